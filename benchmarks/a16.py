"""int8_static with some activations in 16 bits (option activations_16bit, A16W8; issue #18) on all-MiniLM-L6-v2.

One plain int8_static run (SmoothQuant off) gives the prepared model (work/prep/normalized.onnx), in which the
tensors are found by op type: the Softmax inputs (scores + attention mask) and outputs, the LayerNormalization
inputs, the residual Adds' outputs (Adds of two activations that feed no Softmax; their outputs are LayerNorm
inputs, but for the embeddings' first Add), the residual Adds' other inputs (the attention and FFN output
projections' bias Adds) and what those bias Adds read (the projections' MatMul outputs). Each variant is one
in-process run of the pipeline; the figures are the sentence embeddings' cosine against fp32 on the entry's
evaluation samples (tests/zoo task_metric: mean, worst sample) and the artifact's size over the fp32 model's.

    .venv/bin/python benchmarks/a16.py [--entry minilm_onnx] [--variants plain,brief,...] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("plain", "brief", "brief_softmax_float", "plus_bias_adds", "bias_add_inputs_too", "all16_softmax_float")


def tensor_sets(normalized: Path) -> dict[str, list[str]]:
    """Tensor and node names of the prepared model, by role (see the module's docstring)."""
    import onnx

    from worker.engine.calibrate import select_tensors

    model = onnx.load(str(normalized), load_external_data=False)
    consts = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    residual = [n for n in model.graph.node if n.op_type == "Add" and all(i in producer for i in n.input)
                and "Softmax" not in readers.get(n.output[0], []) and not set(n.input) & consts]
    bias_adds = [i for n in residual for i in n.input
                 if producer[i].op_type == "Add" and producer[i] not in residual]
    return {
        "softmax_nodes": [n.name for n in softmax],
        "softmax_in": [n.input[0] for n in softmax],
        "softmax_out": [n.output[0] for n in softmax],
        "layernorm_in": [n.input[0] for n in model.graph.node if n.op_type == "LayerNormalization"],
        "residual_out": [n.output[0] for n in residual],
        "bias_add_out": bias_adds,
        # What the bias Adds read: the output projections' MatMul outputs (their constant biases are no activations).
        "bias_add_in": [i for t in bias_adds for i in producer[t].input if i not in consts],
        "all": select_tensors(model),
    }


def variant_options(variant: str, sets: dict[str, list[str]]) -> dict[str, Any]:
    brief = sets["softmax_in"] + sets["softmax_out"] + sets["layernorm_in"] + sets["residual_out"]
    no_softmax_in = sets["softmax_out"] + sets["layernorm_in"] + sets["residual_out"]
    chosen: dict[str, dict[str, Any]] = {
        "plain": {},
        "brief": {"activations_16bit": brief},
        # The mask Add's output holds float32's minimum: no 16-bit range holds the scores either.
        "brief_softmax_float": {"activations_16bit": no_softmax_in, "nodes_to_exclude": sets["softmax_nodes"]},
        "plus_bias_adds": {"activations_16bit": no_softmax_in + sets["bias_add_out"],
                           "nodes_to_exclude": sets["softmax_nodes"]},
        # The README's 43 float nodes but Softmax, as 16-bit activations: every activation they read or write.
        "bias_add_inputs_too": {"activations_16bit": no_softmax_in + sets["bias_add_out"] + sets["bias_add_in"],
                                "nodes_to_exclude": sets["softmax_nodes"]},
        "all16_softmax_float": {"activations_16bit": [t for t in sets["all"] if t not in sets["softmax_in"]],
                                "nodes_to_exclude": sets["softmax_nodes"]},
    }
    opts = chosen[variant]
    if "activations_16bit" in opts:
        opts["activations_16bit"] = list(dict.fromkeys(opts["activations_16bit"]))
    return opts


def run_variant(entry: Any, options: dict[str, Any], name: str, work: Path, threads: int) -> dict[str, Any]:
    from worker.engine.config import QuantizeConfig, parse_options
    from worker.engine.pipeline import run

    opts = dict(options, smoothquant="off", latency_runs=1)  # latency is not what this measures
    cfg = QuantizeConfig(model_path=entry.model, output_path=work / f"{entry.name}.{name}.onnx",
                         recipe="int8_static", options=parse_options("int8_static", opts),
                         calibration_path=entry.calib, eval_path=entry.eval, threads=threads, device="cpu",
                         work_dir=work / f"work-{name}")
    started = time.perf_counter()
    res = run(cfg)
    return {"report": res.report, "path": res.artifact_path, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    from tests.zoo.corpus import build_corpus, run_model, task_metric

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entry", default="minilm_onnx")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-a16-") as tmp:
        (entry,) = build_corpus(names=[args.entry])
        ref = run_model(entry.model, entry.eval)
        plain = run_variant(entry, {}, "plain", Path(tmp), args.threads)  # also the plain variant's figures
        sets = tensor_sets(Path(tmp) / "work-plain" / "prep" / "normalized.onnx")
        print(json.dumps({k: len(v) for k, v in sets.items()}), file=sys.stderr, flush=True)
        for variant in args.variants.split(","):
            opts = variant_options(variant, sets)
            got = plain if variant == "plain" else run_variant(entry, opts, variant, Path(tmp), args.threads)
            m = task_metric(entry, ref, run_model(got["path"], entry.eval), None)
            rows.append({"variant": variant, "tensors_16bit": len(opts.get("activations_16bit", [])),
                         "float_nodes": len(opts.get("nodes_to_exclude", [])),
                         "cosine_mean": round(m["cosine_mean"], 4), "cosine_min": round(m["cosine_min"], 4),
                         "size_ratio": got["report"]["size"]["ratio"], "seconds": round(got["seconds"], 1),
                         "layers_a16": sum(1 for layer in got["report"]["layers"]
                                           if layer.get("activation_bits") == 16)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| variant | 16-bit tensors | float nodes | cosine mean / worst | size / fp32 | s |")
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['tensors_16bit']} | {r['float_nodes']} | {r['cosine_mean']} / "
              f"{r['cosine_min']} | {r['size_ratio']} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
