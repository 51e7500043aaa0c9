"""The auto search on models built to make one answer right: planted sensitive layers, a model only
dynamic int8 quantizes well, one only a percentile-calibrated static int8 does, and an impossible target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import builders
from worker.engine import auto
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError


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
    outcome = auto.search(_base(tmp_path, model, data), target)
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


def test_dynamic_wins_when_input_scales_vary(tmp_path: Path) -> None:
    model = builders.scale_free_mlp(tmp_path / "scale.onnx")
    calib = builders.scale_varying_data(tmp_path / "calib.npz")
    ev = builders.scale_varying_data(tmp_path / "eval.npz", n=32, seed=2)
    outcome = auto.search(_base(tmp_path, model, calib, ev, batch_size=1, max_fallback_steps=2),
                          {"metric": "sqnr_db", "min": 20.0})
    assert outcome.chosen is not None, outcome.report["candidates"]
    assert outcome.chosen.candidate.recipe == "int8_dynamic"
    assert outcome.chosen.candidate.excluded_nodes == ()
    plain_static = [r for r in outcome.report["candidates"] if r["recipe"] == "int8_static" and not r["excluded_nodes"]]
    assert not any(r["met_target"] for r in plain_static)


def test_static_percentile_wins_when_rare_spikes_defeat_dynamic(tmp_path: Path) -> None:
    model = builders.spike_ignoring_mlp(tmp_path / "spike.onnx")
    calib = builders.spiky_data(tmp_path / "calib.npz")
    ev = builders.spiky_data(tmp_path / "eval.npz", n=32, spiky_share=0.25, seed=2)
    outcome = auto.search(_base(tmp_path, model, calib, ev, max_fallback_steps=2), {"metric": "sqnr_db", "min": 20.0})
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
    nxt = {c.recipe: c.excluded_nodes for c in auto.next_candidates(rows, max_steps=4)}
    assert nxt == {"int8_static": ("add",), "int8_dynamic": ("mm1",)}
    assert auto.next_candidates(rows, max_steps=0) == []
