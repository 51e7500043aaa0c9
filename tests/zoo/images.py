"""Images for the corpus: scikit-image's bundled sample photos when installed (else scenes drawn with
numpy), text rendered with Pillow's bundled font (else numpy-drawn pseudo-text), and the LFW face and
non-face patches scikit-image ships."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import numpy as np

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "camera",
               "brick", "grass", "gravel", "coins", "clock", "moon", "page", "text", "cell")


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def image_source() -> str:
    return "scikit-image" if have("skimage") else "drawn"


def text_source() -> str:
    return "pillow" if have("PIL") else "drawn"


def _rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def drawn_scene(seed: int, h: int = 384, w: int = 512) -> np.ndarray:
    """A stand-in photo: a lit gradient sky, a textured ground, a few shaded ellipses and boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = top[None, None] + (bottom - top)[None, None] * (yy / h)[:, :, None]
    horizon = rng.uniform(0.4, 0.7) * h
    ground = rng.uniform(40, 200, 3)
    tex = rng.normal(0, 18, (h, w, 1))
    img = np.where((yy > horizon)[:, :, None], ground[None, None] + tex, img)
    for _ in range(rng.integers(3, 8)):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, h / 4), rng.uniform(10, w / 4)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        col = rng.uniform(0, 255, 3)
        shade = np.clip(1.1 - 0.5 * d, 0.4, 1.1)[:, :, None]
        img = np.where((d < 1)[:, :, None], col[None, None] * shade, img)
    for _ in range(rng.integers(1, 4)):
        y0, x0 = int(rng.uniform(0, h * 0.8)), int(rng.uniform(0, w * 0.8))
        img[y0 : y0 + int(rng.uniform(10, h / 3)), x0 : x0 + int(rng.uniform(10, w / 3))] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def photos() -> dict[str, np.ndarray]:
    """Name -> RGB uint8 photo."""
    if have("skimage"):
        from skimage import data

        return {n: _rgb(getattr(data, n)()) for n in PHOTO_NAMES}
    return {f"scene{i}": drawn_scene(i) for i in range(12)}


def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize an HxW or HxWx3 uint8 (or float) image; Pillow's Lanczos when available, else bilinear."""
    if have("PIL"):
        from PIL import Image

        if img.dtype == np.uint8:
            return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.LANCZOS))
        chans = [img] if img.ndim == 2 else [img[:, :, c] for c in range(img.shape[2])]
        out = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((w, h), Image.Resampling.LANCZOS))
               for c in chans]
        return out[0] if img.ndim == 2 else np.stack(out, axis=2)
    src = img.astype(np.float32)
    ys = np.clip((np.arange(h) + 0.5) * img.shape[0] / h - 0.5, 0, img.shape[0] - 1)
    xs = np.clip((np.arange(w) + 0.5) * img.shape[1] / w - 0.5, 0, img.shape[1] - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, img.shape[0] - 1), np.minimum(x0 + 1, img.shape[1] - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    if src.ndim == 3:
        fy, fx = fy[:, :, None], fx[:, :, None]
    top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
    bot = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
    out = top * (1 - fy) + bot * fy
    return np.clip(out, 0, 255).astype(np.uint8) if img.dtype == np.uint8 else out.astype(img.dtype)


def random_crop(img: np.ndarray, h: int, w: int, rng: np.random.Generator, min_frac: float = 0.3) -> np.ndarray:
    """A crop of random size (at least ``min_frac`` of the photo's side) and place, resized to h x w."""
    H, W = img.shape[:2]
    aspect = w / h
    ch = int(rng.uniform(min_frac, 1.0) * min(H, W / aspect))
    cw = int(ch * aspect)
    ch, cw = max(8, min(ch, H)), max(8, min(cw, W))
    y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    return resize(img[y : y + ch, x : x + cw], h, w)


# ---------------------------------------------------------------------------------------------- text
def _drawn_text(lines: Sequence[str], rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Pseudo-text without a font: rows of dark glyph-sized strokes with ascenders and descenders."""
    img = np.full((height, width), rng.uniform(215, 250), dtype=np.float32)
    size = int(rng.uniform(12, 24))
    y = int(rng.uniform(8, 20))
    for line in lines:
        x = int(rng.uniform(6, 20))
        for ch in line:
            if x + size > width:
                break
            if ch != " ":
                tall = ch.isupper() or ch in "bdfhklt"
                deep = ch in "gjpqy"
                top = y + (0 if tall else size // 3)
                bottom = y + size + (size // 3 if deep else 0)
                img[top:bottom, x + 1 : x + max(2, size // 6) + 1] = 30
                img[y + size // 3 : y + size // 3 + 2, x : x + size // 2] = 30
                img[y + size - 2 : y + size, x : x + size // 2] = 30
            x += size // 2 + 1
        y += int(size * 1.6)
        if y + size > height:
            break
    return img.astype(np.uint8)


def text_image(lines: Sequence[str], rng: np.random.Generator, width: int = 360, height: int = 300) -> np.ndarray:
    """A page-like RGB image of ``lines`` of text: Pillow's bundled font at a random size and weight, dark
    ink on a light, slightly uneven paper, a little sensor noise."""
    if not have("PIL"):
        return _rgb(_drawn_text(lines, rng, width, height))
    from PIL import Image, ImageDraw, ImageFont

    paper = tuple(int(v) for v in rng.uniform(205, 255, 3))
    ink = tuple(int(v) for v in rng.uniform(0, 70, 3))
    img = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(img)
    size = int(rng.uniform(15, 30))
    font = ImageFont.load_default(size=size)
    stroke = int(rng.integers(0, 2))
    y = int(rng.uniform(4, 16))
    for line in lines:
        draw.text((int(rng.uniform(6, 24)), y), line, fill=ink, font=font, stroke_width=stroke, stroke_fill=ink)
        y += int(size * rng.uniform(1.25, 1.6))
        if y > height - size:
            break
    a = np.asarray(img).astype(np.float64)
    shade = np.linspace(rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0), width)[None, :, None]
    lit = a * shade + rng.normal(0, 3, a.shape)
    return np.clip(lit, 0, 255).astype(np.uint8)


def text_line(line: str, rng: np.random.Generator) -> np.ndarray:
    """One line of text as a text detector would crop it: RGB, a few pixels of paper around the glyphs, Pillow's
    bundled font at a random size and ink, a little sensor noise."""
    size = int(rng.uniform(22, 34))
    if not have("PIL"):
        return _rgb(_drawn_text([line], rng, width=(size // 2 + 1) * len(line) + 16, height=int(size * 1.7)))
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = (int(v) for v in font.getbbox(line))
    pad = int(rng.integers(3, 9))
    paper = tuple(int(v) for v in rng.uniform(205, 255, 3))
    ink = tuple(int(v) for v in rng.uniform(0, 70, 3))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), paper)
    ImageDraw.Draw(img).text((pad - left, pad - top), line, fill=ink, font=font)
    a = np.asarray(img).astype(np.float64) + rng.normal(0, 3, (img.height, img.width, 3))
    return np.clip(a, 0, 255).astype(np.uint8)


def wrap(words: Sequence[str], chars: int) -> list[str]:
    lines: list[str] = []
    cur = ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > chars:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        lines.append(cur)
    return lines


# --------------------------------------------------------------------------------------------- faces
@functools.lru_cache(maxsize=1)
def lfw_patches() -> tuple[np.ndarray, np.ndarray] | None:
    """scikit-image's LFW subset: (faces [100, 25, 25], non-faces [100, 25, 25]) as uint8 gray, or None."""
    if not have("skimage"):
        return None
    from skimage import data

    a = np.clip(data.lfw_subset() * 255.0, 0, 255).astype(np.uint8)
    return a[:100], a[100:]
