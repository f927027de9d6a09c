"""examples/fashion_mnist: the quick path end to end on a tiny subset, and its idx reader.

Needs Debian's dataset-fashion-mnist (the README's `make test` requirements; .ci/run installs it).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

SCRIPT = REPO / "examples" / "fashion_mnist" / "run.py"
IDX_DIR = Path("/usr/share/datasets/fashion-mnist")


def _example():
    spec = importlib.util.spec_from_file_location("fashion_mnist_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _idx(path: Path, array: np.ndarray, *, magic_type: int = 0x08, extra: bytes = b"") -> Path:
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes() + extra))
    return path


def test_idx_reader_reads_what_was_written_and_refuses_other_files(tmp_path):
    example = _example()
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    assert np.array_equal(example.read_idx(_idx(tmp_path / "ok.gz", images)), images)
    with pytest.raises(example.IdxError, match="not an idx file of unsigned bytes"):
        example.read_idx(_idx(tmp_path / "float.gz", images, magic_type=0x0D))
    with pytest.raises(example.IdxError, match="holds 61 values where its header announces 3x4x5"):
        example.read_idx(_idx(tmp_path / "long.gz", images, extra=b"\0"))
    with pytest.raises(example.IdxError, match="apt-get install dataset-fashion-mnist"):
        example.read_idx(tmp_path / "missing.gz")


def test_first_per_class_keeps_file_order():
    example = _example()
    labels = np.array([2, 0, 2, 1, 0, 2, 1, 0])
    assert example.first_per_class(labels, 2).tolist() == [0, 1, 2, 3, 4, 6]
    assert example.first_per_class(labels, None).tolist() == list(range(8))


def test_missing_idx_files_give_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--idx-dir",
                             str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fashion-mnist: error: {tmp_path}/train-images-idx3-ubyte.gz not found (Debian: apt-get install "
        "dataset-fashion-mnist, or pass --idx-dir)"]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 41 members and 14 processes: a few minutes alone, far more on a shared machine
def test_quick_path_end_to_end_on_a_tiny_subset(tmp_path):
    assert IDX_DIR.is_dir(), "install Debian's dataset-fashion-mnist (README: what make test needs)"
    out = tmp_path / "fm"
    result = subprocess.run([sys.executable, str(SCRIPT), "--setting", "quick", "--out", str(out),
                             "--train-per-class", "20", "--val-per-class", "3", "--epochs", "1", "--device", "cpu"],
                            capture_output=True, text=True, cwd=REPO, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["setting"] == {"train_per_class": 20, "val_per_class": 3, "epochs": 1}
    assert [step["step"] for step in summary["steps"]][:3] == ["imagefolder", "prepare full", "train full"]
    assert all(step.get("returncode", 0) == 0 for step in summary["steps"])
    assert set(summary["reports"]) == {"sub4", "sub16", "sub4-dct", "sub16-dct"}
    for name, report in summary["reports"].items():
        members = 4 if name.startswith("sub4") else 16
        assert len(report["members"]) == members and report["samples"] == 30, name
        assert report["baseline"]["ten_crop"] is (name == "sub4"), name
        assert report["cost"]["ensemble"]["parameters"] == members * report["cost"]["baseline"]["parameters"]
        assert (out / "reports" / name / "accuracy_vs_members.png").is_file()
    card = json.loads((out / "data" / "sub16" / "dataset.json").read_text())
    assert (card["counts"]["written"], card["counts"]["rejected"], card["size"]) == (230, 0, 7)
    run = json.loads((out / "runs" / "sub16" / "sub-15" / "run.json").read_text())
    assert run["model"]["stem"] == "lowres" and run["recipe"] == "small"
    printed = result.stdout
    assert "| baseline 28 px, 10-crop |" in printed and "| sub16-dct | 16 |" in printed
    assert (out / "summary.md").read_text() in printed
