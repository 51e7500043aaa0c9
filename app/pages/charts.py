"""Charts as inline SVG drawn on the server: no JavaScript, nothing loaded from elsewhere.

Every piece of text that reaches the SVG (layer and output names come from the user's model) goes
through ``markupsafe.escape``; elements are built with :func:`el`, never by pasting strings.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

from app.pages.present import (
    candidate_key,
    fmt_bytes,
    fmt_db,
    fmt_interval,
    fmt_ms,
    layers_worst_first,
    sensitivity_db,
)
from worker.engine.labels import candidate_name
from worker.engine.report import AccuracyTargetSpec, Candidate, CandidateConfig, Latency, Layer, OutputAccuracy, Size

ROW = 26
DETAIL_ROW = 16
BAR = 16
TOP = 8
CHAR_W = 7.5  # rough width of one character of the 13-unit label font, to shorten long names
MAX_LAYERS = 40
COLOURS = {"original": "#7c8797", "quantized": "#2364aa", "int8": "#2364aa", "fp32": "#c0661d", "none": "#bbbbbb"}


@dataclass(frozen=True)
class Layout:
    """Sizes in SVG user units; the SVG scales to its box, so these set the proportions and the text size."""

    width: int
    label_w: int
    value_w: int


SMALL = Layout(360, 80, 90)  # two bars, before and after
WIDE = Layout(560, 200, 130)  # one row per layer or output

_ids = itertools.count(1)


def el(tag: str, *children: Markup | str, **attrs: Any) -> Markup:
    """``<tag attrs>children</tag>`` with every attribute value and every plain-str child escaped.

    Attribute names: a trailing underscore is dropped (``class_``), other underscores become dashes.
    """
    parts = [tag]
    for name, value in attrs.items():
        if value is None:
            continue
        parts.append(f'{name.rstrip("_").replace("_", "-")}="{escape(str(value))}"')
    inner = Markup("").join(escape(c) for c in children)
    return Markup("<{}>{}</{}>").format(Markup(" ".join(parts)), inner, Markup(tag))


def _num(x: float) -> str:
    return f"{x:.1f}"


def shorten(text: str, limit: int) -> str:
    """Long layer names keep their start and their end: '/encoder/layers.0/…/MatMul'."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}\u2026{text[-(limit - 1 - half):]}"


@dataclass(frozen=True)
class Bar:
    label: str
    value: float | None  # None: no bar, the text says why
    text: str
    kind: str  # a COLOURS key
    tooltip: str = ""
    detail: str = ""  # a second, smaller line under the bar


def tick_step(top: float, most: int = 6) -> float:
    """A round axis step (1, 2 or 5 times a power of ten) giving at most ``most`` ticks up to ``top``."""
    step = 10.0 ** math.floor(math.log10(top / most)) if top > 0 else 1.0
    for factor in (1, 2, 5, 10):
        if top / (step * factor) <= most:
            return step * factor
    return step * 10  # pragma: no cover - the loop always returns


def bar_chart(title: str, desc: str, bars: list[Bar], layout: Layout = WIDE, *, css: str = "chart",
              legend: list[tuple[str, str]] | None = None, axis: str = "") -> Markup:
    """A horizontal bar chart: label column, bars scaled to the largest value, the value as text.

    Bars of kind 'fp32' are hatched as well as coloured, so they read without colour. With ``axis`` (a unit),
    light grid lines with round values run under the bars.
    """
    uid = f"c{next(_ids)}"
    row_h = ROW + (DETAIL_ROW if any(b.detail for b in bars) else 0)
    top = TOP + (ROW if legend else 0)
    scale_max = max([b.value for b in bars if b.value is not None and b.value > 0] or [1.0])
    step = tick_step(scale_max) if axis else 0.0
    if axis:
        scale_max = step * math.ceil(scale_max / step)
    bottom = top + row_h * len(bars)
    height = bottom + (ROW if axis else 0) + TOP
    span = layout.width - layout.label_w - layout.value_w
    limit = int((layout.label_w - 10) / CHAR_W)
    hatch = el("pattern",
               el("rect", width="6", height="6", fill=COLOURS["fp32"]),
               el("path", d="M-1 1L1 -1M0 6L6 0M5 7L7 5", stroke="#ffffff", stroke_width="1.5"),
               id=f"{uid}-hatch", width="6", height="6", patternUnits="userSpaceOnUse")
    body: list[Markup] = [
        el("title", title, id=f"{uid}-t"),
        el("desc", desc, id=f"{uid}-d"),
        el("defs", hatch),
    ]
    if legend:
        x = float(layout.label_w)
        for kind, text in legend:
            fill = f"url(#{uid}-hatch)" if kind == "fp32" else COLOURS[kind]
            body.append(el("rect", x=_num(x), y=TOP + 4, width="12", height="12", fill=fill))
            body.append(el("text", text, x=_num(x + 16), y=TOP + 15, class_="legend"))
            x += 28 + CHAR_W * len(text)
    if axis:
        ticks = int(round(scale_max / step))
        for k in range(ticks + 1):
            x = layout.label_w + span * k / ticks
            # one segment per row, so the grid never runs through a row's second line of text
            d = "".join(f"M{x:.1f} {top + i * row_h}v{ROW}" for i in range(len(bars)))
            body.append(el("path", d=d, stroke="#dde2e8", fill="none", class_="grid"))
            label = f"{step * k:g}" + (f" {axis}" if k == ticks else "")
            body.append(el("text", label, x=_num(x), y=bottom + 15, text_anchor="middle", class_="tick"))
    for i, b in enumerate(bars):
        y = top + i * row_h
        bar_y = y + (ROW - BAR) // 2
        text_y = bar_y + 13
        row: list[Markup | str] = []
        if b.tooltip:
            row.append(el("title", b.tooltip))
        row.append(el("text", shorten(b.label, limit), x=layout.label_w - 8, y=text_y, text_anchor="end",
                      class_="label"))
        w = 0.0
        if b.value is not None and b.value > 0:
            w = max(1.0, span * b.value / scale_max)
            fill = f"url(#{uid}-hatch)" if b.kind == "fp32" else COLOURS.get(b.kind, COLOURS["quantized"])
            row.append(el("rect", x=layout.label_w, y=bar_y, width=_num(w), height=BAR, fill=fill,
                          class_=f"bar bar-{b.kind}"))
        row.append(el("text", b.text, x=_num(layout.label_w + w + 6), y=text_y, class_="value"))
        if b.detail:
            row.append(el("text", b.detail, x=layout.label_w, y=text_y + DETAIL_ROW + 2, class_="detail"))
        body.append(el("g", *row, class_="row"))
    return el("svg", *body, xmlns="http://www.w3.org/2000/svg", viewBox=f"0 0 {layout.width} {height}",
              role="img", aria_labelledby=f"{uid}-t {uid}-d", class_=css, preserveAspectRatio="xMinYMin meet")


def size_chart(size: Size | None) -> Markup:
    """Original and quantized file size."""
    o, q = (size.original_bytes, size.quantized_bytes) if size else (None, None)
    return bar_chart(
        "Model size", f"original {fmt_bytes(o)}, quantized {fmt_bytes(q)}",
        [Bar("original", o, fmt_bytes(o), "original"), Bar("quantized", q, fmt_bytes(q), "quantized")],
        SMALL, css="chart chart-small",
    )


def latency_chart(latency: Latency | None) -> Markup:
    """Original and quantized p50 latency."""
    o, q = (latency.original_ms_p50, latency.quantized_ms_p50) if latency else (None, None)
    return bar_chart(
        "Latency (p50)", f"original {fmt_ms(o)}, quantized {fmt_ms(q)}",
        [Bar("original", o, fmt_ms(o), "original"), Bar("quantized", q, fmt_ms(q), "quantized")],
        SMALL, css="chart chart-small",
    )


def layer_chart(layers: list[Layer]) -> tuple[Markup, int]:
    """Per-layer SQNR, worst first, layers kept in float hatched; returns the chart and how many it shows."""
    ordered = layers_worst_first(layers)[:MAX_LAYERS]
    bars = []
    for layer in ordered:
        precision = str(layer.precision)
        sqnr = layer.sqnr_db
        # Every lower precision is "quantized" blue; only layers left in fp32 are hatched.
        kind = "fp32" if precision == "fp32" else "int8"
        text = f"{fmt_db(sqnr)} \u00b7 {precision}"
        tip = f"{layer.name} ({layer.op_type}, {precision}): {fmt_db(sqnr)}"
        sens = layer.sensitivity
        # Sensitivity (static reports): what this layer alone in int8 does to the model's outputs.
        detail = f"alone in int8: outputs {fmt_db(sensitivity_db(sens))}" if isinstance(sens, (int, float)) else ""
        bars.append(Bar(str(layer.name), sqnr, text, kind, tip, detail))
    desc = "Signal-to-quantization-noise ratio of each layer's output, lowest (worst) first; higher is better."
    chart = bar_chart("Per-layer SQNR", desc, bars, css="chart chart-wide chart-layers",
                      legend=[("int8", "quantized (int8 / int4 / fp16)"), ("fp32", "kept in float (fp32)")],
                      axis="dB")
    return chart, len(ordered)


def output_chart(outputs: list[OutputAccuracy]) -> Markup:
    """Per-output SQNR, with cosine and max abs error in words under each bar."""
    bars = []
    for o in outputs:
        detail = f"cosine {o.cosine:.5f} \u00b7 max abs error {o.max_abs_error:.3g}" \
            if o.cosine is not None and o.max_abs_error is not None else ""
        name = str(o.name)
        # Bit-identical outputs have no finite SQNR: say so instead of 'n/a', which reads as 'not measured'.
        text = "\u221e (identical)" if o.identical is True else fmt_db(o.sqnr_db)
        ci = fmt_interval(o.sqnr_db_ci, lambda x: f"{x:.1f}")
        tip = f"{name}: {text}" + (f" {ci} dB, 95% interval" if ci else "") + (f"; {o.role} output"
                                                                                if o.role else "")
        bars.append(Bar(name, o.sqnr_db, text, "quantized", tip, detail))
    desc = "Error of each model output, quantized against original: SQNR (higher is better), cosine, max abs error."
    return bar_chart("Per-output error", desc, bars, css="chart chart-wide chart-outputs", axis="dB")


def loss_chart(curve: list[dict[str, Any]], width: int = 640, height: int = 220) -> Markup:
    """Training loss against step, as a polyline with its first and last values written out."""
    points = [(float(p["step"]), float(p["loss"])) for p in curve
              if isinstance(p.get("step"), (int, float)) and isinstance(p.get("loss"), (int, float))]
    if len(points) < 2:
        return Markup("")
    left, right, top, bottom = 56, 16, 16, 36
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y1 = max(ys) or 1.0
    sx = (width - left - right) / ((x1 - x0) or 1.0)
    sy = (height - top - bottom) / y1

    def at(x: float, y: float) -> str:
        return f"{left + (x - x0) * sx:.1f},{height - bottom - y * sy:.1f}"

    line = el("polyline", points=" ".join(at(x, y) for x, y in points), fill="none",
              stroke=COLOURS["quantized"], stroke_width="2")
    axes = el("path", d=f"M{left},{top} V{height - bottom} H{width - right}", fill="none", stroke="#555")
    labels = [
        el("text", f"{ys[0]:.4g}", x=str(left - 4), y=str(height - bottom - ys[0] * sy + 4), text_anchor="end",
           font_size="11"),
        el("text", "0", x=str(left - 4), y=str(height - bottom + 4), text_anchor="end", font_size="11"),
        el("text", f"step {int(x0)}", x=str(left), y=str(height - 8), font_size="11"),
        el("text", f"step {int(x1)}: loss {ys[-1]:.4g}", x=str(width - right), y=str(height - 8),
           text_anchor="end", font_size="11"),
    ]
    return el("svg", el("title", "Training loss"),
              el("desc", "Distillation loss against training step; lower is closer to the float model."),
              axes, line, *labels, viewBox=f"0 0 {width} {height}", role="img", class_="chart chart-loss",
              width="100%")


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size (smaller) and metric (higher), by size."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def pareto_chart(candidates: list[Candidate], target: AccuracyTargetSpec | None, metric: str,
                 chosen: CandidateConfig | None, width: int = 640, height: int = 300) -> Markup:
    """The auto search's candidates: accuracy metric against model size, the target as a dashed line, the
    Pareto front (nothing both smaller and more accurate) joined, the chosen candidate ringed. Candidates
    that met the target are filled; those that missed are hollow."""
    pts = [c for c in candidates if c.size_bytes is not None and c.metric is not None]
    if not pts:
        return Markup("")
    left, right, top, bottom = 64, 16, 16, 40
    xs = [float(c.size_bytes or 0) for c in pts]
    ys = [float(c.metric or 0.0) for c in pts]
    line = target.min if target else None
    y_lo, y_hi = min(ys + ([line] if line is not None else [])), max(ys + ([line] if line is not None else []))
    pad = (y_hi - y_lo) * 0.08 or abs(y_hi) * 0.01 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = max(xs) * 1.05
    sx = (width - left - right) / x_hi
    sy = (height - top - bottom) / (y_hi - y_lo)

    def px(x: float) -> float:
        return left + x * sx

    def py(y: float) -> float:
        return height - bottom - (y - y_lo) * sy

    body: list[Markup] = [
        el("title", f"Candidates: {metric} against size"),
        el("desc", f"Each candidate the auto search measured, {metric} (higher is better) against model size "
           "(smaller is better); filled points met the target, the ringed one was chosen."),
        el("path", d=f"M{left},{top} V{height - bottom} H{width - right}", fill="none", stroke="#555"),
        el("text", "0", x=str(left), y=str(height - bottom + 16), text_anchor="middle", class_="tick"),
        el("text", fmt_bytes(int(x_hi)), x=str(width - right), y=str(height - bottom + 16), text_anchor="end",
           class_="tick"),
        el("text", "model size", x=_num((left + width - right) / 2), y=str(height - 6), text_anchor="middle",
           class_="tick"),
        el("text", f"{y_hi:.4g}", x=str(left - 4), y=_num(top + 4), text_anchor="end", class_="tick"),
        el("text", f"{y_lo:.4g}", x=str(left - 4), y=_num(height - bottom), text_anchor="end", class_="tick"),
        el("text", metric, x=str(left + 4), y=_num(top + 10), class_="tick"),
    ]
    if line is not None:
        body.append(el("path", d=f"M{left},{py(float(line)):.1f} H{width - right}", stroke="#c0661d",
                       stroke_dasharray="5 4", fill="none", class_="target"))
        body.append(el("text", f"target {line:g}", x=str(width - right - 4), y=_num(py(float(line)) - 4),
                       text_anchor="end", class_="tick"))
    front = _pareto_front(list(zip(xs, ys, strict=True)))
    if len(front) > 1:
        body.append(el("polyline", points=" ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in front), fill="none",
                       stroke="#7c8797", stroke_width="1.5", class_="front"))
    chosen_key = candidate_key(chosen) if chosen else None
    for c, x, y in zip(pts, xs, ys, strict=True):
        met = bool(c.met_target)
        key = candidate_key(c)
        label = candidate_label(c)
        tip = f"{label}: {metric} {y:.6g}, {fmt_bytes(int(x))}" + ("" if met else " (missed the target)")
        dot = el("circle", el("title", tip), cx=_num(px(x)), cy=_num(py(y)), r="5",
                 fill=COLOURS["quantized"] if met else "#ffffff", stroke=COLOURS["quantized"], stroke_width="2",
                 class_="point point-met" if met else "point point-missed")
        body.append(dot)
        if key == chosen_key:
            body.append(el("circle", cx=_num(px(x)), cy=_num(py(y)), r="10", fill="none", stroke="#1d7a3a",
                           stroke_width="2", class_="chosen"))
            body.append(el("text", f"chosen: {shorten(label, 40)}", x=_num(min(px(x) + 14, width - right - 160)),
                           y=_num(py(y) - 12), class_="label"))
    return el("svg", *body, xmlns="http://www.w3.org/2000/svg", viewBox=f"0 0 {width} {height}", role="img",
              class_="chart chart-pareto", preserveAspectRatio="xMinYMin meet")


def candidate_label(c: CandidateConfig) -> str:
    """'int8_static (entropy) + 2 layers in float'."""
    return candidate_name(str(c.recipe), c.options, c.excluded_nodes, c.activations_16bit, c.blocks)
