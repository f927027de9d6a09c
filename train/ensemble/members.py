"""Trained members: discovery in a runs folder, compatibility checks, and one loader interface.

Run layout (written by ``cli.py train``): ``RUNS/sub-KK/run.json`` names the ``backend``;
``final.json`` (top-1/top-5 on the member's own val split) marks the member as done. A loader per
backend turns such a folder into a ``Member``; the aggregation code sees only ``Member``. A new
backend (MindSpore) adds one line to ``LOADER_PATHS`` (its module is imported only when one of its
members is evaluated), or registers at run time with ``@register_loader(name)``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from subspectral.schemas import ContractError, DatasetCard, RunRecord


class MemberError(ValueError):
    """A member cannot be used: missing, corrupt, or trained on incompatible data."""


@dataclass(frozen=True)
class FinishedRun:
    """One finished run folder: its shard, run record (run.json) and final.json."""

    shard: int
    path: Path
    record: RunRecord
    final: dict[str, Any]

    @property
    def backend(self) -> str:
        return self.record.backend

    @property
    def val_top1(self) -> float:
        """The member's own val accuracy (final.json top1): what ``geo`` ranks members by."""
        return float(self.final["top1"])


class Member(Protocol):
    """What aggregation needs from a trained member, whatever framework trained it."""

    shard: int
    meta: dict[str, Any]  # run.json

    def predict(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` (float32, on the evaluation device) for a batch of images as stored:
        uint8 (int16 for ``dct``), NHWC or NCHW."""
        ...


MemberLoader = Callable[[FinishedRun, torch.device], Member]
# backend -> "module:function" of its loader, imported on first use.
LOADER_PATHS: dict[str, str] = {
    "torch": "subspectral.train.ensemble.members:load_torch_member",
    "mindspore": "subspectral.train.mindspore.member:load_mindspore_member",  # imports MindSpore only when used
}
_LOADERS: dict[str, MemberLoader] = {}


def register_loader(backend: str) -> Callable[[MemberLoader], MemberLoader]:
    """Decorator: ``loader(run, device) -> Member`` for run folders whose run.json names ``backend``."""

    def register(loader: MemberLoader) -> MemberLoader:
        _LOADERS[backend] = loader
        return loader

    return register


def load_member(run: FinishedRun, device: torch.device) -> Member:
    if run.backend not in _LOADERS and run.backend in LOADER_PATHS:
        module, _, function = LOADER_PATHS[run.backend].partition(":")
        _LOADERS[run.backend] = getattr(importlib.import_module(module), function)
    if run.backend not in _LOADERS:
        known = ", ".join(sorted({*_LOADERS, *LOADER_PATHS}))
        raise MemberError(f"{run.path}: no loader for backend {run.backend!r} (known: {known})")
    return _LOADERS[run.backend](run, device)


class TorchMember:
    """A member trained by the torch backend: ``train.models.model_from_run`` + final.pt weights.

    The network takes the stored integer batch (NHWC) and normalises it itself (``InputNorm``)."""

    def __init__(self, shard: int, meta: dict[str, Any], model: torch.nn.Module, device: torch.device):
        self.shard = shard
        self.meta = meta
        self.model = model.to(device).eval()
        self.device = device

    def predict(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        batch = torch.as_tensor(images)
        if batch.shape[1] == 3 and batch.shape[-1] != 3:  # NCHW -> NHWC, the layout the model takes
            batch = batch.permute(0, 2, 3, 1)
        with torch.inference_mode():
            return self.model(batch.to(self.device, non_blocking=True)).float()


def load_torch_member(run: FinishedRun, device: torch.device) -> TorchMember:
    """final.pt through the trainer's own loader (weights_only load, EBV basis verified)."""
    from subspectral.train.checkpoint import load_trained_model
    from subspectral.train.run import CheckpointError

    try:
        model, meta = load_trained_model(run.path, "final")
    except CheckpointError as error:
        raise MemberError(str(error)) from error
    except Exception as error:  # torch.load and load_state_dict raise many types for unusable files
        reason = (str(error).splitlines() or [""])[0]
        raise MemberError(
            f"{run.path / 'final.pt'}: corrupt or unusable checkpoint ({type(error).__name__}: {reason})"
        ) from error
    return TorchMember(run.shard, meta, model, device)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MemberError(f"{path}: unreadable ({error})") from error


def read_run(path: Path, shard: int | None = None) -> FinishedRun:
    """A finished run folder (``final.json`` present) as a FinishedRun."""
    if not (path / "final.json").is_file():
        raise MemberError(f"{path}: not a finished run (no final.json)")
    try:
        record = RunRecord.from_json(_read_json(path / "run.json"), str(path / "run.json"))
    except ContractError as error:
        raise MemberError(str(error)) from error
    final = _read_json(path / "final.json")
    if final.get("validated") is False:
        raise MemberError(f"{path}: trained without validation (its dataset had no val split), so it has no own "
                          "val accuracy to rank it by: train it on a dataset prepared with --val-per-class N")
    if not isinstance(final.get("top1"), (int, float)):
        raise MemberError(f"{path / 'final.json'}: no 'top1'")
    if shard is not None and record.shard != shard:
        raise MemberError(f"{path}: run.json says shard {record.shard}, but the folder is for shard {shard}")
    return FinishedRun(record.shard, path, record, final)


def discover_runs(
    runs_dir: Path, folder_names: Sequence[str], shards: Sequence[int]
) -> tuple[list[FinishedRun], list[int]]:
    """Finished runs among ``shards`` (folder ``runs_dir/folder_names[k]``), and the shards missing."""
    found, missing = [], []
    for shard in shards:
        path = runs_dir / folder_names[shard]
        if (path / "final.json").is_file():
            found.append(read_run(path, shard))
        else:
            missing.append(shard)
    return found, missing


def check_compatible(run: FinishedRun, card: DatasetCard, data: str) -> None:
    """Refuse a member trained on other data than ``card``'s: another class table, split, transform, size,
    or other shards for its sub-dataset (another ``--seed``, a re-preparation, replaced tars)."""
    difference = run.record.data_difference(card, data)
    if difference is not None:
        raise MemberError(f"member {run.path} {difference}: refusing to mix members and data of different datasets")
