"""Train one member (sub-network k on sub-dataset k): set-up, epoch loop, checkpoints, final files."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from subspectral.schemas import DatasetCard
from subspectral.train import checkpoint as ckpt
from subspectral.train.config import ConfigError, Recipe
from subspectral.train.data import make_loader
from subspectral.train.distributed import DistInfo, barrier, init_distributed, shutdown
from subspectral.train.ebv import generate_ebv
from subspectral.train.engine import (
    StepContext,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    evaluate,
    train_one_epoch,
)
from subspectral.train.epochs import EpochPlan, MemberTraining, batches_per_epoch
from subspectral.train.models import SubNetwork, create_model
from subspectral.train.portable import PORTABLE_FILE
from subspectral.train.prepared import has_split, read_card, shard_uris
from subspectral.train.progress import EpochProgress
from subspectral.train.run import (
    BASIS_FILE,
    BackendRun,
    MemberJob,
    TrainOptions,
    prepare_run_dir,
    run_record,
    select_members,
)
from subspectral.train.stream import EvalStream, TrainStream
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

_EVAL_BATCH = 512


@functools.lru_cache(maxsize=2)
def _basis(num_classes: int, dim: int, threshold: float, seed: int, steps: int, device: str) -> torch.Tensor:
    # Members trained one after another in one process share the (deterministic) basis.
    return generate_ebv(num_classes, dim, threshold=threshold, seed=seed, max_steps=steps, device=device)[0]


def build_member_model(meta: dict[str, Any], recipe: Recipe, device: torch.device,
                       basis_file: Path | None) -> SubNetwork:
    """The member's network; an EBV basis comes from ``basis_file`` when resuming, else is generated."""
    spec = meta["model"]
    basis = None
    if spec["head"] == "ebv" and basis_file is not None:
        basis = load_file(basis_file)["basis"]
    elif spec["head"] == "ebv":
        basis = _basis(meta["num_classes"], spec["ebv_dim"], spec["ebv_threshold"], spec["ebv_seed"],
                       recipe.model.ebv_steps, str(device))
    try:
        return create_model(spec["name"], meta["num_classes"], stem=spec["stem"], head=spec["head"],
                            ebv_dim=spec["ebv_dim"], ebv_tau=spec["ebv_tau"], ebv_basis=basis,
                            input_scale=spec["input"]["scale"], mean=spec["input"]["mean"],
                            std=spec["input"]["std"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _check_input_size(model: nn.Module, card: DatasetCard) -> None:
    shape = card.sample_shape
    probe = torch.zeros((2, *shape), dtype=torch.from_numpy(np.empty(0, card.dtype)).dtype)
    model.eval()
    try:
        with torch.no_grad():
            model(probe)
    except RuntimeError as exc:
        raise ConfigError(f"model {model.net.__class__.__name__} with this stem cannot take "
                          f"{shape[0]}x{shape[1]} input ({str(exc).splitlines()[0]})") from exc


def _seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


class MemberTrainer(MemberTraining):
    """Everything one member's training holds: model, optimizer, loaders, run folder."""

    def __init__(self, job: MemberJob, recipe: Recipe, dist: DistInfo, device: torch.device) -> None:
        self.job, self.recipe, self.dist, self.device = job, recipe, dist, device
        card = read_card(job.data)
        self.card = card
        self.train_uris = shard_uris(job.data, card, job.shard, "train")
        self.val_uris = shard_uris(job.data, card, job.shard, "val") if has_split(card, "val") else None
        self.run_dir = job.out / card.sub_datasets[job.shard]
        self.state = prepare_run_dir(self.run_dir, job.resume, "torch")
        self.meta = run_record(job, card, recipe, "torch").to_json()
        batch = recipe.data.batch_size
        self.batches_per_epoch = batches_per_epoch(card, batch, dist.world)
        if (batch // dist.world) % recipe.train.accumulate_steps:
            raise ConfigError(f"data.batch_size={batch} over {dist.world} process(es) does not split into "
                              f"train.accumulate_steps={recipe.train.accumulate_steps} micro-batches")
        self.resume_from, self.resume_recipe, self.resume_epochs = None, None, 0
        if self.state == "resume":
            self.resume_from = ckpt.load_checkpoint(self.run_dir / "last.pt", self.meta)
            self.resume_recipe = self.resume_from["config"]
            self.resume_epochs = int(self.resume_from["epoch"]) + 1

    def build(self) -> None:
        recipe, train_cfg = self.recipe, self.recipe.train
        _seed_everything(train_cfg.seed, train_cfg.deterministic)
        basis_file = self.run_dir / BASIS_FILE
        model = build_member_model(self.meta, recipe, self.device,
                                   basis_file if self.state == "resume" and basis_file.exists() else None)
        _check_input_size(model, self.card)
        model.to(self.device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and train_cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = None
        if train_cfg.ema_decay > 0:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train_cfg.ema_decay),
                                     use_buffers=True)
        self.optimizer = build_optimizer(model, recipe)
        self.scheduler = build_scheduler(self.optimizer, recipe, self.batches_per_epoch)
        amp_dtype = autocast_dtype(train_cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self.ctx = StepContext(self.device, amp_dtype, self.card.num_classes, train_cfg)
        trained = model
        if self.dist.enabled:
            trained = DistributedDataParallel(model, device_ids=[self.device.index] if on_cuda else None)
        # self.model stays the plain module: checkpoints never carry torch.compile's "_orig_mod." prefix.
        self.train_model = torch.compile(trained, backend=train_cfg.compile_backend) if train_cfg.compile else trained
        world, rank = self.dist.world, self.dist.rank
        self.train_stream = TrainStream(self.train_uris, self.card, recipe.data,
                                        batch_size=recipe.data.batch_size // world,
                                        batches_per_epoch=self.batches_per_epoch, rank=rank, world=world,
                                        seed=train_cfg.seed)
        self.val_stream = (EvalStream(self.val_uris, self.card, batch_size=_EVAL_BATCH, rank=rank, world=world)
                           if self.val_uris else None)

    def _weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The state_dict to save (train.fused_trainer copies a member's weights out of its fused block)."""
        return module.state_dict()

    def _checkpoint(self, epoch: int, best_top1: float) -> dict[str, Any]:
        return {"model": self._weights(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "epoch": epoch,
                "best_top1": best_top1, "rng": ckpt.rng_state(), "meta": self.meta,
                "config": self.recipe.to_dict()}

    def restore(self, checkpoint: dict[str, Any]) -> tuple[int, float]:
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            # A bfloat16 or float32 run saves an empty scaler state: resumed in float16, it starts from the
            # scaler's initial scale.
            if checkpoint["scaler"] or not self.scaler.is_enabled():
                self.scaler.load_state_dict(checkpoint["scaler"])
            if self.ema is not None and checkpoint["ema"] is not None:
                self.ema.load_state_dict(checkpoint["ema"])
            ckpt.set_rng_state(checkpoint["rng"])
            return int(checkpoint["epoch"]) + 1, float(checkpoint["best_top1"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = " ".join((str(exc).splitlines() or [type(exc).__name__])[0].split())
            raise ckpt.CheckpointError(f"{self.run_dir / 'last.pt'} does not fit this run ({reason})") from exc

    def save_basis(self) -> None:
        ckpt.save_basis(self.run_dir, self.model)

    def verify_basis(self) -> None:
        ckpt.verify_basis(self.run_dir, self.model)

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def validate(self) -> dict[str, Any]:
        pin = self.device.type == "cuda"
        loader = make_loader(self.val_stream, self.recipe.data.workers, pin)
        return evaluate(self._eval_model(), loader, self.ctx)

    def train_epoch(self, epoch: int, bar: EpochProgress) -> dict[str, Any]:
        train_cfg = self.recipe.train
        # Everything random in an epoch derives from (seed, epoch): resuming replays it exactly.
        torch.manual_seed(train_cfg.seed * 100_003 + epoch)
        mix_rng = np.random.default_rng([train_cfg.seed, epoch, self.dist.rank])
        self.train_stream.set_epoch(epoch)
        loader = make_loader(self.train_stream, self.recipe.data.workers, self.device.type == "cuda")
        after_step = (functools.partial(self.ema.update_parameters, self.model)
                      if self.ema is not None else _nothing)
        stats = train_one_epoch(self.train_model, loader, self.optimizer, self.scheduler, self.scaler,
                                self.ctx, mix_rng, after_step, bar.step)
        return {"lr": self.optimizer.param_groups[0]["lr"], **stats}

    def save_last(self, epoch: int, best_top1: float) -> Path:
        path = self.run_dir / "last.pt"
        ckpt.save_torch(self._checkpoint(epoch, best_top1), path)
        return path

    def wait_for_ranks(self) -> None:
        barrier()

    def plan(self) -> EpochPlan:
        return EpochPlan.of(self.recipe, shard=self.job.shard, batches_per_epoch=self.batches_per_epoch,
                            main=self.dist.is_main, world=self.dist.world, progress=self.job.progress,
                            validates=self.val_uris is not None)

    def save_final_weights(self) -> None:
        model = self._eval_model()
        ckpt.save_torch({"model": self._weights(model), "meta": self.meta}, self.run_dir / "final.pt")
        ckpt.save_portable(self.run_dir / PORTABLE_FILE, model, self.meta)

    def final_fields(self) -> dict[str, Any]:
        weights = list(self._eval_model().parameters())
        return {"ema": self.ema is not None, "parameters": sum(p.numel() for p in weights),
                "parameter_bytes": sum(p.numel() * p.element_size() for p in weights)}


def _nothing() -> None:
    return None


def train_members(options: TrainOptions, recipe: Recipe, members: str) -> BackendRun:
    """``--backend torch``: the members ``members`` (as --shard gives them) one after another in this process."""
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    use_cuda = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    _, shards = select_members(options.data, members)
    dist = init_distributed("cuda" if use_cuda else "cpu")
    device = torch.device("cuda", dist.local_rank) if use_cuda else torch.device("cpu")
    done = BackendRun(main=dist.is_main)
    jobs = [MemberJob(options.data, shard, options.out, options.resume, options.progress) for shard in shards]
    try:
        if recipe.train.fuse > 1:  # K members at a time as one grouped network (train/fused_trainer.py)
            from subspectral.train.fused_trainer import train_fused_groups

            done.results = train_fused_groups(jobs, recipe, dist, device)
        else:
            for job in jobs:
                done.results[job.shard] = train_member(job, recipe, dist, device)
    finally:
        shutdown()
    return done


def train_member(job: MemberJob, recipe: Recipe, dist: DistInfo, device: torch.device) -> dict[str, Any]:
    """Check everything (data, shard, recipe, checkpoint) before training, then train; final.json content."""
    return MemberTrainer.checked_run(job, recipe, dist, device)
