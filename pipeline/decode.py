"""Image bytes → an upright RGB image, or a :class:`RejectedInput` with a reason.

Pure: bytes in, pixels out; no files. Baseline JPEG (the bulk of ImageNet) goes through
libjpeg-turbo via simplejpeg, straight into a 4-byte RGBX buffer that Pillow wraps without a copy
and that splits into sub-images as 32-bit words (see ``decompose``). Large JPEGs are decoded at
1/2, 1/4 or 1/8 scale in the DCT domain when that still leaves at least the target size. Anything
else — PNG, GIF, CMYK/YCCK JPEG, 16-bit, palette, alpha — goes through Pillow.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError
from subspectral.schemas.reasons import RejectReason

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (1024·1024·1024 // 4 // 3)
# An image at that pixel limit stored uncompressed in 8-bit RGB: no real image file needs more.
DEFAULT_MAX_FILE_BYTES = 256 * 1024**2


class RejectedInput(Exception):
    """An input that cannot become a sample, and why."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # mode RGB or RGBX, upright; possibly reduced by DCT scaling
    width: int  # original width after EXIF orientation, before any reduction
    height: int


DEFAULT_MIN_SIDE = 32


@dataclass(frozen=True)
class SizeLimits:
    min_side: int = DEFAULT_MIN_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # checked by the reader, before decoding

    @classmethod
    def for_side(cls, side: int) -> SizeLimits:
        """The default limits for images resized to ``side``×``side``: an image that is at least that
        large is never too small (Fashion-MNIST's 28×28 at S = 28), and larger targets keep 32 px."""
        return cls(min_side=min(DEFAULT_MIN_SIDE, side))


MinimumSize = Callable[[int, int], tuple[int, int]]


def full_size(width: int, height: int) -> tuple[int, int]:
    return width, height


def decode_image(data: bytes, min_decoded: MinimumSize = full_size, limits: SizeLimits = SizeLimits(),
                 scratch: bytearray | None = None) -> DecodedImage:
    """Decode ``data``, possibly reduced in the DCT domain to no less than ``min_decoded(w, h)``.

    ``min_decoded`` maps the upright original size to the (width, height) the decoded image must keep.
    ``scratch``, when given, is reused as the JPEG decoder's output buffer (grown as needed): fresh
    0.5–1 MB buffers cost a page fault per 4 KB on these machines. The returned image then lives in
    ``scratch`` and is overwritten by the next call that uses it.
    """
    if not data:
        raise RejectedInput(RejectReason.EMPTY_FILE)
    if data[:2] == b"\xff\xd8":
        decoded = _decode_jpeg_fast(data, min_decoded, limits, scratch)
        if decoded is not None:
            return decoded
    return _decode_with_pillow(data, min_decoded, limits)


def _check_size(width: int, height: int, limits: SizeLimits) -> None:
    if width * height > limits.max_pixels:
        raise RejectedInput(RejectReason.TOO_LARGE, f"{width}x{height} exceeds {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        raise RejectedInput(RejectReason.TOO_SMALL, f"{width}x{height} is under {limits.min_side} px")


def _decode_jpeg_fast(data: bytes, min_decoded: MinimumSize, limits: SizeLimits,
                      scratch: bytearray | None) -> DecodedImage | None:
    """libjpeg-turbo path; None when the file needs Pillow (CMYK, YCCK, or a header it rejects)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "RGB", "Gray"):
        if colorspace in ("CMYK", "YCCK"):  # Pillow decodes these, and ignores libjpeg's warnings: check first
            _check_jpeg_data(data)
        return None
    orientation = jpeg_exif_orientation(data)
    swap = orientation in (5, 6, 7, 8)
    upright_w, upright_h = (height, width) if swap else (width, height)
    _check_size(upright_w, upright_h, limits)
    min_w, min_h = min_decoded(upright_w, upright_h)
    if swap:
        min_w, min_h = min_h, min_w
    # min_factor=2: libjpeg-turbo's M/8 scalings between 1 and 2 decode slower than full size.
    scale = {"min_width": min_w, "min_height": min_h, "min_factor": 2}
    buffer = None
    if scratch is not None:
        out_h, out_w, _, _ = simplejpeg.decode_jpeg_header(data, **scale)
        if len(scratch) < out_h * out_w * 4:
            scratch.extend(bytes(out_h * out_w * 4 - len(scratch)))
        buffer = scratch
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGBX", fastdct=False, fastupsample=False, buffer=buffer, **scale
        )
    except ValueError as error:
        _reject_corrupt(error)
        pixels = simplejpeg.decode_jpeg(  # the image data was whole: only bytes after it were off
            data, colorspace="RGBX", fastdct=False, fastupsample=False, buffer=buffer, strict=False, **scale
        )
    h, w = pixels.shape[:2]
    image = Image.frombuffer("RGBX", (w, h), pixels, "raw", "RGBX", 0, 1)
    if orientation > 1:
        image = image.transpose(_ORIENTATION_TRANSPOSE[orientation])
    return DecodedImage(image, upright_w, upright_h)


def _reject_corrupt(error: ValueError) -> None:
    """Raise the reject for a libjpeg error or warning, unless it only concerns bytes after the image data.

    libjpeg-turbo reports damage as warnings ("Corrupt JPEG data: premature end of data segment",
    "Premature end of JPEG file", "bad Huffman code") and fills what it could not decode with grey;
    simplejpeg raises them (strict mode), and such a file is rejected rather than written as a grey
    image. One warning is harmless: "extraneous bytes before marker 0xd9", junk between the last
    scan and the end-of-image marker, after every pixel was decoded (a few ImageNet files have it).
    """
    message = str(error)
    lowered = message.lower()
    if "extraneous bytes before marker 0xd9" in lowered:
        return
    truncated = "premature end" in lowered or "truncat" in lowered
    reason = RejectReason.TRUNCATED if truncated else RejectReason.UNREADABLE
    raise RejectedInput(reason, f"libjpeg: {message}") from None


def _check_jpeg_data(data: bytes) -> None:
    """Decode a CMYK/YCCK JPEG at 1/8 scale with libjpeg's warnings raised: damage shows up the same."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="CMYK", min_width=1, min_height=1)
    except ValueError as error:
        _reject_corrupt(error)


def _decode_with_pillow(data: bytes, min_decoded: MinimumSize, limits: SizeLimits) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            orientation = image.getexif().get(0x0112, 1) if image.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
            swap = orientation in (5, 6, 7, 8)
            upright_w, upright_h = (image.height, image.width) if swap else image.size
            _check_size(upright_w, upright_h, limits)
            if image.format == "JPEG":
                min_w, min_h = min_decoded(upright_w, upright_h)
                if swap:
                    min_w, min_h = min_h, min_w
                image.draft(image.mode, (min_w, min_h))
            image.load()
            image = ImageOps.exif_transpose(image) if orientation > 1 else image
            image = to_rgb(image)
    except RejectedInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RejectedInput(RejectReason.TOO_LARGE, str(error)) from None
    except UnidentifiedImageError:
        raise RejectedInput(RejectReason.NOT_AN_IMAGE, "not a format Pillow can read") from None
    except OSError as error:
        truncated = "truncated" in str(error) or "broken data" in str(error)
        reason = RejectReason.TRUNCATED if truncated else RejectReason.UNREADABLE
        raise RejectedInput(reason, str(error)) from None
    except (ValueError, SyntaxError, struct.error, EOFError, IndexError) as error:
        raise RejectedInput(RejectReason.UNREADABLE, f"{type(error).__name__}: {error}") from None
    return DecodedImage(image, upright_w, upright_h)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB. Transparency is composited on white; 16/32-bit greys keep their top 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greys (PNG opens them as I;16 or I): keep the top byte instead of clipping at 255.
        grey = np.asarray(image).astype(np.int64) >> 8
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def jpeg_exif_orientation(data: bytes) -> int:
    """EXIF Orientation (1-8) of a JPEG, 1 when absent or malformed; reads only the APP segments."""
    pos = 2
    end = len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for index in range(count):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(tiff):
            break
        tag, _type, _count, value = struct.unpack_from(order + "HHIH", tiff, entry)
        if tag == 0x0112:
            return value if 1 <= value <= 8 else 1
    return 1
