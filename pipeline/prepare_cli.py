"""Resize every image to S×S (S = r·s), split it into N = r² sub-images of s×s (polyphase, optionally
followed by a DCT across the N components), and write N aligned WebDataset sub-datasets
(OUT/sub-00 … OUT/sub-{N-1}) with a dataset card, class table, manifest and rejects table.

Without --src, the embedded sample corpus is generated (deterministically, no network) and used,
with 20 images per class held out for val.
The work runs as Ray tasks on an embedded local Ray, or on a cluster with --ray-address / RAY_ADDRESS.
Rerunning the same command resumes: finished shards whose tars are all intact are kept, the rest is
written. One prepare at a time per --out: a second one is refused (local folders are locked).
Errors are one line on stderr: exit 2 for refused input, 1 for faults a retry may fix (a full disk,
a store that does not answer: object-store requests give up after $SUBSPECTRAL_STORAGE_TIMEOUT seconds
without a byte, default 15). SIGTERM or Ctrl-C stops cleanly; a second one stops at once.

A run that writes nothing, or rejects more than --max-reject-fraction of its inputs, exits 2 with one
line naming the main reject reason; everything but dataset.json stays in --out.

examples:
  python cli.py prepare --out data/sample                       # sample corpus, --split 36
  python cli.py prepare --src /data/imagenet21k --out /data/in21k-sub36 --val-per-class 50 --min-per-class 500
  python cli.py prepare --src s3://corpus/in21k --out s3://work/in21k-sub36 --ray-address auto
  python cli.py prepare --src /data/laion-shards --label-field label --out /data/laion-sub36  # img2dataset output
  python cli.py prepare --src val_labels.csv --out data/in1k-val --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import sys
from dataclasses import replace

DEFAULTS = {
    "split": 36,
    "size": 56,
    "resize_mode": "center-crop",
    "transform": "none",
    "format": None,  # jpg, or dctz with --transform dct
    "quality": 95,
    "val_per_class": 0,
    "sample_val_per_class": 20,  # the embedded sample corpus gets a val split, as ImageNet has
    "min_per_class": 0,
    "shard_size": None,  # from --shard-bytes
    "shard_bytes": "256MB",
    "seed": 0,
    "layout": "auto",
    "min_side": None,  # min(32, S): see SizeLimits.for_side
    "max_reject_fraction": 0.5,
    "max_file_mb": 256,  # = decode.DEFAULT_MAX_FILE_BYTES
}
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD = -3, 64 * 1024  # glibc's mallopt parameter; blocks from this size are mapped
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def byte_size(text: str) -> int:
    """``256MB``, ``1GiB``, ``100000`` → bytes (for --shard-bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    io_group = parser.add_argument_group("input and output")
    io_group.add_argument("--src", nargs="+", metavar="PATH_OR_URI",
                          help="corpus roots or list files (local or s3://); default: the embedded sample corpus")
    io_group.add_argument("--out", required=True, metavar="DIR_OR_URI", help="output folder (local or s3://)")
    io_group.add_argument("--layout", default=d["layout"],
                          choices=("auto", "imagefolder", "class-tars", "webdataset", "list"),
                          help="input layout: ImageFolder tree, one tar per class (ImageNet-21K release), WebDataset "
                               "shards (img2dataset's output: KEY.jpg + KEY.cls or KEY.json), or a CSV/Parquet list "
                               "with path and label columns (default: %(default)s, detected)")
    io_group.add_argument("--label-field", default=None, metavar="NAME",
                          help="WebDataset shards: the field of each sample's KEY.json that holds its label "
                               "(default: the KEY.cls member)")
    split_group = parser.add_argument_group("sub-datasets")
    split_group.add_argument("--split", type=int, default=d["split"], metavar="N",
                             help="number of sub-datasets, a perfect square: 1 (full-resolution baseline), 4, 9, 16, "
                                  "36, ... (default: %(default)s)")
    split_group.add_argument("--size", type=int, default=d["size"], metavar="S",
                             help="side of each sub-image; images are resized to sqrt(N)·S (default: %(default)s)")
    split_group.add_argument("--resize-mode", default=d["resize_mode"], choices=("center-crop", "squash", "pad"),
                             help="center-crop: shorter side to size, centred square; squash: ignore aspect; "
                                  "pad: longer side to size on black (default: %(default)s)")
    split_group.add_argument("--transform", default=d["transform"], choices=("none", "dct"),
                             help="none: store the polyphase components; dct: orthonormal DCT-II across them, "
                                  "stored as exactly invertible integer bands (--format dctz or npy) "
                                  "(default: %(default)s)")
    split_group.add_argument("--format", default=d["format"], choices=("jpg", "png", "webp", "npy", "dctz"),
                             help="format of each sample's image: jpg, png, webp or npy; for --transform dct, dctz "
                                  "(compressed integer bands, ~0.4x the npy bytes) or npy (default: jpg, dctz with "
                                  "--transform dct)")
    split_group.add_argument("--sample-json", action="store_true",
                             help="also write KEY.json (class, source, original width and height) beside each "
                                  "image; manifest.parquet holds the same for every sample (default: off)")
    split_group.add_argument("--quality", type=int, default=d["quality"],
                             help="JPEG/WebP quality, 1-100 (default: %(default)s)")
    split_group.add_argument("--min-side", type=int, default=d["min_side"], metavar="PX",
                             help="reject images whose shorter side is under this (default: 32, or S = sqrt(N)·size "
                                  "when that is smaller, so images of at least S×S are always kept)")
    split_group.add_argument("--max-file-mb", type=float, default=d["max_file_mb"], metavar="MIB",
                             help="reject input files larger than this many MiB, unread; the size of an image at "
                                  "the decompression-bomb limit (89.5 Mpx) in uncompressed RGB "
                                  "(default: %(default)s)")
    plan_group = parser.add_argument_group("classes, splits and shards")
    plan_group.add_argument("--val-per-class", type=int, default=None, metavar="N",
                            help="hold out N images per class for val, chosen by a seeded hash of the key; a source "
                                 "with its own train/ and val/ keeps them (default: "
                                 f"{d['val_per_class']}, or {d['sample_val_per_class']} for the embedded sample "
                                 "corpus)")
    plan_group.add_argument("--min-per-class", type=int, default=d["min_per_class"], metavar="N",
                            help="drop classes with fewer than N images (ImageNet-21K-P: 500) (default: %(default)s)")
    plan_group.add_argument("--shard-size", type=int, default=d["shard_size"], metavar="N",
                            help="samples per tar shard (default: as many as make one tar of one sub-dataset about "
                                 "--shard-bytes, from a few images encoded first)")
    plan_group.add_argument("--shard-bytes", type=byte_size, default=d["shard_bytes"], metavar="SIZE",
                            help="target size of one tar of one sub-dataset when --shard-size is not given "
                                 "(default: %(default)s; webdataset suggests 100 MB to 1 GB)")
    plan_group.add_argument("--seed", type=int, default=d["seed"],
                            help="seed of the val hold-out and of the shuffle before sharding (default: %(default)s)")
    run_group = parser.add_argument_group("execution")
    run_group.add_argument("--num-workers", type=int, default=None, metavar="N",
                           help="parallel worker processes on the local machine (default: number of CPUs); the "
                                "output does not depend on it")
    run_group.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"), metavar="ADDR",
                           help="join an existing Ray cluster (e.g. auto, ray://head:10001) instead of starting an "
                                "embedded one (default: $RAY_ADDRESS, else embedded)")
    run_group.add_argument("--executor", default="ray", choices=("ray", "serial"),
                           help="serial runs every task in this process, for debugging (default: %(default)s)")
    run_group.add_argument("--max-reject-fraction", type=float, default=d["max_reject_fraction"], metavar="F",
                           help="fail (exit 2, no dataset.json) when more than this fraction of the inputs is "
                                "rejected; a run that writes nothing always fails (default: %(default)s)")
    run_group.add_argument("--dry-run", action="store_true",
                           help="print the plan (classes, images per split, shards, estimated size); write nothing. "
                                "Folders and tars are listed in parallel, as in a real run")


def options_from_args(args: argparse.Namespace):
    from .decode import SizeLimits
    from .plan import PlanOptions
    from .prepare import PrepareOptions
    from .shard import SampleSpec
    from .storage import location

    if args.src:
        sources = tuple(location(src).uri for src in args.src)
        val_per_class = DEFAULTS["val_per_class"] if args.val_per_class is None else args.val_per_class
    else:
        from .sample import sample_corpus

        sources = (location(sample_corpus()).uri,)
        val_per_class = DEFAULTS["sample_val_per_class"] if args.val_per_class is None else args.val_per_class
    image_format = args.format or ("dctz" if args.transform == "dct" else "jpg")
    max_file_bytes = int(args.max_file_mb * 2**20)
    limits = None if args.min_side is None else SizeLimits(min_side=args.min_side, max_file_bytes=max_file_bytes)
    spec = SampleSpec(split=args.split, size=args.size, resize_mode=args.resize_mode, transform=args.transform,
                      image_format=image_format, quality=args.quality, limits=limits, sample_json=args.sample_json)
    if limits is None:  # the spec's default min(32, S), with the file-size limit given here
        spec = replace(spec, limits=replace(spec.limits, max_file_bytes=max_file_bytes))
    plan = PlanOptions(shard_size=args.shard_size, seed=args.seed, val_per_class=val_per_class,
                       min_per_class=args.min_per_class, shard_bytes=args.shard_bytes)
    return PrepareOptions(sources=sources, out=location(args.out).uri, layout=args.layout, spec=spec, plan=plan,
                          label_field=args.label_field)


def lean_driver_memory() -> None:
    """Let this process give freed memory back: the driver plans one compact row per input (13 M for
    ImageNet-21K) and frees large temporaries as it goes.

    With Arrow's default allocator (mimalloc), and glibc's mmap threshold that grows as blocks are freed,
    freed memory stays with the process, and planning's temporaries add up to the peak; with Arrow on the
    system allocator and every block of 64 KB or more mapped (and unmapped) on its own, it goes back
    (the driver's peak at 13.15 M inputs: BENCHMARKS.md, "prepare at ImageNet-21K scale"). Arrow reads its
    setting when first imported: call this before that. Shard workers keep their defaults.
    """
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator's defaults stay
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def run(args: argparse.Namespace) -> int:
    lean_driver_memory()
    from .distributor import TaskFailed, default_workers
    from .prepare import prepare

    try:
        options = options_from_args(args)
        workers = args.num_workers or default_workers()
        if workers < 1:
            raise ValueError(f"--num-workers must be at least 1, got {workers}")
        prepare(options, num_workers=workers, ray_address=args.ray_address, dry_run=args.dry_run,
                executor=args.executor, max_reject_fraction=args.max_reject_fraction)
    except ValueError as error:  # refused input: retrying cannot help
        print(f"prepare: error: {one_line(error)}", file=sys.stderr)
        return 2
    except (OSError, TaskFailed) as error:  # a fault (full disk, store unreachable, worker killed): a retry may help
        print(f"prepare: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


def one_line(error: BaseException) -> str:
    """An error as one line: pyarrow's and libjpeg's messages may span several."""
    return " ".join(str(error).split()) or type(error).__name__
