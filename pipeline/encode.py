"""Encode one sub-image (or DCT band) to the bytes of a sample's image member. Pure.

jpg uses libjpeg-turbo through simplejpeg (≈ 2× Pillow per 56×56 encode, measured in
bench/bench_prepare.py); png and webp use Pillow; npy is numpy's own format. When the C extension
``pipeline._splitjpeg`` is built (setup.py), :func:`split_jpeg_encoder` splits and encodes all N
components in one call: the same bytes, 7–13 % less time per image (BENCHMARKS.md).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import simplejpeg
from PIL import Image, features

from . import resize

try:  # optional: setup.py skips it where libjpeg-turbo's headers or a C compiler are missing
    from . import _splitjpeg
except ImportError:
    _splitjpeg = None

FORMATS = ("jpg", "png", "webp", "npy", "dctz")
BAND_FORMATS = ("dctz", "npy")  # what --transform dct can store; dctz (schemas/bands.py) is its default


def check_format(image_format: str, transform: str) -> None:
    """A clear error for a format/transform pair that cannot be written with what is installed."""
    if image_format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {image_format!r}")
    if transform == "dct" and image_format not in BAND_FORMATS:
        raise ValueError("--transform dct stores integer DCT bands losslessly and needs --format dctz (compressed, "
                         "the default) or npy")
    if transform != "dct" and image_format == "dctz":
        raise ValueError("--format dctz stores DCT bands and needs --transform dct")
    if image_format == "webp" and not features.check("webp"):
        raise ValueError("--format webp: the loaded Pillow was built without WebP (pillow-simd usually is); "
                         "use jpg, png or npy")


def encoder(image_format: str, quality: int) -> Callable[[np.ndarray], bytes]:
    """An encoder for (s, s, C) arrays: C = 4 (RGBX, X ignored) or 3 (RGB); npy also takes int16 bands."""
    if image_format == "jpg":
        def encode_jpg(pixels: np.ndarray) -> bytes:
            colorspace = "RGBX" if pixels.shape[-1] == 4 else "RGB"
            return simplejpeg.encode_jpeg(pixels, quality, colorspace, "420")
        return encode_jpg
    if image_format == "dctz":
        raise ValueError("dctz encodes all bands of a sample at once: schemas.bands.encode_bands")
    if image_format == "npy":
        def encode_npy(pixels: np.ndarray) -> bytes:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(pixels[..., :3]), allow_pickle=False)
            return buffer.getvalue()
        return encode_npy
    pil_format, options = ("PNG", {"compress_level": 6}) if image_format == "png" else ("WEBP", {"quality": quality})

    def encode_with_pillow(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels[..., :3]), "RGB").save(buffer, pil_format, **options)
        return buffer.getvalue()
    return encode_with_pillow


def jpeg_library() -> str:
    """Which code encodes JPEG components, for logs: the C extension or simplejpeg."""
    if _splitjpeg is not None:
        return f"pipeline._splitjpeg (libjpeg-turbo, libjpeg API {_splitjpeg.LIBJPEG_VERSION})"
    return f"simplejpeg {simplejpeg.__version__}"


def split_jpeg_encoder(quality: int) -> Callable[[np.ndarray | Image.Image, int], list[bytes]] | None:
    """S×S image, grid r → the JPEGs of its r² polyphase components, in one C call.

    The image is an (S, S, C) uint8 array (C = 3, or 4 with the 4th byte ignored) or an RGB/RGBX Pillow
    image, which is read in place through its Arrow export (no copy, no pyarrow). Byte for byte what
    ``encoder("jpg", quality)`` gives for each component of ``decompose(pixels, r)``
    (tests/test_splitjpeg.py); None when ``pipeline._splitjpeg`` is not built.
    """
    if _splitjpeg is None:
        return None

    def encode_components(image: np.ndarray | Image.Image, grid: int) -> list[bytes]:
        if isinstance(image, Image.Image):
            try:
                return _splitjpeg.encode_image_components(*image.__arrow_c_array__(), image.width, grid, quality)
            except (AttributeError, ValueError):  # Pillow < 11.2, or not one block of 4-byte pixels
                image = resize.pixels(image)
        pixels = np.ascontiguousarray(image, dtype=np.uint8)
        return _splitjpeg.encode_components(pixels, pixels.shape[0], pixels.shape[2], grid, quality)
    return encode_components
