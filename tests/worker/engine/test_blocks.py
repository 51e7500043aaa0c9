"""Residual blocks from the graph (worker/engine/blocks.py), their sensitivity, and auto's block steps."""

from __future__ import annotations

from pathlib import Path

import onnx

from tests import builders
from worker.engine import auto
from worker.engine.blocks import find_blocks, rank_blocks, residual_adds
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.pipeline import run


def test_a_transformer_splits_into_attention_and_feed_forward_blocks(tmp_path: Path) -> None:
    model = onnx.load(str(builders.tiny_transformer(tmp_path / "t.onnx", layers=2)))
    adds = residual_adds(model)
    assert len(adds) == 4  # two layers, each with an attention and a feed-forward residual Add
    blocks = find_blocks(model)
    assert [b.name for b in blocks] == [a.name for a in adds]
    # Every node belongs to one block at most, and each block holds two MatMul-like layers or more.
    seen = [n for b in blocks for n in b.nodes]
    assert len(seen) == len(set(seen))
    ops = {n.name: n.op_type for n in model.graph.node}
    for b in blocks:
        assert sum(ops[n] in ("MatMul", "Gemm") for n in b.nodes) >= 2, b
        assert b.nodes[-1] == b.name  # the residual Add ends its block
    # The ranking sums each block's measured layers; unmeasured blocks and one-layer blocks drop out.
    first = [n for n in blocks[0].nodes if ops[n] == "MatMul"]
    second = [n for n in blocks[1].nodes if ops[n] == "MatMul"]
    ranked = rank_blocks(blocks, {first[0]: 0.1, second[0]: 0.5, second[1]: 0.2}, set(first) | set(second))
    assert [(r["name"], r["sensitivity"]) for r in ranked] == [(blocks[1].name, 0.7), (blocks[0].name, 0.1)]
    assert ranked[0]["layers"] == second
    assert find_blocks(onnx.load(str(builders.mlp(tmp_path / "mlp.onnx")))) == []  # no residual Add


def test_the_analysis_run_reports_its_blocks_and_auto_steps_through_them(tmp_path: Path) -> None:
    model = builders.tiny_transformer(tmp_path / "t.onnx", layers=2)
    data = builders.token_data(tmp_path / "t.npz")
    cfg = QuantizeConfig(model_path=model, output_path=tmp_path / "q.onnx", recipe="int8_static",
                         options=parse_options("int8_static", {"latency_runs": 1}), calibration_path=data,
                         threads=1, device="cpu", layer_sensitivity=True)
    report = run(cfg).report
    blocks = report["sensitivity"]["blocks"]
    assert len(blocks) == 4
    layer_names = {layer["name"] for layer in report["layers"]}
    assert all(set(b["layers"]) <= layer_names for b in blocks)
    assert [b["sensitivity"] for b in blocks] == sorted((b["sensitivity"] for b in blocks), reverse=True)
    # auto: the best static candidate, with the most sensitive block in float as one step, then the next two.
    analysis = auto.CandidateResult(auto.Candidate("int8_static", {"method": "entropy"}), "done", size_bytes=100,
                                    metric=0.9, met_target=False, report=report)
    fp16 = auto.CandidateResult(auto.Candidate("fp16"), "done", size_bytes=400, metric=1.0, met_target=True)
    step = next(c for c in auto.next_candidates([analysis, fp16], max_steps=8) if c.blocks)
    assert step.blocks == (blocks[0]["name"],) and step.excluded_nodes == tuple(blocks[0]["layers"])
    assert step.branch == "int8_static/entropy/blocks" and not step.activations_16bit
    done = auto.CandidateResult(step, "done", size_bytes=150, metric=0.95, met_target=False)
    again = next(c for c in auto.next_candidates([analysis, fp16, done], max_steps=8) if c.blocks)
    assert again.blocks == (blocks[0]["name"], blocks[1]["name"])
    assert again.excluded_nodes == (*blocks[0]["layers"], *blocks[1]["layers"])
    assert parse_options("int8_static", again.config()["options"]).nodes_to_exclude == again.excluded_nodes
    assert auto.Candidate.from_dict(again.to_dict()) == again
    done.met_target = True  # met: the block branch stops (the 4-bit weight branch starts from that model)
    after = auto.next_candidates([analysis, fp16, done], max_steps=8)
    assert not [c for c in after if c.blocks and not c.options.get("four_bit_weights")]
    assert [c.blocks for c in after if c.options.get("four_bit_weights")] == [done.candidate.blocks]
    done.met_target = False
    assert not [c for c in auto.next_candidates([analysis, fp16, done], max_steps=1) if c.blocks]
