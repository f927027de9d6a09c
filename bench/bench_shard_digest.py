"""What hashing a tar as it is written (shards.parquet's SHA-256) costs `prepare`, measured side by side.

Runs the pipeline's own shard worker (``pipeline.shard.write_shard``, as ``bench_prepare.py``'s
``ours-serial``) on the shards it plans for the benchmark corpus, each written as a val shard (the
ones ``prepare`` hashes), twice per round: as shipped, and with the tar writer's SHA-256 replaced by
a hasher that does nothing. The two runs follow each other (their order alternates by round), so
both see the same moments of a shared machine; the result is the median over rounds of the
per-round ratio of images per CPU-second.

    .venv/bin/python bench/bench_shard_digest.py --images 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_prepare import build_corpus, combine, ours_serial, planned_shard_tasks  # noqa: E402
from subspectral.pipeline import tarwriter  # noqa: E402


class _NoDigest:
    """Stands in for ``hashlib`` in the tar writer: the same calls, no hashing."""

    class _Null:
        def update(self, _data: object) -> None:
            return None

        def hexdigest(self) -> str:
            return "0" * 64

    @staticmethod
    def sha256() -> _Null:
        return _NoDigest._Null()


def run_shards(tasks: list, work_dir: Path, digest: bool):
    tarwriter.hashlib = hashlib if digest else _NoDigest
    try:
        return combine([ours_serial(replace(task, split="val"), work_dir) for task in tasks])
    finally:
        tarwriter.hashlib = hashlib


def sha256_rate(size: int = 64 << 20) -> float:
    """Bytes per second of hashlib's SHA-256 here, on 3 KB pieces as the tar writer feeds it."""
    data = bytes(size)
    digest = hashlib.sha256()
    start = time.process_time()
    for offset in range(0, size, 3072):
        digest.update(data[offset:offset + 3072])
    return size / (time.process_time() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="corpus size (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--shard-size", type=int, default=250, help="samples per shard (default 250)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "subspectral-bench",
                        help="where the corpus is cached (default: %(default)s)")
    args = parser.parse_args(argv)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.cache_dir, args.images)
    tasks = planned_shard_tasks(corpus, args.shard_size)
    work_dir = Path(tempfile.mkdtemp(prefix="digest-", dir=args.cache_dir))
    run_shards(tasks[:1], work_dir, True)  # warm-up: imports, first-call caches
    ratios, rates = [], {True: [], False: []}
    for round_index in range(args.rounds):
        runs = {}
        for digest in ((True, False) if round_index % 2 == 0 else (False, True)):
            runs[digest] = run_shards(tasks, work_dir, digest)
            rates[digest].append(runs[digest].rate_cpu)
        ratios.append(runs[True].rate_cpu / runs[False].rate_cpu)
        print(f"round {round_index + 1}: with SHA-256 {runs[True].rate_cpu:.1f}, without "
              f"{runs[False].rate_cpu:.1f} images per CPU-second; ratio {ratios[-1]:.3f}", flush=True)
    bytes_per_image = runs[True].extra["tar_bytes"] / runs[True].images
    rate = sha256_rate()
    print(f"\n{args.images} images, {len(tasks)} shards of <= {args.shard_size}, {args.rounds} rounds")
    print(f"images per CPU-second, median: with SHA-256 {statistics.median(rates[True]):.1f}, "
          f"without {statistics.median(rates[False]):.1f}")
    print(f"with / without, median of per-round ratios: {statistics.median(ratios):.3f}")
    print(f"bytes written per image (all sub-datasets): {bytes_per_image:,.0f}; SHA-256 here: {rate / 1e6:,.0f} MB "
          f"per CPU-second, so {1000 * bytes_per_image / rate:.2f} ms of hashing per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
