"""The run of one member that both backends share: resume, epochs, validation, logs, checkpoints, final.

A backend's trainer subclasses ``MemberTraining`` and supplies what differs (building the network,
restoring and writing checkpoints, one epoch of training, validation, the barrier between ranks);
what a run folder gets (metrics.jsonl, TensorBoard scalars, a summary line per epoch, ``best`` as a
link to ``last``, final.json) is decided here once, so torch and MindSpore run folders cannot drift.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subspectral.schemas import DatasetCard
from subspectral.train.config import ConfigError, Recipe, dump_yaml
from subspectral.train.progress import EpochProgress
from subspectral.train.run import CheckpointError, same_file_as, write_json, write_text
from subspectral.train.storage import DataError

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPlan:
    shard: int
    epochs: int
    batches_per_epoch: int
    val_every: int
    checkpoint_every: int
    main: bool  # this rank writes the run folder
    world: int
    progress: bool
    label: str = ""  # after the member in summary lines, e.g. "mindspore"

    @classmethod
    def of(cls, recipe: Recipe, *, shard: int, batches_per_epoch: int, main: bool, world: int, progress: bool,
           label: str = "") -> EpochPlan:
        return cls(shard=shard, epochs=recipe.schedule.epochs, batches_per_epoch=batches_per_epoch,
                   val_every=recipe.train.val_every, checkpoint_every=recipe.train.checkpoint_every, main=main,
                   world=world, progress=progress, label=label)


def batches_per_epoch(card: DatasetCard, batch: int, world: int) -> int:
    """Full global batches per epoch; refuses a batch that does not split over the ranks or exceeds the data."""
    if batch % world:
        raise ConfigError(f"data.batch_size={batch} does not divide over {world} processes")
    samples = card.splits["train"].samples
    batches = samples // batch
    if batches == 0:
        raise ConfigError(f"data.batch_size={batch} exceeds the {samples} training samples of a sub-dataset")
    return batches


METRICS_FILE = "metrics.jsonl"


def truncate_metrics(run_dir: Path, kept_epochs: int) -> None:
    """Drop metrics.jsonl lines of epochs after the checkpoint (a run killed between logging and checkpointing)."""
    path = run_dir / METRICS_FILE
    if path.exists():
        lines = [line for line in path.read_text().splitlines(keepends=True)
                 if line.strip() and json.loads(line)["epoch"] <= kept_epochs]
        write_text(path, "".join(lines))


class EpochLog:
    """metrics.jsonl, TensorBoard scalars and one summary line on stderr per epoch."""

    def __init__(self, run_dir: Path, prefix: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is used

        self.metrics = run_dir / METRICS_FILE
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        self.prefix = prefix

    def write(self, line: dict[str, Any]) -> None:
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        for key, value in line.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, line["epoch"])
        self.writer.flush()
        summary = f"epoch {line['epoch']}: loss {line['train_loss']:.4f}  {line['images_per_s']:.0f} img/s"
        if "top1" in line:
            summary += f"  val top1 {line['top1']:.2f}%  top5 {line['top5']:.2f}%"
        _log.info(f"[{self.prefix}] {summary}")

    def close(self) -> None:
        self.writer.close()


class MemberTraining(ABC):
    """``run()`` for a backend's member trainer; the subclass sets the attributes and the hooks below."""

    run_dir: Path
    recipe: Recipe
    meta: dict[str, Any]  # run.json
    state: str  # "fresh" | "resume" | "done" (final.json exists)
    resume_from: Any  # the checkpoint to resume from, loaded and checked; None for a new run

    @abstractmethod
    def plan(self) -> EpochPlan: ...

    @abstractmethod
    def build(self) -> None:
        """Network, optimizer, streams."""

    @abstractmethod
    def restore(self, checkpoint: Any) -> tuple[int, float]:
        """Load the checkpoint into what ``build`` made; (first epoch to run, best top-1 so far)."""

    @abstractmethod
    def save_basis(self) -> None:
        """Write the EBV basis the network was built with (no-op for a linear head)."""

    @abstractmethod
    def verify_basis(self) -> None:
        """Check the rebuilt network's EBV basis against the one the run saved."""

    def write_run_files(self, start_epoch: int) -> None:
        """config.yaml, run.json, the EBV basis; on resume, metrics.jsonl cut back to the checkpoint."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.run_dir / "config.yaml", dump_yaml(self.recipe))
        write_json(self.run_dir / "run.json", self.meta)
        if self.state == "resume":
            self.verify_basis()
            truncate_metrics(self.run_dir, start_epoch)
        else:
            self.save_basis()

    @abstractmethod
    def train_epoch(self, epoch: int, bar: EpochProgress) -> dict[str, Any]:
        """Train one epoch; ``{"lr", "train_loss", "images_per_s", ...}`` for metrics.jsonl."""

    @abstractmethod
    def validate(self) -> dict[str, Any]:
        """``{"val_loss", "top1", "top5", "val_samples", "val_skipped"}`` over the whole val split."""

    @abstractmethod
    def save_last(self, epoch: int, best_top1: float) -> Path:
        """Write the resumable checkpoint of ``epoch`` (0-based) atomically; its path."""

    @abstractmethod
    def save_final_weights(self) -> None:
        """The weights to evaluate (EMA weights when EMA is on), for the ensemble's member loaders."""

    @abstractmethod
    def final_fields(self) -> dict[str, Any]:
        """The backend's own fields of final.json."""

    @abstractmethod
    def wait_for_ranks(self) -> None:
        """A barrier across ranks (a no-op where the backend's collectives already line ranks up)."""

    @classmethod
    def checked_run(cls, *args: Any) -> dict[str, Any]:
        """Check everything (data, shard, recipe, checkpoint) before training, then train; final.json content."""
        try:
            trainer = cls(*args)
        except (DataError, CheckpointError) as exc:
            raise ConfigError(str(exc)) from exc
        return trainer.run()

    def run(self) -> dict[str, Any]:
        if self.state == "done":
            return json.loads((self.run_dir / "final.json").read_text())
        self.build()
        start_epoch, best_top1 = 0, -1.0
        if self.resume_from is not None:
            start_epoch, best_top1 = self.restore(self.resume_from)
            self.resume_from = None
        plan = self.plan()
        if plan.main:
            self.write_run_files(start_epoch)
        self.wait_for_ranks()
        final = {**self._epochs(plan, start_epoch, best_top1), **self.final_fields()}
        if plan.main:
            self.save_final_weights()
            write_json(self.run_dir / "final.json", final)  # last: the member is done
        self.wait_for_ranks()
        return final

    def _epochs(self, plan: EpochPlan, start_epoch: int, best_top1: float) -> dict[str, Any]:
        """Epochs ``start_epoch .. plan.epochs - 1``; the content of final.json but for backend fields.

        ``best`` is written when validation top-1 improves (the first of equal maxima): a hard link to the
        ``last`` checkpoint saved in the same epoch.
        """
        prefix = f"sub-{plan.shard:02d}" + (f" {plan.label}" if plan.label else "")
        log = EpochLog(self.run_dir, prefix) if plan.main else None
        last_eval: dict[str, Any] = {}
        started = time.perf_counter()
        for epoch in range(start_epoch, plan.epochs):
            bar = EpochProgress(plan.batches_per_epoch, f"sub-{plan.shard:02d} {epoch + 1}/{plan.epochs}",
                                enabled=plan.main and plan.progress, world=plan.world)
            line: dict[str, Any] = {"epoch": epoch + 1, **self.train_epoch(epoch, bar)}
            bar.close()
            if (epoch + 1) % plan.val_every == 0 or epoch + 1 == plan.epochs:
                last_eval = self.validate()
                line.update(last_eval)
            if log is not None:
                log.write(line)
                improved = "top1" in line and line["top1"] > best_top1
                best_top1 = max(best_top1, line.get("top1", best_top1))
                if (epoch + 1) % plan.checkpoint_every == 0 or epoch + 1 == plan.epochs or improved:
                    last = self.save_last(epoch, best_top1)
                    if improved:
                        same_file_as(last, last.with_name("best" + last.suffix))
            self.wait_for_ranks()
        if not last_eval:  # resumed after the last epoch had finished but before final.json
            last_eval = self.validate()
        if log is not None:
            log.close()
        return {"top1": last_eval["top1"], "top5": last_eval["top5"], "val_loss": last_eval["val_loss"],
                "val_samples": last_eval["val_samples"], "epochs": plan.epochs, "best_top1": best_top1,
                "train_seconds": time.perf_counter() - started}
