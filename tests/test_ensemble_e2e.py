"""The chain on the embedded sample: prepare --split 4, train two members, ensemble-eval.

Members train one short epoch (the test checks the plumbing, not accuracy); the ensemble must
measure each member exactly as the trainer measured it on the same val split (same decoding,
same normalisation, same weights), which ties the three commands together.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_prepare_train_ensemble_on_the_sample(tmp_path: Path) -> None:
    data, runs, out = tmp_path / "data", tmp_path / "runs", tmp_path / "report"
    # 45 of the sample's 60 images per class go to val: short training, a val set of 450.
    cli("prepare", "--out", str(data), "--split", "4", "--val-per-class", "45", "--shard-size", "128",
        "--executor", "serial")
    cli("train", "--data", str(data), "--shard", "0,2", "--config", "sample", "--out", str(runs),
        "--epochs", "1", "--device", "cpu", "--no-progress", "data.workers=0")
    result = cli("ensemble-eval", "--data", str(data), "--runs", str(runs), "--out", str(out),
                 "--device", "cpu")

    assert "| **ensemble: geo (p = 0.3)** |" in result.stdout
    assert "missing members, not evaluated: sub-01, sub-03" in result.stderr
    report = json.loads((out / "report.json").read_text())
    card = json.loads((data / "dataset.json").read_text())
    assert report["samples"] == card["splits"]["val"]["samples"] == 450
    assert sorted(m["shard"] for m in report["members"]) == [0, 2]
    for member in report["members"]:
        final = json.loads((runs / member["folder"] / "final.json").read_text())
        assert 100 * member["top1"] == pytest.approx(final["top1"], abs=1e-9)
        assert 100 * member["top5"] == pytest.approx(final["top5"], abs=1e-9)
    best_first = sorted(report["members"], key=lambda m: -m["val_top1_own"])
    assert report["members"] == [{**m, "rank": i} for i, m in enumerate(best_first)]
    assert report["accuracy_vs_members"]["mean-logits"][0]["top1"] == report["members"][0]["top1"]
    assert pq.read_table(out / "predictions.parquet").num_rows == 450
