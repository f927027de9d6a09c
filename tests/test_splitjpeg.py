"""pipeline._splitjpeg, the C extension that splits and encodes in one call, against the pure-Python path.

Its contract: the same bytes as ``decompose`` followed by simplejpeg for each component, so that shards
do not depend on whether the extension was built where they were written.
"""

from __future__ import annotations

import filecmp
import threading
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from conftest import photo_like
from PIL import Image
from skimage import data as skdata
from subspectral.pipeline import decompose, encode
from subspectral.pipeline.shard import SampleEncoder, SampleSpec

BUILD_HINT = ("pipeline._splitjpeg is not built: it needs a C compiler and libjpeg-turbo's headers "
              "(Debian: gcc libjpeg62-turbo-dev); then rerun scripts/setup.sh")


@pytest.fixture(scope="module")
def split_encode_95():
    encoder = encode.split_jpeg_encoder(95)
    assert encoder is not None, BUILD_HINT
    return encoder


def reference(image: np.ndarray, grid: int, quality: int) -> list[bytes]:
    """The pure-Python path the extension replaces: decompose, then the jpg encoder per component."""
    encode_jpg = encode.encoder("jpg", quality)
    return [encode_jpg(part) for part in decompose.decompose(image, grid)]


def rgbx(rgb: np.ndarray) -> np.ndarray:
    """RGB → RGBX with a junk fourth byte, which the encoder must ignore."""
    return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 77, np.uint8)], axis=-1)


def squares() -> dict[str, np.ndarray]:
    photos = {"astronaut": skdata.astronaut()[:504, :504], "chelsea": skdata.chelsea()[:300, :300]}
    noise = np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8)
    return {**photos, "photo_like": photo_like(336, 336, seed=3), "noise": noise}


@pytest.mark.parametrize("quality", [50, 90, 95, 96, 100])  # 96 is where TurboJPEG switches to the accurate DCT
@pytest.mark.parametrize("channels", [3, 4])
def test_same_bytes_as_decompose_then_simplejpeg(quality, channels):
    encoder = encode.split_jpeg_encoder(quality)
    assert encoder is not None, BUILD_HINT
    for name, image in squares().items():
        pixels = image if channels == 3 else rgbx(image)
        for grid in (1, 2, 3, 6):
            if pixels.shape[0] % grid:
                continue
            got = encoder(pixels, grid)
            assert len(got) == grid * grid
            assert got == reference(pixels, grid, quality), f"{name}, grid {grid}"


def test_decodes_to_the_components(split_encode_95):
    image = skdata.astronaut()[:336, :336]
    parts = decompose.decompose(image, 6)
    for jpeg, part in zip(split_encode_95(image, 6), parts, strict=True):
        decoded = simplejpeg.decode_jpeg(jpeg).astype(np.float64)
        assert decoded.shape == (56, 56, 3)
        psnr = 10 * np.log10(255**2 / np.mean((decoded - part) ** 2))
        assert psnr > 30  # q95 with 4:2:0 chroma on a 6x-subsampled photo: ~32 dB here


def test_strided_input_is_copied_not_misread(split_encode_95):
    wide = rgbx(skdata.astronaut())
    view = wide[100:436, 50:386]  # not contiguous
    assert split_encode_95(view, 6) == reference(np.ascontiguousarray(view), 6, 95)


@pytest.mark.parametrize("mode", ["RGB", "RGBX"])
def test_pillow_images_are_read_in_place_with_the_same_bytes(split_encode_95, mode):
    rgb = skdata.astronaut()[:336, :336]
    image = Image.fromarray(rgb).convert(mode)
    assert split_encode_95(image, 6) == reference(rgb, 6, 95)


def test_exports_it_cannot_read_in_place_are_refused():
    from subspectral.pipeline import _splitjpeg

    grey = Image.new("L", (336, 336))  # exported as plain uint8, not fixed_size_list<uint8>[4]
    with pytest.raises(ValueError, match="fixed_size_list"):
        _splitjpeg.encode_image_components(*grey.__arrow_c_array__(), 336, 6, 95)
    wide = Image.new("RGBX", (336, 300))
    with pytest.raises(ValueError, match="encode_image_components"):
        _splitjpeg.encode_image_components(*wide.__arrow_c_array__(), 336, 6, 95)


def test_bad_arguments_are_a_clear_error():
    from subspectral.pipeline import _splitjpeg

    pixels = np.zeros((336, 336, 4), np.uint8)
    for args in [(pixels, 336, 4, 5, 95), (pixels, 336, 2, 6, 95), (pixels, 330, 4, 6, 95), (pixels, 336, 4, 6, 0)]:
        with pytest.raises(ValueError, match="encode_components"):
            _splitjpeg.encode_components(*args)


def test_threads_encode_concurrently_and_correctly(split_encode_95):
    """The GIL is released while encoding; every call has its own compressor."""
    images = [photo_like(336, 336, seed=seed) for seed in range(4)]
    expected = [reference(image, 6, 95) for image in images]
    results: dict[int, list[list[bytes]]] = {}

    def work(index: int) -> None:
        results[index] = [split_encode_95(images[index], 6) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, runs in results.items():
        assert all(run == expected[index] for run in runs)


def test_sample_encoder_uses_it_only_for_jpg_phases(split_encode_95):
    assert SampleEncoder(SampleSpec())._split_encode is not None
    assert SampleEncoder(SampleSpec(image_format="png"))._split_encode is None
    assert SampleEncoder(SampleSpec(image_format="npy", transform="dct"))._split_encode is None


def test_shards_are_byte_identical_with_and_without_the_extension(sample_root, tmp_path, monkeypatch,
                                                                  split_encode_95):
    from subspectral.pipeline.plan import PlanOptions
    from subspectral.pipeline.prepare import PrepareOptions, prepare
    from subspectral.pipeline.storage import location

    def run(out: Path) -> Path:
        options = PrepareOptions(sources=(location(sample_root).uri,), out=location(out).uri, layout="auto",
                                 spec=SampleSpec(split=9), plan=PlanOptions(shard_size=64, seed=0, val_per_class=5))
        prepare(options, num_workers=1, ray_address=None, dry_run=False, executor="serial", log=lambda _: None)
        return out

    with_extension = run(tmp_path / "with")
    monkeypatch.setattr(encode, "_splitjpeg", None)
    assert SampleEncoder(SampleSpec())._split_encode is None
    without = run(tmp_path / "without")
    tars = sorted(path.relative_to(with_extension) for path in with_extension.rglob("*.tar"))
    assert tars and tars == sorted(path.relative_to(without) for path in without.rglob("*.tar"))
    _, mismatch, errors = filecmp.cmpfiles(with_extension, without, [str(tar) for tar in tars], shallow=False)
    assert not mismatch and not errors
