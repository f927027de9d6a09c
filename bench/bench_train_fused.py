"""Fused training: member-images/s of K members trained as one grouped network, against other ways of
training K members in one process and against one network on 224x224, on the same device in the same run.

    python bench/bench_train_fused.py                                        # CPU: resnet34 imagenet stem, K = 1, 4, 9
    python bench/bench_train_fused.py --stems imagenet,lowres --members 1,4,9,36 --device cuda --batch 256 --amp
    python bench/bench_train_fused.py --cli data/sample-sub36 --members 4   # cli.py train --fuse K vs one at a time

Forms (each the trainer's own step code: SGD 0.9 / wd 1e-4, one optimizer, GradScaler and schedule per member):
``sequential`` K members one after another (``train.engine.train_one_epoch``, what ``--shard 0-8`` does);
``grouped`` one network grouped K ways (``train.fused_trainer.train_fused_epoch``, what ``--fuse K`` does);
``vmap`` ``torch.func.stack_module_state`` + ``functional_call`` under ``vmap``, one optimizer over the
stacked weights (a lower bound on its optimizer cost); ``streams`` (CUDA only) the sequential form with
member k on CUDA stream k; ``grouped+graphs`` (CUDA only, ``--compile``) the grouped network under
``torch.compile(mode="reduce-overhead")``, i.e. CUDA graphs. The reference is one member at 224x224
(imagenet stem). Each measurement runs in its own process, so its peak memory is its own (CUDA:
``max_memory_allocated``; CPU: peak RSS growth over the process before the first step); a round measures
every configuration once, ratios are taken within a round and the table gives medians over rounds.

``--data DATA`` adds the input pipeline: ``FusedTrainStream`` (K aligned sub-datasets read in lockstep,
decoded by ``--workers`` CPU processes) in member-images/s, and on CUDA ``torchvision.io.decode_jpeg``
of the same JPEGs on the GPU, batched, in images/s; the loader keeps up when it delivers at least what
the grouped form consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = 1000
WARMUP = 2


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _members(args: argparse.Namespace, stem: str, count: int) -> list[SimpleNamespace]:
    """``count`` members as the trainer holds them: model, optimizer, schedule, scaler, no EMA."""
    import torch
    from subspectral.train.config import Recipe
    from subspectral.train.engine import build_optimizer, build_scheduler
    from subspectral.train.models import create_model

    members = []
    for k in range(count):
        torch.manual_seed(k)
        model = create_model(args.model, CLASSES, stem=stem).to(args.device)
        if args.device == "cuda":
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, Recipe())  # SGD 0.9, wd 1e-4: the shipped ImageNet recipes
        members.append(SimpleNamespace(model=model, optimizer=optimizer, ema=None,
                                       scheduler=build_scheduler(optimizer, Recipe(), 1000),
                                       scaler=torch.amp.GradScaler(args.device, enabled=False)))
    return members


def _batches(args: argparse.Namespace, size: int, channels: int, count: int) -> list[dict]:
    import torch

    images = torch.randint(0, 256, (args.batch, size, size, channels), dtype=torch.uint8, device=args.device)
    labels = torch.randint(0, CLASSES, (args.batch,), device=args.device)
    return [{"images": images, "labels": labels, "skipped": 0}] * count


def _context(args: argparse.Namespace):
    import torch
    from subspectral.train.config import TrainConfig
    from subspectral.train.engine import StepContext

    return StepContext(torch.device(args.device), torch.bfloat16 if args.amp else None, CLASSES, TrainConfig())


class _NoBar:
    def step(self, *_: object) -> None:
        return None


def _sequential(args: argparse.Namespace, stem: str, size: int, count: int):
    import numpy as np
    from subspectral.train.engine import train_one_epoch

    members, ctx = _members(args, stem, count), _context(args)

    def run(steps: int) -> None:
        batches = _batches(args, size, 3, steps)
        for member in members:
            train_one_epoch(member.model, batches, member.optimizer, member.scheduler, member.scaler, ctx,
                            np.random.default_rng(0), lambda: None, lambda *_: None)
    return run


def _streams(args: argparse.Namespace, stem: str, size: int, count: int):
    """Member k's steps on CUDA stream k, interleaved step by step, no host sync until the end."""
    import torch
    import torch.nn.functional as F

    members, ctx = _members(args, stem, count), _context(args)
    streams = [torch.cuda.Stream() for _ in members]

    def run(steps: int) -> None:
        batch = _batches(args, size, 3, 1)[0]
        for stream in streams:
            stream.wait_stream(torch.cuda.current_stream())  # the batch was made on the default stream
        for _ in range(steps):
            for member, stream in zip(members, streams, strict=True):
                with torch.cuda.stream(stream):
                    member.optimizer.zero_grad(set_to_none=True)
                    with ctx.autocast():
                        logits = member.model(batch["images"])
                    F.cross_entropy(logits.float(), batch["labels"]).backward()
                    member.optimizer.step()
        torch.cuda.synchronize()
    return run


def _grouped(args: argparse.Namespace, stem: str, size: int, count: int, graphs: bool):
    import numpy as np
    import torch
    from subspectral.train.fused import fuse_members
    from subspectral.train.fused_trainer import train_fused_epoch

    members, ctx = _members(args, stem, count), _context(args)
    layout = torch.channels_last if args.device == "cuda" else torch.contiguous_format
    net = fuse_members([m.model for m in members], share=True, memory_format=layout)
    trained = torch.compile(net, mode="reduce-overhead") if graphs else net

    def run(steps: int) -> None:
        train_fused_epoch(trained, members, _batches(args, size, 3 * count, steps), ctx, np.random.default_rng(0),
                          _NoBar())
    return run


def _vmap(args: argparse.Namespace, stem: str, size: int, count: int):
    import copy

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap

    members, ctx = _members(args, stem, count), _context(args)
    params, buffers = stack_module_state([m.model for m in members])
    optimizer = torch.optim.SGD(params.values(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    skeleton = copy.deepcopy(members[0].model).to("meta")

    def one(weights: dict, state: dict, images: torch.Tensor) -> torch.Tensor:
        return functional_call(skeleton, (weights, state), (images,))

    def run(steps: int) -> None:
        batch = _batches(args, size, 3, 1)[0]
        images = batch["images"].expand(count, *batch["images"].shape)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with ctx.autocast():
                logits = vmap(one)(params, buffers, images)  # [K, B, classes]
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].repeat(count), reduction="none")
            loss.view(count, -1).mean(dim=1).sum().backward()
            optimizer.step()
        float(loss.sum())  # wait for the device
    return run


def measure(args: argparse.Namespace, form: str, stem: str, size: int, count: int) -> dict:
    """Member-images/s of one configuration (after ``WARMUP`` steps), and its peak memory."""
    import torch

    torch.backends.cudnn.benchmark = True
    rss_before = _rss_mb()
    if form in ("sequential", "reference"):
        run = _sequential(args, stem, size, count)
    elif form == "streams":
        run = _streams(args, stem, size, count)
    elif form in ("grouped", "grouped+graphs"):
        run = _grouped(args, stem, size, count, graphs=form == "grouped+graphs")
    else:
        run = _vmap(args, stem, size, count)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(WARMUP)
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(args.steps)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else _rss_mb() - rss_before
    return {"form": form, "stem": stem, "size": size, "members": count, "batch": args.batch, "device": args.device,
            "member_images_per_s": count * args.batch * args.steps / seconds, "peak_mb": peak}


def _configurations(args: argparse.Namespace) -> list[tuple[str, str, int, int]]:
    forms = args.forms.split(",")
    configs = [("reference", "imagenet", 224, 1)]
    for stem in args.stems.split(","):
        for count in (int(k) for k in args.members.split(",")):
            configs += [(form, stem, 56, count) for form in forms if count > 1 or form == "sequential"]
    return configs


def _one_process(args: argparse.Namespace, config: tuple[str, str, int, int]) -> dict:
    form, stem, size, count = config
    command = [sys.executable, __file__, "--one", form, stem, str(size), str(count), "--model", args.model,
               "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
               *(["--amp"] if args.amp else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:  # e.g. out of memory at a large K: report it, go on
        reason = (result.stderr.strip().splitlines() or ["?"])[-1][:120]
        return {"form": form, "stem": stem, "size": size, "members": count, "failed": reason}
    return json.loads(result.stdout.strip().splitlines()[-1])


def compute_table(args: argparse.Namespace) -> None:
    configs = _configurations(args)
    rounds = []
    for _ in range(args.rounds):
        rows = {config: _one_process(args, config) for config in configs}
        reference = rows[configs[0]]
        for (_, stem, _, count), row in rows.items():
            sequential = rows.get(("sequential", stem, 56, count), {})
            if "failed" in row or "failed" in reference:
                continue
            # Seconds per member-image at 56 over seconds per image at 224 (the FLOP ratio is 1/13.6 for
            # resnet34's imagenet stem).
            row["cost_vs_224"] = reference["member_images_per_s"] / row["member_images_per_s"]
            if "member_images_per_s" in sequential and row is not reference:
                row["vs_sequential"] = row["member_images_per_s"] / sequential["member_images_per_s"]
        rounds.append(rows)
    print(json.dumps([list(r.values()) for r in rounds], indent=1), file=sys.stderr)
    print(f"\n{args.model}, batch {args.batch} per member, {args.device}"
          f"{', bf16 autocast, channels_last' if args.device == 'cuda' and args.amp else ''}, "
          f"{args.steps} timed steps, median of {args.rounds} round(s)")
    print("| form | stem @ size | K | member-images/s | cost per member-image vs 224 | vs sequential | peak MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for config in configs:
        values = [r[config] for r in rounds]
        if any("failed" in v for v in values):
            print(f"| {config[0]} | {config[1]} @{config[2]} | {config[3]} | failed: {values[0].get('failed', '')} "
                  "| | | |")
            continue
        cells = [_median(values, key, fmt) for key, fmt in (("member_images_per_s", "rate"), ("cost_vs_224", ".3f"),
                                                           ("vs_sequential", ".2f"), ("peak_mb", ",.0f"))]
        print(f"| {config[0]} | {config[1]} @{config[2]} | {config[3]} | " + " | ".join(cells) + " |")
    _goals(configs, rounds, args.device)


GOAL_COST = 1 / 12  # per member-image against one 224x224 image (the FLOP ratio is 1/16 at 56x56)
GOAL_RATE = 50_000  # member-images/s, imagenet stem, one H100/H200
GOAL_SPEEDUP = 5.0  # 36 members in one process against one after another


def _fused(configs: list[tuple[str, str, int, int]], rounds: list[dict], key: str,
           count: int | None = None) -> list[tuple[float, str]]:
    """(median of ``key``, form) of every fused form, imagenet stem (at ``count`` members, or any)."""
    found = []
    for config in configs:
        values = [r[config] for r in rounds]
        if (config[0] not in ("reference", "sequential") and config[1] == "imagenet"
                and count in (None, config[3]) and all(key in v for v in values)):
            found.append((statistics.median(v[key] for v in values), f"{config[0]}, K={config[3]}"))
    return found


def _goals(configs: list[tuple[str, str, int, int]], rounds: list[dict], device: str) -> None:
    """The issue's goals, each from the best fused form of this run (medians over rounds)."""
    cost = _fused(configs, rounds, "cost_vs_224")
    goals = [("cost per member-image <= 1/12 of one 224x224 image", min(cost) if cost else None,
              lambda v: v <= GOAL_COST, ".3f"),
             (f">= {GOAL_RATE:,} member-images/s (one H100/H200)",
              max(_fused(configs, rounds, "member_images_per_s"), default=None), lambda v: v >= GOAL_RATE, ",.0f"),
             (f"36 members >= {GOAL_SPEEDUP:g} x one after another",
              max(_fused(configs, rounds, "vs_sequential", 36), default=None), lambda v: v >= GOAL_SPEEDUP, ".2f")]
    print("\ngoals (the best fused form of this run; imagenet stem at 56x56):")
    for goal, found, met, fmt in goals:
        if found is None:
            print(f"- {goal}: not measured in this run")
            continue
        where = "" if device == "cuda" else " (not a GPU: the goals are for one)"
        print(f"- {goal}: {'met' if met(found[0]) else 'NOT met'}, {format(found[0], fmt)} ({found[1]}){where}")


def _median(rows: list[dict], key: str, fmt: str) -> str:
    present = [row[key] for row in rows if key in row]
    if not present:
        return ""
    value = statistics.median(present)
    return _rate(value) if fmt == "rate" else format(value, fmt)


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def loader_table(args: argparse.Namespace) -> None:
    """Member-images/s the fused input pipeline delivers, and GPU JPEG decode of the same samples."""
    from bench_train_throughput import make_view
    from subspectral.train.prepared import read_card

    counts = [k for k in (int(k) for k in args.members.split(",")) if k <= read_card(args.data).split]
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / "view"  # each member's train shards listed --repeat times
        for k in range(max(counts)):
            make_view(Path(args.data), k, args.repeat, view)
        print(f"\ninput pipeline, {args.data} (train shards x{args.repeat}): {args.workers} loader workers, "
              f"batch {args.batch}, {args.device}")
        print("| members K | fused loader member-images/s | GPU decode_jpeg images/s |")
        print("| --- | --- | --- |")
        for count in counts:
            print(_loader_row(args, str(view), count))


def _loader_row(args: argparse.Namespace, data: str, count: int) -> str:
    import torch
    from subspectral.train.config import DataConfig
    from subspectral.train.data import make_loader
    from subspectral.train.fused_data import FusedTrainStream
    from subspectral.train.prepared import read_card, shard_uris
    from subspectral.train.shards import iter_samples, to_sample
    from subspectral.train.storage import read_bytes

    card = read_card(data)
    uris = [shard_uris(data, card, k, "train") for k in range(count)]
    batches = card.splits["train"].samples // args.batch
    stream = FusedTrainStream(uris, card, DataConfig(), batch_size=args.batch, batches_per_epoch=batches, rank=0,
                              world=1, seed=0)
    start = time.perf_counter()
    images = sum(len(b["labels"]) for b in make_loader(stream, args.workers, args.device == "cuda"))
    rate = images * count / (time.perf_counter() - start)
    gpu = ""
    if args.device == "cuda":
        from torchvision.io import decode_jpeg

        jpegs = [torch.frombuffer(bytearray(to_sample(key, parts).data), dtype=torch.uint8)
                 for uri in uris[0] for key, parts in iter_samples(read_bytes(uri))]
        decode_jpeg(jpegs[: args.batch], device="cuda")  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, len(jpegs), args.batch):
            decode_jpeg(jpegs[first:first + args.batch], device="cuda")
        torch.cuda.synchronize()
        gpu = _rate(len(jpegs) / (time.perf_counter() - start))
    return f"| {count} | {_rate(rate)} | {gpu} |"


def cli_table(args: argparse.Namespace) -> None:
    """``cli.py train`` on the first K members of ``--cli DATA``: --fuse K against one at a time; then
    ``cli.py ensemble-eval`` of those members with --fuse K against --fuse 1."""
    count = max(int(k) for k in args.members.split(","))
    shards = f"0-{count - 1}"
    rates: dict[str, list[float]] = {"one at a time": [], f"--fuse {count}": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name in list(rates) if round_index % 2 == 0 else list(reversed(rates)):
                out = Path(tmp) / f"r{round_index}-{name.replace(' ', '_')}"
                fuse = ["--fuse", str(count)] if name.startswith("--fuse") else []
                wall = _cli(args, "train", "--data", args.cli, "--shard", shards, "--config", args.config, "--epochs",
                            str(args.epochs), "--out", str(out), "--no-progress", "--device", args.device, *fuse,
                            *args.overrides)
                lines = [json.loads(line) for run in sorted(out.glob("sub-*"))
                         for line in (run / "metrics.jsonl").read_text().splitlines()]
                # Training epochs after the first (start-up), every member: member-images over seconds spent.
                later = [line for line in lines if line["epoch"] > 1]
                seconds = sum(line["seconds"] for line in later) / (count if "fused" in later[0] else 1)
                rates[name].append(sum(line["train_images"] for line in later) / seconds)
                print(f"round {round_index + 1} {name}: {rates[name][-1]:.1f} member-images/s (wall {wall:.0f} s)",
                      file=sys.stderr)
        evaluations: dict[str, list[float]] = {"--fuse 1": [], f"--fuse {count}": []}
        for round_index in range(args.rounds):
            for name in list(evaluations) if round_index % 2 == 0 else list(reversed(evaluations)):
                report = Path(tmp) / f"report-{round_index}-{name.split()[-1]}"
                _cli(args, "ensemble-eval", "--data", args.cli, "--runs", str(out), "--out", str(report), "--device",
                     args.device, "--fuse", name.split()[-1])
                evaluations[name].append(json.loads((report / "report.json").read_text())["seconds"])
    print(f"\ncli.py train --config {args.config} --epochs {args.epochs} --shard {shards} on {args.cli}, "
          f"{args.device}; training epochs 2+ (validation not counted); median of {args.rounds} round(s)")
    print("| how | member-images/s | vs one at a time |")
    print("| --- | --- | --- |")
    _ratio_rows(rates, "one at a time", higher_is_better=True)
    print(f"\ncli.py ensemble-eval of those {count} members (its own 'seconds': loading + evaluation)")
    print("| how | seconds | speed vs --fuse 1 |")
    print("| --- | --- | --- |")
    _ratio_rows(evaluations, "--fuse 1", higher_is_better=False)


def _cli(args: argparse.Namespace, *command: str) -> float:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "cli.py"), *command], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": path})
    return time.perf_counter() - started


def _ratio_rows(values: dict[str, list[float]], base: str, higher_is_better: bool) -> None:
    """One table row per entry: its median, and the median of its per-round ratios against ``base``."""
    for name, measured in values.items():
        pairs = zip(measured, values[base], strict=True)
        ratios = [(v / b) if higher_is_better else (b / v) for v, b in pairs]
        print(f"| {name} | {_rate(statistics.median(measured))} | {statistics.median(ratios):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--stems", default="imagenet", help="comma-separated: imagenet,lowres")
    parser.add_argument("--members", default="1,4,9", help="comma-separated K values (1,4,9,36)")
    parser.add_argument("--forms", default="sequential,grouped,vmap",
                        help="sequential,grouped,vmap; on CUDA also streams,grouped+graphs")
    parser.add_argument("--batch", type=int, default=16, help="images per member per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA: with channels_last)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--data", help="a prepared dataset: also measure the fused input pipeline")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers for --data")
    parser.add_argument("--repeat", type=int, default=10, help="--data: train shards listed this many times")
    parser.add_argument("--cli", metavar="DATA", help="compare cli.py train --fuse K with one at a time on DATA")
    parser.add_argument("--config", default="sample", help="--cli: the recipe")
    parser.add_argument("--epochs", type=int, default=3, help="--cli: epochs (the first is not counted)")
    parser.add_argument("--one", nargs=4, metavar=("FORM", "STEM", "SIZE", "K"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="--cli: recipe overrides, e.g. data.batch_size=64")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the measurement processes
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        form, stem, size, count = args.one
        print(json.dumps(measure(args, form, stem, int(size), int(count))))
    elif args.cli:
        cli_table(args)
    else:
        compute_table(args)
        if args.data:
            loader_table(args)


if __name__ == "__main__":
    main()
