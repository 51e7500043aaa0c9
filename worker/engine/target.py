"""An accuracy target (``{"metric": ..., "min": x}`` or ``{"metric": ..., "max_drop": x}``): checked, measured
in a run's report, and how far a run is from it. auto searches for a candidate that meets it; every other recipe
reports against it (``QuantizeConfig.accuracy_target``)."""

from __future__ import annotations

from typing import Any

from worker.engine.errors import EngineError


def check_target(target: dict[str, Any] | None) -> dict[str, Any]:
    if not target or not target.get("metric") or (target.get("min") is None) == (target.get("max_drop") is None):
        raise EngineError(
            "accuracy_target_required",
            "recipe auto needs an accuracy_target: {\"metric\": "
            "\"label_accuracy|top1_agreement|multilabel_f1|cosine|sqnr_db\", \"min\": x} or "
            "{\"metric\": ..., \"max_drop\": x}, optionally with \"time_budget_s\"",
        )
    if target.get("confidence") is not None and target["confidence"] != 0.95:
        raise EngineError(
            "invalid_accuracy_target",
            "accuracy_target.confidence can only be 0.95 (reports carry 95% bootstrap intervals)",
        )
    return target


def measure(target: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The target's metric in a run's report: ``{value, original, met}``. Higher is better for every metric;
    the worst output counts. An exact reproduction has no finite SQNR and meets any minimum.

    With ``"confidence": 0.95`` the target is met only when the 95% interval's lower bound meets it (for
    max_drop on label accuracy: the lower bound of the change's interval), and ``bound`` says which value
    decided."""
    metric = target["metric"]
    acc = report["accuracy"]
    confident = target.get("confidence") is not None
    original: float | None
    bound: float | None = None
    if metric == "label_accuracy":
        labels = acc.get("labels")
        value = labels["quantized"] if labels else None
        original = labels["original"] if labels else None
        if confident and labels:
            if target.get("min") is not None:
                bound = (labels.get("quantized_ci") or [None])[0]
            elif labels.get("delta_ci"):
                # the drop's upper end, expressed as the quantized value it implies
                bound = None if original is None else original + labels["delta_ci"][0]
    else:
        outputs = acc["outputs"]
        if metric == "sqnr_db" and outputs and all(
                o.get("sqnr_db") is None and o.get("max_abs_error") == 0 for o in outputs):
            return {"value": None, "original": None, "met": True, "note": "every output reproduced exactly"}
        vals = [o[metric] for o in outputs if o.get(metric) is not None]
        value = min(vals) if vals else None
        original = {"cosine": 1.0, "top1_agreement": 1.0, "multilabel_f1": 1.0}.get(metric)
        if confident:
            lows = [o[f"{metric}_ci"][0] for o in outputs if o.get(f"{metric}_ci")]
            bound = min(lows) if lows and len(lows) == len(vals) else None
    decide = bound if confident else value
    met: bool | None = None
    if decide is not None:
        if target.get("min") is not None:
            met = decide >= float(target["min"])
        elif original is not None:
            met = (original - decide) <= float(target["max_drop"])
    elif confident and value is not None:
        met = False  # no interval (too few samples): a confident claim cannot be made
    out: dict[str, Any] = {"value": value, "original": original, "met": met}
    if confident:
        out.update(confidence=float(target["confidence"]), bound=bound)
    return out


def distance(target: dict[str, Any], value: float | None, original: float | None) -> float | None:
    """How far ``value`` is from meeting the target, in the metric's units (0 when met)."""
    if value is None:
        return None
    if target.get("min") is not None:
        return round(max(0.0, float(target["min"]) - value), 6)
    if original is None:
        return None
    return round(max(0.0, (original - value) - float(target["max_drop"])), 6)


def evaluate_target(target: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """A single recipe's ``accuracy_target`` (pipeline.run, with ``QuantizeConfig.accuracy_target``): the target,
    the measured value and whether it was met. Those recipes do not search for the target; they report against
    it. (auto reports ``target_result`` instead, decided on its confirmation samples.)"""
    measured = measure(target, report)
    extra = {"note": measured["note"]} if "note" in measured else {}
    return {**target, "value": measured["value"], "met": measured["met"], **extra}
