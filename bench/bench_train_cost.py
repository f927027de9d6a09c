"""Per-image training cost and peak memory of a network at 56x56 (both stems) against 224x224.

    python bench/bench_train_cost.py --batch 64 --rounds 3 # CPU: resnet34, median step of 3 rounds
    python bench/bench_train_cost.py --device cuda --batch 256 --amp   # GPU: bf16 autocast, channels_last
    python bench/bench_train_cost.py --flops               # forward GFLOPs per image, every model x stem

Each configuration runs in its own process so peak memory is its own (a round runs the three one
after another; ratios are taken within a round, then the median over rounds is reported): on CUDA the allocator's
peak (max_memory_allocated), on the CPU the growth of peak RSS over the process's RSS before the
first step (activations, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = (("imagenet", 224), ("imagenet", 56), ("lowres", 56))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model_name: str, stem: str, size: int, batch: int, steps: int, device: str, amp: bool) -> dict:
    import torch
    from subspectral.train.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, 1000, stem=stem).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=amp)

    def step() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rss_before = _rss_mb()
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb() - rss_before
    seconds = statistics.median(times)
    return {"model": model_name, "stem": stem, "size": size, "batch": batch, "device": device,
            "ms_per_image": 1000 * seconds / batch, "images_per_s": batch / seconds, "peak_mb": peak}


def flops_table() -> list[dict]:
    import torch
    from subspectral.train.models import MODEL_BUILDERS, create_model
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for name in MODEL_BUILDERS:
        row = {"model": name}
        for stem, size in CONFIGS:
            if (name, stem, size) == ("alexnet", "imagenet", 56):
                row[f"{stem}@{size}"] = None  # its last max-pool has nothing left to pool at 56x56
                continue
            model = create_model(name, 1000, stem=stem).eval()
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(torch.zeros(1, size, size, 3, dtype=torch.uint8))
            row[f"{stem}@{size}"] = counter.get_total_flops() / 2 / 1e9  # multiply-adds, as papers count
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--flops", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("STEM", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flops:
        print("| model | imagenet stem @224 | imagenet stem @56 | lowres stem @56 |\n| --- | --- | --- | --- |")
        for row in flops_table():
            cells = ["n/a" if v is None else f"{v:.2f}" for v in list(row.values())[1:]]
            print(f"| {row['model']} | " + " | ".join(cells) + " |")
        return
    if args.one:
        print(json.dumps(measure(args.model, args.one[0], int(args.one[1]), args.batch, args.steps,
                                 args.device, args.amp)))
        return
    rounds = []
    for _ in range(args.rounds):
        results = []
        for stem, size in CONFIGS:
            command = [sys.executable, __file__, "--one", stem, str(size), "--model", args.model, "--batch",
                       str(args.batch), "--steps", str(args.steps), "--device", args.device]
            output = subprocess.run(command + (["--amp"] if args.amp else []), check=True, capture_output=True,
                                    text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
        for row in results:
            row["cost_ratio"] = row["ms_per_image"] / results[0]["ms_per_image"]
            row["memory_ratio"] = row["peak_mb"] / results[0]["peak_mb"]
        rounds.append(results)
    print(json.dumps(rounds, indent=1), file=sys.stderr)
    print(f"{args.model}, batch {args.batch}, {args.device}{' bf16' if args.amp else ''}, "
          f"median of {args.rounds} round(s)")
    print("| input | ms/image | images/s | peak MB | cost vs 224 | memory vs 224 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, (stem, size) in enumerate(CONFIGS):
        median = {key: statistics.median(r[i][key] for r in rounds)
                  for key in ("ms_per_image", "images_per_s", "peak_mb", "cost_ratio", "memory_ratio")}
        print(f"| {stem} stem @{size} | {median['ms_per_image']:.3f} | {median['images_per_s']:.0f} | "
              f"{median['peak_mb']:.0f} | {median['cost_ratio']:.3f} | {median['memory_ratio']:.3f} |")

if __name__ == "__main__":
    main()
