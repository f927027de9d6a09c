"""Benchmark of `cli.py ensemble-eval` against issue 4's speed goal, in one process run.

Goal: evaluating N members together costs at most 1.25 × the sum of evaluating each member alone on
its own sub-dataset (lockstep reading, loading and aggregation overhead ≤ 25 %).

* ``alone``: member k evaluated the way the trainer evaluates it for final.json: load final.pt
  (``train.checkpoint.load_trained_model``), stream sub-dataset k's val shards (``train.stream.EvalStream``,
  no DataLoader workers), forward, top-1/top-5 (``train.engine.evaluate``). Summed over the members.
* ``together``: the whole ``ensemble-eval`` command in-process (``train.ensemble_cli.run``): member
  loading, lockstep reading with key checks, the four fusion methods and the accuracy-vs-members
  curve, predictions.parquet, report.json/md and the plot.

The two are interleaved round by round (same process, same data, same members); medians reported.
Data: the embedded sample generator (10 classes, ``--per-class`` images each, 2,500 val images by
default, so fixed costs such as the plot do not dominate), prepared here (``cli.py prepare``, serial
executor, jpg, shards of 256). Members: the sample recipe's network (resnet18, imagenet stem, by
default) with deterministic random weights in the trainer's exact run layout (speed does not
depend on the weights' values).

    .venv/bin/python bench/bench_ensemble.py                          # split 4, 4 members, CPU
    .venv/bin/python bench/bench_ensemble.py --split 36 --members 36
    .venv/bin/python bench/bench_ensemble.py --device cuda --stem lowres
    .venv/bin/python bench/bench_ensemble.py --threads 2                # CPU, 2 threads on a larger machine
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ensemble_fixtures import make_torch_run  # noqa: E402
from subspectral.pipeline.sample import sample_corpus  # noqa: E402
from subspectral.schemas import DatasetCard  # noqa: E402
from subspectral.train.checkpoint import load_trained_model  # noqa: E402
from subspectral.train.config import TrainConfig  # noqa: E402
from subspectral.train.data import make_loader  # noqa: E402
from subspectral.train.engine import StepContext, evaluate  # noqa: E402
from subspectral.train.ensemble import cli as ensemble_cli  # noqa: E402
from subspectral.train.prepared import read_card, shard_uris  # noqa: E402
from subspectral.train.stream import EvalStream  # noqa: E402


def prepare(out: Path, split: int, per_class: int, val_per_class: int) -> None:
    """The embedded sample generator with ``per_class`` images per class, prepared at ``split``."""
    corpus = sample_corpus(out.parent / "corpus", classes=10, per_class=per_class)
    command = [sys.executable, str(ROOT / "cli.py"), "prepare", "--src", str(corpus), "--out", str(out),
               "--split", str(split), "--val-per-class", str(val_per_class), "--shard-size", "256",
               "--executor", "serial"]
    subprocess.run(command, check=True, capture_output=True)


def time_alone(data: str, card: DatasetCard, run_dir: Path, shard: int, device: torch.device, batch: int) -> float:
    start = time.perf_counter()
    model, _ = load_trained_model(run_dir)
    model = model.to(device)
    stream = EvalStream(shard_uris(data, card, shard, "val"), card, batch_size=batch, rank=0, world=1)
    context = StepContext(device, None, card.num_classes, TrainConfig())
    evaluate(model, make_loader(stream, workers=0, pin_memory=False), context)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_together(data: str, runs: Path, out: Path, device: torch.device, batch: int) -> float:
    parser = argparse.ArgumentParser()
    ensemble_cli.add_arguments(parser)
    args = parser.parse_args(["--data", data, "--runs", str(runs), "--out", str(out), "--device", str(device),
                              "--batch-size", str(batch)])
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the report table, printed by the command
        status = ensemble_cli.run(args)
    if status != 0:
        raise SystemExit("ensemble-eval failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=int, default=4)
    parser.add_argument("--members", type=int, default=None, help="members to ensemble (default: all N)")
    parser.add_argument("--per-class", type=int, default=300, help="sample images per class (10 classes)")
    parser.add_argument("--val-per-class", type=int, default=250, help="of those, val images per class")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--stem", default="imagenet", choices=("imagenet", "lowres"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    members = args.members or args.split

    with tempfile.TemporaryDirectory(prefix="bench_ensemble_") as tmp:
        data, runs = Path(tmp) / "data", Path(tmp) / "runs"
        prepare(data, args.split, args.per_class, args.val_per_class)
        card = read_card(str(data))
        run_dirs = [make_torch_run(runs, card.to_json(), k, 50.0, str(data), name=args.model, stem=args.stem)
                    for k in range(members)]
        # Warm-up (imports, allocator, cuDNN autotuning), then interleaved measured rounds.
        time_alone(str(data), card, run_dirs[0], 0, device, args.batch_size)
        time_together(str(data), runs, Path(tmp) / "report", device, args.batch_size)
        alone, together = [], []
        for _ in range(args.repeats):
            alone.append(sum(time_alone(str(data), card, d, k, device, args.batch_size)
                             for k, d in enumerate(run_dirs)))
            together.append(time_together(str(data), runs, Path(tmp) / "report", device, args.batch_size))
        ratios = [t / a for t, a in zip(together, alone, strict=True)]
        result = {
            "split": args.split, "members": members, "val_images": card.splits["val"].samples,
            "model": f"{args.model}/{args.stem}", "device": str(device), "batch_size": args.batch_size,
            "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
            "alone_sum_s_median": round(statistics.median(alone), 3),
            "together_s_median": round(statistics.median(together), 3),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                       + (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"),
        }
    print(json.dumps(result, indent=2), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
