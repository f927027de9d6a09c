"""Benchmark of `cli.py ensemble-eval` at ImageNet-21K scale (issue 10): old against new, side by side.

Four parts (``--part``, default all), each alternating old and new round by round in one run, every
measurement in a fresh child process so that peak memory is its own; medians reported.

* ``fusion``: synthetic float32 logits ``[M, B, C]`` on the CPU (M = 36, B = 256; C = 10,450 and
  19,167), the four rules and the accuracy-against-members curve (every prefix, every rule).
  old: ``tests/ensemble_reference.tally_batch`` (the code before issue 10: the ``[M, B, C]`` terms of
  each rule, float64 softmax and one-hot for vote); new: ``train.ensemble.fusion.tally_batch``, members
  fed one at a time as the command feeds them. Seconds per batch and per 1,000 images; transient
  memory = peak RSS during the batches minus RSS with the logits allocated (the peak is reset through
  ``/proc/self/clear_refs`` first), also as a multiple of the logits' size. Both must give the same
  counts (checked).
* ``streams``: one lockstep stream over one synthetic val shard of each ``--shard-mb`` size (56x56
  JPEG samples in the prepare layout), batches of 256 decoded. old: the reader before issue 10
  (``tests/ensemble_reference.read_stream_whole_shards``: the whole shard in memory); new:
  ``train.ensemble.lockstep`` streaming. Peak RSS above the child's RSS before reading; the growth with the
  shard's size is the point. With ``--s3`` both also read each shard from a moto server on loopback
  (once per size) and the GET requests are counted from the server's request log.
* ``sample``: the whole command (``cli.py ensemble-eval``) on the embedded sample prepared at
  ``--split``, members with the sample recipe's network (resnet18, imagenet stem) and deterministic
  random weights (``tests/ensemble_fixtures.make_torch_run``). old: ``cli.py`` of ``--old-rev``
  (``git archive`` into a temporary folder); new: this tree, with ``--prefetch 2`` (default) and
  ``--prefetch 0``. Wall seconds and peak RSS (``/usr/bin/time``); all predictions.parquet equal.
* ``prefetch``: what the read-ahead thread gains where it is meant to, beside an accelerator. The N
  val streams of the sample prepared at ``--split`` (2,500 val images by default) read in lockstep
  (``train.ensemble.lockstep.Lockstep``) through ``prefetch`` with depth 0 and 2; per batch the consumer waits
  ``--forward-ms`` × N without using the CPU, as the host does while a GPU runs the members. Wall
  seconds, seconds spent waiting for batches, CPU seconds per batch (reading, parsing, decoding).

    .venv/bin/python bench/bench_ensemble_scale.py                                    # everything
    .venv/bin/python bench/bench_ensemble_scale.py --part fusion --rounds 3
    .venv/bin/python bench/bench_ensemble_scale.py --part streams --shard-mb 16 64 256 --s3
    .venv/bin/python bench/bench_ensemble_scale.py --part sample --members 6 --rounds 3
    .venv/bin/python bench/bench_ensemble_scale.py --part prefetch --forward-ms 0 10 20 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

OLD_REV = "337eb37"  # the last revision before issue 10's ensemble-eval changes
THREADS_ENV: dict[str, str] = {}  # OMP_NUM_THREADS for every child with --threads


# ---------------------------------------------------------------- measurement inside a child

def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset the peak RSS to the current RSS (Linux: write 5 to clear_refs); returns the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def child_fusion(implementation: str, classes: int, members: int, batch: int, batches: int) -> dict[str, Any]:
    import torch
    from subspectral.train.ensemble.fusion import METHODS, Tally

    if implementation == "old":
        from ensemble_reference import tally_batch
    else:
        from subspectral.train.ensemble.fusion import tally_batch
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(members, batch, classes, generator=generator)
    # Half the labels are some member's top class, so the counts are not all zero.
    voter = torch.randint(0, members, (batch,), generator=generator)
    labels = torch.where(torch.arange(batch) % 2 == 0, logits[voter, torch.arange(batch)].argmax(dim=-1),
                         torch.randint(0, classes, (batch,), generator=generator))
    tally = Tally(num_members=members, methods=METHODS, p=0.3, k=5)
    tally_batch(tally, logits, labels)  # warm-up: one-off set-up (thread pools, kernels) is not "per batch"
    before = _reset_peak()
    seconds = []
    for _ in range(batches):
        start = time.perf_counter()
        tally_batch(tally, logits, labels)
        seconds.append(time.perf_counter() - start)
    return {"seconds_per_batch": statistics.median(seconds), "transient_bytes": _status("VmHWM") - before,
            "logits_bytes": logits.numel() * logits.element_size(),
            "counts_sha256": hashlib.sha256(json.dumps(tally.counts()).encode()).hexdigest()}


def child_stream(implementation: str, uri: str) -> dict[str, Any]:
    from unittest import mock

    import numpy as np
    from subspectral.train.ensemble import lockstep

    stream = lockstep.Stream("sub-00", [uri], (56, 56, 3), np.dtype(np.uint8))
    before = _reset_peak()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if implementation == "old":
            from ensemble_reference import read_stream_whole_shards

            stack.enter_context(mock.patch.object(lockstep, "_read_stream", read_stream_whole_shards))
        samples = sum(len(batch.keys) for batch in lockstep.Lockstep([stream], batch_size=256))
    return {"samples": samples, "seconds": time.perf_counter() - start, "peak_above_start": _status("VmHWM") - before}


def in_child(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run this script's ``--child ARGS`` in a fresh process; its JSON result.

    glibc's malloc serves blocks under a threshold that grows up to 32 MB from its heap and may keep
    them resident after they are freed; a fixed 128 KiB threshold sends every large block to mmap and
    back on free, so the child's RSS follows what it really holds."""
    env = {**(env or os.environ), **THREADS_ENV, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                            env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- parts

def bench_fusion(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for classes in args.classes:
        runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for _ in range(args.rounds):
            for implementation in ("old", "new"):
                runs[implementation].append(in_child("fusion", implementation, str(classes), str(args.fusion_members),
                                                     str(args.batch_size), str(args.batches)))
        hashes = {run["counts_sha256"] for both in runs.values() for run in both}
        if len(hashes) != 1:
            raise SystemExit(f"C={classes}: old and new counts differ")
        logits_bytes = runs["new"][0]["logits_bytes"]
        row: dict[str, Any] = {"part": "fusion", "classes": classes, "members": args.fusion_members,
                               "batch": args.batch_size, "logits_MB": round(logits_bytes / 1e6, 1),
                               "same_counts": True}
        for implementation, measured in runs.items():
            per_batch = statistics.median(run["seconds_per_batch"] for run in measured)
            transient = statistics.median(run["transient_bytes"] for run in measured)
            row[implementation] = {
                "s_per_batch": round(per_batch, 3),
                "s_per_1000_images": round(per_batch * 1000 / args.batch_size, 2),
                "s_per_batch_min_max": [round(min(r["seconds_per_batch"] for r in measured), 3),
                                        round(max(r["seconds_per_batch"] for r in measured), 3)],
                "transient_MB": round(transient / 1e6, 1),
                "transient_x_logits": round(transient / logits_bytes, 3),
            }
        row["speedup"] = round(row["old"]["s_per_batch"] / row["new"]["s_per_batch"], 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def _write_jpeg_shard(path: Path, megabytes: int) -> int:
    """A val shard of 56x56 JPEG samples (cls, jpg, json: the prepare layout) of about ``megabytes``."""
    import io

    import numpy as np
    import simplejpeg

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:56, 0:56]
    jpegs = []
    for i in range(64):  # smooth images with noise: about the size of a real 56x56 q95 sub-image
        image = np.stack([x * 4 + i, y * 4, (x + y) * 2], -1) + rng.normal(0, 3, (56, 56, 3))
        jpegs.append(simplejpeg.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=95))
    count = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        while path.stat().st_size < megabytes * 1e6:
            key = f"img_{count:08d}"
            for ext, payload in (("cls", str(count % 1000).encode()), ("jpg", jpegs[count % 64]),
                                 ("json", b'{"class": "n0", "width": 56, "height": 56}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            count += 1
    return count


@contextlib.contextmanager
def moto_server(log: Path):
    """A moto S3 server on loopback whose request log goes to ``log``; yields its endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log, "w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=sink, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def bench_streams(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    shards = []
    for megabytes in args.shard_mb:
        path = tmp / f"val-{megabytes}mb.tar"
        shards.append((path, _write_jpeg_shard(path, megabytes)))
    for path, samples in shards:
        runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for _ in range(args.rounds):
            for implementation in ("old", "new"):
                runs[implementation].append(in_child("stream", implementation, str(path)))
        row: dict[str, Any] = {"part": "streams", "shard_MB": round(path.stat().st_size / 1e6, 1), "samples": samples}
        for implementation, measured in runs.items():
            assert all(run["samples"] == samples for run in measured)
            row[implementation] = {
                "peak_MB_above_start": round(statistics.median(r["peak_above_start"] for r in measured) / 1e6, 1),
                "s_per_1000_images": round(statistics.median(r["seconds"] for r in measured) * 1000 / samples, 3),
            }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    if args.s3:
        from conftest import S3_CREDENTIALS, s3_client
        from subspectral.train.storage import REMOTE_READ_AHEAD

        log = tmp / "moto.log"
        with moto_server(log) as endpoint:
            client = s3_client(endpoint)
            client.create_bucket(Bucket="bench-streams")
            env = {**os.environ, **S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
            for row, (path, samples) in zip(rows, shards, strict=True):
                client.upload_file(str(path), "bench-streams", path.name)
                for implementation in ("old", "new"):
                    before = log.read_text().count(f"GET /bench-streams/{path.name}")
                    measured = in_child("stream", implementation, f"s3://bench-streams/{path.name}", env=env)
                    gets = log.read_text().count(f"GET /bench-streams/{path.name}") - before
                    row[f"{implementation}_s3"] = {
                        "GET_requests": gets, "peak_MB_above_start": round(measured["peak_above_start"] / 1e6, 1),
                        "s_per_1000_images": round(measured["seconds"] * 1000 / samples, 3)}
                row["new_s3"]["read_ahead_MiB"] = REMOTE_READ_AHEAD >> 20
                print(json.dumps(row), file=sys.stderr)
    return rows


def _timed_cli(cli: Path, options: list[str]) -> tuple[float, int]:
    """Run ``cli.py ensemble-eval OPTIONS`` under /usr/bin/time: (wall seconds, peak RSS bytes)."""
    command = ["/usr/bin/time", "-f", "%e %M", sys.executable, str(cli), "ensemble-eval", *options]
    env = {**os.environ, **THREADS_ENV, "PYTHONPATH": str(cli.parent)}  # the tree's own packages first
    result = subprocess.run(command, cwd=cli.parent, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    wall, peak_kib = result.stderr.strip().splitlines()[-1].split()
    return float(wall), int(peak_kib) * 1024


def bench_sample(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq
    from bench_ensemble import prepare
    from ensemble_fixtures import make_torch_run


    old_tree = tmp / "old"
    old_tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old_rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
    data, runs = tmp / "data", tmp / "runs"
    prepare(data, args.split, args.per_class, args.val_per_class)
    card = json.loads((data / "dataset.json").read_text())
    members = args.members or args.split
    for k in range(members):
        make_torch_run(runs, card, k, 50.0 + k, str(data))
    images = int(card["splits"]["val"]["samples"])
    variants = {"old": (old_tree / "cli.py", []), "new": (ROOT / "cli.py", []),
                "new --prefetch 0": (ROOT / "cli.py", ["--prefetch", "0"])}
    measured: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    common = ["--data", str(data), "--runs", str(runs), "--device", "cpu", "--batch-size", str(args.batch_size)]
    for _ in range(args.rounds):
        for name, (cli, extra) in variants.items():
            out = tmp / f"report-{name.replace(' ', '_')}"
            measured[name].append(_timed_cli(cli, [*common, "--out", str(out), *extra]))
    tables = [pq.read_table(tmp / f"report-{name.replace(' ', '_')}" / "predictions.parquet") for name in variants]
    if not all(table.equals(tables[0]) for table in tables):
        raise SystemExit("predictions.parquet differ between old and new")
    row: dict[str, Any] = {"part": "sample", "split": args.split, "members": members, "val_images": images,
                           "model": "resnet18/imagenet", "batch": args.batch_size, "same_predictions": True}
    for name, values in measured.items():
        walls = [wall for wall, _ in values]
        row[name] = {"wall_s": round(statistics.median(walls), 2),
                     "wall_s_min_max": [round(min(walls), 2), round(max(walls), 2)],
                     "s_per_1000_images": round(statistics.median(walls) * 1000 / images, 2),
                     "peak_RSS_MB": round(statistics.median(peak for _, peak in values) / 1e6, 1)}
    print(json.dumps(row), file=sys.stderr)
    return [row]


def _consume(batches: Any, forward_seconds: float) -> dict[str, float]:
    """Take every batch, then wait ``forward_seconds`` without using the CPU, as the host does while an
    accelerator runs the members; the time spent waiting for batches is measured apart."""
    wall, cpu, waiting, count = time.perf_counter(), time.process_time(), 0.0, 0
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)
        waiting += time.perf_counter() - start
        if batch is None:
            break
        count += 1
        time.sleep(forward_seconds)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "waiting": waiting,
            "batches": count}


def bench_prefetch(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """The N val streams of the sample prepared at --split, in lockstep, ``--prefetch 0`` against 2, with
    a simulated accelerator forward pass per batch (``--forward-ms`` per member and batch)."""
    from bench_ensemble import prepare
    from subspectral.train.ensemble.lockstep import Lockstep, Stream, prefetch
    from subspectral.train.prepared import read_card, shard_uris

    data = tmp / "data"
    prepare(data, args.split, args.prefetch_per_class, args.prefetch_val_per_class)
    card = read_card(str(data))
    streams = [Stream(name, shard_uris(str(data), card, k, "val"), card.sample_shape, card.dtype)
               for k, name in enumerate(card.sub_datasets)]
    rows = []
    for forward_ms in args.forward_ms:
        forward_seconds = args.split * forward_ms / 1000
        runs: dict[int, list[dict[str, float]]] = {0: [], 2: []}
        for _ in range(args.rounds):
            for depth, measured in runs.items():
                measured.append(_consume(prefetch(Lockstep(streams, args.batch_size), depth), forward_seconds))
        batches = runs[0][0]["batches"]
        row: dict[str, Any] = {"part": "prefetch", "streams": len(streams),
                               "val_images": card.splits["val"].samples, "batches": batches,
                               "forward_ms_per_member_batch": forward_ms,
                               "forward_s_per_batch": round(forward_seconds, 3)}
        for depth, measured in runs.items():
            walls = [m["wall"] for m in measured]
            row[f"prefetch {depth}"] = {
                "wall_s": round(statistics.median(walls), 2),
                "wall_s_min_max": [round(min(walls), 2), round(max(walls), 2)],
                "waiting_for_batches_s": round(statistics.median(m["waiting"] for m in measured), 2),
                "cpu_s_per_batch": round(statistics.median(m["cpu"] for m in measured) / batches, 3)}
        row["gain"] = round(row["prefetch 0"]["wall_s"] / row["prefetch 2"]["wall_s"], 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        if kind == "fusion":
            implementation, classes, members, batch, batches = rest
            result = child_fusion(implementation, int(classes), int(members), int(batch), int(batches))
        else:
            result = child_stream(*rest)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("fusion", "streams", "sample", "prefetch", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=3, help="old/new rounds per configuration (default: 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of every measured process (OMP_NUM_THREADS; default: torch's)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--classes", type=int, nargs="+", default=[10450, 19167], help="fusion: class counts")
    parser.add_argument("--fusion-members", type=int, default=36, help="fusion: members (default: 36)")
    parser.add_argument("--batches", type=int, default=2, help="fusion: batches per child; median (default: 2)")
    parser.add_argument("--shard-mb", type=int, nargs="+", default=[16, 64, 256], help="streams: shard sizes")
    parser.add_argument("--s3", action="store_true", help="streams: also from a moto S3 server, counting GETs")
    parser.add_argument("--split", type=int, default=36, help="sample: sub-datasets prepared (default: 36)")
    parser.add_argument("--members", type=int, default=6, help="sample: members evaluated (default: 6)")
    parser.add_argument("--per-class", type=int, default=60, help="sample: images per class (10 classes)")
    parser.add_argument("--val-per-class", type=int, default=50, help="sample: of those, val images per class")
    parser.add_argument("--old-rev", default=OLD_REV, help=f"sample: the old revision (default: {OLD_REV})")
    parser.add_argument("--forward-ms", type=float, nargs="+", default=[0, 10, 20],
                        help="prefetch: simulated forward time per member and batch, ms (default: 0 10 20)")
    parser.add_argument("--prefetch-per-class", type=int, default=300, help="prefetch: images per class")
    parser.add_argument("--prefetch-val-per-class", type=int, default=250, help="prefetch: val images per class")
    args = parser.parse_args()
    if args.threads:
        THREADS_ENV["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()

    import torch

    parts = ("fusion", "streams", "sample", "prefetch") if args.part == "all" else (args.part,)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_ensemble_scale_") as tmp:
        for part in parts:
            workdir = Path(tmp) / part
            workdir.mkdir()
            if part == "fusion":
                results += bench_fusion(args)
            elif part == "streams":
                results += bench_streams(args, workdir)
            elif part == "sample":
                results += bench_sample(args, workdir)
            else:
                results += bench_prefetch(args, workdir)
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(),
               "torch_threads": args.threads or torch.get_num_threads(),
               "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
               "torch": torch.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps({"results": results, **machine}, indent=1))


if __name__ == "__main__":
    main()
