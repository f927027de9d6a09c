"""Train one sub-network per sub-dataset (member k sees only sub-dataset k).

    python cli.py train --data data/sample --shard 0 --config sample --out runs
    python cli.py train --data data/sample --shard all --config sample --out runs     # N members in turn
    python cli.py train --data DATA --shard 7 --config imagenet21k-sub36 --out runs optimizer.lr=0.01
    python cli.py train --data DATA --shard 0-8 --fuse 9 --config imagenet21k-sub36 --out runs --device cuda
                                                                       # 9 members at once, one grouped network
    torchrun --nproc-per-node 8 cli.py train --data s3://bucket/in21k-sub36 --shard 7 --config \\
        imagenet21k-sub36 --out runs --device cuda                                    # DDP, one member
    python cli.py train --list-recipes

Member k's run lives in OUT/sub-KK/ (see docs/training.md). --resume continues a killed run
exactly; a finished member (final.json present) is skipped, so a batch array can always pass it.
"""

from __future__ import annotations

import argparse
import sys


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


def parse_shards(text: str, count: int) -> list[int]:
    """'all', 'K', '0,3,5' or '0-8' -> member indices; ValueError with a clear message otherwise."""
    if text == "all":
        return list(range(count))
    shards: list[int] = []
    for item in text.split(","):
        low, sep, high = item.partition("-")
        try:
            shards.extend(range(int(low), int(high) + 1) if sep else [int(low)])
        except ValueError as exc:
            raise ValueError(f"--shard {text!r}: expected K, K,L,M, K-L or all") from exc
    for shard in shards:
        if not 0 <= shard < count:
            raise ValueError(f"shard {shard} is out of range: this dataset has {count} sub-datasets "
                             f"(0..{count - 1})")
    return shards


def _fail(message: str) -> int:
    print(f"cli.py train: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from train.config import ConfigError, apply_overrides, list_recipes, load_recipe

    if args.list_recipes:
        for name, description in list_recipes().items():
            print(f"{name:24s} {description}")
        return 0
    if not args.data:
        return _fail("--data is required")
    try:
        recipe = apply_overrides(load_recipe(args.config), args.overrides)
        if args.epochs is not None:
            apply_overrides(recipe, [f"schedule.epochs={args.epochs}"])
        if args.fuse is not None:
            apply_overrides(recipe, [f"train.fuse={args.fuse}"])
    except ConfigError as exc:
        return _fail(str(exc))
    # Fused training (train/fused_trainer.py): K members per process, torch backend only.
    if recipe.train.fuse < 1:
        return _fail(f"train.fuse must be at least 1 (1 trains members one at a time), got {recipe.train.fuse}")
    if recipe.train.fuse > 1 and args.backend == "mindspore":
        return _fail("--fuse / train.fuse > 1 is not supported by --backend mindspore: train its members one at a "
                     "time (train.fuse=1)")
    if args.backend == "mindspore":
        from train.mindspore.cli import train_members

        return train_members(args, recipe)
    return _train(args, recipe)


def _train(args: argparse.Namespace, recipe) -> int:
    from pathlib import Path

    import torch

    from train.checkpoint import CheckpointError
    from train.config import ConfigError
    from train.data import read_card
    from train.distributed import init_distributed, shutdown
    from train.storage import DataError
    from train.trainer import MemberJob, train_member

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device_type = "cuda" if use_cuda else "cpu"
    try:
        card = read_card(args.data)
        shards = parse_shards(args.shard, int(card["split"]))
    except (DataError, ValueError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # the store cannot be reached or read: endpoint, network, credentials, permissions
        return _fail(f"cannot read {args.data}: {' '.join(str(exc).split())}")
    dist = init_distributed(device_type)
    device = torch.device(device_type, dist.local_rank) if device_type == "cuda" else torch.device("cpu")
    results = {}
    jobs = [MemberJob(args.data, shard, Path(args.out), args.resume, device, not args.no_progress) for shard in shards]
    try:
        if recipe.train.fuse > 1:  # K members at a time (train/fused_trainer.py)
            from train.fused_trainer import train_fused_groups

            results = train_fused_groups(jobs, recipe, dist)
        else:
            for job in jobs:
                results[job.shard] = train_member(job, recipe, dist)
    except (ConfigError, DataError, CheckpointError) as exc:
        return _fail(str(exc))
    finally:
        shutdown()
    if dist.is_main:
        for shard, final in results.items():
            print(f"sub-{shard:02d}: top1 {final['top1']:.2f}%  top5 {final['top5']:.2f}%  "
                  f"({final['val_samples']} val samples, {final['epochs']} epochs)")
    return 0
