#!/usr/bin/env python3
"""The method on Fashion-MNIST, in one command: full-resolution baseline, sub4 and sub16 ensembles.

    .venv/bin/python examples/fashion_mnist/run.py --setting quick --out /tmp/fashion-mnist-quick
    .venv/bin/python examples/fashion_mnist/run.py --setting full --out /tmp/fashion-mnist-full

Reads the idx files of Debian's ``dataset-fashion-mnist`` (28x28 grayscale, 10 classes), writes them
as an ImageFolder tree (train/ = the official training set, val/ = the official test set; the quick
setting takes the first images of each class of both), then runs the project's own commands:

    cli.py prepare   --split 1 --size 28 (baseline), --split 4 --size 14 (sub4), --split 16 --size 7 (sub16)
                     and, with the dct variant, sub4 and sub16 with --transform dct
    cli.py train     --shard all --config small, for every dataset
    cli.py ensemble-eval --baseline RUNS/full/sub-00 for every split dataset (--ten-crop for the plain ones)

and writes OUT/summary.md and OUT/summary.json: every report's accuracy and cost, and the wall time of
every step. Rerunning the same command resumes: finished datasets and members are kept.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Folder names sort in the official label order, so class index k is Fashion-MNIST's label k.
CLASSES = ["0-tshirt-top", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal", "6-shirt", "7-sneaker",
           "8-bag", "9-ankle-boot"]
SIDE = 28

# Settings: images per class (None = all) and epochs. The quick one fits in an hour on 2 CPU cores.
SETTINGS = {
    "quick": {"train_per_class": 500, "val_per_class": 100, "epochs": 4},
    "full": {"train_per_class": None, "val_per_class": None, "epochs": 1},
}


@dataclass(frozen=True)
class Dataset:
    name: str  # folder under OUT/data and OUT/runs
    split: int  # number of sub-datasets
    transform: str  # none | dct

    @property
    def size(self) -> int:
        return SIDE // round(self.split ** 0.5)

    @property
    def prepare_options(self) -> list[str]:
        # PNG (lossless) for the pixels: JPEG would blur 7x7 sub-images; DCT bands are stored as npy.
        image_format = "npy" if self.transform == "dct" else "png"
        return ["--split", str(self.split), "--size", str(self.size), "--transform", self.transform,
                "--format", image_format]


BASELINE = Dataset("full", 1, "none")
VARIANTS = {
    "plain": [Dataset("sub4", 4, "none"), Dataset("sub16", 16, "none")],
    "dct": [Dataset("sub4-dct", 4, "dct"), Dataset("sub16-dct", 16, "dct")],
}


class IdxError(ValueError):
    """An idx file that is missing or not what its name says."""


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip-compressed or not) as a uint8 array: N x rows x cols images, or N labels."""
    if not path.is_file():
        raise IdxError(f"{path} not found (Debian: apt-get install dataset-fashion-mnist, or pass --idx-dir)")
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise IdxError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()})")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise IdxError(f"{path} holds {body.size} values where its header announces {'x'.join(map(str, shape))}")
    return body.reshape(shape)


def first_per_class(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` images of every class, in file order (all when None)."""
    if per_class is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:per_class]] = True
    return np.flatnonzero(keep)


def write_image_folder(root: Path, idx_dir: Path, per_class: dict[str, int | None]) -> dict[str, int]:
    """root/{train,val}/<class>/<split>_<index>.png from the idx files; kept when already complete."""
    from PIL import Image

    marker = root.with_name(root.name + ".json")  # beside the tree: prepare would list it as a stray file
    wanted = {"idx_dir": str(idx_dir), "per_class": per_class}
    if marker.is_file() and json.loads(marker.read_text())["options"] == wanted:
        return json.loads(marker.read_text())["images"]
    counts = {}
    for split, (images_file, labels_file) in IDX_FILES.items():
        images, labels = read_idx(idx_dir / images_file), read_idx(idx_dir / labels_file)
        if images.shape[1:] != (SIDE, SIDE) or len(images) != len(labels) or labels.max() >= len(CLASSES):
            raise IdxError(f"{idx_dir}: {images_file} / {labels_file} are not Fashion-MNIST "
                           f"(images {images.shape}, {len(labels)} labels)")
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        chosen = first_per_class(labels, per_class[split])
        prefix = "test" if split == "val" else "train"  # the official file each image comes from
        for index in chosen.tolist():
            path = root / split / CLASSES[labels[index]] / f"{prefix}_{index:05d}.png"
            Image.fromarray(images[index], "L").save(path)
        counts[split] = len(chosen)
    marker.write_text(json.dumps({"options": wanted, "images": counts}, indent=2) + "\n")
    return counts


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Steps:
    """Runs the project's commands in turn, each timed; a failing command stops the example."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.records: list[dict] = []

    def run(self, name: str, *arguments: str) -> None:
        command = [sys.executable, str(REPO / "cli.py"), *arguments]
        print(f"[fashion-mnist] {name}: cli.py {' '.join(arguments)}", file=sys.stderr, flush=True)
        started, cpu_before = time.perf_counter(), _children_cpu_seconds()
        result = subprocess.run(command, cwd=REPO, check=False)
        # CPU seconds beside wall seconds: on a shared machine the wall time says more about the others' load.
        record = {"step": name, "command": ["cli.py", *arguments], "seconds": round(time.perf_counter() - started, 1),
                  "cpu_seconds": round(_children_cpu_seconds() - cpu_before, 1), "returncode": result.returncode}
        self.records.append(record)
        with open(self.log, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if result.returncode:
            raise SystemExit(f"fashion-mnist: step {name} failed with exit status {result.returncode}")


def run_example(args: argparse.Namespace) -> dict:
    setting = {**SETTINGS[args.setting]}
    for key in setting:
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    steps = Steps(out / "steps.jsonl")
    counts = write_image_folder(out / "images", args.idx_dir,
                                {"train": setting["train_per_class"], "val": setting["val_per_class"]})
    steps.records.append({"step": "imagefolder", "seconds": round(time.perf_counter() - started, 1),
                          "cpu_seconds": round(time.process_time() - cpu_started, 1), **counts})
    datasets = [BASELINE] + [d for variant in args.variants for d in VARIANTS[variant]]
    epochs = str(setting["epochs"])
    for dataset in datasets:
        data, runs = out / "data" / dataset.name, out / "runs" / dataset.name
        # --executor serial: 70,000 images of 28x28 take about a minute in one process; starting Ray on a
        # busy 2-core machine takes longer than that and can time out.
        steps.run(f"prepare {dataset.name}", "prepare", "--src", str(out / "images"), "--out", str(data),
                  "--layout", "imagefolder", "--executor", "serial", *dataset.prepare_options, *args.prepare_option)
        steps.run(f"train {dataset.name}", "train", "--data", str(data), "--shard", "all", "--config", "small",
                  "--out", str(runs), "--epochs", epochs, "--device", args.device, "--resume", "--no-progress",
                  *args.override)
        if dataset is BASELINE:
            continue
        # The same baseline in every report: tested with 10 crops once (11 forward passes of the 28 px network
        # per image cost more than evaluating all 16 sub16 members), with one crop everywhere.
        ten_crop = ["--ten-crop"] if dataset is datasets[1] else []
        device = [] if args.device == "auto" else ["--device", args.device]
        steps.run(f"ensemble-eval {dataset.name}", "ensemble-eval", "--data", str(data), "--runs", str(runs),
                  "--baseline", str(out / "runs" / BASELINE.name / "sub-00"), *ten_crop,
                  "--out", str(out / "reports" / dataset.name), *device)
    summary = summarise(out, [d for d in datasets if d is not BASELINE], setting, steps.records,
                        time.perf_counter() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(render_summary(summary))
    print(render_summary(summary))
    return summary


def summarise(out: Path, datasets: list[Dataset], setting: dict, steps: list[dict], seconds: float) -> dict:
    """The reports' numbers side by side, with the time of every step."""
    reports = {d.name: json.loads((out / "reports" / d.name / "report.json").read_text()) for d in datasets}
    return {"setting": setting, "seconds": round(seconds, 1), "steps": steps,
            "reports": {name: {key: report[key] for key in ("samples", "members", "mean_member", "methods",
                                                            "baseline", "cost")}
                        for name, report in reports.items()}}


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def render_summary(summary: dict) -> str:
    reports = summary["reports"]
    setting = summary["setting"]
    first = next(iter(reports.values()))
    base = first["baseline"]  # the first report tests it with 10 crops too
    lines = [
        "# Fashion-MNIST: baseline against sub-dataset ensembles",
        "",
        f"Setting: {setting['train_per_class'] or 'all'} training images per class, "
        f"{setting['val_per_class'] or 'all'} val (official test) images per class ({first['samples']} in all), "
        f"{setting['epochs']} epochs, recipe `small`. Top-1 % on the val set.",
        "",
        "| model | members | mean member | worst–best member | mean-logits | mean-probs | geo | vote |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| baseline 28 px, 1 crop | 1 | {_percent(base['one_crop']['top1'])} | | | | | |",
    ]
    if base["ten_crop"]:
        lines.append(f"| baseline 28 px, 10-crop | 1 | {_percent(base['top1'])} | | | | | |")
    for name, report in reports.items():
        members = [m["top1"] for m in report["members"]]
        fused = " | ".join(_percent(report["methods"].get(m, {}).get("top1"))
                           for m in ("mean-logits", "mean-probs", "geo", "vote"))
        lines.append(f"| {name} | {len(members)} | {_percent(report['mean_member']['top1'])} "
                     f"| {_percent(min(members))}–{_percent(max(members))} | {fused} |")
    lines += ["", "| model | parameters | size MB | training time | peak memory |", "| --- | --- | --- | --- | --- |"]
    cost = first["cost"]["baseline"]
    lines.append(f"| baseline | {cost['parameters']:,} | {cost['size_mb']:.2f} | {_duration(cost['train_seconds'])} "
                 f"| {cost['peak_rss_bytes'] / 2**20:.0f} MiB |")
    for name, report in reports.items():
        ensemble = report["cost"]["ensemble"]
        count = len(report["members"])
        lines.append(f"| {name} | {ensemble['parameters'] // count:,} × {count} | "
                     f"{ensemble['size_mb'] / count:.2f} × {count} | {_duration(ensemble['train_seconds'])} serial, "
                     f"{_duration(ensemble['train_seconds_max'])} in parallel "
                     f"| {ensemble['peak_rss_bytes'] / 2**20:.0f} MiB (largest member) |")
    lines += ["", "| step | wall seconds | CPU seconds |", "| --- | --- | --- |"]
    lines += [f"| {step['step']} | {step['seconds']:.0f} | {step.get('cpu_seconds', 0):.0f} |"
              for step in summary["steps"]]
    cpu = sum(step.get("cpu_seconds", 0) for step in summary["steps"])
    lines.append(f"| **end to end** | **{summary['seconds']:.0f}** | **{cpu:.0f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="quick",
                        help="quick: 500 train / 100 val images per class, 4 epochs; full: all 60,000 / 10,000, "
                             "1 epoch (default: quick)")
    parser.add_argument("--out", type=Path, required=True, help="working folder: images, data, runs, reports")
    parser.add_argument("--idx-dir", type=Path, default=IDX_DIR, help=f"the idx .gz files (default: {IDX_DIR})")
    parser.add_argument("--variants", default="plain,dct",
                        help="comma-separated: plain (sub4, sub16), dct (sub4 and sub16 with --transform dct) "
                             "(default: plain,dct)")
    parser.add_argument("--train-per-class", type=int, help="override the setting's training images per class")
    parser.add_argument("--val-per-class", type=int, help="override the setting's val images per class")
    parser.add_argument("--epochs", type=int, help="override the setting's epochs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="training and evaluation device (default: auto, cuda when there is one)")
    parser.add_argument("--prepare-option", action="append", default=[], metavar="OPTION",
                        help="extra option for every cli.py prepare (after the example's own, so it wins), "
                             "e.g. --prepare-option=--executor=ray")
    parser.add_argument("override", nargs="*", metavar="section.key=value",
                        help="recipe overrides for every cli.py train, e.g. data.workers=1")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = variants
    for key in ("train_per_class", "val_per_class", "epochs"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    try:
        run_example(args)
    except IdxError as error:
        print(f"fashion-mnist: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
