"""How `prepare`'s shard work scales with cores: N processes, each writing whole shards, share nothing.

A process pool (no Ray, so it runs on any machine with the project, e.g. a lent host with more cores
than CI) runs ``pipeline.shard.write_shard`` over the shards that the pipeline itself plans for CORPUS.
Every worker gets the same load, ``--tasks-per-worker`` shard tasks: the planned shards, repeated
as needed, each into a fresh output. Reported per N: images/s wall, and the efficiency
rate(N) / (N · rate(1)). A drop means shared limits: memory bandwidth, page cache, the disk.

    .venv/bin/python bench/bench_prepare_scaling.py --corpus DIR --workers 1,2,4,8,16

DIR is an ImageFolder corpus, e.g. the one bench/bench_prepare.py caches under $TMPDIR/subspectral-bench/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_prepare import planned_shard_tasks  # noqa: E402
from subspectral.pipeline.shard import write_shard  # noqa: E402
from subspectral.pipeline.storage import location  # noqa: E402


def _write(task_and_out):
    task, out = task_and_out
    return write_shard(replace(task, out=location(out)))["samples"]


def measure(tasks: list, workers: int, tasks_per_worker: int, work_dir: Path) -> dict:
    jobs = [(tasks[i % len(tasks)], tempfile.mkdtemp(dir=work_dir)) for i in range(workers * tasks_per_worker)]
    context = multiprocessing.get_context("fork")
    with context.Pool(workers) as pool:
        pool.map(_write, [(replace(tasks[0], rows=tasks[0].rows.slice(0, 2)), tempfile.mkdtemp(dir=work_dir))
                          for _ in range(workers)], chunksize=1)  # imports and first calls, not timed
        started = time.perf_counter()
        images = sum(pool.map(_write, jobs, chunksize=1))
        wall = time.perf_counter() - started
    for _, out in jobs:
        shutil.rmtree(out, ignore_errors=True)
    return {"workers": workers, "images": images, "wall_seconds": wall, "images_per_second": images / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="an ImageFolder corpus")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    parser.add_argument("--shard-size", type=int, default=150, help="samples per shard (default 150)")
    parser.add_argument("--tasks-per-worker", type=int, default=4, help="shard tasks per worker (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions per worker count; medians (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    tasks = planned_shard_tasks(args.corpus, args.shard_size)
    work_dir = Path(tempfile.mkdtemp(prefix="scaling-"))
    from subspectral.pipeline import encode

    print(f"{len(tasks)} planned shards of ≤ {args.shard_size}; {os.cpu_count()} CPUs; JPEG encoder "
          f"{encode.jpeg_library()}")
    results = []
    try:
        for workers in counts:
            runs = [measure(tasks, workers, args.tasks_per_worker, work_dir) for _ in range(args.rounds)]
            rate = statistics.median(run["images_per_second"] for run in runs)
            results.append({"workers": workers, "images_per_second_median": rate, "runs": runs})
            base = results[0]["images_per_second_median"] / results[0]["workers"]
            rounds = ", ".join(format(run["images_per_second"], ".0f") for run in runs)
            print(f"{workers:3d} workers: {rate:8.1f} images/s wall (rounds {rounds}); "
                  f"efficiency {rate / (workers * base):.2f}", flush=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "shard_size": args.shard_size,
                                         "tasks_per_worker": args.tasks_per_worker, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
