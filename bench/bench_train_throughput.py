"""Trainer throughput on one member, and whether the input pipeline keeps up with the device.

    python bench/bench_train_throughput.py --data data/sample --config imagenet1k --device cuda --workers 8

A prepared sub-dataset is small, so the bench trains on a *view* of it: its train shards listed
``--repeat`` times (symlinks) under a copied card. It measures, on the same view and batch size:
(1) the loader alone (DataLoader with ``--workers`` processes, pinned memory on CUDA), (2) the
network alone on a batch already on the device, (3) ``cli.py train`` for ``--epochs`` epochs
(images/s of the last epoch, from metrics.jsonl). The loader keeps up when (3) is close to (2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_view(data: Path, shard: int, repeat: int, out: Path) -> Path:
    """A dataset whose sub-dataset ``shard`` lists its train shards ``repeat`` times (symlinks); its card's
    train digests no longer describe the listing, which training never checks."""
    from subspectral.schemas import shard_file
    from subspectral.train.prepared import read_card

    card = read_card(str(data))
    folder = card.sub_datasets[shard]
    (out / folder).mkdir(parents=True)
    train = card.splits["train"]
    for j, path in enumerate(card.shard_paths("train", shard) * repeat):
        (out / folder / shard_file("train", j)).symlink_to((data / path).resolve())
    for path in card.shard_paths("val", shard):
        (out / path).symlink_to((data / path).resolve())
    splits = {**card.splits, "train": replace(train, shards=train.shards * repeat, samples=train.samples * repeat)}
    (out / "dataset.json").write_text(json.dumps(replace(card, splits=splits).to_json()))
    return out


def loader_rate(view: Path, shard: int, recipe, workers: int, pin: bool) -> float:
    from subspectral.train.data import make_loader
    from subspectral.train.prepared import read_card, shard_uris
    from subspectral.train.stream import TrainStream

    card = read_card(str(view))
    batch = recipe.data.batch_size
    stream = TrainStream(shard_uris(str(view), card, shard, "train"), card, recipe.data, batch_size=batch,
                         batches_per_epoch=card.splits["train"].samples // batch, rank=0, world=1, seed=0)
    start = time.perf_counter()
    images = sum(len(b["labels"]) for b in make_loader(stream, workers, pin))
    return images / (time.perf_counter() - start)


def compute_rate(recipe, card, device: str, steps: int = 20) -> float:
    import torch
    from subspectral.train.config import resolve_stem
    from subspectral.train.engine import autocast_dtype
    from subspectral.train.models import create_model

    spec = recipe.model
    model = create_model(spec.name, card.num_classes, stem=resolve_stem(spec.stem, card.size)).to(device)
    amp = autocast_dtype(recipe.train, torch.device(device)) is not None  # train.amp: auto | true | false
    if device == "cuda" and recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = recipe.data.batch_size
    images = torch.randint(0, 256, (batch, *card.sample_shape), dtype=torch.uint8, device=device)
    labels = torch.randint(0, card.num_classes, (batch,), device=device)
    for i in range(steps + 3):
        if i == 3:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--config", default="imagenet1k")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from subspectral.train.config import apply_overrides, load_recipe
    from subspectral.train.prepared import read_card

    overrides = [*args.overrides, f"data.workers={args.workers}"]
    recipe = apply_overrides(load_recipe(args.config), overrides)
    with tempfile.TemporaryDirectory() as tmp:
        view = make_view(Path(args.data), args.shard, args.repeat, Path(tmp) / "view")
        card = read_card(str(view))
        loader = loader_rate(view, args.shard, recipe, args.workers, args.device == "cuda")
        compute = compute_rate(recipe, card, args.device)
        command = [sys.executable, str(REPO / "cli.py"), "train", "--data", str(view), "--shard", str(args.shard),
                   "--config", args.config, "--out", str(Path(tmp) / "runs"), "--epochs", str(args.epochs),
                   "--device", args.device, "--no-progress", *overrides]
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": path})
        folder = card.sub_datasets[args.shard]
        lines = (Path(tmp) / "runs" / folder / "metrics.jsonl").read_text().splitlines()
        metrics = [json.loads(line) for line in lines]
    train = metrics[-1]["images_per_s"]
    model = f"{recipe.model.name} {recipe.model.stem} stem"
    print(f"\n{model}, batch {recipe.data.batch_size}, {args.device}, amp={recipe.train.amp}, "
          f"channels_last={recipe.train.channels_last}, {args.workers} loader workers, "
          f"{card.splits['train'].samples} images/epoch")
    print("| loader alone | network alone (batch on device) | cli.py train (last epoch) | train / network |")
    print("| --- | --- | --- | --- |")
    print(f"| {loader:,.0f} img/s | {compute:,.0f} img/s | {train:,.0f} img/s | {train / compute:.2f} |")


if __name__ == "__main__":
    main()
