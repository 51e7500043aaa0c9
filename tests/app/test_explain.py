"""'How to read this report' (app.pages.explain) and the interval formatting behind it: every paragraph is built
from the report it explains, so each test checks that this report's numbers, not boilerplate, come out."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from app.examples import REPORT_EXAMPLE
from app.pages import explain, present
from worker.engine.report import STORED, Latency, Report


def _read(report: dict[str, Any]) -> dict[str, str]:
    # Hand-made reports, often partial: read as a stored report is (Report.from_stored).
    return {p.key: p.text for p in explain.how_to_read(Report.from_stored(report))}


def _lat(latency: dict[str, Any]) -> Latency:
    """A hand-made latency section, read as a stored one (keys it lacks are None)."""
    return Latency.model_validate(latency, context={STORED: True})


def _report(**changes: Any) -> dict[str, Any]:
    report = copy.deepcopy(REPORT_EXAMPLE)
    report.update(changes)
    return report


def _int4(algorithm: str | None, calibration: dict[str, Any] | None, source: str) -> dict[str, Any]:
    report = _report(recipe="int4_weight_only", calibration=calibration,
                     options={"block_size": 32, **({"algorithm": algorithm} if algorithm else {})})
    report["accuracy"] = {**report["accuracy"], "source": source, "labels": None}
    return report


def test_int4_without_calibration_is_called_risky() -> None:
    read = _read(_int4(None, None, "synthetic"))  # no algorithm, no data: the engine rounds to nearest
    assert read["calibration"].startswith("No calibration: int4_weight_only stores the weights in 4 bits")
    assert "algorithm rtn rounds each weight to the nearest of 16 levels of its block of 32 weights" \
        in read["calibration"]
    assert read["int4"].startswith("4-bit without calibration is risky") and "and rtn chose them" in read["int4"]
    assert "This job's figures come from synthetic inputs" in read["int4"]

    read = _read(_int4("hqq", None, "eval_set"))
    assert "algorithm hqq fits each block's scale" in read["calibration"] and "and hqq chose them" in read["int4"]
    assert "synthetic" not in read["int4"]

    read = _read(_int4("gptq", {"method": "gptq", "samples": 128, "seconds": 3.5, "algorithm": "gptq"},
                       "calibration_holdout"))
    assert "int4" not in read
    assert read["calibration"].startswith("Calibration: ") and "used 128 calibration samples" in read["calibration"]
    assert "(3.5 s)" in read["calibration"]


@pytest.mark.parametrize(("calibration", "expected"), [
    ({"method": "percentile", "samples": 256, "seconds": 1.5, "tensors": 40, "percentile": 99.99},
     "calibrated 40 tensors with the percentile method on 256 samples (1.5 s): the range holding 99.99 % of the "
     "values seen"),
    ({"method": "minmax", "samples": 32, "seconds": 0.2},
     "with the minmax method on 32 samples (0.2 s): the range from the smallest to the largest value seen"),
])
def test_calibration_names_this_jobs_method_and_samples(calibration: dict[str, Any], expected: str) -> None:
    assert expected in _read(_report(calibration=calibration))["calibration"]


def test_recipes_without_calibration_and_qat() -> None:
    assert _read(_report(recipe="int8_dynamic", calibration=None))["calibration"].startswith(
        "This job did not calibrate: int8_dynamic")
    read = _read(_report(recipe="qat_int8", training={"steps": 200, "seconds": 12.5},
                         calibration={"method": "minmax", "samples": 64}))
    assert read["recipe"].startswith("This job used quantization-aware training (QAT): the model was fine-tuned "
                                     "for 200 steps")
    assert "minmax method on 64 samples; then 200 training steps (12.5 s)" in read["calibration"]
    assert "post-training quantization (PTQ, recipe int8_static)" in _read(_report())["recipe"]
    # auto explains the candidate it chose
    auto = _report(recipe="auto", chosen={"recipe": "int8_dynamic", "options": {}})
    assert "recipe int8_dynamic" in _read(auto)["recipe"] and "did not calibrate" in _read(auto)["calibration"]


def test_which_figure_to_trust_follows_the_role() -> None:
    report = _report()
    report["accuracy"]["labels"] = None
    report["accuracy"]["outputs"] = [
        {"name": "probs", "role": "classification", "role_source": "inferred", "role_reason": "name 'probs'",
         "cosine": 0.9995, "sqnr_db": 31.0, "top1_agreement": 0.975, "top1_agreement_ci": [0.95, 0.991667]},
        {"name": "depth", "role": "regression", "role_source": "declared", "cosine": 0.99991, "sqnr_db": 30.0},
    ]
    read = _read(report)
    assert read["trust-0"] == (
        "Output probs is a classification output (inferred: name 'probs'): trust top-1 agreement, the share of "
        "samples whose top class is the same as the original model's: 97.5 % (95.0 \u2026 99.2 %). It does not say "
        "whether either answer was right; an evaluation set with labels adds label accuracy.")
    assert read["trust-1"].startswith("Output depth is a regression output (declared in the job's options): trust "
                                      "SQNR 30.0 dB and cosine 0.99991, since it has no classes to agree on")
    # 30 dB: the error's RMS is 10^(-30/20) = 3.2 % of the output's
    assert "The worst here, 30.0 dB (depth), means an error about 3.2 % of the output's size" in read["figures"]
    # without labels the interval sentence uses the top-1 agreement
    assert "the top-1 agreement of probs is between 95.0 % and 99.2 % with 95% confidence" in read["intervals"]


def test_multilabel_outputs_are_read_by_their_f1() -> None:
    report = _report()
    report["accuracy"]["labels"] = None
    report["accuracy"]["outputs"] = [
        {"name": "notes", "role": "multilabel", "role_source": "inferred", "role_reason": "independent scores",
         "cosine": 0.9866, "sqnr_db": 15.5, "multilabel_f1": 0.933139, "multilabel_f1_ci": [0.913305, 0.954686]},
        {"name": "onsets", "role": "multilabel", "role_source": "inferred", "cosine": 0.981, "sqnr_db": 13.9,
         "multilabel_f1": 0.844251, "multilabel_f1_ci": [0.822922, 0.864918]},
    ]
    read = _read(report)
    assert read["trust-0"].startswith(
        "Output notes is a multilabel output (inferred: independent scores): trust multi-label F1, how far the "
        "quantized model's yes elements (scores of 0.5 or above) are the original's: 93.3 % (91.3 \u2026 95.5 %).")
    head = present.accuracy_headline(Report.from_stored(report))
    assert head is not None and head.key == "multilabel_f1" and head.after == "84.4 %"  # the worse of the two
    assert head.after_ci == "(82.3 \u2026 86.5 %)"
    accuracy = Report.from_stored(report).accuracy
    assert accuracy is not None
    rows = present.output_rows(accuracy.outputs)
    assert rows[1].role == "multi-label" and rows[1].extra == ["multi-label F1 84.4 % (82.3 \u2026 86.5 %)"]


@pytest.mark.parametrize(("delta_ci", "says"), [
    ([-0.09375, -0.015625], "The whole interval is below zero: the drop is real"),
    ([-0.046875, 0.0], "The interval includes zero"),
    ([0.015625, 0.0625], "The whole interval is above zero"),
])
def test_the_interval_sentence_reads_this_jobs_interval(delta_ci: list[float], says: str) -> None:
    report = _report()
    report["accuracy"]["labels"]["delta_ci"] = delta_ci
    text = _read(report)["intervals"]
    lo, hi = (present.fmt_end(x * 100) for x in delta_ci)
    assert f"with 64 evaluation samples the label-accuracy change is between {lo} and {hi} points" in text
    assert says in text


def test_speed_interval_and_overlap_paragraphs() -> None:
    report = _report()
    report["latency"].update(speedup=1.02, speedup_ci=[0.95, 1.09], speedup_measurable=False, runs=20)
    text = _read(report)["intervals"]
    assert "The speed-up comes from 20 timed runs of each model, interleaved" in text
    assert "no measurable speed-up (0.95 \u2026 1.09). That interval includes 1.0" in text
    assert "overlap" not in _read(report)  # the example's evaluation set shares nothing
    report["accuracy"]["overlap"] = {"evaluation_samples": 64, "shared_with_calibration": 64,
                                     "identical_to_calibration": True}
    assert _read(report)["overlap"].startswith("The evaluation set is the calibration set")


def test_reports_with_nothing_to_explain() -> None:
    assert explain.how_to_read(Report.from_stored({})) == []
    assert explain.how_to_read(Report.from_stored({"recipe": "auto", "candidates": [], "accuracy": None,
                                                   "latency": None})) == []
    bare = _read({"recipe": "int8_static", "accuracy": {"outputs": [{"name": "y"}]}})
    assert set(bare) == {"recipe", "figures", "trust-0"}  # no calibration section, no intervals: nothing made up


def test_interval_formatting() -> None:
    assert present.fmt_points_ci([-0.03125, -0.002]) == "(\u22123.1 \u2026 \u22120.2)"
    assert present.fmt_points_ci([-0.046875, 0.0]) == "(\u22124.7 \u2026 0.0)"
    assert present.fmt_pct_ci([0.953125, 1.0]) == "(95.3 \u2026 100.0 %)"
    assert present.fmt_fraction_ci(0.99412, [0.99207, 0.99571]) == "(0.9921 \u2026 0.9957)"
    # a cosine near 1 gets the decimals that tell its ends apart
    assert present.fmt_fraction_ci(0.999951, [0.999932, 0.999968]) == "(0.99993 \u2026 0.99997)"
    for missing in (None, [], [0.9], ["a", "b"], "0.9"):
        assert present.fmt_pct_ci(missing) == "" and present.interval(missing) is None
    lat = {"speedup": 1.7, "speedup_ci": [1.52, 1.9], "speedup_measurable": True, "runs": 30, "order": "interleaved"}
    assert present.speed_text(_lat(lat)) == "1.7\u00d7 faster (1.5 \u2026 1.9), 30 interleaved runs"
    slow = {"speedup": 0.7, "speedup_ci": [0.65, 0.75], "speedup_measurable": True, "runs": 30}
    assert present.speed_text(_lat(slow)) == "1.4\u00d7 slower (1.3 \u2026 1.5), 30 runs"  # 1/0.75 … 1/0.65
    flat = {"speedup": 0.98, "speedup_ci": [0.93, 1.08], "speedup_measurable": False, "runs": 30}
    assert present.speed_text(_lat(flat)) == "no measurable speed-up (0.93 \u2026 1.08), 30 runs"
    assert present.speed_text(_lat({"speedup": 2.1})) == "2.1\u00d7 faster" and present.speed_text(None) == \
        "latency not measured"


def test_an_interval_of_one_point_is_explained_not_trusted() -> None:
    """All 10 samples agreeing gives the bootstrap nothing to resample: the text says so and gives the rule of
    three's bound (3/10 = 30 %) instead of '95% sure it is between 100 % and 100 %'."""
    report = _report()
    report["accuracy"]["labels"] = None
    report["accuracy"]["outputs"] = [{"name": "p", "role": "classification", "samples": 10, "cosine": 0.9985,
                                      "top1_agreement": 1.0, "top1_agreement_ci": [1.0, 1.0]}]
    text = _read(report)["intervals"]
    assert "all 10 evaluation samples keep their top class in p, so its interval is the single point 100 %" in text
    assert "a true rate of disagreements up to about 30 % could still go unseen" in text
    assert "between 100.0 % and 100.0 %" not in text
    labelled = _report()
    labelled["accuracy"]["labels"].update(delta=0.0, delta_ci=[0.0, 0.0])
    text = _read(labelled)["intervals"]
    assert "on these 64 evaluation samples no answer went from right to wrong or back" in text
    assert "changed answers up to about 4.7 % could still go unseen" in text  # 300 / 64


def test_a_speed_interval_near_one_keeps_two_decimals() -> None:
    """A measured slow-down of 1.05 to 1.37 must not print as '(1.0 … 1.4)', which reads as 'maybe no change'."""
    lat = {"speedup": 0.8726, "speedup_ci": [0.7322, 0.955], "speedup_measurable": True, "runs": 30}
    assert present.speed_text(_lat(lat)) == "1.1\u00d7 slower (1.05 \u2026 1.37), 30 runs"
    from app.client.cli import latency_change

    assert latency_change(lat) == "1.15x slower (1.05 \u2026 1.37)"
    assert latency_change({**lat, "speedup": 2.57, "speedup_ci": [2.4451, 2.6918]}) == "2.57x faster (2.4 \u2026 2.7)"
