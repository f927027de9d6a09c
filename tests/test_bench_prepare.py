"""The prepare benchmark's naive reference does the same work as the pipeline, so its speed is a fair yardstick."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from subspectral.pipeline import decompose, resize
from subspectral.pipeline.decode import decode_image

REPO = Path(__file__).resolve().parents[1]
IMAGES, SPLIT, SIZE = 3, 36, 56


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_prepare", REPO / "bench" / "bench_prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def naive_output(tmp_path_factory):
    bench = _load_bench()
    root = tmp_path_factory.mktemp("bench")
    corpus = bench.build_corpus(root, IMAGES, classes=2)
    files = bench.corpus_files(corpus)
    written = bench.naive_reference(files, root / "naive")
    return files, written, root / "naive"


def _read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive.getmembers()]


def test_corpus_is_imagenet_like(naive_output):
    files, _, _ = naive_output
    assert len(files) == IMAGES
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert min(image.size) >= 333 and max(image.size) == 500
        assert 30_000 < path.stat().st_size < 250_000


def test_naive_tars_hold_36_aligned_members_per_image(naive_output):
    files, written, out = naive_output
    assert written == IMAGES
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == [f"sub-{k:02d}.tar" for k in range(SPLIT)]
    expected_names = [f"{path.stem}.{ext}" for path in files for ext in ("cls", "jpg", "json")]
    labels = {name: index for index, name in enumerate(sorted({p.parent.name for p in files}))}
    for tar in tars:
        members = _read_tar(tar)
        assert [name for name, _ in members] == expected_names  # same keys, same order in every sub-dataset
        for index, path in enumerate(files):
            (_, cls), (_, jpg), (_, meta) = members[3 * index : 3 * index + 3]
            assert int(cls) == labels[path.parent.name]
            assert json.loads(meta)["class"] == path.parent.name
            with Image.open(io.BytesIO(jpg)) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))


def _jpeg_round_trip(pixels: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return np.asarray(Image.open(buffer)).astype(np.int16)


def test_naive_sub_image_k_is_the_pipelines_component_k(naive_output):
    files, _, out = naive_output
    grid = decompose.grid_factor(SPLIT)
    members = [dict(_read_tar(out / f"sub-{k:02d}.tar")) for k in range(SPLIT)]
    for path in files:
        decoded = decode_image(path.read_bytes())
        square = resize.resize_square(decoded.image, grid * SIZE, "center-crop")[..., :3]
        components = decompose.decompose(np.ascontiguousarray(square), grid)
        # The pipeline's component k through the naive encoder: the naive member must match it, and no other.
        expected = np.stack([_jpeg_round_trip(component) for component in components])
        for k in range(SPLIT):
            naive = np.asarray(Image.open(io.BytesIO(members[k][f"{path.stem}.jpg"]))).astype(np.int16)
            errors = np.abs(expected - naive).mean(axis=(1, 2, 3))
            others = np.delete(errors, k)
            assert errors[k] < 1.0 and others.min() > 4 * errors[k], (path.name, k, errors[k], others.min())
