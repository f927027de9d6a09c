"""The run of one member that both backends share: resume, epochs, validation, logs, checkpoints, final.

A backend's trainer subclasses ``MemberTraining`` and supplies what differs (building the network,
restoring and writing checkpoints, one epoch of training, validation, the barrier between ranks);
what a run folder gets (metrics.jsonl, TensorBoard scalars, a summary line per epoch, ``best`` as a
link to ``last``, final.json) is decided here once, so torch and MindSpore run folders cannot drift.
"""

from __future__ import annotations

import json
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subspectral.schemas import DatasetCard
from subspectral.train import peak_memory
from subspectral.train.config import ConfigError, Recipe, check_recipe, dump_yaml
from subspectral.train.progress import EpochProgress
from subspectral.train.run import (
    LAST_CHECKPOINT,
    CheckpointError,
    Diverged,
    same_file_as,
    write_json,
    write_text,
)
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
    validates: bool = True  # False: the dataset has no val split (no validation; best = last)

    @classmethod
    def of(cls, recipe: Recipe, *, shard: int, batches_per_epoch: int, main: bool, world: int, progress: bool,
           label: str = "", validates: bool = True) -> EpochPlan:
        return cls(shard=shard, epochs=recipe.schedule.epochs, batches_per_epoch=batches_per_epoch,
                   val_every=recipe.train.val_every, checkpoint_every=recipe.train.checkpoint_every, main=main,
                   world=world, progress=progress, label=label, validates=validates)


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
# Keys that may differ between a checkpoint's recipe and the run resuming it: they decide when the run
# validates and checkpoints, never what it trains. schedule.epochs may grow (see resume_note).
RESUME_FREE = {"train.val_every", "train.checkpoint_every"}


def _flat(recipe: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, body in recipe.items() if isinstance(body, dict)
            for key, value in body.items()}


def resume_note(saved: dict[str, Any], recipe: Recipe, trained_epochs: int) -> str:
    """Refuse to resume a checkpoint with another recipe, except a longer schedule.epochs; a note when it grew.

    The note goes at the top of config.yaml, so the file says which epochs ran under the shorter schedule.
    """
    then, now = _flat(saved), _flat(recipe.to_dict())
    for key in sorted(then.keys() | now.keys()):
        if key in RESUME_FREE or key == "schedule.epochs" or then.get(key) == now.get(key):
            continue
        raise ConfigError(f"--resume with another recipe: {key} is {then.get(key)!r} in the checkpoint, "
                          f"{now.get(key)!r} now; only schedule.epochs may grow on resume (train with other "
                          "values into another --out)")
    before, after = int(then["schedule.epochs"]), recipe.schedule.epochs
    if after < before:
        raise ConfigError(f"--resume with schedule.epochs={after}: the checkpoint's run has {before} epochs; "
                          "schedule.epochs may grow on resume, never shrink")
    if after == before:
        return ""
    return (f"# --resume extended schedule.epochs from {before} to {after} after epoch {trained_epochs}: epochs "
            f"1-{trained_epochs} followed the {before}-epoch schedule, the rest the {after}-epoch one\n")


def truncate_metrics(run_dir: Path, kept_epochs: int) -> None:
    """Drop metrics.jsonl lines of epochs after the checkpoint (a run killed between logging and checkpointing)."""
    path = run_dir / METRICS_FILE
    if path.exists():
        lines = [line for line in path.read_text().splitlines(keepends=True)
                 if line.strip() and json.loads(line)["epoch"] <= kept_epochs]
        write_text(path, "".join(lines))


def cost_from_metrics(metrics: Path) -> dict[str, Any]:
    """final.json's cost fields from metrics.jsonl, whose lines cover every epoch of the run, resumed
    segments included: ``train_seconds`` (training and validation of all epochs) and ``peak_rss_bytes``
    (the largest resident set of the training process in any epoch, see ``train.peak_memory``)."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.exists() else []
    peaks = [line["peak_rss_bytes"] for line in lines if "peak_rss_bytes" in line]
    return {"train_seconds": sum(line.get("epoch_seconds", line["seconds"]) for line in lines),
            "peak_rss_bytes": max(peaks) if peaks else None}


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
        if line.get("skipped"):
            summary += f"  ({line['skipped']} train samples skipped)"
        if "top1" in line:
            summary += f"  val top1 {line['top1']:.2f}%  top5 {line['top5']:.2f}%"
            if line["val_skipped"]:
                total = line["val_samples"] + line["val_skipped"]
                summary += f"  ({line['val_skipped']} of {total} val samples skipped)"
        _log.info(f"[{self.prefix}] {summary}")

    def close(self) -> None:
        self.writer.close()


class MemberTraining(ABC):
    """``run()`` for a backend's member trainer; the subclass sets the attributes and the hooks below."""

    run_dir: Path
    recipe: Recipe
    card: DatasetCard
    meta: dict[str, Any]  # run.json
    state: str  # "fresh" | "resume" | "done" (final.json exists)
    resume_from: Any  # the checkpoint to resume from, loaded and checked; None for a new run
    resume_recipe: dict[str, Any] | None  # the recipe the checkpoint was trained with (Recipe.to_dict())
    resume_epochs: int  # epochs the checkpoint has trained
    config_note: str = ""  # comment lines at the top of config.yaml (a resume that extended the schedule)

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
        config = self.run_dir / "config.yaml"
        earlier = [line + "\n" for line in config.read_text().splitlines() if line.startswith("# --resume")] \
            if self.state == "resume" and config.exists() else []
        write_text(config, "".join(earlier) + self.config_note + dump_yaml(self.recipe))
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
        """The backend's own fields of final.json: ``ema``, and ``parameters`` and ``parameter_bytes`` of the
        evaluated weights (trainable parameters, as torchvision counts them)."""

    @abstractmethod
    def wait_for_ranks(self) -> None:
        """A barrier across ranks (a no-op where the backend's collectives already line ranks up)."""

    @classmethod
    def checked_run(cls, job: Any, recipe: Recipe, *args: Any) -> dict[str, Any]:
        """Check everything (data, shard, recipe, checkpoint) before training, then train; final.json content."""
        return cls.checked(job, recipe, *args).run()

    @classmethod
    def checked(cls, job: Any, recipe: Recipe, *args: Any) -> MemberTraining:
        """The member's training, every check (data, shard, recipe, checkpoint) made; not started."""
        check_recipe(recipe)
        try:
            trainer = cls(job, recipe, *args)
        except (DataError, CheckpointError) as exc:
            raise ConfigError(str(exc)) from exc
        if trainer.resume_from is not None:
            trainer.config_note = resume_note(trainer.resume_recipe or {}, recipe, trainer.resume_epochs)
        return trainer

    def run(self) -> dict[str, Any]:
        if self.state == "done":
            return json.loads((self.run_dir / "final.json").read_text())
        plan, start_epoch, best_top1 = self.begin()
        book = EpochBook(self, plan, start_epoch, best_top1)
        self.train_epochs(book, start_epoch, plan.epochs)
        final = {**book.close(), **self.final_fields()}
        self.end(plan, final)
        return final

    # run() in three parts, so that train.fused_trainer can drive K members through one shared epoch loop.
    def begin(self) -> tuple[EpochPlan, int, float]:
        """Build, restore the checkpoint, write the run files: (plan, first epoch to run, best top-1 so far)."""
        plan = self.plan()
        if plan.main and not plan.validates:
            _log.warning(f"cli.py train: warning: {self.meta['data']} has no val split (prepare it with "
                         f"--val-per-class N for one): sub-{plan.shard:02d} trains without validation, best = last")
        self.build()
        start_epoch, best_top1 = 0, -1.0
        if self.resume_from is not None:
            start_epoch, best_top1 = self.restore(self.resume_from)
            self.resume_from = None
        if plan.main:
            self.write_run_files(start_epoch)
        self.wait_for_ranks()
        return plan, start_epoch, best_top1

    def train_epochs(self, book: EpochBook, start: int, stop: int) -> None:
        """Train epochs ``start .. stop - 1`` (0-based) on their own, each recorded in ``book``."""
        for epoch in range(start, stop):
            started = time.perf_counter()
            book.record(epoch, {"epoch": epoch + 1, **self._train_epoch(epoch, book.plan, book.saved)}, started)

    def end(self, plan: EpochPlan, final: dict[str, Any]) -> None:
        """The final weights, then final.json (last: the member is done)."""
        if plan.main:
            self.save_final_weights()
            write_json(self.run_dir / "final.json", final)
        self.wait_for_ranks()

    def checked_validation(self, result: dict[str, Any] | None = None) -> dict[str, Any]:
        """``validate()`` (or its ``result``, already computed), with every val sample of the card that was
        not evaluated counted as skipped.

        The count comes from the card, so samples lost in a damaged shard are counted whatever the stream
        could tell; a validation that evaluated nothing is refused rather than reported as 0 %.
        """
        result = self.validate() if result is None else result
        expected = self.card.splits["val"].samples
        if result["val_samples"] == 0:
            raise DataError(f"sub-{self.meta['shard']:02d}: no usable val sample in {self.meta['data']} "
                            f"({expected} in the card): every val shard is damaged or unreadable")
        return {**result, "val_skipped": max(expected - result["val_samples"], result["val_skipped"])}

    def diverged(self, message: str, saved: int) -> Diverged:
        """A non-finite loss: ``message``, the checkpoint kept (``saved``: the epochs it holds), what to do."""
        advice = "lower optimizer.lr or set train.grad_clip"
        if saved:  # a resume must keep the recipe, so other values need another run folder
            advice = (f"stopped, {LAST_CHECKPOINT[self.meta['backend']]} of epoch {saved} kept; {advice} "
                      "and train into another --out")
        else:
            advice = f"stopped before any checkpoint; {advice}"
        return Diverged(f"{message}: {advice}")

    def _train_epoch(self, epoch: int, plan: EpochPlan, saved: int) -> dict[str, Any]:
        """One epoch with its progress bar; a non-finite loss stops the run (``diverged``)."""
        bar = EpochProgress(plan.batches_per_epoch, f"sub-{plan.shard:02d} {epoch + 1}/{plan.epochs}",
                            enabled=plan.main and plan.progress, world=plan.world)
        try:
            line = self.train_epoch(epoch, bar)
            if not math.isfinite(line["train_loss"]):
                raise Diverged(f"sub-{plan.shard:02d} epoch {epoch + 1}: the training loss is {line['train_loss']}")
        except Diverged as exc:
            raise self.diverged(str(exc), saved) from exc
        finally:
            bar.close()
        return line


class EpochBook:
    """One member's record across epochs: validation when due, metrics, the ``last`` and ``best`` checkpoints.

    ``best`` is written when validation top-1 improves (the first of equal maxima): a hard link to the
    ``last`` checkpoint saved in the same epoch. Without a val split, best is linked to every last.
    """

    def __init__(self, run: MemberTraining, plan: EpochPlan, start_epoch: int, best_top1: float) -> None:
        self.run, self.plan, self.best_top1 = run, plan, best_top1
        prefix = f"sub-{plan.shard:02d}" + (f" {plan.label}" if plan.label else "")
        self.log = EpochLog(run.run_dir, prefix) if plan.main else None
        self.last_eval: dict[str, Any] = {}
        self.skipped, self.saved = 0, start_epoch  # saved: the epochs the last checkpoint holds
        peak_memory.reset_peak()  # members trained in turn in one process each get their own peak

    def validates(self, epoch: int) -> bool:
        plan = self.plan
        return plan.validates and ((epoch + 1) % plan.val_every == 0 or epoch + 1 == plan.epochs)

    def record(self, epoch: int, line: dict[str, Any], started: float, evaluation: dict[str, Any] | None = None,
               share: int = 1) -> None:
        """After epoch ``epoch`` (0-based), begun at ``started`` (perf_counter), has trained: validate when due
        (``evaluation``: already computed), log ``line``, checkpoint. ``share``: the members that trained
        the epoch together, whose time is split evenly (``epoch_seconds``)."""
        plan, run = self.plan, self.run
        self.skipped = line["skipped"]
        if self.validates(epoch):
            self.last_eval = run.checked_validation(evaluation)
            line.update(self.last_eval)
        line["epoch_seconds"] = (time.perf_counter() - started) / share
        line["peak_rss_bytes"] = peak_memory.peak_bytes()
        if self.log is not None:
            self.log.write(line)
            improved = "top1" in line and line["top1"] > self.best_top1
            self.best_top1 = max(self.best_top1, line.get("top1", self.best_top1))
            if (epoch + 1) % plan.checkpoint_every == 0 or epoch + 1 == plan.epochs or improved:
                last = run.save_last(epoch, self.best_top1)
                self.saved = epoch + 1
                if improved or not plan.validates:
                    same_file_as(last, last.with_name("best" + last.suffix))
        run.wait_for_ranks()

    def close(self) -> dict[str, Any]:
        """The content of final.json but for the backend's fields."""
        plan = self.plan
        if plan.validates and not self.last_eval:  # resumed after the last epoch had finished, before final.json
            self.last_eval = self.run.checked_validation()
        if self.log is not None:
            self.log.close()
        last = self.last_eval
        measured = {"top1": last.get("top1"), "top5": last.get("top5"), "val_loss": last.get("val_loss"),
                    "val_samples": last.get("val_samples", 0), "val_skipped": last.get("val_skipped", 0),
                    "best_top1": self.best_top1 if plan.validates else None}
        return {**measured, "validated": plan.validates, "train_skipped": self.skipped, "epochs": plan.epochs,
                **cost_from_metrics(self.run.run_dir / METRICS_FILE)}
