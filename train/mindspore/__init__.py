"""MindSpore backend of ``cli.py train`` (``--backend mindspore``): the same recipes, data and run layout.

``train_members`` (this backend's entry in ``train.cli``'s registry), ``runtime`` (context,
device target, mode, msrun/mpirun), ``models`` (ResNet family, stems, EBV head, input
normalisation; same registry names as ``train.models``), ``ebv`` (the torch backend's basis),
``data`` (GeneratorDataset over ``train.stream``'s batches: same partition, shuffle and
augmentation), ``step`` (loss, optimizer, lr per step, AMP level, loss scaling, the compiled train
step), ``checkpoint`` (atomic .ckpt files), ``trainer`` (one member), ``member`` (the ensemble-eval
loader). See docs/mindspore.md.

Nothing here imports MindSpore at package import time: ``require_mindspore`` gives the one-line
message when it is missing.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from subspectral.train.config import ConfigError

if TYPE_CHECKING:
    from subspectral.train.config import Recipe
    from subspectral.train.run import BackendRun, TrainOptions

MISSING_MESSAGE = ("--backend mindspore needs MindSpore, which is not installed: "
                   "pip install '.[mindspore]' (mindspore==2.10.0, numpy<2)")


class MindSporeMissing(ConfigError):
    """MindSpore is not importable; the message is one line for the user."""


def require_mindspore() -> None:
    if importlib.util.find_spec("mindspore") is None:
        raise MindSporeMissing(MISSING_MESSAGE)


def train_members(options: TrainOptions, recipe: Recipe, members: str) -> BackendRun:
    """``--backend mindspore``: the members ``members`` (as --shard gives them) one after another."""
    require_mindspore()
    from subspectral.train.run import BackendRun, MemberJob, select_members

    from .runtime import init_runtime
    from .trainer import train_member

    _, shards = select_members(options.data, members)
    runtime = init_runtime(options.device_target, options.mode, recipe.train.seed)
    done = BackendRun(main=runtime.is_main, label=f", mindspore {options.mode}")
    for shard in shards:
        job = MemberJob(options.data, shard, options.out, options.resume, options.progress)
        done.results[shard] = train_member(job, recipe, runtime)
    return done
