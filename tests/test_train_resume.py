"""A run killed (SIGKILL) after its first checkpoint and resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import kill_when_written, run_cli

# Deterministic CPU run that exercises every resumable state: shuffling, augmentation, mixup and
# cutmix, EMA, warmup + cosine schedule, AdamW moments, a DataLoader worker.
ARGS = ("--shard", "4", "--config", "sample", "--no-progress", "schedule.epochs=2", "data.batch_size=100",
        "train.deterministic=true", "data.workers=1", "train.ema_decay=0.9", "train.mixup_alpha=0.2",
        "train.cutmix_alpha=1.0", "train.mix_prob=0.8", "train.val_every=2")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final.pt", weights_only=True)["model"]


def test_killed_and_resumed_run_equals_uninterrupted_run(prepared_sample, tmp_path):
    data = ("--data", str(prepared_sample))
    run_cli("train", *data, "--out", str(tmp_path / "whole"), *ARGS)

    killed = tmp_path / "killed"
    checkpoint = killed / "sub-04" / "last.pt"
    kill_when_written(checkpoint, "train", *data, "--out", str(killed), *ARGS)
    assert not (killed / "sub-04" / "final.json").exists()
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0  # epoch 1 of 2 done

    run_cli("train", *data, "--out", str(killed), "--resume", *ARGS)
    whole, resumed = _final_weights(tmp_path / "whole" / "sub-04"), _final_weights(killed / "sub-04")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    metrics = [json.loads(line) for line in (killed / "sub-04" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in metrics] == [1, 2]
    # The training time covers both processes' epochs, not only the resumed one's.
    final = json.loads((killed / "sub-04" / "final.json").read_text())
    assert final["train_seconds"] == metrics[0]["epoch_seconds"] + metrics[1]["epoch_seconds"]
    assert final["peak_rss_bytes"] == max(line["peak_rss_bytes"] for line in metrics)
    # Resuming a finished member is a no-op that reports it.
    assert "top1" in run_cli("train", *data, "--out", str(killed), "--resume", *ARGS).stdout
