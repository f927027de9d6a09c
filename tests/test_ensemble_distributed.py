"""ensemble-eval split across two workers (gloo, CPU), started by torchrun or by srun, equals the single-process
run exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_as_srun_tasks
from ensemble_fixtures import make_dataset, make_torch_run

ROOT = Path(__file__).resolve().parent.parent


def _torchrun(argv: list[str]) -> list[subprocess.CompletedProcess]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [subprocess.run([*torchrun, *argv], cwd=ROOT, capture_output=True, text=True)]


def _srun(argv: list[str]) -> list[subprocess.CompletedProcess]:
    return run_as_srun_tasks([sys.executable, *argv], ntasks=2)


@pytest.mark.slow
@pytest.mark.parametrize("launch", [_torchrun, _srun], ids=["torchrun", "srun"])
def test_two_workers_merge_to_the_single_process_result(tmp_path: Path, launch) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 11).tolist()
    images = rng.integers(0, 256, (4, 11, 16, 16, 3), dtype=np.uint8)
    data, runs = tmp_path / "data", tmp_path / "runs"
    card = make_dataset(data, images, labels, num_classes=5, shard_size=3)  # 4 shards: 3 + 3 + 3 + 2
    for shard, top1 in [(0, 40.0), (1, 60.0), (3, 50.0)]:
        make_torch_run(runs, card, shard, top1, str(data), seed=shard)
    # A split-1 baseline of the same keys, tested with 10 crops and with one: both sets of counters are summed.
    full = tmp_path / "full"
    full_card = make_dataset(full, rng.integers(0, 256, (1, 11, 32, 32, 3), dtype=np.uint8), labels,
                             num_classes=5, shard_size=3)
    baseline = make_torch_run(tmp_path / "runs-full", full_card, 0, 45.0, str(full), seed=7)
    command = ["cli.py", "ensemble-eval", "--data", str(data), "--runs", str(runs), "--device", "cpu",
               "--batch-size", "2", "--baseline", str(baseline), "--ten-crop"]
    single = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "one")], cwd=ROOT,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    for split in launch([*command, "--out", str(tmp_path / "two")]):
        assert split.returncode == 0, split.stderr

    one, two = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two"))
    assert two["workers"] == 2 and one["workers"] == 1
    for key in ("samples", "members", "methods", "accuracy_vs_members", "mean_member", "missing", "baseline"):
        assert one[key] == two[key], key
    assert two["baseline"]["ten_crop"] and set(two["baseline"]["one_crop"]) == {"top1", "top5"}
    assert one["samples"] == 11
    rows_one = pq.read_table(tmp_path / "one" / "predictions.parquet")
    assert rows_one.equals(pq.read_table(tmp_path / "two" / "predictions.parquet"))
    assert not list((tmp_path / "two").glob("predictions.part*"))
