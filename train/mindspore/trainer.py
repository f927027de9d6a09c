"""Train one member with MindSpore: the torch trainer's run folder, recipe semantics and metrics.

``RUNS/sub-KK/`` gets config.yaml, run.json (``"backend": "mindspore"``), metrics.jsonl (the torch
backend's keys), tb/, last.ckpt, best.ckpt, ebv_basis.safetensors (EBV heads), final.ckpt and
final.json (written last). Everything random in an epoch derives from (seed, epoch, rank/slot), so
``--resume`` replays the remaining epochs exactly as an uninterrupted run would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
import torch
from mindspore import Tensor
from subspectral.schemas import DatasetCard
from subspectral.train.config import ConfigError, Recipe
from subspectral.train.epochs import EpochPlan, MemberTraining, batches_per_epoch
from subspectral.train.mindspore import checkpoint as ckpt
from subspectral.train.mindspore.data import batches, eval_dataset, slot_stream, train_dataset
from subspectral.train.mindspore.ebv import generate_basis
from subspectral.train.mindspore.models import count_parameters, create_model, ebv_basis_of, ebv_heads
from subspectral.train.mindspore.runtime import Runtime
from subspectral.train.mindspore.step import (
    EvalStep,
    SoftTargetLoss,
    TrainStep,
    apply_precision,
    build_optimizer,
    precision_for,
)
from subspectral.train.mixing import mix_batch
from subspectral.train.portable import PORTABLE_FILE
from subspectral.train.prepared import has_split, read_card, shard_uris
from subspectral.train.progress import EpochProgress
from subspectral.train.run import BASIS_FILE, MemberJob, prepare_run_dir, run_record
from subspectral.train.schedule import lr_factor
from subspectral.train.stream import EvalStream

_EVAL_BATCH = 512
# Recipe keys the torch backend honours and this one cannot: refused, never silently ignored.
_UNSUPPORTED = {"train.ema_decay": ("EMA weights", lambda r: r.train.ema_decay > 0, 0),
                "train.accumulate_steps": ("gradient accumulation", lambda r: r.train.accumulate_steps > 1, 1)}


def _check_supported(recipe: Recipe) -> None:
    for key, (what, used, default) in _UNSUPPORTED.items():
        if used(recipe):
            raise ConfigError(f"{key} ({what}) is not supported by the mindspore backend; set {key}={default}")


def mindspore_meta(job: MemberJob, card: DatasetCard, recipe: Recipe, runtime: Runtime) -> dict[str, Any]:
    """run.json: every backend's record (so evaluators read both alike) plus MindSpore's own details."""
    details = {"version": ms.__version__, "device_target": runtime.device_target, "mode": runtime.mode,
               "amp_level": precision_for(recipe.train, runtime.device_target).amp_level}
    return run_record(job, card, recipe, "mindspore", mindspore=details).to_json()


class SumAcrossRanks(ms.nn.Cell):
    """AllReduce(sum) as a compiled cell: MindSpore 2.10 has no eager (pyboost) AllReduce kernel on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.all_reduce = ms.ops.AllReduce()

    @ms.jit
    def construct(self, values: Tensor) -> Tensor:
        return self.all_reduce(values)


class MindSporeTrainer(MemberTraining):
    def __init__(self, job: MemberJob, recipe: Recipe, runtime: Runtime) -> None:
        _check_supported(recipe)
        self._summer: SumAcrossRanks | None = None
        self.job, self.recipe, self.runtime = job, recipe, runtime
        self.card = card = read_card(job.data)
        self.train_uris = shard_uris(job.data, card, job.shard, "train")
        self.val_uris = shard_uris(job.data, card, job.shard, "val") if has_split(card, "val") else None
        self.run_dir = job.out / card.sub_datasets[job.shard]
        self.state = prepare_run_dir(self.run_dir, job.resume, "mindspore")
        self.meta = mindspore_meta(job, card, recipe, runtime)
        self.batches_per_epoch = batches_per_epoch(card, recipe.data.batch_size, runtime.world)
        self.resume_from, self.resume_recipe, self.resume_epochs = None, None, 0
        if self.state == "resume":
            self.resume_from = ckpt.read_ckpt(self.run_dir / "last.ckpt", self.meta, ckpt.RESUME_FIELDS)[0]
            self.resume_recipe = ckpt.recipe_of(self.resume_from)
            self.resume_epochs = int(ckpt.scalar(self.resume_from, "epoch", keep=True)) + 1

    def _basis(self) -> np.ndarray | None:
        spec = self.meta["model"]
        if spec["head"] != "ebv":
            return None
        if self.state == "resume" and (self.run_dir / BASIS_FILE).exists():
            return ckpt.load_basis(self.run_dir)
        return generate_basis(self.meta["num_classes"], spec["ebv_dim"], spec["ebv_threshold"], spec["ebv_seed"],
                              self.recipe.model.ebv_steps)

    def build(self) -> None:
        recipe, spec, world = self.recipe, self.meta["model"], self.runtime.world
        try:
            self.model = create_model(spec["name"], self.meta["num_classes"], stem=spec["stem"], head=spec["head"],
                                      ebv_basis=self._basis(), ebv_tau=spec["ebv_tau"],
                                      input_scale=spec["input"]["scale"], mean=spec["input"]["mean"],
                                      std=spec["input"]["std"])
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        precision = precision_for(recipe.train, self.runtime.device_target)
        network = apply_precision(self.model, precision)
        self.optimizer = build_optimizer(self.model, recipe, self.batches_per_epoch)
        loss = SoftTargetLoss(network, self.meta["num_classes"], recipe.train.label_smoothing)
        self.train_step = TrainStep(loss, self.optimizer, precision.loss_scaling, recipe.train.grad_clip)
        self.eval_step = EvalStep(network, min(5, int(self.meta["num_classes"])))
        self.train_stream = slot_stream(self.train_uris, self.card, recipe.data,
                                        batch_size=recipe.data.batch_size // world,
                                        batches_per_epoch=self.batches_per_epoch, rank=self.runtime.rank, world=world,
                                        seed=recipe.train.seed)
        self.val_stream = (EvalStream(self.val_uris, self.card, batch_size=_EVAL_BATCH, rank=self.runtime.rank,
                                      world=world) if self.val_uris else None)

    def restore(self, params: dict[str, Any]) -> tuple[int, float]:
        epoch, best = ckpt.scalar(params, "epoch"), ckpt.scalar(params, "best_top1")
        ckpt.load_into(self.train_step, params, self.run_dir / "last.ckpt")
        return int(epoch) + 1, best

    def save_last(self, epoch: int, best_top1: float) -> Path:
        path = self.run_dir / "last.ckpt"
        ckpt.save_ckpt(self.train_step, path, self.meta, recipe=self.recipe.to_dict(), epoch=epoch,
                       best_top1=best_top1)
        return path

    def save_basis(self) -> None:
        ckpt.save_basis(self.run_dir, ebv_basis_of(self.model))

    def verify_basis(self) -> None:
        ckpt.verify_basis(self.run_dir, ebv_basis_of(self.model))

    def train_epoch(self, epoch: int, bar: EpochProgress) -> dict[str, Any]:
        config = self.recipe.train
        self.train_stream.set_epoch(epoch)
        mix_rng = np.random.default_rng([config.seed, epoch, self.runtime.rank])
        classes = int(self.meta["num_classes"])
        mixing = config.mixup_alpha > 0 or config.cutmix_alpha > 0
        self.train_step.set_train(True)
        loss_sum, seen, skipped, steps = 0.0, 0, 0, 0
        start = time.perf_counter()
        dataset = train_dataset(self.train_stream, self.recipe.data.workers)
        for images, labels, batch_skipped in batches(dataset):
            # The torch backend's mixing, on the host: the same draws from the same generator.
            mixed, targets = mix_batch(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                                       classes, config, mix_rng)
            batch = mixed.numpy().astype(np.float32) if mixing else images
            loss = self.train_step(Tensor(batch), Tensor(targets.numpy()))
            loss_value = float(loss.asnumpy())  # a host sync per step: free on the CPU
            loss_sum += loss_value * len(labels)
            seen += len(labels)
            skipped += int(batch_skipped)
            steps += 1
            step = epoch * self.batches_per_epoch + steps
            bar.step(loss_value, self._lr(step), len(labels))
        seconds = time.perf_counter() - start
        loss_total, seen_total, skipped_total = self._all_reduce([loss_sum, seen, skipped])
        return {"lr": self._lr((epoch + 1) * self.batches_per_epoch),
                "train_loss": loss_total / max(seen_total, 1), "train_images": int(seen_total), "steps": steps,
                "seconds": seconds, "images_per_s": seen_total / max(seconds, 1e-9), "skipped": int(skipped_total)}

    def _lr(self, step: int) -> float:
        base = self.recipe.optimizer.lr
        return base * lr_factor(step, self.batches_per_epoch, self.recipe.schedule, base)

    def validate(self) -> dict[str, Any]:
        self.eval_step.set_train(False)
        totals = np.zeros(5)  # loss, top1, top5, samples, skipped
        for images, labels, count, skipped in batches(eval_dataset(self.val_stream)):
            loss, top1, top5 = self.eval_step(Tensor(images), Tensor(labels), Tensor(count))
            totals += [float(loss.asnumpy()), float(top1.asnumpy()), float(top5.asnumpy()), int(count), int(skipped)]
        loss, top1, top5, samples, skipped = self._all_reduce(totals.tolist())
        samples = max(samples, 1)
        return {"val_loss": loss / samples, "top1": 100 * top1 / samples, "top5": 100 * top5 / samples,
                "val_samples": int(samples), "val_skipped": int(skipped)}

    def _all_reduce(self, values: list[float]) -> list[float]:
        if not self.runtime.enabled:
            return values
        if self._summer is None:
            self._summer = SumAcrossRanks()
        return [float(v) for v in self._summer(Tensor(np.asarray(values, np.float32))).asnumpy()]

    def plan(self) -> EpochPlan:
        return EpochPlan.of(self.recipe, shard=self.job.shard, batches_per_epoch=self.batches_per_epoch,
                            main=self.runtime.is_main, world=self.runtime.world, progress=self.job.progress,
                            label="mindspore", validates=self.val_uris is not None)

    def wait_for_ranks(self) -> None:
        return None  # ranks already meet in the all-reduces of every epoch's metrics

    def save_final_weights(self) -> None:
        ckpt.save_ckpt(self.model, self.run_dir / "final.ckpt", self.meta, standalone=True)
        ckpt.save_portable(self.run_dir / PORTABLE_FILE, self.model.net, ebv_heads(self.model.net), self.meta)

    def final_fields(self) -> dict[str, Any]:
        weights = self.model.trainable_params()
        return {"ema": False, "parameters": count_parameters(self.model),
                "parameter_bytes": int(sum(np.prod(p.shape) * np.dtype(ms.dtype_to_nptype(p.dtype)).itemsize
                                           for p in weights))}


def train_member(job: MemberJob, recipe: Recipe, runtime: Runtime) -> dict[str, Any]:
    """Check everything (data, shard, recipe, checkpoint) before training, then train; final.json content."""
    return MindSporeTrainer.checked_run(job, recipe, runtime)
