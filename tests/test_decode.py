"""Decoding real files: EXIF orientation, every mode to RGB, and a clear reason for each bad input."""

import io

import numpy as np
import pytest
from conftest import encode, photo_like
from PIL import Image, ImageOps
from subspectral.pipeline.decode import DecodedImage, RejectedInput, SizeLimits, decode_image, jpeg_exif_orientation
from subspectral.pipeline.resize import decoded_minimum, resize_square


def rgb(decoded: DecodedImage) -> np.ndarray:
    return np.asarray(decoded.image.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo_like(120, 80, seed=orientation), quality=95, exif=exif.tobytes())
    assert jpeg_exif_orientation(data) == orientation
    decoded = decode_image(data)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).astype(np.int16)
    assert (decoded.width, decoded.height) == (expected.shape[1], expected.shape[0])
    assert np.abs(rgb(decoded) - expected).mean() < 2.0  # two libjpeg builds may round IDCT differently


def test_orientation_parser_reads_big_endian_tiff():
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"
    segment = b"Exif\x00\x00" + tiff
    data = b"\xff\xd8\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + b"\xff\xd9"
    assert jpeg_exif_orientation(data) == 6
    assert jpeg_exif_orientation(b"\xff\xd8\xff\xd9") == 1


def _palette_with_transparency() -> bytes:
    image = Image.fromarray(photo_like(64, 64)).convert("P")
    image.info["transparency"] = 0
    return encode(image, "PNG", transparency=0)


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.fromarray(photo_like(64, 48)).convert("L"), quality=90),
        encode(Image.fromarray(photo_like(64, 48)).convert("CMYK"), quality=90),
        encode(Image.fromarray(photo_like(64, 48)).convert("L"), "PNG"),
        encode(Image.fromarray(photo_like(64, 48)).convert("1"), "PNG"),
        encode(Image.fromarray(photo_like(64, 48)).convert("RGBA"), "PNG"),
        encode(Image.fromarray(photo_like(64, 48)).convert("LA"), "PNG"),
        encode(Image.fromarray(photo_like(64, 48)[..., 0].astype(np.uint16) * 257), "PNG"),
        _palette_with_transparency(),
        encode(Image.fromarray(photo_like(64, 48)), "GIF"),
        encode(Image.fromarray(photo_like(64, 48)), "BMP"),
    ],
    ids=["jpeg-L", "jpeg-CMYK", "png-L", "png-1", "png-RGBA", "png-LA", "png-16bit", "png-P-transparent", "gif", "bmp"],
)
def test_every_mode_becomes_rgb(data):
    decoded = decode_image(data)
    assert decoded.image.mode in ("RGB", "RGBX")
    assert decoded.image.size[0] >= 48
    assert resize_square(decoded.image, 36, "center-crop").shape[:2] == (36, 36)


def test_sixteen_bit_grey_keeps_its_top_byte():
    grey = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20
    decoded = decode_image(encode(Image.fromarray(grey), "PNG"))
    np.testing.assert_array_equal(np.asarray(decoded.image)[..., 0], (grey >> 8).astype(np.uint8))


def test_transparency_is_composited_on_white():
    pixels = np.zeros((40, 40, 4), np.uint8)
    pixels[:20, :, :] = (10, 20, 30, 255)
    decoded = decode_image(encode(Image.fromarray(pixels, "RGBA"), "PNG"))
    out = np.asarray(decoded.image)
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[-1, -1]) == (255, 255, 255)


def _truncated_png() -> bytes:
    data = encode(photo_like(200, 200), "PNG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "reason", "limits"),
    [
        (b"", "empty_file", SizeLimits()),
        (b"this is a text file, not an image", "not_an_image", SizeLimits()),
        (b"\xff\xd8\xff\xe0 not really a jpeg", "unreadable", SizeLimits()),
        (encode(photo_like(300, 200))[:3000], "truncated", SizeLimits()),
        (_truncated_png(), "truncated", SizeLimits()),
        (encode(photo_like(20, 300)), "too_small", SizeLimits()),
        (encode(photo_like(400, 300)), "too_large", SizeLimits(max_pixels=100_000)),
        (encode(Image.new("1", (30_000, 30_000)), "PNG"), "too_large", SizeLimits()),  # a 110 KB bomb
    ],
    ids=["empty", "text", "fake-jpeg", "truncated-jpeg", "truncated-png", "tiny", "over-limit", "png-bomb"],
)
def test_bad_inputs_are_rejected_with_a_reason(data, reason, limits):
    with pytest.raises(RejectedInput) as caught:
        decode_image(data, limits=limits)
    assert caught.value.reason == reason


def test_large_jpeg_decodes_reduced_but_reports_its_original_size():
    data = encode(photo_like(2400, 1800), quality=90)
    decoded = decode_image(data, lambda w, h: decoded_minimum(w, h, 336, "center-crop"))
    assert (decoded.width, decoded.height) == (2400, 1800)
    assert 336 <= min(decoded.image.size) < 1800  # DCT-domain reduction happened, never below the target
    full = resize_square(decode_image(data).image, 336, "center-crop")[..., :3].astype(np.int16)
    reduced = resize_square(decoded.image, 336, "center-crop")[..., :3].astype(np.int16)
    assert np.abs(full - reduced).mean() < 3.0


def test_a_reused_decode_buffer_gives_the_same_pixels():
    scratch = bytearray()
    sizes = ((500, 375), (300, 200), (1400, 1000), (500, 375))
    files = [encode(photo_like(w, h, seed=w), quality=90) for w, h in sizes]
    for data in files:
        reused = np.asarray(decode_image(data, scratch=scratch).image).copy()
        np.testing.assert_array_equal(reused, np.asarray(decode_image(data).image))
    assert len(scratch) == 1400 * 1000 * 4


def _with_frame_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF header claiming another size (the scan data stays as it was)."""
    at = data.index(b"\xff\xc0") + 5
    return data[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 4:]


def _cut_before_end(data: bytes) -> bytes:
    """Half the scan data, then a proper end-of-image marker: 'premature end of data segment'."""
    return data[: len(data) // 2] + b"\xff\xd9"


_CMYK = encode(Image.fromarray(photo_like(300, 200, seed=5)).convert("CMYK"), quality=90)


@pytest.mark.parametrize("data", [
    _with_frame_size(encode(photo_like(64, 64, seed=1), quality=90), 9000, 9000),  # 64x64 of data
    _cut_before_end(encode(photo_like(300, 200, seed=2), quality=90)),
    _cut_before_end(_CMYK),  # decoded by Pillow, which fills the rest with grey
], ids=["header-claims-9000x9000", "cut-before-end-marker", "cmyk-cut-before-end-marker"])
def test_a_jpeg_libjpeg_reports_corrupt_is_rejected_whichever_decoder_reads_it(data):
    with pytest.raises(RejectedInput) as caught:
        decode_image(data)
    assert caught.value.reason == "truncated"
    assert "premature end" in caught.value.detail.lower()


def test_junk_after_the_image_data_keeps_the_image():
    """libjpeg warns of 'extraneous bytes before marker 0xd9', after every pixel is decoded: a few ImageNet
    files have it, and they are whole images."""
    data = encode(photo_like(200, 150, seed=3), quality=90)
    decoded = decode_image(data[:-2] + bytes(100) + data[-2:])
    np.testing.assert_array_equal(rgb(decoded), rgb(decode_image(data)))
    assert decode_image(_CMYK).image.size == (300, 200)
