"""DDP: two CPU processes (gloo) train like one process with the same global batch, whether torchrun
started them or srun did (Slurm's variables only, no torchrun: train/distributed.py reads them).

BatchNorm normalises over each rank's half of a batch, which changes the gradients a lot (measured:
relative difference 0.8 at initialisation) against one process normalising over the whole batch.
The reference is therefore one process accumulating 2 micro-batches, split the way 2 ranks split
the data; with it the parameters agree to float rounding (measured: bit-equal).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_as_srun_tasks, run_cli
from subspectral.train.models import create_model

# Stream order, no augmentation, plain SGD: both runs see the same global batches in the same order.
ARGS = ("--shard", "0", "--config", "sample", "--no-progress", "schedule.epochs=1", "data.batch_size=100",
        "data.shuffle_buffer=0", "data.shuffle_shards=false", "data.crop=none", "data.hflip=false",
        "data.workers=0", "optimizer.name=sgd", "optimizer.lr=0.02", "optimizer.momentum=0",
        "optimizer.weight_decay=0", "schedule.name=constant", "schedule.warmup_epochs=0",
        "train.label_smoothing=0", "train.deterministic=true")


def _one_shard_copy(data: Path, out: Path) -> Path:
    """Sub-dataset 0 with its train shards merged into one, so ranks split it sample by sample
    (rank r takes samples r, r+2, ...): each global batch then holds the single process's batch."""
    card = json.loads((data / "dataset.json").read_text())
    (out / "sub-00").mkdir(parents=True)
    with tarfile.open(out / "sub-00" / "train-000000.tar", "w", format=tarfile.USTAR_FORMAT) as merged:
        for j in range(card["splits"]["train"]["shards"]):
            with tarfile.open(data / "sub-00" / f"train-{j:06d}.tar") as shard:
                for member in shard:
                    merged.addfile(member, io.BytesIO(shard.extractfile(member).read()))
    (out / "sub-00" / "val-000000.tar").symlink_to(data / "sub-00" / "val-000000.tar")
    card["splits"]["train"]["shards"] = 1
    (out / "dataset.json").write_text(json.dumps(card))
    return out


def _update(run_dir: Path, initial: dict[str, torch.Tensor]) -> torch.Tensor:
    final = torch.load(run_dir / "final.pt", weights_only=True)["model"]
    return torch.cat([(final[k].double() - initial[k].double()).flatten() for k in initial])


@pytest.fixture(scope="module")
def one_process(prepared_sample, tmp_path_factory) -> tuple[Path, Path]:
    """The one-shard data and the single process's run: 2 micro-batches, split the way 2 ranks split the data."""
    root = tmp_path_factory.mktemp("ddp")
    data = _one_shard_copy(prepared_sample, root / "data")
    # One thread per process everywhere: CPU kernels round differently with other thread counts.
    run_cli("train", "--data", str(data), "--out", str(root / "one"), *ARGS, "train.accumulate_steps=2",
            env={"OMP_NUM_THREADS": "1"})
    return data, root / "one" / "sub-00"


def _torchrun(argv: list[str]) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return [subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)]


def _srun(argv: list[str]) -> list[subprocess.CompletedProcess]:
    return run_as_srun_tasks([sys.executable, *argv], ntasks=2, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("launch", [_torchrun, _srun], ids=["torchrun", "srun"])
def test_two_gloo_processes_match_one_process(one_process, launch, tmp_path):
    data, one_run = one_process
    results = launch([str(REPO / "cli.py"), "train", "--data", str(data), "--out", str(tmp_path / "two"), *ARGS])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]

    torch.manual_seed(0)  # the trainer seeds, then builds the model: the same initial weights
    model = create_model("resnet18", 10, stem="imagenet")
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    one, two = _update(one_run, initial), _update(tmp_path / "two" / "sub-00", initial)
    assert one.norm() > 0
    relative = float((one - two).norm() / one.norm())
    assert relative < 1e-4, relative
    final_one = json.loads((one_run / "final.json").read_text())
    final_two = json.loads((tmp_path / "two" / "sub-00" / "final.json").read_text())
    assert final_two["val_samples"] == final_one["val_samples"] == 100
    metrics = json.loads((tmp_path / "two" / "sub-00" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["train_images"] == 500 and metrics["steps"] == 5
