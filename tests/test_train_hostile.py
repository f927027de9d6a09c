"""`cli.py train` and `ensemble-eval` given damaged data, bad values and files that are not theirs (issue 11):
real processes on real (damaged) tars; every refusal is one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from damaged_data import one_sub_dataset, rewrite_members, undecodable_images

QUICK = ("--config", "sample", "--no-progress", "schedule.epochs=1", "data.batch_size=100")  # one 5-step epoch


def fails_with(result, *texts: str) -> str:
    """The one line of a refusal: exit status 2, nothing else on stderr, no traceback, every text in it."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def truncated_val(prepared_sample, tmp_path_factory):
    """One member trained for one epoch on a dataset whose val shard was cut at half its size."""
    root = tmp_path_factory.mktemp("truncated")
    data = one_sub_dataset(prepared_sample, root / "data")
    val = data / "sub-00" / "val-000000.tar"
    cut = val.stat().st_size // 2
    with tarfile.open(val) as archive:
        whole = {}
        for member in archive:
            whole.setdefault(member.name.partition(".")[0], set()).update(
                [member.name.partition(".")[2]] if member.offset_data + member.size <= cut else [])
    head = sum({"cls", "jpg"} <= exts for exts in whole.values())
    val.write_bytes(val.read_bytes()[:cut])
    result = run_cli("train", "--data", str(data), "--shard", "0", "--out", str(root / "runs"), *QUICK)
    return data, root / "runs" / "sub-00", result, head


def test_a_damaged_val_shard_is_evaluated_up_to_the_damage_and_the_rest_reported(truncated_val):
    _, run_dir, result, head = truncated_val
    final = json.loads((run_dir / "final.json").read_text())
    assert 0 < head < 100
    assert (final["val_samples"], final["val_skipped"], final["validated"]) == (head, 100 - head, True)
    assert f"({head} val samples, 1 epochs); {100 - head} val samples skipped as unreadable" in result.stdout
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert (metrics["val_samples"], metrics["val_skipped"]) == (head, 100 - head)


def _resumable_copy(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished run without final.json: what a run killed after its last checkpoint leaves."""
    shutil.copytree(run_dir, dest / run_dir.name)
    (dest / run_dir.name / "final.json").unlink()
    return dest / run_dir.name


def test_resume_refuses_another_recipe_and_says_when_the_schedule_grew(truncated_val, tmp_path):
    data, run_dir, _, _ = truncated_val
    copy = _resumable_copy(run_dir, tmp_path)
    args = ("train", "--data", str(data), "--shard", "0", "--out", str(tmp_path), "--resume", *QUICK)
    for override, key in (("optimizer.lr=0.01", "optimizer.lr is 0.002 in the checkpoint, 0.01 now"),
                          ("optimizer.name=sgd", "optimizer.name is 'adamw' in the checkpoint, 'sgd' now"),
                          ("data.batch_size=50", "data.batch_size is 100 in the checkpoint, 50 now")):
        fails_with(run_cli(*args, override, check=False), "--resume with another recipe", key)
    assert not (copy / "final.json").exists()
    run_cli(*args, "--epochs", "2")
    config = (copy / "config.yaml").read_text()
    assert config.startswith("# --resume extended schedule.epochs from 1 to 2 after epoch 1: epochs 1-1 followed")
    assert "epochs: 2" in config
    assert json.loads((copy / "final.json").read_text())["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (copy / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_nan_loss_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(truncated_val, tmp_path):
    data, run_dir, _, _ = truncated_val
    copy = _resumable_copy(run_dir, tmp_path)
    checkpoint = torch.load(copy / "last.pt", weights_only=True)
    checkpoint["model"]["net.fc.weight"].fill_(float("nan"))  # as weights that diverged would be
    torch.save(checkpoint, copy / "last.pt")
    kept = (copy / "last.pt").read_bytes()
    result = run_cli("train", "--data", str(data), "--shard", "0", "--out", str(tmp_path), "--resume", *QUICK,
                     "--epochs", "2", check=False)
    fails_with(result, "sub-00 2/2: the training loss is nan at step", "last.pt of epoch 1 kept")
    assert (copy / "last.pt").read_bytes() == kept and not (copy / "final.json").exists()


def test_a_diverging_first_epoch_stops_before_any_checkpoint(prepared_sample, tmp_path):
    data = one_sub_dataset(prepared_sample, tmp_path / "data")
    result = run_cli("train", "--data", str(data), "--shard", "0", "--out", str(tmp_path / "runs"), *QUICK,
                     "data.batch_size=32", "optimizer.name=sgd", "optimizer.lr=1e30", "schedule.warmup_epochs=0",
                     "schedule.min_lr=0", check=False)
    fails_with(result, "the training loss is nan", "stopped before any checkpoint", "lower optimizer.lr")
    assert not (tmp_path / "runs" / "sub-00" / "last.pt").exists()
    assert not (tmp_path / "runs" / "sub-00" / "final.json").exists()


EVIL_MARKER = "subspectral-test-evil-pickle-ran"


class _Evil:
    """Unpickling this runs a command: what a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_that_are_not_ours_are_refused_without_the_unsafe_hint(truncated_val, tmp_path):
    data, run_dir, _, _ = truncated_val
    copy = _resumable_copy(run_dir, tmp_path / "runs")
    marker = tmp_path / EVIL_MARKER
    torch.save({"model": _Evil(marker)}, copy / "last.pt")
    resume = ("train", "--data", str(data), "--shard", "0", "--out", str(tmp_path / "runs"), "--resume", *QUICK)
    line = fails_with(run_cli(*resume, check=False), "last.pt is not a checkpoint written by cli.py train")
    assert "weights_only" not in line and not marker.exists()
    torch.save({"model": {}, "meta": json.loads((copy / "run.json").read_text())}, copy / "last.pt")
    fails_with(run_cli(*resume, check=False), "last.pt lacks optimizer, scheduler, scaler")
    # ensemble-eval's members and baseline: tests/test_ensemble_stage.py


def test_undecodable_train_shards_stop_with_one_line_instead_of_spinning(prepared_sample, tmp_path):
    data = one_sub_dataset(prepared_sample, tmp_path / "data")
    for tar in (data / "sub-00").glob("train-*.tar"):
        rewrite_members(tar, undecodable_images)
    result = run_cli("train", "--data", str(data), "--shard", "0", "--out", str(tmp_path / "runs"), *QUICK,
                     "data.workers=2", check=False, timeout=300)
    fails_with(result, "no usable sample in shard", "are damaged or cannot be decoded")


def test_a_label_outside_the_classes_stops_with_one_line(prepared_sample, tmp_path):
    data = one_sub_dataset(prepared_sample, tmp_path / "data")
    tar = data / "sub-00" / "train-000000.tar"
    changed: list[str] = []

    def first_label_42(name: str, payload: bytes) -> bytes:
        if name.endswith(".cls") and not changed:
            changed.append(name)
            return b"42"
        return payload

    rewrite_members(tar, first_label_42)
    result = run_cli("train", "--data", str(data), "--shard", "0", "--out", str(tmp_path / "runs"), *QUICK,
                     check=False)
    fails_with(result, "train-000000.tar: sample", "has label 42, outside the 10 classes of the dataset card (0..9)")


def test_bad_values_are_refused_before_anything_is_written(prepared_sample, tmp_path):
    # Every range is checked in tests/test_train_config.py; this is the command's path to that check.
    result = run_cli("train", "--data", str(prepared_sample), "--out", str(tmp_path / "runs"), *QUICK,
                     "data.batch_size=-32", check=False)
    fails_with(result, "data.batch_size must be >= 1, got -32")
    assert not (tmp_path / "runs").exists()


def test_without_a_val_split_train_warns_once_and_ensemble_eval_names_what_it_needs(sample_root, tmp_path):
    data = tmp_path / "no-val"
    run_cli("prepare", "--src", str(sample_root), "--out", str(data), "--split", "4", "--size", "16",
            "--val-per-class", "0", "--executor", "serial")
    result = run_cli("train", "--data", str(data), "--shard", "0", "--out", str(tmp_path / "runs"), *QUICK)
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "has no val split" in warnings[0] and "--val-per-class" in warnings[0]
    assert "trained 1 epochs without validation" in result.stdout
    run_dir = tmp_path / "runs" / "sub-00"
    final = json.loads((run_dir / "final.json").read_text())
    assert final["validated"] is False and final["top1"] is None and final["val_samples"] == 0
    assert (run_dir / "best.pt").stat().st_ino == (run_dir / "last.pt").stat().st_ino  # best = last
    refused = run_cli("ensemble-eval", "--data", str(data), "--runs", str(tmp_path / "runs"), check=False)
    fails_with(refused, "has no val split", "--val-per-class N")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def test_sigterm_to_the_process_group_stops_with_one_line_while_loader_workers_run(prepared_sample, tmp_path):
    """A batch scheduler (or Ctrl-C) signals every process of the job, the DataLoader workers included."""
    command = [sys.executable, str(REPO / "cli.py"), "train", "--data", str(prepared_sample), "--shard", "0",
               "--out", str(tmp_path), *QUICK, "schedule.epochs=2", "data.batch_size=50", "data.workers=2"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(_children(process.pid)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # until the two loader workers run
    time.sleep(1)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert stderr.strip().splitlines() == ["SIGTERM received: stopped; rerun the same command to resume"], stderr
