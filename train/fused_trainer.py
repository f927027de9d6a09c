"""Train K members at once in one process on one device as one grouped network (``cli.py train --fuse K``).

Members never communicate, so K members of one recipe are one network whose layers are grouped K
ways (``train.fused``), fed the K sub-images of the same images read in lockstep (``train.fused_data``).
Each member keeps its own ``MemberTrainer``: run folder, run.json, config.yaml, EBV basis, optimizer,
LR schedule, GradScaler (its own loss scale: a float16 overflow skips only its step), EMA, gradient
clipping (its own norm), checkpoints, best choice and final files, all as when it trains alone. Its
parameters are views of its block of the fused network, so its own optimizer steps that block; the
group shares only the forward and backward pass, the loader and the progress bar.

Each member resumes from its own last.pt. A member behind the others (killed between two of the
group's checkpoint writes, or a fresh member added to a resumed group) first catches up alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from subspectral.train.config import ConfigError, Recipe
from subspectral.train.data import make_loader
from subspectral.train.distributed import DistInfo
from subspectral.train.engine import StepContext, batch_on_device, mixed_batches, optimizer_step
from subspectral.train.epochs import EpochBook
from subspectral.train.fused import FusedNetwork, fuse_members, own_storage
from subspectral.train.fused_data import FusedEvalStream, FusedTrainStream
from subspectral.train.progress import EpochProgress
from subspectral.train.run import Diverged, MemberJob
from subspectral.train.trainer import _EVAL_BATCH, MemberTrainer
from torch import nn


class GroupMember(MemberTrainer):
    """A member trained in a fused group: what it saves is copied out of its block of the fused network."""

    def _weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return own_storage(module.state_dict())


def _forward_backward(net: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                      scalers: Sequence[torch.amp.GradScaler], ctx: StepContext) -> torch.Tensor:
    """Every member's gradients of its own mean loss (scaled by its own GradScaler); the K mean losses.

    Micro-batches as in ``train.engine``. Member k's loss depends on block k only, so the gradient of
    the sum is each member's own gradient.
    """
    steps = ctx.config.accumulate_steps
    total = torch.zeros(len(scalers), device=images.device)
    for j in range(steps):
        with ctx.autocast():
            logits = net(images[j::steps])  # [K, b, classes]
        part = targets[j::steps]
        members, batch = logits.shape[:2]
        losses = F.cross_entropy(logits.float().flatten(0, 1), part.repeat(members, 1), reduction="none",
                                 label_smoothing=ctx.config.label_smoothing).view(members, batch).mean(dim=1)
        if any(scaler.is_enabled() for scaler in scalers):
            torch.stack([s.scale(loss / steps) for s, loss in zip(scalers, losses, strict=True)]).sum().backward()
        else:
            (losses.sum() / steps).backward()
        total += losses.detach() * (batch / targets.shape[0])
    return total


def _step(member: MemberTrainer, grad_clip: float) -> None:
    """Member's own clip (its own gradient norm), optimizer, scaler, schedule and EMA: as in ``train.engine``."""
    optimizer_step(member.model, member.optimizer, member.scheduler, member.scaler, grad_clip)
    if member.ema is not None:
        member.ema.update_parameters(member.model)


def train_fused_epoch(net: nn.Module, members: Sequence[MemberTrainer], batches: Iterable[dict[str, torch.Tensor]],
                      ctx: StepContext, rng: np.random.Generator, bar: EpochProgress) -> list[dict[str, Any]]:
    """One epoch of the group; each member's metrics (``images_per_s``: its own images, i.e. the group's / K)."""
    fused = net if isinstance(net, FusedNetwork) else net._orig_mod  # torch.compile's wrapper
    fused.train()
    loss_sum = torch.zeros(len(members), dtype=torch.float64, device=ctx.device)
    seen = skipped = steps = 0
    start = time.perf_counter()
    for images, labels, targets, lost in mixed_batches(batches, ctx, rng):
        skipped += lost
        # In place: the members' .grad are views of these tensors (set_to_none would cut them off).
        fused.zero_grad(set_to_none=False)
        losses = _forward_backward(net, images, targets, [m.scaler for m in members], ctx)
        for member in members:
            _step(member, ctx.config.grad_clip)
        loss_sum += losses * labels.shape[0]  # on the device: no CPU-GPU sync per step
        seen += labels.shape[0]
        steps += 1
        bar.step(losses.mean(), members[0].optimizer.param_groups[0]["lr"], labels.shape[0] * len(members))
    seconds = time.perf_counter() - start
    return [{"lr": m.optimizer.param_groups[0]["lr"], "train_loss": loss / max(seen, 1), "train_images": seen,
             "steps": steps, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9), "skipped": skipped,
             "fused": len(members)} for m, loss in zip(members, loss_sum.tolist(), strict=True)]


@torch.no_grad()
def evaluate_fused(net: FusedNetwork, batches: Iterable[dict[str, torch.Tensor]],
                   ctx: StepContext) -> list[dict[str, Any]]:
    """Each member's top-1/top-5 and mean loss over the val split, from one forward per batch."""
    net.eval()
    totals = torch.zeros(net.members, 4, dtype=torch.float64, device=ctx.device)  # loss, top1, top5, samples
    skipped = 0
    k = min(5, ctx.num_classes)
    for batch in batches:
        images, labels, lost = batch_on_device(batch, ctx.device)
        skipped += lost
        with ctx.autocast():
            logits = net(images).float()  # [K, B, classes]
        hits = logits.topk(k, dim=-1).indices == labels[None, :, None]
        losses = F.cross_entropy(logits.flatten(0, 1), labels.repeat(net.members), reduction="none")
        samples = torch.full((net.members,), len(labels), device=ctx.device)
        totals += torch.stack([losses.view(net.members, -1).sum(dim=1), hits[..., 0].sum(dim=1),
                               hits.any(dim=-1).sum(dim=1), samples], dim=1).double()
    results = []
    for loss, top1, top5, samples in totals.tolist():
        samples = max(samples, 1)
        results.append({"val_loss": loss / samples, "top1": 100 * top1 / samples, "top5": 100 * top5 / samples,
                        "val_samples": int(samples), "val_skipped": skipped})
    return results


class FusedGroup:
    """K members of one recipe trained together; ``run()`` -> each member's final.json content by shard."""

    def __init__(self, jobs: Sequence[MemberJob], recipe: Recipe, dist: DistInfo, device: torch.device) -> None:
        if dist.enabled:
            raise ConfigError("train.fuse > 1 trains members on one device in one process, not under torchrun: "
                              "start one fused group per process (docs/training.md)")
        shards = [job.shard for job in jobs]
        if len(set(shards)) != len(shards):
            raise ConfigError(f"--shard names a member twice: {shards}")
        self.recipe = recipe
        self.device = device
        self.members = [GroupMember.checked(job, recipe, dist, device) for job in jobs]

    def run(self) -> dict[int, dict[str, Any]]:
        finals = {m.job.shard: m.run() for m in self.members if m.state == "done"}
        active = [m for m in self.members if m.state != "done"]
        begun = [(m, *m.begin()) for m in active]
        target = max((start for _, _, start, _ in begun), default=0)
        books = []
        for member, plan, start, best_top1 in begun:
            book = EpochBook(member, plan, start, best_top1)
            member.train_epochs(book, start, target)  # behind the others: catch up alone
            books.append(book)
        if len(active) > 1:
            self._train(active, books, target)
        elif active:
            active[0].train_epochs(books[0], target, books[0].plan.epochs)
        for member, book in zip(active, books, strict=True):
            final = {**book.close(), **member.final_fields()}
            member.end(book.plan, final)
            finals[member.job.shard] = final
        return finals

    def _train(self, members: list[GroupMember], books: list[EpochBook], start: int) -> None:
        first, train_cfg = members[0], self.recipe.train
        device = self.device
        layout = torch.channels_last if device.type == "cuda" and train_cfg.channels_last else torch.contiguous_format
        net = fuse_members([m.model for m in members], share=True, memory_format=layout)
        trained = torch.compile(net, backend=train_cfg.compile_backend) if train_cfg.compile else net
        data = self.recipe.data
        stream = FusedTrainStream([m.train_uris for m in members], first.card, data, batch_size=data.batch_size,
                                  batches_per_epoch=first.batches_per_epoch, rank=0, world=1, seed=train_cfg.seed)
        val_stream = (FusedEvalStream([m.val_uris for m in members], first.card, batch_size=_EVAL_BATCH, rank=0,
                                      world=1) if books[0].plan.validates else None)
        plan = books[0].plan
        label = f"sub-{members[0].job.shard:02d}..{members[-1].job.shard:02d} (fused x{len(members)})"
        pin = device.type == "cuda"
        for epoch in range(start, plan.epochs):
            # Everything random in an epoch derives from (seed, epoch), as for each member alone.
            torch.manual_seed(train_cfg.seed * 100_003 + epoch)
            started = time.perf_counter()
            stream.set_epoch(epoch)
            bar = EpochProgress(plan.batches_per_epoch, f"{label} {epoch + 1}/{plan.epochs}",
                                enabled=plan.progress, world=1)
            try:
                lines = train_fused_epoch(trained, members, make_loader(stream, data.workers, pin), first.ctx,
                                          np.random.default_rng([train_cfg.seed, epoch, 0]), bar)
            except Diverged as exc:  # the bar checks the group's mean loss: some member's is not finite
                raise first.diverged(str(exc), min(book.saved for book in books)) from exc
            finally:
                bar.close()
            for member, book, line in zip(members, books, lines, strict=True):
                if not math.isfinite(line["train_loss"]):
                    raise member.diverged(f"sub-{member.job.shard:02d} epoch {epoch + 1} (fused x{len(members)}): "
                                          f"the training loss is {line['train_loss']}", book.saved)
            evaluations: list[dict[str, Any] | None] = [None] * len(members)
            if books[0].validates(epoch):
                evaluations = evaluate_fused(self._eval_net(net, members),
                                             make_loader(val_stream, data.workers, pin), first.ctx)
            for book, line, evaluation in zip(books, lines, evaluations, strict=True):
                book.record(epoch, {"epoch": epoch + 1, **line}, started, evaluation, share=len(members))

    @staticmethod
    def _eval_net(net: FusedNetwork, members: Sequence[MemberTrainer]) -> FusedNetwork:
        """The training network itself, or, with EMA, a fused copy of the members' EMA weights."""
        if members[0].ema is None:
            return net
        return fuse_members([m.ema.module for m in members])


def train_fused_groups(jobs: Sequence[MemberJob], recipe: Recipe, dist: DistInfo,
                       device: torch.device) -> dict[int, dict[str, Any]]:
    """``jobs`` in groups of ``train.fuse`` members, one group after another; final.json content by shard.

    Each group checks everything (data, shards, recipe, checkpoints) before it trains."""
    size = recipe.train.fuse
    finals: dict[int, dict[str, Any]] = {}
    for first in range(0, len(jobs), size):
        finals.update(FusedGroup(jobs[first:first + size], recipe, dist, device).run())
    return {job.shard: finals[job.shard] for job in jobs}
