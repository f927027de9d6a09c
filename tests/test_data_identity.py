"""Members are evaluated only on the data they were trained on, and run records hold from any directory.

Real `prepare`, `train` and `ensemble-eval` processes on a tiny corpus, run with relative paths from
one folder and evaluated from another: the same corpus prepared with --seed 0 and --seed 1 (whose
val split holds images the seed-0 members trained on), a sub-dataset whose val tar was replaced by
another sub-dataset's (same keys), and a --split 1 baseline found through its recorded data path.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from corpora import image_folder

PREPARE = ("--size", "16", "--val-per-class", "2", "--shard-size", "8", "--executor", "serial")
TRAIN = ("--config", "sample", "--no-progress", "--device", "cpu", "schedule.epochs=1", "data.batch_size=4")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder holding, by relative names: the corpus, s4 (seed 0), s4-seed1, s1 (seed 0), and runs of
    members 0 and 1 of s4 and of the split-1 baseline, all made with cwd = this folder."""
    work = tmp_path_factory.mktemp("identity")
    image_folder(work / "corpus")
    for out, split, seed in (("s4", "4", "0"), ("s4-seed1", "4", "1"), ("s1", "1", "0")):
        run_cli("prepare", "--src", "corpus", "--out", out, "--split", split, "--seed", seed, *PREPARE, cwd=work)
    run_cli("train", "--data", "s4", "--shard", "0,1", "--out", "runs", *TRAIN, cwd=work)
    run_cli("train", "--data", "s1", "--shard", "0", "--out", "runs1", *TRAIN, cwd=work)
    return work


def _evaluate(work: Path, data: str, *extra: str, runs: str = "runs"):
    elsewhere = work / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return run_cli("ensemble-eval", "--data", str(work / data), "--runs", str(work / runs), "--device", "cpu",
                   "--out", str(elsewhere / "report"), *extra, check=False, cwd=elsewhere)


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return lines[-1]


def test_runs_record_their_data_as_an_absolute_path(work):
    for run, data in (("runs/sub-00", "s4"), ("runs1/sub-00", "s1")):
        record = json.loads((work / run / "run.json").read_text())
        assert record["data"] == str(work / data)
        card = json.loads((work / data / "dataset.json").read_text())
        assert record["dataset"]["seed"] == card["seed"] == 0


def test_baseline_is_found_from_another_directory(work):
    result = _evaluate(work, "s4", "--baseline", str(work / "runs1" / "sub-00"))
    assert result.returncode == 0, result.stderr
    report = json.loads((work / "elsewhere" / "report" / "report.json").read_text())
    assert report["baseline"]["data"] == str(work / "s1") and report["data"] == str(work / "s4")
    assert report["runs"] == str(work / "runs") and report["members"][0]["path"].startswith(str(work))


def test_members_are_refused_on_the_corpus_prepared_with_another_seed(work):
    def keys(data: str, split: str) -> set[str]:
        rows = pq.read_table(work / data / "manifest.parquet").to_pylist()
        return {row["key"] for row in rows if row["split"] == split}

    # The hazard: images the seed-0 members trained on are in the seed-1 val split, under the same keys.
    assert keys("s4-seed1", "val") & keys("s4", "train")
    line = _error_line(_evaluate(work, "s4-seed1"))
    assert "trained on other data" in line and "--seed 0 then, --seed 1 now" in line and "sub-00" in line


def test_a_val_tar_swapped_for_another_sub_datasets_is_refused(work, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(work / "s4", swapped)
    shutil.copyfile(swapped / "sub-01" / "val-000000.tar", swapped / "sub-00" / "val-000000.tar")
    names = []
    for folder in ("sub-00", "sub-02"):
        with tarfile.open(swapped / folder / "val-000000.tar") as archive:
            names.append(archive.getnames())
    assert names[0] == names[1]  # the same keys in the same order: the alignment check alone cannot see it
    result = run_cli("ensemble-eval", "--data", str(swapped), "--runs", str(work / "runs"), "--device", "cpu",
                     "--out", str(tmp_path / "report"), check=False)
    line = _error_line(result)
    assert "sub-00" in line and "val-000000.tar is not the shard prepared for sub-00" in line
    assert not (tmp_path / "report" / "report.json").exists()
    assert run_cli("ensemble-eval", "--data", str(work / "s4"), "--runs", str(work / "runs"), "--device", "cpu",
                   "--out", str(tmp_path / "report"), check=False).returncode == 0
