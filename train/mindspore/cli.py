"""``cli.py train --backend mindspore``: the torch command's checks and messages, MindSpore underneath.

    python cli.py train --backend mindspore --data data/sample --shard 0 --config sample --out runs
    msrun --worker_num 2 --local_worker_num 2 --join True cli.py train --backend mindspore --data DATA ...
    mpirun -n 8 python cli.py train --backend mindspore --device-target Ascend --data DATA --shard 7 ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.config import ConfigError, Recipe


def _fail(message: str) -> int:
    print(f"cli.py train: error: {message}", file=sys.stderr)
    return 2


def train_members(args: argparse.Namespace, recipe: Recipe) -> int:
    """Train the members named by ``--shard`` one after another; one clear line on any bad input."""
    from train.mindspore import MindSporeMissing, require_mindspore

    try:
        require_mindspore()
    except MindSporeMissing as exc:
        return _fail(str(exc))
    from train.data import read_card
    from train.storage import DataError
    from train.train_cli import parse_shards

    try:
        card = read_card(args.data)
        shards = parse_shards(args.shard, int(card["split"]))
    except (DataError, ValueError) as exc:
        return _fail(str(exc))

    from train.checkpoint import CheckpointError
    from train.mindspore.runtime import init_runtime
    from train.mindspore.trainer import MindSporeJob, train_member

    runtime = init_runtime(args.device_target, args.mode, recipe.train.seed)
    results = {}
    try:
        for shard in shards:
            job = MindSporeJob(args.data, shard, Path(args.out), args.resume, not args.no_progress)
            results[shard] = train_member(job, recipe, runtime)
    except (ConfigError, DataError, CheckpointError) as exc:
        return _fail(str(exc))
    if runtime.is_main:
        for shard, final in results.items():
            print(f"sub-{shard:02d}: top1 {final['top1']:.2f}%  top5 {final['top5']:.2f}%  "
                  f"({final['val_samples']} val samples, {final['epochs']} epochs, mindspore {args.mode})")
    return 0
