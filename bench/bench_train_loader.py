"""Input pipeline speed, one core: tar -> decode 56x56 -> augment -> batch, against decode alone and
against a torchvision ImageFolder + RandomResizedCrop(224) pipeline over the original JPEGs.

    python bench/bench_train_loader.py                       # prepares the embedded sample if needed
    python bench/bench_train_loader.py --data data/sample --rounds 5

All rates come from one process with one torch thread, measured side by side in each round; the
table gives medians over rounds, and ratios are taken within a round.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import simplejpeg  # noqa: E402
import torch  # noqa: E402
from subspectral.schemas import DatasetCard  # noqa: E402
from subspectral.train.config import DataConfig  # noqa: E402
from subspectral.train.data import make_loader  # noqa: E402
from subspectral.train.prepared import read_card, shard_uris  # noqa: E402
from subspectral.train.shards import iter_samples, to_sample  # noqa: E402
from subspectral.train.stream import TrainStream  # noqa: E402


def all_train_shards(data: str, card: DatasetCard) -> list[str]:
    """Every sub-dataset's train shards, so one pass sees N x the sub-dataset's samples."""
    return [uri for k in range(card.split) for uri in shard_uris(data, card, k, "train")]


def pipeline_rate(uris: list[str], card: DatasetCard, samples: int, batch: int) -> float:
    config = DataConfig(shuffle_buffer=2000, crop="pad", crop_padding=4, hflip=True)
    stream = TrainStream(uris, card, config, batch_size=batch, batches_per_epoch=samples // batch, rank=0,
                         world=1, seed=0)
    start = time.perf_counter()
    count = sum(len(b["labels"]) for b in make_loader(stream, 0, False))
    return count / (time.perf_counter() - start)


def decode_rates(images: list[bytes]) -> tuple[float, float]:
    """simplejpeg and PIL decode-only rates over the same in-memory JPEG bytes."""
    from PIL import Image

    out = np.empty((56, 56, 3), np.uint8)
    start = time.perf_counter()
    for data in images:
        simplejpeg.decode_jpeg(data, "RGB", buffer=out)
    fast = len(images) / (time.perf_counter() - start)
    start = time.perf_counter()
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            np.asarray(image.convert("RGB"))
    return fast, len(images) / (time.perf_counter() - start)


def imagefolder_rate(root: Path, batch: int) -> float:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                    transforms.PILToTensor()])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transform), batch_size=batch,
                                         shuffle=True, num_workers=0)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="prepared dataset (default: prepare the embedded sample, --split 36)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from subspectral.pipeline.sample import sample_corpus

    originals = sample_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "data")
            subprocess.run([sys.executable, str(REPO / "cli.py"), "prepare", "--src", str(originals), "--out", data,
                            "--split", "36", "--executor", "serial"], check=True, capture_output=True)
        card = read_card(data)
        uris = all_train_shards(data, card)
        samples = card.splits["train"].samples * card.split
        jpegs = [to_sample(k, p).data for uri in uris for k, p in iter_samples(Path(uri).read_bytes())]
        rounds = []
        for _ in range(args.rounds):
            pipeline = pipeline_rate(uris, card, samples, args.batch)
            fast, pil = decode_rates(jpegs)
            folder = imagefolder_rate(originals, 64)
            rounds.append({"pipeline": pipeline, "simplejpeg": fast, "pil": pil, "imagefolder": folder,
                           "vs_decode": pipeline / fast, "vs_imagefolder": pipeline / folder})
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(json.dumps({"samples_per_round": samples, "rounds": rounds}, indent=1), file=sys.stderr)
    print(f"{samples} samples of 56x56 {card.format} per round, {args.rounds} rounds, one process, 1 torch thread")
    print("| stage | images/s (median) |\n| --- | --- |")
    print(f"| pipeline: tar -> shuffle -> decode -> pad-crop + flip -> uint8 batch | {median['pipeline']:,.0f} |")
    print(f"| decode only, simplejpeg (same samples, from memory) | {median['simplejpeg']:,.0f} |")
    print(f"| decode only, PIL ({PIL.__version__}) | {median['pil']:,.0f} |")
    print(f"| torchvision ImageFolder + RandomResizedCrop(224) + flip, original JPEGs | {median['imagefolder']:,.0f} |")
    print(f"\npipeline / simplejpeg decode-only: {median['vs_decode']:.2f} (median of per-round ratios); "
          f"pipeline / ImageFolder: {median['vs_imagefolder']:.1f}")


if __name__ == "__main__":
    main()
