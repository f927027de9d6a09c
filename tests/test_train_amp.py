"""Mixed precision on the CPU: what ``train.amp`` selects, float16 with a real GradScaler (an overflow
skips the optimizer step and lowers the scale; the scaler's state is saved in last.pt and restored on
--resume), and bfloat16 autocast.

float16 convolutions have no oneDNN kernel on a CPU without AVX512-FP16 and fall back to aten's
slow_conv2d, whose backward pass costs about the same per image whatever the image size (measured here
for resnet18: 0.1 s per image on quiet cores, 0.25 s when they are shared; ~20 times float32). The
float16 runs therefore train on a sample drawn with 2 images per class (10 training images per
sub-dataset) instead of the prepared sample's 500.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from subspectral.pipeline.sample import sample_corpus
from subspectral.train.checkpoint import save_torch
from subspectral.train.config import TrainConfig, apply_overrides, load_recipe
from subspectral.train.distributed import DistInfo
from subspectral.train.engine import StepContext, autocast_dtype, train_one_epoch
from subspectral.train.run import MemberJob
from subspectral.train.trainer import MemberTrainer
from torch import nn

FP16 = ("--shard", "1", "--config", "sample", "--no-progress", "schedule.epochs=2", "data.batch_size=5",
        "train.amp=true", "train.amp_dtype=float16")


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory) -> Path:
    """The embedded sample with 2 images per class, split 4: 10 train and 10 val samples per sub-dataset."""
    corpus = sample_corpus(tmp_path_factory.mktemp("small-corpus"), per_class=2)
    out = tmp_path_factory.mktemp("small-sample") / "data"
    run_cli("prepare", "--src", str(corpus), "--out", str(out), "--split", "4", "--val-per-class", "1",
            "--executor", "serial")
    return out


@pytest.mark.parametrize("amp, device, expected", [
    ("auto", "cpu", None), ("auto", "cuda", torch.bfloat16),
    (True, "cpu", torch.bfloat16), (True, "cuda", torch.bfloat16),
    (False, "cpu", None), (False, "cuda", None),
])
def test_amp_switch_selects_autocast_per_device(amp, device, expected):
    assert autocast_dtype(TrainConfig(amp=amp), torch.device(device)) == expected
    assert autocast_dtype(TrainConfig(amp=amp, amp_dtype="float16"), torch.device(device)) == (
        expected and torch.float16)


@pytest.mark.parametrize("overrides, dtype, scaler", [
    ([], None, False),  # the default: float32 on the CPU
    (["train.amp=true"], torch.bfloat16, False),
    (["train.amp=true", "train.amp_dtype=float16"], torch.float16, True),
    (["train.amp=false", "train.amp_dtype=float16"], None, False),
])
def test_trainer_wires_autocast_and_the_grad_scaler(small_sample, tmp_path, overrides, dtype, scaler):
    trainer = _built_trainer(small_sample, tmp_path, overrides)
    assert trainer.ctx.amp_dtype == dtype
    assert trainer.scaler.is_enabled() is scaler


def _built_trainer(data: Path, out: Path, overrides: list[str]) -> MemberTrainer:
    recipe = apply_overrides(load_recipe("sample"), ["data.batch_size=10", *overrides])
    trainer = MemberTrainer(MemberJob(str(data), 0, out, False, False), recipe, DistInfo(), torch.device("cpu"))
    trainer.build()
    return trainer


def test_float16_resumed_from_a_checkpoint_without_scaler_state_starts_the_scaler_afresh(small_sample, tmp_path):
    trainer = _built_trainer(small_sample, tmp_path, ["train.amp=true", "train.amp_dtype=float16"])
    checkpoint = {**trainer._checkpoint(0, 50.0), "scaler": {}}  # as a bfloat16 or float32 run saves it
    assert trainer.restore(checkpoint) == (1, 50.0)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**16


def _one_step(init_scale: float, grad_clip: float) -> tuple[dict, nn.Module, torch.optim.Optimizer,
                                                           torch.amp.GradScaler, list[torch.Tensor]]:
    """One float16-autocast step of a linear classifier through the engine, with a real GradScaler."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 3, 3))
    before = [param.detach().clone() for param in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    config = TrainConfig(amp=True, amp_dtype="float16", grad_clip=grad_clip)
    ctx = StepContext(torch.device("cpu"), torch.float16, 3, config)
    batch = {"images": torch.rand(8, 4, 4, 3) * 255, "labels": torch.arange(8) % 3, "skipped": 0}
    stats = train_one_epoch(model, [batch], optimizer, scheduler, scaler, ctx, np.random.default_rng(0),
                            lambda: None, lambda *_: None)
    return stats, model, optimizer, scaler, before


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])  # 1.0: the scaler unscales before clipping
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_float16_overflow_skips_the_optimizer_step_and_halves_the_scale(grad_clip):
    # The loss (float32) times 2**40 overflows float16 (max 65504) in the linear layer's backward pass.
    stats, model, optimizer, scaler, before = _one_step(2.0**40, grad_clip)
    assert math.isfinite(stats["train_loss"]) and stats["steps"] == 1
    assert not all(torch.isfinite(param.grad).all() for param in model.parameters())
    assert all(torch.equal(old, param) for old, param in zip(before, model.parameters(), strict=True))  # not stepped
    assert not optimizer.state  # SGD never ran: no momentum buffers
    assert scaler.get_scale() == 2.0**39 and scaler.state_dict()["_growth_tracker"] == 0
    # The same step with a scale that fits in float16 updates the weights and keeps the scale.
    stats, model, optimizer, scaler, before = _one_step(2.0**8, grad_clip)
    assert all(torch.isfinite(param.grad).all() for param in model.parameters())
    assert not any(torch.equal(old, param) for old, param in zip(before, model.parameters(), strict=True))
    assert optimizer.state
    assert scaler.get_scale() == 2.0**8 and scaler.state_dict()["_growth_tracker"] == 1


def _finite_metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert math.isfinite(line["train_loss"]) and math.isfinite(line["val_loss"]), line
    return lines


def test_float16_trains_on_cpu_and_resume_restores_the_scaler(small_sample, tmp_path):
    where = ("--data", str(small_sample), "--out", str(tmp_path))
    run_cli("train", *where, *FP16)
    run_dir = tmp_path / "sub-01"
    final = json.loads((run_dir / "final.json").read_text())
    assert final["val_samples"] == 10 and math.isfinite(final["val_loss"])
    assert [line["steps"] for line in _finite_metrics(run_dir)] == [2, 2]
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["config"]["train"]["amp"] is True and last["config"]["train"]["amp_dtype"] == "float16"
    scaler = last["scaler"]
    assert 0 < scaler["scale"] <= 2.0**16 and 0 <= scaler["_growth_tracker"] <= 4  # 4 steps from 2**16

    # As if killed after epoch 1, with a scaler that had backed off to 1024 and grows every 3 clean steps.
    last["epoch"] = 0
    last["scaler"] = {**scaler, "scale": 1024.0, "growth_interval": 3, "_growth_tracker": 2}
    save_torch(last, run_dir / "last.pt")
    (run_dir / "final.json").unlink()
    run_cli("train", *where, *FP16, "--resume")
    resumed = torch.load(run_dir / "last.pt", weights_only=True)["scaler"]
    assert resumed["growth_interval"] == 3  # a fresh GradScaler's is 2000
    assert 0 < resumed["scale"] <= 2048.0  # 2 steps on from 1024 (a fresh one starts at 65536)
    assert (run_dir / "final.json").is_file()


def test_bfloat16_autocast_trains_on_cpu_without_a_scaler(small_sample, tmp_path):
    run_cli("train", "--data", str(small_sample), "--out", str(tmp_path), "--shard", "2", "--config", "sample",
            "--no-progress", "schedule.epochs=1", "data.batch_size=5", "train.amp=true")
    run_dir = tmp_path / "sub-02"
    assert math.isfinite(json.loads((run_dir / "final.json").read_text())["val_loss"])
    _finite_metrics(run_dir)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["config"]["train"]["amp_dtype"] == "bfloat16"
    assert last["scaler"] == {}  # bfloat16 has float32's range: no loss scaling
