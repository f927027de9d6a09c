"""The embedded sample corpus: deterministic, ImageNet-shaped, quirky, atomic, and learnable."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image, ImageOps
from subspectral.pipeline import sample
from subspectral.pipeline.sample import plan_sample, render_image, sample_corpus

CLASSES, PER_CLASS = 10, 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return sample_corpus(tmp_path_factory.mktemp("cache"), classes=CLASSES, per_class=PER_CLASS)


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_same_arguments_give_identical_files_and_another_seed_does_not(tmp_path):
    a, b, c = (sample_corpus(tmp_path / name, classes=10, per_class=2, seed=seed)
               for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    names = [p.relative_to(a) for p in _files(a)]
    assert len(names) == 20
    assert names == [p.relative_to(b) for p in _files(b)]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert [p.read_bytes() for p in _files(a)] != [p.read_bytes() for p in _files(c)]


def test_imagenet_layout(corpus):
    folders = sorted(p.name for p in corpus.iterdir())
    assert len(folders) == CLASSES and all(re.fullmatch(r"n\d{8}", f) for f in folders)
    assert folders[0] == "n01440764"
    for folder in folders:
        names = [p.name for p in (corpus / folder).iterdir()]
        assert len(names) == PER_CLASS
        assert all(re.fullmatch(rf"{folder}_\d+( copy\.v2)?\.JPEG", n) for n in names)
    assert len([p for p in _files(corpus) if " " in p.name and p.stem.count(".") == 1]) == 1


def test_quirks_of_real_corpora_are_there(corpus):
    images = [Image.open(p) for p in _files(corpus)]
    modes = [im.mode for im in images]
    assert modes.count("L") >= 2 and modes.count("CMYK") == 1
    assert [im.format for im in images].count("PNG") == 1
    orientations = sorted(im.getexif().get(0x0112, 1) for im in images)
    assert orientations[-2:] == [3, 6]


@pytest.mark.parametrize("quirk", ["exif6", "exif3"])
def test_exif_orientation_gives_the_upright_picture(corpus, quirk):
    spec = next(s for s in plan_sample(CLASSES, PER_CLASS) if s.quirk == quirk)
    stored = Image.open(corpus / spec.wnid / spec.name)
    upright = ImageOps.exif_transpose(stored)
    assert upright.size == (spec.width, spec.height)
    if quirk == "exif6":
        assert stored.size == (spec.height, spec.width) != upright.size
    error = np.abs(np.asarray(upright, np.float32) - render_image(spec, CLASSES)).mean()
    assert error < 3, f"{quirk}: stored pixels are not the upright picture turned (mean error {error:.1f})"


def test_sizes_vary_like_imagenet(corpus):
    sizes = [Image.open(p).size for p in _files(corpus)]
    assert all(160 <= side <= 640 for size in sizes for side in size)
    landscape = sum(w > h for w, h in sizes)
    assert 0.5 * len(sizes) < landscape < 0.9 * len(sizes)
    assert sum(w < h for w, h in sizes) >= 20 and sum(w == h for w, h in sizes) >= 20
    assert len(set(sizes)) > len(sizes) // 2


def test_second_call_reuses_the_corpus(corpus):
    first = _files(corpus)[0]
    before = (corpus.stat().st_mtime_ns, first.stat().st_mtime_ns)
    assert sample_corpus(corpus.parent, classes=CLASSES, per_class=PER_CLASS) == corpus
    assert (corpus.stat().st_mtime_ns, first.stat().st_mtime_ns) == before
    assert [p.name for p in corpus.parent.iterdir()] == [corpus.name]


def test_interrupted_generation_leaves_nothing_to_reuse(tmp_path, monkeypatch):
    calls = []

    def failing_encode(spec, pixels):
        calls.append(spec)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return b"partial"

    monkeypatch.setattr(sample, "encode_image", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        sample_corpus(tmp_path, classes=2, per_class=4)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("classes, per_class", [(1, 60), (2, 3), (10**4, 1), (10, 0), (10, 10**5)])
def test_bad_sizes_are_refused(tmp_path, classes, per_class):
    with pytest.raises(ValueError, match="sample corpus"):
        sample_corpus(tmp_path, classes=classes, per_class=per_class)


def _sub_image_thumbnail(path) -> np.ndarray:
    """What one sub-network sees, shrunk: 336x336 centre crop, sub-image 0 (every 6th pixel), 8x8 means."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    sub = np.asarray(ImageOps.fit(img, (336, 336), Image.Resampling.BICUBIC), np.float32)[::6, ::6]
    return sub.reshape(8, 7, 8, 7, 3).mean(axis=(1, 3)).ravel()


def test_a_strided_sub_image_is_enough_to_tell_classes_apart(corpus):
    """Nearest class mean on 8x8 thumbnails of sub-image 0, fitted on 40 images per class."""
    folders = sorted(corpus.iterdir())
    features = np.stack([[_sub_image_thumbnail(p) for p in sorted(f.iterdir())] for f in folders])
    means = features[:, :40].mean(axis=1)
    held_out = features[:, 40:].reshape(-1, features.shape[-1])
    truth = np.repeat(np.arange(len(folders)), PER_CLASS - 40)
    predicted = ((held_out[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    accuracy = (predicted == truth).mean()
    assert accuracy > 0.5, f"nearest-class-mean accuracy {accuracy:.2f} (chance {1 / len(folders):.2f})"
