"""One training epoch and one evaluation pass; losses, mixing, the learning-rate schedule."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from subspectral.train.config import Recipe, TrainConfig
from subspectral.train.distributed import all_reduce_sum
from subspectral.train.mixing import mix_batch
from subspectral.train.schedule import lr_factor
from torch import nn


@dataclass
class StepContext:
    """What every step needs besides the batch."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: no autocast
    num_classes: int
    config: TrainConfig

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """``train.amp`` on ``device``: auto = autocast on CUDA only, true = on every device, false = never."""
    enabled = config.amp is True or (config.amp == "auto" and device.type == "cuda")
    return getattr(torch, config.amp_dtype) if enabled else None


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    config = recipe.optimizer
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if config.no_decay_norm_bias and param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, recipe.schedule, recipe.optimizer.lr))


def batch_on_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A loader batch's images and labels on ``device``, and how many samples its stream skipped."""
    return (batch["images"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True),
            int(batch["skipped"]))


def _forward_backward(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                      scaler: torch.amp.GradScaler, ctx: StepContext) -> torch.Tensor:
    """Gradients of the batch's mean loss, over ``accumulate_steps`` micro-batches; the mean loss.

    Micro-batch j takes samples j, j+k, j+2k, ... (k = accumulate_steps): exactly how k DDP ranks
    split one sub-dataset shard, so one process with k steps trains like k processes (BatchNorm
    statistics included). Gradients are synchronised across ranks on the last micro-batch only.
    """
    steps = ctx.config.accumulate_steps
    total = torch.zeros((), device=images.device)
    for j in range(steps):
        last = j == steps - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with ctx.autocast():
                logits = model(images[j::steps])
            loss = F.cross_entropy(logits.float(), targets[j::steps], label_smoothing=ctx.config.label_smoothing)
            scaler.scale(loss / steps).backward()
        total += loss.detach() * (targets[j::steps].shape[0] / targets.shape[0])
    return total


def mixed_batches(batches: Iterable[dict[str, torch.Tensor]], ctx: StepContext,
                  rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Each batch on the device and mixed (mixup/cutmix): images, labels, targets and the samples it lost."""
    for batch in batches:
        images, labels, lost = batch_on_device(batch, ctx.device)
        images, targets = mix_batch(images, labels, ctx.num_classes, ctx.config, rng)
        yield images, labels, targets, lost


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   scaler: torch.amp.GradScaler, grad_clip: float) -> None:
    """Clip the model's own gradient norm, step, update the loss scale, advance the schedule."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def train_one_epoch(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler, ctx: StepContext, rng: np.random.Generator,
                    after_step: Callable[[], None],
                    on_step: Callable[[torch.Tensor, float, int], None]) -> dict:
    """One epoch; ``after_step`` updates EMA weights, ``on_step(loss, lr, images)`` feeds the progress bar."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    images_seen = 0
    skipped = 0
    steps = 0
    start = time.perf_counter()
    for images, labels, targets, lost in mixed_batches(batches, ctx, rng):
        skipped += lost
        optimizer.zero_grad(set_to_none=True)
        loss = _forward_backward(model, images, targets, scaler, ctx)
        optimizer_step(model, optimizer, scheduler, scaler, ctx.config.grad_clip)
        after_step()
        # Sum on the device: reading loss.item() each step would be a CPU-GPU sync point.
        loss_sum += loss * labels.shape[0]
        images_seen += labels.shape[0]
        steps += 1
        on_step(loss, optimizer.param_groups[0]["lr"], labels.shape[0])
    seconds = time.perf_counter() - start
    loss_total, seen, skipped_total = all_reduce_sum([float(loss_sum), images_seen, skipped], ctx.device)
    return {"train_loss": loss_total / max(seen, 1), "train_images": int(seen), "steps": steps,
            "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9), "skipped": int(skipped_total)}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], ctx: StepContext) -> dict:
    """Top-1/top-5 and mean loss over every batch of every rank."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, top1, top5, samples
    skipped = 0
    k = min(5, ctx.num_classes)
    for batch in batches:
        images, labels, lost = batch_on_device(batch, ctx.device)
        skipped += lost
        with ctx.autocast():
            logits = model(images).float()
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                               hits[:, 0].sum(), hits.any(dim=1).sum(),
                               torch.tensor(labels.shape[0], device=ctx.device)]).double()
    loss, top1, top5, samples, skipped = all_reduce_sum([*totals.tolist(), skipped], ctx.device)
    samples = max(samples, 1)
    return {"val_loss": loss / samples, "top1": 100 * top1 / samples, "top5": 100 * top5 / samples,
            "val_samples": int(samples), "val_skipped": int(skipped)}
