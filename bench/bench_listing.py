"""What the safe listing of a local tree and the bounded reader cost, per file.

* Listing: ``plan_units`` + ``list_unit`` of every class folder + ``combine`` (the listing `prepare`
  runs; local trees go through ``pipeline.walk``: links judged, FIFOs and devices named, never opened)
  against the same steps of ``pipeline/listing.py`` as it is at ``--against`` (a git ref, default
  main: pyarrow's recursive listing, which followed links into loops and skipped FIFOs, devices and
  dangling links silently), loaded from git into a module of its own.
* Reading: ``SourceReader.read`` (a ``stat`` first, so a FIFO or device is never opened; reads bounded
  by ``max_bytes``) against Python's ``open(path, "rb").read()``.

Synthetic trees of empty ``*.JPEG`` files, ``--classes`` folders, at each of ``--sizes`` files; both
ways in the same round, after one untimed pass (warm page cache); medians of ``--rounds``.

    .venv/bin/python bench/bench_listing.py --sizes 20000,80000,320000 --rounds 5 --against main
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from subspectral.pipeline.listing import combine, list_unit, plan_units
from subspectral.pipeline.reader import SourceReader

REPO = Path(__file__).resolve().parents[1]


def make_tree(root: Path, files: int, classes: int) -> Path:
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(c, files, classes):
            (folder / f"n{c:08d}_{i}.JPEG").touch()
    return root


def list_like_prepare(root: Path) -> int:
    units, top_rejects = plan_units([str(root)], "auto")
    inputs, _ = combine([list_unit(unit) for unit in units], top_rejects)
    return inputs.num_rows


def listing_at(ref: str) -> types.ModuleType:
    """``pipeline/listing.py`` as committed at ``ref``, importable beside today's package."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:pipeline/listing.py"], capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType(f"listing_at_{ref}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source.replace("from .", "from subspectral.pipeline."), module.__name__, "exec"), module.__dict__)
    return module


def list_like_before(module: types.ModuleType) -> Callable[[Path], int]:
    def run(root: Path) -> int:
        units, _ = module.plan_units([str(root)], "auto")
        return pa.concat_tables([module.list_unit(unit).inputs for unit in units]).num_rows
    return run


def read_bounded(paths: list[str]) -> int:
    reader = SourceReader()
    return sum(len(reader.read(path, -1, -1)) for path in paths)


def read_plain(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            total += len(handle.read())
    return total


def rounds(pair: tuple[Callable, Callable], argument, count: int) -> list[tuple[float, float]]:
    results = []
    for fn in pair:
        fn(argument)  # warm: page cache, imports
    for _ in range(count):
        times = []
        for fn in pair:
            started = time.perf_counter()
            fn(argument)
            times.append(time.perf_counter() - started)
        results.append(tuple(times))
    return results


def summary(name: str, results: list[tuple[float, float]], files: int) -> dict:
    ours = statistics.median(r[0] for r in results)
    base = statistics.median(r[1] for r in results)
    ratios = [r[0] / r[1] for r in results]
    return {"what": name, "files": files, "us_per_file": 1e6 * ours / files, "baseline_us_per_file": 1e6 * base / files,
            "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,80000,320000", help="files per tree (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=100, help="class folders per tree (default: %(default)s)")
    parser.add_argument("--read-files", type=int, default=2000, help="files read per round (default: %(default)s)")
    parser.add_argument("--read-bytes", type=int, default=110_000, help="bytes per file read (default: %(default)s, "
                                                                        "an ImageNet JPEG)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", default="main", help="git ref of the listing to compare with (default: main)")
    parser.add_argument("--work-dir", default=None, help="where the trees go (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-listing-", dir=args.work_dir))
    before = list_like_before(listing_at(args.against))
    results = []
    try:
        for files in (int(size) for size in args.sizes.split(",")):
            root = make_tree(work / f"tree-{files}", files, args.classes)
            assert list_like_prepare(root) == before(root) == files
            results.append(summary("listing", rounds((list_like_prepare, before), root, args.rounds), files))
            shutil.rmtree(root)
            print(json.dumps(results[-1]), flush=True)
        folder = work / "read"
        folder.mkdir()
        paths = []
        for i in range(args.read_files):
            paths.append(str(folder / f"{i}.JPEG"))
            Path(paths[-1]).write_bytes(os.urandom(args.read_bytes))
        results.append(summary("reading", rounds((read_bounded, read_plain), paths, args.rounds), len(paths)))
        print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "against": args.against,
                      "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
