"""Train one sub-network per sub-dataset (member k sees only sub-dataset k).

    python cli.py train --data data/sample --shard 0 --config sample --out runs
    python cli.py train --data data/sample --shard all --config sample --out runs     # N members in turn
    python cli.py train --data DATA --shard 7 --config imagenet21k-sub36 --out runs optimizer.lr=0.01
    python cli.py train --data DATA --shard 0-8 --fuse 9 --config imagenet21k-sub36 --out runs --device cuda
                                                                       # 9 members at once, one grouped network
    torchrun --nproc-per-node 8 cli.py train --data s3://bucket/in21k-sub36 --shard 7 --config \\
        imagenet21k-sub36 --out runs --device cuda                                    # DDP, one member
    srun --ntasks-per-node 8 python cli.py train --data DATA --shard 7 ...           # DDP under Slurm, no torchrun
    python cli.py train --list-recipes

Member k's run lives in OUT/sub-KK/ (see docs/training.md). --resume continues a killed run
exactly; a finished member (final.json present) is skipped, so a batch array can always pass it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from subspectral.train.config import Recipe
    from subspectral.train.run import BackendRun, TrainOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="prepared dataset: a folder or an s3:// URI holding dataset.json")
    parser.add_argument("--shard", default="0",
                        help="member(s) to train: K, a list 0,3,5, a range 0-8, or all (default 0)")
    parser.add_argument("--config", default="sample", help="recipe name (see --list-recipes) or a YAML path")
    parser.add_argument("--out", default="runs", help="runs folder; member k goes to OUT/sub-KK")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/sub-KK/last.pt if present")
    parser.add_argument("--epochs", type=int, help="shorthand for schedule.epochs=N")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available (default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fuse", type=int, metavar="K",
                        help="train the --shard members K at a time in one process, as one network grouped K ways "
                             "(= train.fuse=K; default 1: one at a time); see docs/training.md")
    parser.add_argument("--backend", choices=("torch", "mindspore"), default="torch",
                        help="training framework (default torch); mindspore: see docs/mindspore.md")
    parser.add_argument("--device-target", choices=("CPU", "GPU", "Ascend"), default="CPU",
                        help="--backend mindspore: device to train on (default CPU)")
    parser.add_argument("--mode", choices=("graph", "pynative"), default="graph",
                        help="--backend mindspore: execution mode (default graph)")
    parser.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override recipe keys, e.g. optimizer.lr=0.05 data.workers=2")


# --backend NAME -> "module:function" of its ``train_members(options, recipe, members) -> BackendRun``
# (``members`` as --shard gives it),
# imported only when chosen (MindSpore is an optional dependency).
BACKENDS: dict[str, str] = {
    "torch": "subspectral.train.trainer:train_members",
    "mindspore": "subspectral.train.mindspore:train_members",
}


def backend(name: str) -> Callable[[TrainOptions, Recipe, str], BackendRun]:
    module, _, function = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _fail(message: str) -> int:
    print(f"cli.py train: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from subspectral.train.config import ConfigError, apply_overrides, check_recipe, list_recipes, load_recipe
    from subspectral.train.run import CheckpointError
    from subspectral.train.storage import DataError

    if args.list_recipes:
        for name, description in list_recipes().items():
            print(f"{name:24s} {description}")
        return 0
    if not args.data:
        return _fail("--data is required")
    from subspectral.train.run import TrainOptions

    options = TrainOptions(data=args.data, out=Path(args.out), resume=args.resume, progress=not args.no_progress,
                           device=args.device, device_target=args.device_target, mode=args.mode)
    try:
        recipe = apply_overrides(load_recipe(args.config), args.overrides)
        if args.epochs is not None:
            apply_overrides(recipe, [f"schedule.epochs={args.epochs}"])
        if args.fuse is not None:
            apply_overrides(recipe, [f"train.fuse={args.fuse}"])
        check_recipe(recipe)
        # Fused training (train/fused_trainer.py): K members per process, torch backend only.
        if recipe.train.fuse > 1 and args.backend == "mindspore":
            raise ConfigError("--fuse / train.fuse > 1 is not supported by --backend mindspore: train its members "
                              "one at a time (train.fuse=1)")
        train_members = backend(args.backend)
        done = train_members(options, recipe, args.shard)
    except (ConfigError, DataError, CheckpointError, ValueError) as exc:
        return _fail(str(exc))
    if done.main:
        for shard, final in done.results.items():
            print(f"sub-{shard:02d}: {summary(final, done.label)}")
    return 0


def summary(final: dict, label: str) -> str:
    """A member's result line from its final.json content (older final.json files lack the skip counts)."""
    if final.get("validated", True):
        line = (f"top1 {final['top1']:.2f}%  top5 {final['top5']:.2f}%  "
                f"({final['val_samples']} val samples, {final['epochs']} epochs{label})")
    else:
        line = f"trained {final['epochs']} epochs without validation (the dataset has no val split){label}"
    if final.get("val_skipped"):
        line += f"; {final['val_skipped']} val samples skipped as unreadable"
    if final.get("train_skipped"):
        line += f"; {final['train_skipped']} train samples skipped in the last epoch"
    return line
