"""MindSpore run-folder files: atomic .ckpt checkpoints that carry run.json's identity, the EBV basis file.

Same layout as the torch backend (``train.checkpoint``): last.ckpt / best.ckpt hold the whole train
step (weights, BatchNorm statistics, momentum buffers, the optimizer's global_step, the loss scale)
plus ``epoch``, ``best_top1`` and the run's meta as JSON; final.ckpt holds the member's network.
.ckpt is MindSpore's protobuf format (no pickle). ``ebv_basis.safetensors`` is the torch backend's
file, written with safetensors' numpy API: the same name, key and layout for both backends, and so is
final.safetensors (``train.portable``): the network renamed to torchvision's parameter names, which a
torchvision model of the same name loads (the networks mirror torchvision's, ``train.mindspore.models``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn
from safetensors.numpy import load_file, save_file
from subspectral.train import portable
from subspectral.train.run import BASIS_FILE, IDENTITY_FIELDS, CheckpointError

_META_KEY = "subspectral_meta"
_RECIPE_KEY = "subspectral_recipe"
# The values beside the parameters in last.ckpt / best.ckpt (final.ckpt has the meta only).
RESUME_FIELDS = ("epoch", "best_top1", _RECIPE_KEY)


def save_ckpt(cell: nn.Cell, path: Path, meta: dict[str, Any], *, standalone: bool = False,
              recipe: dict[str, Any] | None = None, **extra: int | float) -> None:
    """Write ``cell``'s parameters to ``path`` atomically (temporary name in the folder, then rename).

    ``standalone``: name parameters by their path inside ``cell`` ("net.conv1.weight"), not by their
    global names, which carry the prefixes of the cells that wrapped it in training
    ("network.net.conv1.weight"), so a freshly built network loads the file.
    """
    saved = [{"name": name, "data": param} for name, param in cell.parameters_and_names()] if standalone else cell
    # save_checkpoint appends ".ckpt" to names that lack it: give the temporary name that suffix.
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.ckpt")
    values = {_META_KEY: json.dumps(meta, sort_keys=True), **extra}
    if recipe is not None:  # the recipe the weights were trained with: a resume must use the same
        values[_RECIPE_KEY] = json.dumps(recipe, sort_keys=True)
    ms.save_checkpoint(saved, str(tmp), append_dict=values)
    tmp.chmod(0o644)  # MindSpore writes checkpoints read-only (0400); the torch backend's files are 0644
    os.replace(tmp, path)


def read_ckpt(path: Path, meta: dict[str, Any] | None = None,
              fields: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parameters by name, the saved run meta); refuses a checkpoint made for another member or model,
    or one that lacks the run meta or any of ``fields``."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (is the member finished?)")
    try:
        params = ms.load_checkpoint(str(path))
    except Exception as exc:  # any parse failure means the same thing to the user
        reason = " ".join((str(exc).splitlines() or [type(exc).__name__])[0].split())
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or not a MindSpore checkpoint ({reason})") \
            from exc
    missing = [name for name in (_META_KEY, *fields) if name not in params]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a checkpoint of this tool's "
                              "trainer, or one of an older version")
    try:
        theirs = json.loads(str(params.pop(_META_KEY)))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: its run meta is not JSON") from exc
    if meta is not None:
        for field in IDENTITY_FIELDS:
            if theirs.get(field) != meta.get(field):
                raise CheckpointError(f"checkpoint {path} is for a different run: {field} is "
                                      f"{theirs.get(field)!r} there, {meta.get(field)!r} here")
    return params, theirs


def scalar(params: dict[str, Any], name: str, keep: bool = False) -> float:
    """The value ``name`` saved beside the parameters; removed from ``params`` unless ``keep``."""
    value = params[name] if keep else params.pop(name)
    return float(value.asnumpy()) if hasattr(value, "asnumpy") else float(value)


def recipe_of(params: dict[str, Any]) -> dict[str, Any]:
    """The recipe (``Recipe.to_dict()``) a resumable checkpoint was trained with, removed from ``params``."""
    return json.loads(str(params.pop(_RECIPE_KEY)))


def load_into(cell: nn.Cell, params: dict[str, Any], path: Path) -> None:
    """Load every parameter of ``cell`` from ``params``; a missing or mis-shaped one is a CheckpointError."""
    try:
        missing, _ = ms.load_param_into_net(cell, params, strict_load=True)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} does not fit the model: {(str(exc).splitlines() or [''])[0]}") from exc
    if missing:
        raise CheckpointError(f"{path} does not fit the model: {len(missing)} parameters missing, "
                              f"e.g. {missing[0]}")


def save_basis(run_dir: Path, basis: np.ndarray | None) -> None:
    if basis is None:
        return
    tmp = run_dir / f".{BASIS_FILE}.tmp{os.getpid()}"
    save_file({"basis": np.ascontiguousarray(basis, np.float32)}, str(tmp))
    os.replace(tmp, run_dir / BASIS_FILE)


def load_basis(run_dir: Path) -> np.ndarray:
    return load_file(str(run_dir / BASIS_FILE))["basis"]


def verify_basis(run_dir: Path, basis: np.ndarray | None) -> None:
    """The network's EBV basis must equal the run folder's basis file bit for bit."""
    if basis is None:
        return
    path = run_dir / BASIS_FILE
    if not path.exists():
        raise CheckpointError(f"{path} is missing: cannot verify the EBV basis")
    if not np.array_equal(load_basis(run_dir), basis):
        raise CheckpointError(f"the EBV basis in the weights differs from {path}")


# MindSpore's BatchNorm parameter names -> torchvision's; every other parameter has torchvision's name already.
_BATCHNORM_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                    "moving_variance": "running_var"}


def portable_tensors(network: nn.Cell, ebv_heads: set[str]) -> dict[str, np.ndarray]:
    """``network``'s parameters under torchvision's names, BatchNorm's ``num_batches_tracked`` included (0:
    MindSpore does not count batches, and torchvision uses the count only with ``momentum=None``)."""
    tensors = {}
    for name, param in network.parameters_and_names():
        module, _, leaf = name.rpartition(".")
        if leaf in _BATCHNORM_NAMES:
            name = f"{module}.{_BATCHNORM_NAMES[leaf]}"
            tensors[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
        tensors[portable.portable_name(name, ebv_heads)] = np.ascontiguousarray(param.asnumpy())
    return tensors


def save_portable(path: Path, network: nn.Cell, ebv_heads: set[str], meta: dict[str, Any]) -> None:
    """final.safetensors of a MindSpore member (``network``: the torchvision-shaped net, without InputNorm)."""
    tensors = portable_tensors(network, ebv_heads)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=portable.metadata(meta))
    os.replace(tmp, path)
