"""The embedded sample corpus: a small ImageNet-style ImageFolder tree drawn by a seeded generator.

Each class has a colour (a hue on the colour wheel), a stripe angle and a shape (blob or ring) that
survive a 6x strided subsample; position, scale, background, clutter, lighting and noise vary per
image. A few files carry the quirks of real corpora: grayscale and CMYK JPEGs, a PNG behind a .JPEG
name, EXIF orientations 6 and 3, and a file name with a space and a dot in its stem.
"""

from __future__ import annotations

import colorsys
import io
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

SAMPLE_VERSION = 1
JPEG_QUALITY = 90
MAX_CLASSES = 1000
MAX_PER_CLASS = 10000  # file numbers are drawn without repeats from 1..19999, like ImageNet's
SHAPES, SHAPE_ODDS = ("landscape", "portrait", "square"), (0.7, 0.15, 0.15)
# One quirk per entry, each given to a different image chosen by the seed.
QUIRKS = ("gray", "gray", "gray", "cmyk", "png", "exif6", "exif3", "odd-name")
# EXIF orientation -> np.rot90 turns that store an upright picture so that a viewer applying the tag
# shows it upright again (6: the viewer turns 90 degrees clockwise, so we store it turned counter-clockwise).
STORED_TURNS = {"exif6": (6, 1), "exif3": (3, 2)}
_GOLDEN = 0.6180339887


@dataclass(frozen=True)
class ImageSpec:
    """One image of the corpus: where it goes, its upright size, and the seed of its pixels."""

    label: int
    wnid: str
    name: str
    width: int
    height: int
    quirk: str
    seed: tuple[int, int, int]


def wnid(label: int) -> str:
    """A WordNet-id-like class folder name; class 0 is ImageNet's first class, n01440764."""
    return f"n{1440764 + 3217 * label:08d}"


def _size(rng: np.random.Generator, shape: str) -> tuple[int, int]:
    if shape == "square":
        side = int(rng.integers(160, 513))
        return side, side
    long_side = int(rng.integers(200, 641))
    short_side = max(160, round(long_side * rng.uniform(0.66, 0.8)))  # 3:2 .. 4:3 .. 5:4
    return (long_side, short_side) if shape == "landscape" else (short_side, long_side)


def plan_sample(classes: int = 10, per_class: int = 60, seed: int = 0) -> list[ImageSpec]:
    """Every image of the corpus, in class order; pure and deterministic."""
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"sample corpus: classes must be in 2..{MAX_CLASSES}, got {classes}")
    if not 1 <= per_class <= MAX_PER_CLASS:
        raise ValueError(f"sample corpus: per_class must be in 1..{MAX_PER_CLASS}, got {per_class}")
    if classes * per_class < len(QUIRKS):
        raise ValueError(f"sample corpus: needs at least {len(QUIRKS)} images, got {classes}x{per_class}")
    rng = np.random.default_rng([seed, 0x5A3])
    quirky = rng.choice(classes * per_class, len(QUIRKS), replace=False).tolist()
    quirk_at = dict(zip(quirky, QUIRKS, strict=True))
    specs = []
    for label in range(classes):
        numbers = np.sort(rng.choice(np.arange(1, 20000), per_class, replace=False))
        for i, number in enumerate(numbers.tolist()):
            quirk = quirk_at.get(label * per_class + i, "")
            # A camera stores rotated shots of a landscape scene: orientation 6 must change the size.
            shape = rng.choice(SHAPES, p=SHAPE_ODDS)
            if quirk == "exif6":
                shape = "landscape"
            width, height = _size(rng, shape)
            stem = f"{wnid(label)}_{number}" + (" copy.v2" if quirk == "odd-name" else "")
            specs.append(ImageSpec(label, wnid(label), stem + ".JPEG", width, height, quirk,
                                   (seed, label, i)))
    return specs


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """One colour as a 3x1x1 array, to paint channel-first planes (broadcasting over HxWx1 is slow)."""
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32)[:, None, None]


def _soft(edge_distance: np.ndarray, width: float = 0.03) -> np.ndarray:
    """0 outside, 1 inside, a short ramp across the edge (antialiased like a photo)."""
    return np.clip(edge_distance / width, 0.0, 1.0)


def _box(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> tuple[slice, slice]:
    """Rows and columns of the pixels within r of (cx, cy): shapes are drawn in their box only."""
    rows = np.searchsorted(y[:, 0], [cy - r, cy + r])
    cols = np.searchsorted(x[0], [cx - r, cx + r])
    return slice(*rows), slice(*cols)


def render_image(spec: ImageSpec, classes: int) -> np.ndarray:
    """The upright picture of one image, HxWx3 uint8. Pure: same spec, same pixels."""
    rng = np.random.default_rng(spec.seed)
    h, w = spec.height, spec.width
    unit = float(min(h, w))  # shapes are measured in short sides so they scale with the picture
    y = ((np.arange(h, dtype=np.float32) - h / 2) / unit)[:, None]
    x = ((np.arange(w, dtype=np.float32) - w / 2) / unit)[None, :]

    # Background: a dull two-colour gradient in any direction, unrelated to the class.
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + x * np.cos(angle) + y * np.sin(angle), 0.0, 1.0)
    near, far = (_rgb(rng.uniform(), rng.uniform(0.05, 0.4), rng.uniform(0.25, 0.9)) for _ in range(2))
    img = t * (far - near)  # channel-first, 3xHxW
    img += near

    # The object: class hue, stripes at the class angle, blob (even classes) or ring (odd classes).
    hue = spec.label / classes + rng.normal(0, 0.025)
    light = _rgb(hue, rng.uniform(0.65, 0.95), rng.uniform(0.7, 0.95))
    dark = _rgb(hue + 0.05, rng.uniform(0.7, 1.0), rng.uniform(0.3, 0.5))
    theta = np.pi * ((spec.label * _GOLDEN) % 1.0) + rng.normal(0, 0.08)
    period, phase0 = rng.uniform(0.1, 0.16), rng.uniform()
    cx, cy = rng.uniform(-0.2, 0.2) * w / unit, rng.uniform(-0.2, 0.2) * h / unit
    radius = rng.uniform(0.25, 0.4)
    rx, ry, tilt = radius * rng.uniform(0.8, 1.25), radius * rng.uniform(0.8, 1.25), rng.uniform(0, np.pi)
    rows, cols = _box(x, y, cx, cy, max(rx, ry))
    xs, ys = x[:, cols], y[rows]
    phase = (xs * np.cos(theta) + ys * np.sin(theta)) / period + phase0
    stripes = np.clip(2.5 * np.sin(2 * np.pi * phase) + 0.5, 0.0, 1.0)
    u = (xs - cx) * np.cos(tilt) + (ys - cy) * np.sin(tilt)
    v = (ys - cy) * np.cos(tilt) - (xs - cx) * np.sin(tilt)
    d = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    mask = _soft(1.0 - d) * (_soft(d - 0.5) if spec.label % 2 else 1.0)
    _paint(img[:, rows, cols], mask, stripes * (dark - light) + light)

    # Clutter: a few small discs of random colour.
    for _ in range(int(rng.integers(3, 8))):
        r = rng.uniform(0.03, 0.09)
        cx, cy = rng.uniform(-0.5, 0.5) * w / unit, rng.uniform(-0.5, 0.5) * h / unit
        rows, cols = _box(x, y, cx, cy, r)
        mask = _soft(1.0 - np.hypot(x[:, cols] - cx, y[rows] - cy) / r, 0.1)
        _paint(img[:, rows, cols], mask, _rgb(rng.uniform(), rng.uniform(), rng.uniform()))

    # Lighting and sensor grain (uniform: five times cheaper to draw than normal, looks the same).
    img *= rng.uniform(0.75, 1.15) * (1.0 - rng.uniform(0.1, 0.35) * (x * x + y * y))
    img += (rng.random((h, w), dtype=np.float32) - 0.5) * rng.uniform(0.03, 0.08)
    img *= 255
    img += 0.5
    return np.stack(list(np.clip(img, 0, 255, out=img).astype(np.uint8)), axis=-1)


def _paint(region: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Blend colour (3x1x1 or 3xHxW) over region (a 3xHxW view) in place, with coverage mask (HxW)."""
    fill = colour - region
    fill *= mask
    region += fill


def encode_image(spec: ImageSpec, pixels: np.ndarray) -> bytes:
    """The file bytes of one image, its quirk applied."""
    out = io.BytesIO()
    if spec.quirk in STORED_TURNS:
        orientation, turns = STORED_TURNS[spec.quirk]
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(np.ascontiguousarray(np.rot90(pixels, turns))).save(
            out, format="JPEG", quality=JPEG_QUALITY, exif=exif)
        return out.getvalue()
    img = Image.fromarray(pixels)
    if spec.quirk == "png":
        img.save(out, format="PNG")
        return out.getvalue()
    mode = {"gray": "L", "cmyk": "CMYK"}.get(spec.quirk, "RGB")
    img.convert(mode).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def default_root() -> pathlib.Path:
    """$SUBSPECTRAL_CACHE, or ~/.cache/subspectral."""
    return pathlib.Path(os.environ.get("SUBSPECTRAL_CACHE") or pathlib.Path.home() / ".cache" / "subspectral")


def sample_corpus(root: str | os.PathLike | None = None, *, classes: int = 10, per_class: int = 60,
                  seed: int = 0) -> pathlib.Path:
    """Return the folder of the sample corpus, generating it if it is not there yet.

    The corpus lives in ``ROOT/sample-v{SAMPLE_VERSION}-c{classes}-p{per_class}-s{seed}`` (ROOT defaults
    to $SUBSPECTRAL_CACHE or ~/.cache/subspectral). It is drawn into a temporary folder beside it and
    renamed into place, so an interrupted run never leaves a partial corpus that a later call reuses.
    """
    root = pathlib.Path(root) if root is not None else default_root()
    target = root / f"sample-v{SAMPLE_VERSION}-c{classes}-p{per_class}-s{seed}"
    if target.is_dir():
        return target
    specs = plan_sample(classes, per_class, seed)
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)
        for spec in specs:
            (tmp / spec.wnid).mkdir(exist_ok=True)
            (tmp / spec.wnid / spec.name).write_bytes(encode_image(spec, render_image(spec, classes)))
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent run that finished first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
