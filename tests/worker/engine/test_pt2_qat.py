"""torch.export archives (.pt2): the checks that run before torch sees a file, the export, and qat_int8."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests import pt2_builders as pb
from tests.reports import assert_report_complete
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError
from worker.engine.pipeline import progress_percent, run
from worker.engine.pt2 import check_archive, sanitize

pytestmark = [pytest.mark.filterwarnings("ignore:The given NumPy array is not writable"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]


def _sym_payload(canary: Path) -> Any:
    def change(program: dict[str, Any]) -> None:
        tv = program["graph_module"]["graph"]["tensor_values"]
        name = next(k for k, v in tv.items() if v["sizes"] and "as_expr" in v["sizes"][0])
        tv[name]["sizes"][0]["as_expr"]["expr_str"] = f"__import__('pathlib').Path('{canary}').touch() or s0"
    return change


def _target(target: str) -> Any:
    def change(program: dict[str, Any]) -> None:
        program["graph_module"]["graph"]["nodes"][0]["target"] = target
    return change


def _enum_context(program: dict[str, Any]) -> None:
    sig = program["graph_module"]["module_call_graph"][0]["signature"]
    spec = json.loads(sig["in_spec"])
    spec[1]["children_spec"][1]["context"] = json.dumps([{"__enum__": True, "fqn": "os:environ", "name": "x"}])
    sig["in_spec"] = json.dumps(spec)


def _custom_constant(src: Path, dest: Path, canary: Path) -> Path:
    config = {"config": {"obj": {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True,
                                 "tensor_meta": None}}}
    return pb.rewrite_pt2(src, dest, lambda name, data: (
        json.dumps(config).encode() if name == "data/constants/model_constants_config.json" else data),
        extra={"data/constants/custom_obj_0": pb.pickle_payload(canary)})


HOSTILE = {
    # name: (builder(tmp, conv_pt2, canary) -> path, error code, words the message must contain)
    "raw pickle": (lambda t, c, k: _write(t / "a.pt2", pb.pickle_payload(k)), "unsupported_model_format",
                   "torch.export.save"),
    "TorchScript": (lambda t, c, k: pb.torchscript_file(t / "ts.pt2"), "unsupported_model_format", "TorchScript"),
    "torch.save checkpoint": (lambda t, c, k: pb.torch_save_checkpoint(t / "ck.pt2", k), "unsupported_model_format",
                              "torch.export.save"),
    "zip posing as .pt2": (lambda t, c, k: pb.zip_posing_as_pt2(t / "z.pt2"), "invalid_model", "torch.export"),
    "use_pickle weight": (lambda t, c, k: pb.pt2_with_pickled_weight(c, t / "w.pt2", k), "unsafe_model",
                          "use_pickle"),
    "custom object constant": (lambda t, c, k: _custom_constant(c, t / "o.pt2", k), "unsafe_model", "pickle"),
    "compiled code": (lambda t, c, k: pb.rewrite_pt2(c, t / "so.pt2", lambda n, d: d,
                                                     extra={"data/aotinductor/model/m.so": b"\x7fELF"}),
                      "unsafe_model", "compiled code"),
    "shape expression payload": (lambda t, c, k: pb.pt2_with_program_edit(c, t / "e.pt2", _sym_payload(k)),
                                 "unsafe_model", "shape expression"),
    "exec as a graph node": (lambda t, c, k: pb.pt2_with_program_edit(c, t / "x.pt2", _target("builtins.exec")),
                             "unsupported_model", "builtins.exec"),
    "torch.load as a graph node": (lambda t, c, k: pb.pt2_with_program_edit(c, t / "l.pt2", _target("torch.load")),
                                   "unsupported_model", "torch.load"),
    "enum import in a tree spec": (lambda t, c, k: pb.pt2_with_program_edit(c, t / "n.pt2", _enum_context),
                                   "unsafe_model", "enum"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_archive_check_refuses_before_torch_loads_anything(pt2_zoo: dict[str, Path], tmp_path: Path,
                                                           case: str) -> None:
    build, code, words = HOSTILE[case]
    canary = tmp_path / "canary"
    path = build(tmp_path, pt2_zoo["conv"], canary)
    with pytest.raises(EngineError) as e:
        check_archive(path)
    assert e.value.code == code, e.value
    assert words.lower() in e.value.message.lower(), e.value.message
    assert not canary.exists()


def test_the_payloads_are_live(pt2_zoo: dict[str, Path], tmp_path: Path) -> None:
    """The hostile files above would run code in a plain loader: the refusals are not vacuous."""
    canary = tmp_path / "canary-pickle"
    pickle.loads(pb.pickle_payload(canary))
    assert canary.exists()
    canary = tmp_path / "canary-torch"
    hostile = pb.pt2_with_pickled_weight(pt2_zoo["conv"], tmp_path / "w.pt2", canary)
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(hostile)!r})"],
                   capture_output=True, timeout=120)
    assert canary.exists(), "torch.export.load did not run the use_pickle payload"


def test_sanitized_copy_keeps_only_program_weights_and_constants(pt2_zoo: dict[str, Path], tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    src = pb.pt2_with_sample_inputs_payload(pt2_zoo["tf"], tmp_path / "s.pt2", canary)
    src = pb.rewrite_pt2(src, tmp_path / "s2.pt2", lambda n, d: d, extra={"extra/notes.txt": b"hello"})
    arc = check_archive(src)
    assert arc.program["guards_code"], "the transformer's export has guards (its two inputs share the batch size)"
    safe = sanitize(arc, src, tmp_path / "safe.pt2")
    with zipfile.ZipFile(safe) as z:
        names = set(z.namelist())
        assert z.read("archive/data/sample_inputs/model.pt") == b""
        assert json.loads(z.read("archive/models/model.json"))["guards_code"] == []
    assert not {n for n in names if "extra/" in n}
    assert {n.split("/", 2)[1] for n in names} <= {"archive_format", "archive_version", "byteorder", ".data",
                                                   "models", "data"}
    assert not canary.exists()


def _cfg(z: dict[str, Path], tmp: Path, model: str, recipe: str, data: str, ev: str | None = None,
         **options: object) -> QuantizeConfig:
    return QuantizeConfig(
        model_path=z[model], output_path=tmp / f"{model}.{recipe}.onnx", recipe=recipe,
        options=parse_options(recipe, dict(options)), calibration_path=z[data],
        eval_path=z[ev] if ev else None, threads=2, device="cpu", export_cache_dir=tmp / "exports",
    )


def test_qat_recovers_what_post_training_int8_loses(pt2_zoo: dict[str, Path], tmp_path: Path) -> None:
    """The outlier model: two hidden channels carry a large constant that the next layer barely reads. With
    min/max ranges, post-training int8 leaves the informative channels a few levels and loses clearly on
    held-out data; a short CPU fine-tuning with learned ranges recovers at least half of that loss."""
    progress: list[tuple[str, float]] = []
    res = run(_cfg(pt2_zoo, tmp_path, "outlier", "qat_int8", "outlier_cal", "outlier_eval", steps=200,
                   batch_size=32, learning_rate=1e-4, range_learning_rate=0.2, task_loss=False),
              lambda s, f: progress.append((s, f)))
    rep = res.report
    assert_report_complete(rep, "qat_int8")
    labels = rep["accuracy"]["labels"]
    (ptq,) = rep["accuracy"]["baselines"]
    assert ptq["recipe"] == "int8_static" and ptq["labels"]["samples"] == labels["samples"] == 512
    fp32, ptq_acc, qat_acc = labels["original"], ptq["labels"]["quantized"], labels["quantized"]
    print(f"\noutlier MLP: fp32 {fp32:.3f}, post-training int8 {ptq_acc:.3f}, QAT int8 {qat_acc:.3f}, "
          f"training {rep['training']['seconds']} s for {rep['training']['steps']} steps")
    assert fp32 == 1.0  # labels are the float model's own predictions
    assert fp32 - ptq_acc >= 0.15, "post-training int8 should lose clearly on this model"
    assert qat_acc - ptq_acc >= 0.5 * (fp32 - ptq_acc), "QAT should recover at least half of the loss"
    assert rep["accuracy"]["outputs"][0]["sqnr_db"] > ptq["outputs"][0]["sqnr_db"]

    training = rep["training"]
    assert training["steps"] == 200 and training["seconds"] > 0 and training["device"] == "cpu"
    curve = training["loss_curve"]
    assert len(curve) >= 10 and curve[-1]["step"] == 200
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    # The hidden activation's learned range no longer spans the two constant channels.
    relu_ranges = [hi for name, (lo, hi) in training["learned_activation_ranges"].items() if name.startswith("relu")]
    assert relu_ranges and min(relu_ranges) < 100.0
    assert rep["model"]["source_format"] == "pt2" and rep["model"]["export"]["check"]["samples"] > 0

    percents = [progress_percent(s, f) for s, f in progress]
    assert percents == sorted(percents), "progress must never go back"
    steps_seen = {round(f, 3) for s, f in progress if s == "calibrating"}
    assert len(steps_seen) >= 50, "training progress should count steps"

    # The artifact is a plain QDQ ONNX model that keeps the dynamic batch axis.
    sess = ort.InferenceSession(str(res.artifact_path), providers=["CPUExecutionProvider"])
    x = np.load(pt2_zoo["outlier_eval"])["features"][:3]
    assert sess.run(None, {"features": x})[0].shape == (3, 10)


def test_qat_needs_a_pytorch_model(zoo: dict[str, Path], tmp_path: Path) -> None:
    cfg = QuantizeConfig(model_path=zoo["mlp"], output_path=tmp_path / "q.onnx", recipe="qat_int8",
                         calibration_path=zoo["mlp_data"], threads=1)
    with pytest.raises(EngineError) as e:
        run(cfg)
    assert e.value.code == "pytorch_model_required" and ".pt2" in e.value.message


@pytest.mark.parametrize("options, needle", [
    ({"steps": 0}, "steps"), ({"learning_rate": 2.0}, "learning_rate"), ({"train_weight_ranges": "yes"}, "true or"),
    ({"method": "entropy"}, "unknown option"),
])
def test_qat_options_are_validated(options: dict[str, Any], needle: str) -> None:
    with pytest.raises(EngineError) as e:
        parse_options("qat_int8", options)
    assert needle in e.value.message


def _rewrite(src: Path, dest: Path, change: Any) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            change(zin, zout, info)
    return dest


def test_pt2_zip_bomb_is_refused_before_anything_is_unpacked(pt2_zoo: dict[str, Path], tmp_path: Path) -> None:
    from worker.engine.errors import EngineError
    from worker.engine.pt2 import check_archive

    def bomb(zin: zipfile.ZipFile, zout: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
        zout.writestr(info, zin.read(info))
        if info.filename.endswith("archive_format"):
            root = info.filename.rsplit("/", 1)[0]
            # 256 MiB of zeros deflate to a few hundred KB.
            zout.writestr(zipfile.ZipInfo(f"{root}/extra/padding"), b"\0" * (256 << 20),
                          compress_type=zipfile.ZIP_DEFLATED)

    path = _rewrite(pt2_zoo["conv"], tmp_path / "bomb.pt2", bomb)
    assert path.stat().st_size < 8 << 20
    with pytest.raises(EngineError) as e:
        check_archive(path)
    assert e.value.code == "invalid_model" and "uncompressed" in e.value.message


def test_damaged_pt2_is_a_clear_error_not_a_crash(pt2_zoo: dict[str, Path], tmp_path: Path) -> None:
    from worker.engine.errors import EngineError
    from worker.engine.pt2 import check_archive

    data = bytearray(pt2_zoo["conv"].read_bytes())
    with zipfile.ZipFile(pt2_zoo["conv"]) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("models/model.json"))
    # Flip a byte inside the stored program: its CRC no longer matches.
    h = info.header_offset
    name_len = int.from_bytes(data[h + 26:h + 28], "little")
    extra_len = int.from_bytes(data[h + 28:h + 30], "little")
    start = h + 30 + name_len + extra_len + 10
    data[start] ^= 0xFF
    path = tmp_path / "damaged.pt2"
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError) as e:
        check_archive(path)
    assert e.value.code == "invalid_model"
