"""The client commands of ``lowbit``: submit, status, download, report, jobs, cancel.

Results go to stdout (a table, or JSON with ``--json``); progress bars go to stderr, and only when stderr is a
terminal, so the output fits pipes. Exit status: 0 done; 1 the job failed or was cancelled (its error code and
message on stderr); 2 the server refused the request, or a usage mistake; 3 the server could not be reached,
a download did not match its checksum, or ``--timeout`` passed; 4 an unexpected error inside lowbit
(``lowbit: error [internal_error]: ...``; LOWBIT_DEBUG=1 prints the traceback too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeGuard

from app.client.errors import (
    ChecksumMismatch,
    JobCancelled,
    JobFailed,
    LowbitClientError,
    ServerUnreachable,
    WaitTimeout,
)
from app.client.recipes import RECIPE_NAMES, RECIPE_TAGS

if TYPE_CHECKING:
    from app.client.core import Client, Job

EXIT_OK, EXIT_JOB_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_INTERNAL = 0, 1, 2, 3, 4
# Uploads and downloads smaller than this finish too fast for a bar to help.
BAR_MIN_BYTES = 1 << 20


# -- progress on stderr ------------------------------------------------------------------------------------------

class Progress:
    """One redrawn status line on stderr, only when stderr is a terminal (never with --json)."""

    def __init__(self, enabled: bool | None = None, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.on = self.stream.isatty() if enabled is None else enabled
        self.width = max(40, shutil.get_terminal_size((100, 20)).columns - 1)
        self.active = False
        self.last = 0.0

    def _draw(self, text: str, force: bool = False) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        self.stream.write("\r" + text[: self.width].ljust(self.width))
        self.stream.flush()
        self.active = True

    def note(self, text: str) -> None:
        if not self.on:
            return
        self.end()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.active:
            self.stream.write("\n")
            self.stream.flush()
            self.active = False

    @staticmethod
    def bar(fraction: float, width: int = 28) -> str:
        filled = int(round(width * max(0.0, min(1.0, fraction))))
        return "[" + "#" * filled + "-" * (width - filled) + "]"

    def transfer(self, label: str, done: int, total: int) -> None:
        if total < BAR_MIN_BYTES:
            return
        frac = done / total if total else 1.0
        self._draw(f"{label:<24} {self.bar(frac)} {frac * 100:5.1f} %  {fmt_bytes(done)} / {fmt_bytes(total)}",
                   force=done >= total)
        if done >= total:
            self.end()

    def job(self, job: Job) -> None:
        if job.status == "queued":
            # No live worker on its queue (the server says why): it will not start by waiting.
            what = f"queued, no live worker on {job.raw.get('queue')}" if job.raw.get("waiting_reason") \
                else "queued, waiting for a worker"
        elif job.status == "running":
            what = job.stage or "running"
        else:
            what = job.status
        self._draw(f"job {job.id[:8]}  {what:<28} {self.bar(job.progress / 100)} {job.progress:3d} %",
                   force=True)


# -- formatting --------------------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.2f} %"


def _seconds(job: dict[str, Any]) -> str:
    try:
        start = datetime.fromisoformat(str(job["started_at"]).replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(job["finished_at"]).replace("Z", "+00:00"))
    except (KeyError, TypeError, ValueError):
        return ""
    return f" in {(end - start).total_seconds():.1f} s"


def _dict(value: Any) -> dict[str, Any]:
    """A report section, or {} where a partial report lacks it (or holds something else there)."""
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ReportSections:
    """The report's sections the summary reads, each of the right kind ({} or [] where a report lacks it).

    The client reads the report as the JSON GET /report serves, not through worker.engine.report.Report: it
    imports httpx only (no pydantic, nothing of the server or engine: tests/test_boundaries.py), so that it
    installs and starts light. This is its one reader of the report's top level; the names are Report's
    fields (tests/app/test_report_contract.py checks it), so a renamed section fails a test, not a user."""

    recipe: str | None
    size: dict[str, Any]
    accuracy: dict[str, Any]
    latency: dict[str, Any]
    accuracy_target: dict[str, Any]
    auto: dict[str, Any]
    chosen: dict[str, Any]
    best: dict[str, Any]
    candidates: list[dict[str, Any]] | None  # None: not an auto search's report
    warnings: list[str]

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ReportSections:
        """``body``: a report's JSON; a partial one (older server, failed auto search) reads as empty sections."""
        candidates = body.get("candidates")
        recipe = body.get("recipe")
        return cls(
            recipe=recipe if isinstance(recipe, str) else None,
            size=_dict(body.get("size")), accuracy=_dict(body.get("accuracy")), latency=_dict(body.get("latency")),
            accuracy_target=_dict(body.get("accuracy_target")), auto=_dict(body.get("auto")),
            chosen=_dict(body.get("chosen")), best=_dict(body.get("best")),
            candidates=[c for c in candidates or [] if isinstance(c, dict)] if "candidates" in body else None,
            warnings=[str(w) for w in body.get("warnings") or []],
        )


def _num(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ci_text(value: Any, fmt: Callable[[float], str]) -> str:
    """' (lo … hi)' for a report's 95% interval ``[lo, hi]``; '' where the report has none (older servers)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_num(x) for x in value):
        return f" ({fmt(float(value[0]))} \u2026 {fmt(float(value[1]))})"
    return ""


def signed_end(x: float) -> str:
    """'+1.6', '-3.1', and '0.0' for an end that rounds to zero."""
    text = f"{x:+.1f}"
    return text[1:] if float(text) == 0 else text


def latency_change(lat: dict[str, Any]) -> str:
    """'2.57x faster (2.4 … 2.7)', '1.40x slower (1.3 … 1.5)', or 'no measurable speed-up (0.93 … 1.08)' when
    the speed-up's interval holds 1.0."""
    speed = lat.get("speedup")
    if not _num(speed) or speed <= 0:
        return ""
    ci = lat.get("speedup_ci")
    if lat.get("speedup_measurable") is False:
        return "no measurable speed-up" + ci_text(ci, lambda x: f"{x:.2f}")
    # one decimal, or two where an end would print as 1.0 (a measured 1.02x must not read as 'no change')
    def factor(ends: Any) -> str:
        if not ci_text(ends, str):
            return ""
        digits = 2 if any(f"{float(x):.1f}" == "1.0" for x in ends) else 1
        return ci_text(ends, lambda x: f"{x:.{digits}f}")

    if speed >= 1:
        return f"{speed:.2f}x faster" + factor(ci)
    # a slow-down's interval as slow-down factors: the ends swap
    slow = [1 / ci[1], 1 / ci[0]] if isinstance(ci, list) and ci_text(ci, str) and min(ci) > 0 else None
    return f"{1 / speed:.2f}x slower" + factor(slow)


def output_line(out: dict[str, Any]) -> str:
    """One output's figures with their intervals, then its role: 'output logits: cosine 0.9994 (…), …; a
    classification output (inferred)'."""
    parts = []
    if _num(out.get("cosine")):
        parts.append(f"cosine {out['cosine']}" + ci_text(out.get("cosine_ci"), lambda x: f"{x:.4f}"))
    if out.get("identical") is True:
        parts.append("SQNR inf (bit-identical)")
    elif _num(out.get("sqnr_db")):
        parts.append(f"SQNR {out['sqnr_db']} dB" + ci_text(out.get("sqnr_db_ci"), lambda x: f"{x:.1f}"))
    elif out.get("sqnr_note"):
        parts.append(f"SQNR {out['sqnr_note']}")
    for key, label in (("top1_agreement", "top-1 agreement"), ("sequence_agreement", "sequence agreement"),
                       ("ctc_sequence_agreement", "CTC sequence agreement"),
                       ("multilabel_f1", "multi-label F1"), ("neighbour_agreement", "neighbour agreement")):
        if _num(out.get(key)):
            parts.append(f"{label} {_pct(out[key])}" + ci_text(out.get(key + "_ci"), lambda x: f"{x * 100:.1f}"))
    article = "an" if str(out.get("role"))[:1] in "aeiou" else "a"
    role = f"; {article} {out['role']} output ({out.get('role_source') or '?'})" if out.get("role") else ""
    return f"  output {out.get('name')}: " + ", ".join(parts) + " (quantized vs original)" + role


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _candidate_name(c: dict[str, Any]) -> str:
    """'int8_static (minmax) + 2 layers in float' for an auto report's candidate row (or its chosen/best entry).
    The wording of worker.engine.labels.candidate_name, which the client cannot import (it imports nothing of the
    engine); tests/app/test_auto_api.py checks the two agree."""
    options = _dict(c.get("options"))
    method = options.get("method")
    smooth = f", SmoothQuant {options.get('smoothquant_alpha')}" if options.get("smoothquant") == "on" else ""
    text = (str(c.get("recipe", "?")) + (" + int8 activations" if options.get("int8_activations") else "")
            + (" + 4-bit embeddings" if options.get("quantize_embeddings") else "")
            + (f" ({method}{smooth})" if method else "") + (" + learned rounding" if options.get("adaround") == "on"
                                                            else ""))
    eight = int(options.get("int8_most_sensitive") or 0)
    text += f" + {_count(eight, 'layer')} in 8 bits" if eight else ""
    wide, blocks, kept = (len(c.get(k) or []) for k in ("activations_16bit", "blocks", "excluded_nodes"))
    text += f" + {_count(wide, 'activation')} in 16 bits" if wide else ""
    if blocks:
        return text + f" + {_count(blocks, 'residual block')} in float"
    return text + (f" + {_count(kept, 'layer')} in float" if kept else "")


def _speed(speedup: Any) -> str:
    if not _num(speedup) or speedup <= 0:
        return "speed not measured"
    return f"{speedup:.2f}x faster than fp32" if speedup >= 1 else f"{1 / speedup:.2f}x slower than fp32"


def _auto_lines(report: ReportSections) -> list[str]:
    """An auto job's search: what was chosen (and how fast it is against fp32), or why nothing was."""
    search = report.auto
    rows = report.candidates or []
    failed = [c for c in rows if c.get("status") == "failed"]
    done = sum(1 for c in rows if c.get("status") == "done")
    lines = [f"  auto: {len(rows)} candidates, {done} measured, {len(failed)} failed, "
             f"{sum(1 for c in rows if c.get('status') == 'skipped')} skipped"]
    chosen, best = report.chosen, report.best
    if chosen:
        slower = " (SLOWER than the fp32 model)" if search.get("chosen_slower_than_fp32") else ""
        lines.append(f"  chosen: {_candidate_name(chosen)}, {_speed(search.get('chosen_speedup'))}{slower}")
    elif best:
        lines.append(f"  no candidate met the target; closest: {_candidate_name(best)}, "
                     f"{best.get('distance_to_target')} short")
    else:
        lines.append("  no candidate could be measured")
    for c in failed:
        error = _dict(c.get("error"))
        lines.append(f"  candidate {_candidate_name(c)} failed: [{error.get('code', '?')}] {error.get('message', '')}")
    return lines


def summary_lines(job: dict[str, Any], body: Mapping[str, Any]) -> list[str]:
    """The before → after table of a finished job: size, accuracy, latency (each only when the report has it:
    an auto job whose every candidate failed has none of them), and an auto job's choice. ``body``: the report's
    JSON."""
    report = ReportSections.of(body)
    lines = [f"job {job['id']} {job['status']}: {report.recipe or job.get('recipe')}{_seconds(job)}", ""]
    rows: list[tuple[str, str, str, str]] = []
    size = report.size
    if _num(size.get("original_bytes")) and _num(size.get("quantized_bytes")) and size["original_bytes"] > 0 \
            and size["quantized_bytes"] > 0:
        ratio = size["quantized_bytes"] / size["original_bytes"]
        rows.append(("size", fmt_bytes(size["original_bytes"]), fmt_bytes(size["quantized_bytes"]),
                     f"{1 / ratio:.2f}x smaller" if ratio <= 1 else f"{ratio:.2f}x larger"))
    acc = report.accuracy
    labels = _dict(acc.get("labels"))
    if labels:
        delta = labels.get("delta")
        rows.append(("label accuracy", _pct(labels.get("original")), _pct(labels.get("quantized")),
                     f"{delta * 100:+.2f} pt" + ci_text(labels.get("delta_ci"), lambda x: signed_end(x * 100))
                     if _num(delta) else ""))
    lat = report.latency
    if _num(lat.get("original_ms_p50")) and _num(lat.get("quantized_ms_p50")):
        rows.append(("latency p50", f"{lat['original_ms_p50']:.4g} ms", f"{lat['quantized_ms_p50']:.4g} ms",
                     latency_change(lat)))
    if rows:
        lines.append(f"  {'':<16}{'before':>12}      {'after':<12}  change")
        for name, before, after, change in rows:
            lines.append(f"  {name:<16}{before:>12}  ->  {after:<12}  {change}")
    for out in [o for o in acc.get("outputs") or [] if isinstance(o, dict)]:
        lines.append(output_line(out))
    target = report.accuracy_target
    if target:
        bound = f"min {target['min']}" if target.get("min") is not None else f"max_drop {target.get('max_drop')}"
        met = {True: "met", False: "NOT met"}.get(target["met"], "not measurable") \
            if isinstance(target.get("met"), bool) else "not measurable"
        decided = f", {target['confidence'] * 100:g}% interval's lower end {target['bound']}" \
            if _num(target.get("confidence")) and _num(target.get("bound")) else ""
        lines.append(f"  accuracy target {target.get('metric')} {bound}: {met} (value {target.get('value')}{decided})")
    if report.recipe == "auto" and report.candidates is not None:
        lines.extend(_auto_lines(report))
    if acc:
        source = {"eval_set": "samples of the evaluation set",
                  "calibration_holdout": "held-out calibration samples"}.get(str(acc.get("source")), "samples")
        threads = lat.get("threads")
        lines.append(f"  accuracy measured on {acc.get('samples')} {source}"
                     + (f"; latency on {lat.get('provider')}, batch {lat.get('batch_size')}, "
                        f"{threads} thread{'' if threads == 1 else 's'}" if lat else "")
                     + (f", {lat['runs']} {'interleaved ' if lat.get('order') == 'interleaved' else ''}runs"
                        if _num(lat.get("runs")) and lat["runs"] > 0 else "")
                     + ("; intervals are 95%" if ci_text(labels.get("delta_ci"), str)
                        or ci_text(lat.get("speedup_ci"), str) else ""))
    for w in report.warnings:
        lines.append(f"  warning: {w}")
    return lines


def default_output(model: Path, recipe: str) -> Path:
    """model.onnx + int8_static -> ./model.int8.onnx"""
    stem = model.name.rsplit(".", 1)[0] if "." in model.name else model.name
    return Path.cwd() / f"{stem}.{RECIPE_TAGS.get(recipe, recipe)}.onnx"


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _error(exc: LowbitClientError, as_json: bool, job: Job | None = None) -> int:
    if job is not None and job.status in ("failed", "cancelled"):
        print(f"lowbit: job {job.id} {job.status}" + (f" while {job.stage}" if job.stage else ""), file=sys.stderr)
    print(f"lowbit: error [{exc.code}]: {exc.message}", file=sys.stderr)
    if as_json:
        _print_json({"error": {"code": exc.code, "message": exc.message}, "job": job.raw if job else None})
    if isinstance(exc, JobFailed | JobCancelled):
        return EXIT_JOB_FAILED
    if isinstance(exc, ServerUnreachable | ChecksumMismatch | WaitTimeout):
        return EXIT_UNREACHABLE
    return EXIT_REFUSED


def internal_error(exc: BaseException, as_json: bool = False) -> int:
    """An exception nobody expected (a lowbit bug, or an environment problem): one line on stderr instead of a
    traceback, which LOWBIT_DEBUG=1 prints as well."""
    if os.environ.get("LOWBIT_DEBUG"):
        traceback.print_exception(exc)
        hint = ""
    else:
        hint = " (set LOWBIT_DEBUG=1 to see the traceback)"
    text = " ".join(str(exc).split())[:500]
    message = f"unexpected {type(exc).__name__}" + (f": {text}" if text else "") + \
        f"; this is a lowbit problem, please report it{hint}"
    print(f"lowbit: error [internal_error]: {message}", file=sys.stderr)
    if as_json:
        _print_json({"error": {"code": "internal_error", "message": message}, "job": None})
    return EXIT_INTERNAL


def parse_option(text: str) -> tuple[str, Any]:
    """``--option KEY=VALUE``: the value as JSON when it parses, else the text itself."""
    if "=" not in text:
        raise LowbitClientError(f"--option expects KEY=VALUE, got {text!r}", code="invalid_option")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _client(args: argparse.Namespace) -> Client:
    # lazy: httpx brings rich, click and pygments (20 MB), which `lowbit quantize`, serve and worker never use
    from app.client.core import Client

    return Client(args.server, args.api_key)


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except LowbitClientError as exc:
            return _error(exc, args.json, getattr(exc, "job", None))
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        except BrokenPipeError:  # `lowbit jobs | head`: the reader is gone, and that is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except Exception as exc:  # a bug of ours, or a server answer we did not expect: no traceback
            return internal_error(exc, args.json)
    return run


# -- commands ----------------------------------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    progress = Progress(enabled=False if args.json else None)
    options = dict(parse_option(o) for o in args.option or [])
    target = None
    if args.accuracy_target:
        try:
            target = json.loads(args.accuracy_target)
        except json.JSONDecodeError as exc:
            raise LowbitClientError(f"--accuracy-target is not JSON: {exc}", code="invalid_option") from exc
    model = Path(args.model)
    output = Path(args.output) if args.output else default_output(model, args.recipe)
    if not args.no_wait and not (output if output.is_dir() else output.parent).is_dir():
        raise LowbitClientError(f"cannot write the quantized model to {output}: no such folder",
                                code="invalid_output")
    submitted: list[Job] = []

    def on_submit(job: Job) -> None:
        submitted.append(job)
        if not args.no_wait:
            progress.note(f"job {job.id} submitted; follow it elsewhere with: lowbit status {job.id}")

    def on_upload(label: str, done: int, total: int) -> None:
        progress.transfer(f"uploading {label}", done, total)

    with _client(args) as client:
        try:
            result = client.quantize(
                model, calib=args.calib, eval=args.eval, recipe=args.recipe, options=options, accuracy_target=target,
                callback_url=args.callback_url, device=args.device, wait=not args.no_wait, timeout=args.timeout,
                on_upload=on_upload, on_submit=on_submit, on_job=progress.job)
        except KeyboardInterrupt:
            progress.end()
            if submitted:
                print(f"lowbit: interrupted; job {submitted[0].id} keeps running (lowbit status {submitted[0].id}, "
                      f"lowbit cancel {submitted[0].id})", file=sys.stderr)
            return 130
        finally:
            progress.end()
        if args.no_wait:
            if args.json:
                _print_json(result.job.raw)
            else:
                print(result.job.id)
            return EXIT_OK
        dl = result.download(output, on_progress=lambda label, d, t: progress.transfer(f"downloading {label}", d, t))
    if args.json:
        _print_json({"job": result.job.raw, "report": result.report,
                     "artifact": {"path": str(dl.path), "sha256": dl.sha256, "size_bytes": dl.size_bytes}})
    else:
        for line in summary_lines(result.job.raw, result.report or {}):
            print(line)
        print(f"\nwrote {dl.path} ({fmt_bytes(dl.size_bytes)}, sha256 {dl.sha256})")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(client.resolve_job_id(args.job_id))
    if args.json:
        _print_json(job.raw)
        return EXIT_OK
    line = f"{job.id}  {job.status}"
    if job.status == "running":
        line += f"  {job.stage or ''} {job.progress} %"
    if job.raw.get("waiting_reason"):
        line += f"  ({job.raw['waiting_reason']})"
    if job.error:
        line += f"  [{job.error.code}] {job.error.message}"
    print(line)
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    progress = Progress(enabled=False if args.json else None)
    with _client(args) as client:
        dl = client.download(client.resolve_job_id(args.job_id), Path(args.output) if args.output else Path.cwd(),
                             on_progress=lambda label, d, t: progress.transfer(f"downloading {label}", d, t))
    progress.end()
    if args.json:
        _print_json({"path": str(dl.path), "sha256": dl.sha256, "size_bytes": dl.size_bytes})
    else:
        print(f"wrote {dl.path} ({fmt_bytes(dl.size_bytes)}, sha256 {dl.sha256})")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job_id = client.resolve_job_id(args.job_id)
        report = client.report(job_id)
        job = client.job(job_id) if not args.json else None
    if args.json:
        _print_json(report)
    else:
        assert job is not None
        for line in summary_lines(job.raw, report):
            print(line)
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        items, cursor = client.jobs(args.status, args.limit, args.cursor)
    if args.json:
        _print_json({"items": [j.raw for j in items], "next_cursor": cursor})
        return EXIT_OK
    print(f"{'ID':<36}  {'STATUS':<9}  {'RECIPE':<16}  {'PROGRESS':<18}  CREATED")
    for j in items:
        prog = f"{j.stage or ''} {j.progress} %" if j.status == "running" else (j.error.code if j.error else "")
        print(f"{j.id:<36}  {j.status:<9}  {j.recipe:<16}  {prog:<18}  {j.created_at[:19].replace('T', ' ')}")
    if cursor:
        print(f"more: lowbit jobs --cursor {cursor}", file=sys.stderr)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(client.resolve_job_id(args.job_id))
    if args.json:
        _print_json(job.raw)
    else:
        print(f"{job.id}  {job.status}" + ("" if job.finished else " (stops at its next progress check)"))
    return EXIT_OK


JOB_ID_HELP = "the job's id, or its first 8 characters or more (as the job pages show it)"


def add_commands(sub: Any) -> None:
    """Register the client commands on the ``lowbit`` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", help="the lowbit server's URL (default: LOWBIT_SERVER, the client config file, "
                                         "or http://127.0.0.1:8000)")
    common.add_argument("--api-key", help="API key, sent as 'Authorization: Bearer KEY' (default: LOWBIT_API_KEY "
                                          "or the client config file)")
    common.add_argument("--json", action="store_true", help="print JSON on stdout instead of text")

    sp = sub.add_parser("submit", parents=[common], help="upload a model and data, quantize it on a server, "
                        "follow it and download the result",
                        description="Upload MODEL and its data (files the server already has are not sent again), "
                        "submit a job, follow its progress, print the before -> after summary and download the "
                        "quantized model, verified against its SHA-256.")
    sp.add_argument("model", help="the model file (.onnx)")
    sp.add_argument("--calib", help="calibration data (.npz, one array per model input)")
    sp.add_argument("--eval", help="evaluation data (.npz, labels optional)")
    # Not argparse choices: the server decides which recipes it runs (and refuses others with unknown_recipe).
    sp.add_argument("--recipe", default="int8_static",
                    help=f"one of {', '.join(RECIPE_NAMES)} (default int8_static)")
    sp.add_argument("--option", action="append", metavar="KEY=VALUE",
                    help="recipe option (JSON value), repeatable, e.g. --option method=entropy")
    sp.add_argument("--accuracy-target", metavar="JSON",
                    help='e.g. \'{"metric": "label_accuracy", "max_drop": 0.01}\'')
    sp.add_argument("--callback-url", help="http(s) URL that gets a signed POST when the job finishes")
    sp.add_argument("--device", choices=["cpu", "gpu"], help="run on cpu or gpu workers (default: the server's)")
    sp.add_argument("-o", "--output", help="where to write the quantized model (default: ./MODEL.int8.onnx and so "
                                           "on, after the recipe)")
    sp.add_argument("--no-wait", action="store_true", help="print the job id once submitted and exit")
    sp.add_argument("--timeout", type=float, help="give up waiting after this many seconds (the job keeps running)")
    sp.set_defaults(func=_guarded(cmd_submit))

    st = sub.add_parser("status", parents=[common], help="a job's status, stage and progress")
    st.add_argument("job_id", help=JOB_ID_HELP)
    st.set_defaults(func=_guarded(cmd_status))

    dp = sub.add_parser("download", parents=[common], help="download a job's quantized model (sha256-verified)")
    dp.add_argument("job_id", help=JOB_ID_HELP)
    dp.add_argument("-o", "--output", help="file or folder (default: the server's file name, here)")
    dp.set_defaults(func=_guarded(cmd_download))

    rp = sub.add_parser("report", parents=[common], help="a finished job's report (summary, or all of it as JSON)")
    rp.add_argument("job_id", help=JOB_ID_HELP)
    rp.set_defaults(func=_guarded(cmd_report))

    jp = sub.add_parser("jobs", parents=[common], help="list jobs, newest first")
    jp.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    jp.add_argument("--limit", type=int, default=20)
    jp.add_argument("--cursor", help="next_cursor of the previous page")
    jp.set_defaults(func=_guarded(cmd_jobs))

    cp = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cp.add_argument("job_id", help=JOB_ID_HELP)
    cp.set_defaults(func=_guarded(cmd_cancel))
