"""`cli.py prepare` end to end on real files, real Ray, real tar readers."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from conftest import REPO, photo_like, run_cli
from corpora import TAR_QUIRKS, add_folder_quirks, add_tar_quirks, class_tars, image_folder, jpeg
from PIL import Image
from subspectral.pipeline.decode import SizeLimits
from subspectral.pipeline.decompose import dct_inverse
from subspectral.pipeline.plan import PlanOptions
from subspectral.pipeline.prepare import PrepareOptions, TooManyRejects, prepare, reject_failure
from subspectral.pipeline.shard import SampleEncoder, SampleSpec
from subspectral.pipeline.storage import location
from subspectral.schemas import DatasetCard
from subspectral.schemas.bands import decode_band


def run_prepare(src: Path | list[Path], out: Path, *, split: int = 36, image_format: str = "jpg", transform="none",
                shard_size: int = 100, val_per_class: int = 0, layout: str = "auto", **spec) -> dict:
    sources = tuple(location(s).uri for s in (src if isinstance(src, list) else [src]))
    options = PrepareOptions(
        sources=sources, out=location(out).uri, layout=layout,
        spec=SampleSpec(split=split, image_format=image_format, transform=transform, **spec),
        plan=PlanOptions(shard_size=shard_size, seed=0, val_per_class=val_per_class),
    )
    return prepare(options, num_workers=2, ray_address=None, dry_run=False, log=lambda _: None)


def read_sub_dataset(out: Path, name: str, split: str) -> list[dict]:
    card = json.loads((out / "dataset.json").read_text())
    urls = [str(out / name / f"{split}-{j:06d}.tar") for j in range(card["splits"][split]["shards"])]
    return list(wds.WebDataset(urls, shardshuffle=False)) if urls else []


def assert_aligned(out: Path) -> dict:
    """Every sub-dataset holds the same keys in the same shards in the same order; returns the card."""
    card = json.loads((out / "dataset.json").read_text())
    DatasetCard.from_json(card)  # valid against the JSON Schema, consistent, of this version
    for split, info in card["splits"].items():
        for j in range(info["shards"]):
            reference = None
            for name in card["sub_datasets"]:
                with tarfile.open(out / name / f"{split}-{j:06d}.tar") as archive:
                    names = archive.getnames()
                if reference is None:
                    reference = [n.split(".", 1)[0] for n in names]
                assert [n.split(".", 1)[0] for n in names] == reference, f"{name} {split} shard {j} misaligned"
    return card


def components_of(samples_by_sub: list[list[dict]], index: int, ext: str, side: int = 0) -> np.ndarray:
    return np.stack([np.load(io.BytesIO(s[index][ext])) if ext == "npy" else _dctz(s[index][ext], side)
                     if ext == "dctz" else np.asarray(Image.open(io.BytesIO(s[index][ext])).convert("RGB"))
                     for s in samples_by_sub])


def _dctz(data: bytes, side: int) -> np.ndarray:
    band = np.empty((side, side, 3), np.int16)
    assert decode_band(data, band)
    return band


def expected_square(source: str, split: int = 36, size: int = 56) -> np.ndarray:
    """The resized image as the pipeline computes it before splitting."""
    square, _, _ = SampleEncoder(SampleSpec(split=split, size=size)).square(Path(source).read_bytes())
    return square[..., :3]


def pixel_shuffle(components: np.ndarray) -> np.ndarray:
    """Reference composition by torch: (N, s, s, 3) → (S, S, 3)."""
    n = components.shape[0]
    r = int(round(n ** 0.5))
    channels = torch.from_numpy(components).permute(3, 0, 1, 2).reshape(1, 3 * n, *components.shape[1:3])
    return F.pixel_shuffle(channels, r)[0].permute(1, 2, 0).numpy()


def test_sample_png_split36_reconstructs_bit_exactly_and_aligns(ray_local, sample_root, tmp_path):
    out = tmp_path / "out"
    run_prepare(sample_root, out, image_format="png", shard_size=200, val_per_class=10, sample_json=True)
    card = assert_aligned(out)
    assert card["counts"]["written"] == 600 and card["counts"]["rejected"] == 0
    assert card["splits"]["val"]["samples"] == 100
    subs = [read_sub_dataset(out, name, "train") for name in card["sub_datasets"]]
    for index in (0, 7, 250, len(subs[0]) - 1):
        meta = json.loads(subs[0][index]["json"])
        image = pixel_shuffle(components_of(subs, index, "png"))
        np.testing.assert_array_equal(image, expected_square(meta["src"]))
        assert int(subs[5][index]["cls"]) == int(subs[0][index]["cls"])
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == 600 and set(manifest.column("status").to_pylist()) == {"written"}
    classes = pq.read_table(out / "classes.parquet").to_pylist()
    assert [c["name"] for c in classes] == sorted(c["name"] for c in classes)
    assert sum(c["train"] + c["val"] for c in classes) == 600


@pytest.mark.parametrize(("transform", "image_format"), [("none", "npy"), ("dct", "npy"), ("dct", "dctz")])
def test_npy_components_and_dct_bands_invert_exactly(ray_local, tmp_path, transform, image_format):
    root = image_folder(tmp_path / "corpus")
    out = tmp_path / "out"
    card = run_prepare(root, out, split=4, size=40, image_format=image_format, transform=transform, sample_json=True)
    assert card["dct_scale"] == (2 if transform == "dct" else None)
    subs = [read_sub_dataset(out, name, "train") for name in card["sub_datasets"]]
    for index in range(len(subs[0])):
        parts = components_of(subs, index, image_format, side=40)
        if transform == "dct":
            assert parts.dtype == np.int16
            parts = dct_inverse(parts)
        meta = json.loads(subs[0][index]["json"])
        np.testing.assert_array_equal(pixel_shuffle(parts), expected_square(meta["src"], 4, 40))


def test_ray_data_reads_a_sub_dataset(ray_local, tmp_path):
    out = tmp_path / "out"
    card = run_prepare(image_folder(tmp_path / "corpus"), out, split=9, size=16, shard_size=5)
    assert card["splits"]["train"]["shards"] == 4
    rows = ray_local.data.read_webdataset(str(out / "sub-04")).take_all()
    assert len(rows) == card["splits"]["train"]["samples"] == 18
    assert {r["__key__"] for r in rows} == {s["__key__"] for s in read_sub_dataset(out, "sub-04", "train")}


def test_bad_inputs_are_rejected_with_reasons_and_counts_reconcile(ray_local, tmp_path):
    folder = image_folder(tmp_path / "folder")
    expected_folder = add_folder_quirks(folder)
    tars = class_tars(tmp_path / "tars")
    add_tar_quirks(tars)
    out = tmp_path / "out"
    card = run_prepare([folder, tars], out, split=4, size=24)
    assert_aligned(out)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    got = {r["source"].split(str(tmp_path) + "/", 1)[1]: r["reason"] for r in rejects}
    want = {f"folder/{k}": v for k, v in expected_folder.items() if v}
    want.update({f"tars/{t}" + (f"#{m}" if m else ""): v for (t, m), v in TAR_QUIRKS.items()})
    assert got == want
    counts = card["counts"]
    assert counts["inputs"] == counts["written"] + counts["rejected"]
    manifest = pq.read_table(out / "manifest.parquet")
    written = manifest.filter(pc.equal(manifest.column("status"), "written"))
    assert counts["written"] == written.num_rows == 6 * 3 * 2 + 2 + 7  # good images in both layouts + odd ones
    keys = written.column("key").to_pylist()
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    assert not Path("/tmp/subspectral-evil-absolute.JPEG").exists()
    assert not (tmp_path / "subspectral-evil-parent.JPEG").exists()


def test_both_layouts_give_the_same_samples(ray_local, tmp_path):
    a = run_prepare(image_folder(tmp_path / "folder"), tmp_path / "a", split=4, size=24)
    b = run_prepare(class_tars(tmp_path / "tars"), tmp_path / "b", split=4, size=24)
    assert a["counts"]["written"] == b["counts"]["written"] == 18
    for sub in a["sub_datasets"]:
        left = read_sub_dataset(tmp_path / "a", sub, "train")
        right = read_sub_dataset(tmp_path / "b", sub, "train")
        assert [(s["__key__"], s["cls"], s["jpg"]) for s in left] == [(s["__key__"], s["cls"], s["jpg"]) for s in right]


def test_real_photos(ray_local, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    root = tmp_path / "photos"
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        (root / name).mkdir(parents=True)
        Image.fromarray(getattr(skimage_data, name)()).save(root / name / f"{name}.JPEG", quality=92)
    out = tmp_path / "out"
    run_prepare(root, out, image_format="png", sample_json=True)
    subs = [read_sub_dataset(out, f"sub-{k:02d}", "train") for k in range(36)]
    for index in range(4):
        meta = json.loads(subs[0][index]["json"])
        np.testing.assert_array_equal(pixel_shuffle(components_of(subs, index, "png")), expected_square(meta["src"]))


# ---- the command line, as a user runs it -------------------------------------------------------------

def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


CLI_OPTIONS = ("--shard-size", "40", "--val-per-class", "5", "--split", "16", "--size", "28")


@pytest.fixture(scope="module")
def reference_run(sample_root, tmp_path_factory):
    """The sample prepared by the CLI with one worker: the reference for the runs below."""
    out = tmp_path_factory.mktemp("ref") / "out"
    result = run_cli("prepare", "--src", str(sample_root), "--out", str(out), "--num-workers", "1", *CLI_OPTIONS)
    assert "600 written + 0 rejected = 600 inputs" in result.stdout
    return out


def test_cli_output_is_byte_identical_for_one_and_two_workers(reference_run, sample_root, tmp_path):
    out = tmp_path / "out"
    result = run_cli("prepare", "--src", str(sample_root), "--out", str(out), "--num-workers", "2", *CLI_OPTIONS)
    assert "2 worker(s)" in result.stdout
    assert tree_bytes(out) == tree_bytes(reference_run)


def test_cli_resumes_after_a_real_kill(reference_run, sample_root, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "cli.py"), "prepare", "--src", str(sample_root), "--out", str(out),
               "--num-workers", "1", *CLI_OPTIONS]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((out / "stats").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its Ray workers, mid-run
    process.wait()
    done = -1
    while done != (done := len(list((out / "stats").glob("*.json")))):  # a worker may outlive its driver briefly
        time.sleep(2)
    card = json.loads((reference_run / "dataset.json").read_text())
    total = card["splits"]["train"]["shards"] + card["splits"]["val"]["shards"]
    assert 0 < done < total and not (out / "dataset.json").exists()
    for tar in out.glob("sub-*/*.tar"):  # whatever is visible is a complete tar; partial ones are hidden
        with tarfile.open(tar) as archive:
            archive.getmembers()
    result = run_cli("prepare", "--src", str(sample_root), "--out", str(out), "--num-workers", "2", *CLI_OPTIONS)
    assert f"{total - done} shard(s) to write" in result.stdout
    assert tree_bytes(out) == tree_bytes(reference_run)


def test_cli_refuses_changed_options_and_skips_a_finished_run(reference_run, sample_root):
    again = run_cli("prepare", "--src", str(sample_root), "--out", str(reference_run), *CLI_OPTIONS)
    assert "already complete" in again.stdout
    changed = run_cli("prepare", "--src", str(sample_root), "--out", str(reference_run), *CLI_OPTIONS,
                      "--quality", "80", check=False)
    assert changed.returncode == 2
    assert "prepared with other options (spec.quality: 95 then, 80 now)" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1


def test_cli_dry_run_prints_the_plan_and_writes_nothing(sample_root, tmp_path):
    out = tmp_path / "out"
    result = run_cli("prepare", "--src", str(sample_root), "--out", str(out), "--dry-run", "--num-workers", "2",
                     *CLI_OPTIONS)
    assert "classes: 10" in result.stdout and "train 550, val 50" in result.stdout
    assert "estimated output" in result.stdout
    assert "listed in parallel by 2 worker(s)" in result.stdout  # class folders: on the workers, as a real run
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (("--split", "35"), "perfect square"),
    (("--transform", "dct", "--format", "jpg"), "needs --format dctz"),
    (("--format", "dctz"), "needs --transform dct"),
    (("--src", "/nonexistent/corpus"), "no such file or folder"),
])
def test_cli_bad_options_give_one_clear_line(tmp_path, args, message):
    result = run_cli("prepare", "--out", str(tmp_path / "o"), *(args if "--src" in args else ("--src", str(tmp_path),
                     *args)), check=False)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---- failing loudly, counting honestly, sizing shards (issue 10, issue 11 items 2 and 4) ------------------

def tiny_corpus(root: Path, per_class: int = 3, side: int = 20) -> Path:
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{name}{i}.jpg").write_bytes(jpeg(900 + 10 * c + i, side, side))
    return root


def test_cli_run_that_rejects_everything_exits_2_with_one_line_and_keeps_its_shards(tmp_path):
    """Before: exit 0, empty tars, and '64880640 bytes per sample'."""
    root = tiny_corpus(tmp_path / "tiny")
    out = tmp_path / "out"
    args = ("prepare", "--src", str(root), "--out", str(out), "--split", "4", "--size", "8", "--shard-size", "2",
            "--executor", "serial")
    result = run_cli(*args, "--min-side", "32", check=False)
    line = (f"prepare: error: 6 of 6 inputs rejected as too_small (e.g. 20x20 is under 32 px): --min-side 32 sets "
            f"the limit; see {out}/rejects.parquet")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]
    assert "(no sample)" in result.stdout and "bytes per sample" not in result.stdout
    assert not (out / "dataset.json").exists()
    assert len(list((out / "stats").glob("*.json"))) == 3  # the finished shards stay
    assert {r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist()} == {"too_small"}
    again = run_cli(*args, "--min-side", "32", check=False)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [line]
    assert "0 shard(s) to write" in again.stdout
    fixed = run_cli(*args, "--min-side", "16", check=False)
    assert fixed.returncode == 2
    assert "prepared with other options (spec.limits.min_side: 32 then, 16 now)" in fixed.stderr


def test_reject_fraction_line_names_the_main_reason_among_several():
    options = PrepareOptions(sources=("/c",), out="/o", layout="auto", spec=SampleSpec(),
                             plan=PlanOptions(shard_size=None, seed=0, min_per_class=500))
    card = {"counts": {"inputs": 5000, "written": 1900, "rejected": 3100,
                       "rejected_by_reason": {"below_min_per_class": 2900, "truncated": 200}}}
    examples = {"below_min_per_class": "class n1 has 12 images, fewer than --min-per-class 500", "truncated": "x"}
    assert reject_failure(card, 0.5, options, examples) == (
        "3,100 of 5,000 inputs rejected (62% > --max-reject-fraction 0.5), 2,900 as below_min_per_class (e.g. class n1 "
        "has 12 images, fewer than --min-per-class 500): --min-per-class 500 sets the limit; see /o/rejects.parquet")
    assert reject_failure(card, 0.7, options, examples) is None


def test_cli_duplicate_list_rows_never_give_a_key_twice(tmp_path):
    """issue 11, item 2: the same path twice in a list gave the same key twice in one tar."""
    root = tiny_corpus(tmp_path / "c", side=40)
    rows = ["path,label"] + [f"{c}/{c}{i}.jpg,{c}" for c in "ab" for i in range(3)] + ["a/a0.jpg,a", "b/b1.jpg,a"]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    result = run_cli("prepare", "--src", str(root / "list.csv"), "--out", str(out), "--split", "4", "--size", "8",
                     "--shard-size", "100", "--executor", "serial")
    assert "5 written + 3 rejected = 8 inputs" in result.stdout  # a0 once more; b1 under two labels
    with tarfile.open(out / "sub-00" / "train-000000.tar") as archive:
        names = archive.getnames()
    assert len(names) == len(set(names)) == 2 * 5
    keys = pq.read_table(out / "manifest.parquet").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 5
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert sorted((Path(r["source"]).name, r["reason"]) for r in rejects) == [
        ("a0.jpg", "duplicate_input"), ("b1.jpg", "duplicate_input"), ("b1.jpg", "duplicate_input")]


def test_cli_warns_of_classes_left_short_after_rejects(tmp_path):
    """issue 11, item 4: --min-per-class and --val-per-class count listed files, so rejects can leave a class short."""
    root = tmp_path / "c"
    lines = ["path,label,split"]
    for c, bad in (("a", 3), ("b", 0)):
        (root / c).mkdir(parents=True)
        for i in range(12):
            data = jpeg(i, 60, 50)
            (root / c / f"{c}{i}.jpg").write_bytes(data[:300] if i < bad else data)
            lines.append(f"{c}/{c}{i}.jpg,{c},{'val' if i < 2 else 'train'}")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = run_cli("prepare", "--src", str(root / "list.csv"), "--out", str(out), "--split", "4", "--size", "8",
                     "--shard-size", "100", "--min-per-class", "12", "--val-per-class", "2", "--executor", "serial")
    assert "21 written + 3 rejected = 24 inputs" in result.stdout
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"]["short_classes"] == {"min_per_class": [["a", 9]], "val_per_class": [["a", 0]]}
    assert ("warning: 1 classes got fewer written images than --min-per-class asked after rejects (a 9)"
            in result.stdout)
    assert "warning: 1 classes got fewer written val images than --val-per-class asked" in result.stdout
    classes = pq.read_table(out / "classes.parquet").to_pylist()
    assert [(c["name"], c["train"], c["val"]) for c in classes] == [("a", 9, 0), ("b", 10, 2)]


def test_cli_shard_size_follows_the_target_tar_size(sample_root, tmp_path):
    out = tmp_path / "out"
    run_cli("prepare", "--src", str(sample_root), "--out", str(out), "--split", "4", "--size", "24",
            "--shard-bytes", "400KB", "--executor", "serial")
    card = json.loads((out / "dataset.json").read_text())
    recorded = json.loads((out / "_work" / "shard_size.json").read_text())
    assert card["shard_bytes"] == 400_000 and card["shard_size"] == recorded["shard_size"]
    assert recorded["estimate"]["samples"] == 32
    full = [path.stat().st_size for path in sorted((out / "sub-00").glob("train-*.tar"))][:-1]
    assert len(full) >= 2 and all(0.75 * 400_000 < size < 1.25 * 400_000 for size in full), full


def test_images_of_at_least_s_by_s_are_kept_by_default(tmp_path):
    # Fashion-MNIST-sized 28x28 images at S = 2 x 14: the old default (--min-side 32) rejected all of them.
    import argparse

    from subspectral.pipeline import prepare_cli

    src = tmp_path / "small"
    for c in range(2):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(photo_like(28, 28, seed=10 * c + i)[..., 0], "L").save(src / f"class{c}" / f"i{c}{i}.png")
    parser = argparse.ArgumentParser()
    prepare_cli.add_arguments(parser)

    def cli_prepare(out: str, *extra: str) -> tuple[dict, list[str]]:
        args = parser.parse_args(["--src", str(src), "--out", str(tmp_path / out), "--split", "4", "--size", "14",
                                  "--format", "png", *extra])
        lines: list[str] = []
        prepare(prepare_cli.options_from_args(args), num_workers=1, ray_address=None, dry_run=False,
                executor="serial", log=lines.append)
        return json.loads((tmp_path / out / "dataset.json").read_text()), lines

    card, _ = cli_prepare("sub4")
    assert card["counts"]["written"] == 6 and card["counts"]["rejected"] == 0
    assert card["min_side"] == 28  # min(32, S)
    # Asked for explicitly, a larger minimum rejects them all: the run stops with one line (issue 10), and the
    # summary says which option did it.
    args = parser.parse_args(["--src", str(src), "--out", str(tmp_path / "strict"), "--split", "4", "--size", "14",
                              "--format", "png", "--min-side", "32", "--shard-size", "10"])
    lines: list[str] = []
    with pytest.raises(TooManyRejects, match="6 of 6 inputs rejected as too_small"):
        prepare(prepare_cli.options_from_args(args), num_workers=1, ray_address=None, dry_run=False,
                executor="serial", log=lines.append)
    assert "too_small: shorter side under --min-side 32 px" in lines[-1]


def test_default_min_side_is_unchanged_for_large_targets():
    assert SampleSpec(split=36, size=56).limits.min_side == 32  # S = 336
    assert SampleSpec(split=1, size=28).limits.min_side == 28
    assert SampleSpec(split=16, size=7, limits=SizeLimits(min_side=5)).limits.min_side == 5
