"""The torch backend's run-folder files: checkpoints (weights_only loads), the EBV basis file, the trained model.

A run folder ``RUNS/sub-KK/`` holds config.yaml, run.json, metrics.jsonl, tb/, last.pt, best.pt,
ebv_basis.safetensors (EBV heads only), final.pt, final.safetensors and final.json (written last:
the member is done). final.pt is this tool's (the ``SubNetwork``: input normalisation + ``net.``);
final.safetensors is for any other tool: the torchvision network's own state dict (docs/training.md,
"Using a member outside subspectral").
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from subspectral.schemas import ContractError, RunRecord
from subspectral.train import portable
from subspectral.train.ebv import EBVHead
from subspectral.train.models import SubNetwork, ebv_basis_of, model_from_run
from subspectral.train.portable import portable_name
from subspectral.train.run import BASIS_FILE, IDENTITY_FIELDS, CheckpointError, atomic_write
from torch import nn


def save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What ``MemberTrainer._checkpoint`` writes into last.pt / best.pt, and what final.pt holds.
RESUME_FIELDS = ("model", "optimizer", "scheduler", "scaler", "ema", "epoch", "best_top1", "rng", "meta", "config")
FINAL_FIELDS = ("model", "meta")


def read_checkpoint(path: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: a dict with ``fields``, or a CheckpointError in one line.

    A file that needs more than tensors and plain values is refused as not ours; torch's own message
    would suggest loading it with weights_only=False, which runs whatever code the file names.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} is not a checkpoint written by cli.py train (it holds more than tensors "
                              "and plain values): refused, not loaded") from exc
    except Exception as exc:  # truncated or not a torch file at all (zip, I/O errors): the same to the user
        reason = " ".join((str(exc).splitlines() or [type(exc).__name__])[0].split())
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or unusable checkpoint ({reason})") from exc
    missing = [name for name in fields if not isinstance(checkpoint, dict) or name not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a checkpoint of this tool's "
                              "trainer, or one of an older version")
    return checkpoint


def load_checkpoint(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Load ``path`` (weights_only) and refuse it unless it was made for the same member, data and model."""
    checkpoint = read_checkpoint(path, RESUME_FIELDS)
    theirs = checkpoint["meta"] if isinstance(checkpoint["meta"], dict) else {}
    for field in IDENTITY_FIELDS:
        if theirs.get(field) != meta.get(field):
            raise CheckpointError(f"checkpoint {path} is for a different run: {field} is "
                                  f"{theirs.get(field)!r} there, {meta.get(field)!r} here")
    return checkpoint


def save_basis(run_dir: Path, model: nn.Module) -> None:
    basis = ebv_basis_of(model)
    if basis is not None:
        tensors = {"basis": basis.detach().cpu().contiguous()}
        atomic_write(run_dir / BASIS_FILE, lambda tmp: save_file(tensors, tmp))


def verify_basis(run_dir: Path, model: nn.Module) -> None:
    """The model's EBV buffer must equal the run folder's basis file bit for bit."""
    basis = ebv_basis_of(model)
    if basis is None:
        return
    path = run_dir / BASIS_FILE
    if not path.exists():
        raise CheckpointError(f"{path} is missing: cannot verify the EBV basis")
    if not torch.equal(load_file(path)["basis"], basis.detach().cpu()):
        raise CheckpointError(f"the EBV basis in the weights differs from {path}")


def load_trained_model(run_dir: str | Path, weights: str = "final") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained member from its run folder: (model in eval mode on CPU, run.json content).

    ``weights`` is ``final`` (final.pt: EMA weights when EMA was on), ``best`` or ``last``.
    """
    run_dir = Path(run_dir)
    path = run_dir / f"{weights}.pt"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (is the member finished?)")
    checkpoint = read_checkpoint(path, FINAL_FIELDS)
    meta = checkpoint["meta"]
    try:
        record = RunRecord.from_json(meta, f"{path}'s run record")
    except ContractError as exc:
        raise CheckpointError(str(exc)) from exc
    try:
        model = model_from_run(record.model, record.num_classes)
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = " ".join((str(exc).splitlines() or [type(exc).__name__])[0].split())
        raise CheckpointError(f"{path} does not hold the model its meta describes ({reason})") from exc
    verify_basis(run_dir, model)
    return model.eval(), meta


def portable_state_dict(model: SubNetwork) -> dict[str, torch.Tensor]:
    """The member's torchvision network as torchvision names it (``train.portable``)."""
    heads = {name for name, module in model.net.named_modules() if isinstance(module, EBVHead)}
    return {portable_name(name, heads): tensor.detach().cpu().contiguous()
            for name, tensor in model.net.state_dict().items()}


def save_portable(path: Path, model: SubNetwork, meta: dict[str, Any]) -> None:
    """final.safetensors: ``portable_state_dict(model)``, with run.json in the metadata."""
    tensors = portable_state_dict(model)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=portable.metadata(meta)))
