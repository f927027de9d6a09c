"""Training speed of the MindSpore backend against the torch backend: same member, same recipe, same run.

Both trainers run as ``cli.py train`` subprocesses on the same prepared data, member and recipe,
interleaved round by round (torch, MindSpore GRAPH, MindSpore PYNATIVE, then again), so load from
other processes hits all of them alike. The figure is the trainer's own ``images_per_s`` from
metrics.jsonl (training steps only: data loading included, validation excluded), for the epochs
after the first (which holds MindSpore's graph compilation), divided by the cores the process may
use. A second part times one 3x3 convolution in MindSpore with oneDNN at its default ISA and capped
at AVX2 (``ONEDNN_MAX_CPU_ISA``), which is where the time went before train/mindspore/runtime.py
set that cap (see BENCHMARKS.md, "MindSpore").

    .venv-ms/bin/python bench/bench_mindspore.py                       # sample recipe, 3 epochs, 2 rounds
    .venv-ms/bin/python bench/bench_mindspore.py --epochs 2 --rounds 1 --json out/bench_ms.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BACKENDS = {
    "torch": ("--backend", "torch", "--device", "cpu"),
    "mindspore-graph": ("--backend", "mindspore", "--mode", "graph"),
    "mindspore-pynative": ("--backend", "mindspore", "--mode", "pynative"),
}

_CONV_PROBE = """
import time, numpy as np, mindspore as ms
from mindspore import Tensor, nn
ms.set_context(mode=ms.GRAPH_MODE); ms.set_device("CPU")
x = Tensor(np.random.randn(8, 64, 14, 14).astype(np.float32))
conv = nn.Conv2d(64, 64, 3, pad_mode="pad", padding=1, has_bias=False)
conv(x).asnumpy()
start = time.perf_counter(); conv(x).asnumpy(); conv(x).asnumpy(); conv(x).asnumpy()
print((time.perf_counter() - start) / 3)
"""


_STEP_PROBE = """
import sys, time, numpy as np
from subspectral.train.mindspore.runtime import prepare_environment
prepare_environment("CPU")
import mindspore as ms
from mindspore import Tensor, nn
ms.set_context(mode=ms.GRAPH_MODE); ms.set_device("CPU")
from subspectral.train.mindspore.models import create_model
from subspectral.train.mindspore.step import SoftTargetLoss, TrainStep
net = create_model("resnet18", 10, stem="imagenet")
step = TrainStep(SoftTargetLoss(net, 10, 0.0), nn.Momentum(net.trainable_params(), 0.01, 0.9), False, 0.0)
step.set_train()
images = Tensor(np.random.default_rng(0).integers(0, 256, (32, 56, 56, 3), dtype=np.uint8))
targets = Tensor(np.eye(10, dtype=np.float32)[np.arange(32) % 10])
step(images, targets).asnumpy()
print("STEPS_START", flush=True)
start = time.perf_counter()
for _ in range(5):
    step(images, targets).asnumpy()
print("STEP_SECONDS", (time.perf_counter() - start) / 5, flush=True)
"""


def profile_step() -> dict[str, float]:
    """ms per training step (resnet18 imagenet stem, batch 32, 56x56) and oneDNN's share, by primitive."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "GLOG_v": "3", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _STEP_PROBE], capture_output=True, text=True, env=env,
                            check=True, cwd=ROOT)
    lines = result.stdout.splitlines()
    start = lines.index("STEPS_START")
    step_ms = 1000 * float(next(line.split()[1] for line in lines if line.startswith("STEP_SECONDS")))
    by_kind: dict[str, float] = {}
    for line in lines[start:]:
        fields = line.split(",")
        if line.startswith("onednn_verbose") and len(fields) > 8 and fields[2] == "primitive" and fields[3] == "exec":
            kind = f"{fields[5]} {fields[7]}"  # primitive and propagation kind
            by_kind[kind] = by_kind.get(kind, 0.0) + float(fields[-1]) / 5
    return {"step_ms": step_ms, **{k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


def prepare(out: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "prepare", "--out", str(out), "--split", "4",
                    "--val-per-class", "10", "--shard-size", "100", "--executor", "serial"],
                   check=True, capture_output=True, cwd=ROOT)


def train_rate(data: Path, runs: Path, backend: str, recipe: str, epochs: int, overrides: list[str]) -> list[float]:
    command = [sys.executable, str(ROOT / "cli.py"), "train", *BACKENDS[backend], "--data", str(data), "--shard", "0",
               "--config", recipe, "--out", str(runs), "--no-progress", f"schedule.epochs={epochs}", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{backend} failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(line) for line in (runs / "sub-00" / "metrics.jsonl").read_text().splitlines()]
    return [line["images_per_s"] for line in lines[1:]]


def conv_seconds(isa: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    env["GLOG_v"] = "3"
    result = subprocess.run([sys.executable, "-c", _CONV_PROBE], capture_output=True, text=True, env=env, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="sample")
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is not counted")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every backend, e.g. data.workers=0")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    rates: dict[str, list[float]] = {name: [] for name in BACKENDS}
    with tempfile.TemporaryDirectory(prefix="bench-ms-") as tmp:
        data = Path(tmp) / "data"
        prepare(data)
        for round_index in range(args.rounds):
            for backend in BACKENDS:
                runs = Path(tmp) / f"runs-{backend}-{round_index}"
                rates[backend] += train_rate(data, runs, backend, args.recipe, args.epochs, args.overrides)
                print(f"round {round_index + 1} {backend}: {rates[backend][-1]:.1f} images/s", flush=True)
    conv = {"default ISA": conv_seconds(None), "ONEDNN_MAX_CPU_ISA=AVX2": conv_seconds("AVX2")}
    profile = profile_step()
    result = {"machine": platform.processor() or platform.machine(), "cores": cores, "recipe": args.recipe,
              "overrides": args.overrides, "epochs_counted": args.epochs - 1, "rounds": args.rounds,
              "images_per_s": {k: statistics.median(v) for k, v in rates.items()},
              "images_per_s_per_core": {k: statistics.median(v) / cores for k, v in rates.items()},
              "all_rates": rates, "conv3x3_8x64x14x14_ms": {k: 1000 * v for k, v in conv.items()},
              "mindspore_graph_step_ms_by_onednn_primitive": profile}
    torch_rate = result["images_per_s"]["torch"]
    result["ratio_to_torch"] = {k: v / torch_rate for k, v in result["images_per_s"].items()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
