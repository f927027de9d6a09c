"""Benchmark of `cli.py prepare` at ImageNet-21K scale (issue 10), on a 2-core machine, in minutes.

The real corpus (13.15 M images, 19,167 class tars, ~1.1 TB) does not fit here; each budget is shown
on what does, and extrapolated where it grows with the corpus:

* ``plan``: synthetic list files of 1 M, 3 M and 13.15 M rows over 19,167 classes, class sizes shaped
  like winter21's (10,450 classes of 500–1,716 images, 8,717 of 1–359: what ``--min-per-class 500``
  keeps is ImageNet-21K-P's 11.6 M), the 21K-P filters scaled with the row count so that every size
  keeps the same share. Per size, each in a fresh process: the dry run as a user runs it (``cli.py
  prepare --dry-run``), and a real run's driver (``prepare()`` on an embedded Ray) whose shard tasks
  are stand-ins that write what a finished task writes for the driver (status table, stats; every
  input written, no image): peak RSS and CPU time of listing, planning, dispatch and finalising, and
  the RSS of Ray's own processes beside it. ``--baseline CHECKOUT`` runs the same dry run with another
  checkout's code (its ``.venv``), side by side.
* ``requests``: class tars of tiny JPEGs on a real S3 server on loopback (moto), whose own request log
  counts: listing requests per tar (one tar is over 64 MB), and a real ``prepare`` run whose shards draw
  the same share of every class tar as a 21K-P shard of the default size does (the distance read
  through to join neighbouring members scaled from photos' ~84 KB to these members' size): requests
  per image.
* ``bytes``: 200 photo-like JPEGs (bench_prepare's corpus), ``--split 36 --size 56``: bytes per sample per
  sub-dataset against the encoded 56×56 q95 JPEG, with and without ``--sample-json``; ``--transform dct``
  stored as ``npy`` and as ``dctz``: bytes, time to write, time for the trainer to decode.

    .venv/bin/python bench/bench_scale.py --quick                     # smoke run: small sizes, 1–2 minutes
    .venv/bin/python bench/bench_scale.py --baseline /work/main       # the full run (sizes 1M, 3M, 13.15M)

Results: a Markdown summary on stdout and JSON (``--json``, default $TMPDIR/subspectral-bench/bench_scale.json).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WINTER21_IMAGES, WINTER21_CLASSES = 13_150_000, 19_167
KEPT_CLASSES, KEPT_SIZES, DROPPED_SIZES = 10_450, (500, 1716), (1, 359)  # at the full size
MIN_PER_CLASS, VAL_PER_CLASS = 500, 50  # ImageNet-21K-P's filters, at the full size
SPLIT, SIZE, QUALITY = 36, 56, 95
TAR_MEMBERS = 700  # images per class tar, as in winter21 (13.15 M / 19,167 ≈ 686)
KEPT_TAR_MEMBERS = 1108  # images per class tar that 21K-P keeps (11.58 M / 10,450)
PHOTO_MEMBER_SPAN = 84_000 + 768  # bytes from one winter21 JPEG member to the next (1.1 TB / 13.15 M, + header)
STREAM_BLOCK = 64 * 2**20


# ---------------------------------------------------------------- synthetic list files

def class_sizes(rows: int, seed: int = 0) -> np.ndarray:
    """Images per class for ``rows`` rows: winter21's shape (see the module doc), scaled, summing to ``rows``."""
    rng = np.random.default_rng(seed)
    full = np.concatenate([rng.integers(KEPT_SIZES[0], KEPT_SIZES[1] + 1, KEPT_CLASSES),
                           rng.integers(DROPPED_SIZES[0], DROPPED_SIZES[1] + 1, WINTER21_CLASSES - KEPT_CLASSES)])
    rng.shuffle(full)
    sizes = np.floor(full * rows / full.sum()).astype(np.int64)
    sizes[np.argsort(-full)[: rows - sizes.sum()]] += 1  # the rounding remainder, to the largest classes
    return sizes


def filters(rows: int) -> tuple[int, int]:
    """--min-per-class and --val-per-class scaled to ``rows``: each size keeps the same share of classes."""
    scale = rows / WINTER21_IMAGES
    return max(1, round(MIN_PER_CLASS * scale)), max(1, round(VAL_PER_CLASS * scale))


def write_list(path: Path, rows: int) -> Path:
    """An ImageNet-style CSV list (``train/n01440764/n01440764_10026.JPEG,n01440764``); cached by size."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    if path.exists():
        return path
    sizes = class_sizes(rows)
    wnids = pa.array([f"n{1440764 + 3217 * c:08d}" for c in range(WINTER21_CLASSES)])
    labels = np.repeat(np.arange(WINTER21_CLASSES, dtype=np.int32), sizes)
    numbers = np.arange(rows) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    partial = path.with_suffix(".partial")
    with pacsv.CSVWriter(str(partial), pa.schema([("path", pa.string()), ("label", pa.string())])) as writer:
        for start in range(0, rows, 1 << 20):
            label = wnids.take(pa.array(labels[start : start + (1 << 20)]))
            stem = pc.binary_join_element_wise(label, pc.cast(pa.array(numbers[start : start + (1 << 20)]),
                                                              pa.string()), "_")
            paths = pc.binary_join_element_wise("train", label, pc.binary_join_element_wise(stem, ".JPEG", ""), "/")
            writer.write_table(pa.table({"path": paths, "label": label}))
    partial.rename(path)
    return path


# ---------------------------------------------------------------- measuring a process

MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"returncode": result.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024,
                  "cpu_seconds": usage.ru_utime + usage.ru_stime, "wall_seconds": time.perf_counter() - started,
                  "stdout": result.stdout[-3000:], "stderr": result.stderr[-3000:]}))
"""


def measured(command: list[str], env: dict | None = None) -> dict:
    """Peak RSS and CPU time of ``command`` (and any child it waits for), from a fresh wrapper process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout)


def dry_run(python: str, checkout: Path, listing: Path, out: Path, rows: int, shard_size: int) -> dict:
    minimum, val = filters(rows)
    command = [python, str(checkout / "cli.py"), "prepare", "--src", str(listing), "--out", str(out), "--dry-run",
               "--min-per-class", str(minimum), "--val-per-class", str(val), "--shard-size", str(shard_size)]
    result = measured(command, env={"PYTHONPATH": str(checkout)})
    if result["returncode"] != 0:
        raise RuntimeError(f"dry run failed: {result['stderr']}")
    return {key: result[key] for key in ("peak_rss_bytes", "cpu_seconds", "wall_seconds")}


# ---------------------------------------------------------------- a real run's driver, with stand-in shard tasks

def stand_in_shard(task) -> dict:
    """What a finished shard task leaves for the driver (status table, stats), every input written; no image.

    Runs on a Ray worker (pickled by value from this script). Bytes per sample come from the environment.
    """
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from subspectral.pipeline.shard import stats_location, status_location
    from subspectral.pipeline.storage import write_bytes, write_json
    from subspectral.schemas.tables import STATUS_SCHEMA

    count = task.rows.num_rows
    nulls = pa.nulls(count, pa.string())
    status = pa.table({"key": task.rows.column("key"), "status": pa.repeat(pa.scalar("written"), count),
                       "reason": nulls, "detail": nulls, "width": pa.repeat(pa.scalar(500, pa.int32()), count),
                       "height": pa.repeat(pa.scalar(375, pa.int32()), count)}, schema=STATUS_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(status, buffer)
    write_bytes(status_location(task.out, task.split, task.shard), buffer.getvalue())
    per_sample = int(os.environ.get("BENCH_SCALE_SAMPLE_BYTES", "5000"))
    stats = {"split": task.split, "shard": task.shard, "samples": count, "rejected": 0,
             "bytes": [count * per_sample] * task.spec.split, "requests": 0}
    write_json(stats_location(task.out, task.split, task.shard), stats)
    return {**stats, "seconds": {}}


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as refs:  # "5": reset the peak RSS (Linux ≥ 4.0)
        refs.write("5")


def real_run_driver(listing: Path, out: Path, rows: int, shard_size: int) -> dict:
    """In this (fresh) process: ``prepare()`` on an embedded Ray with stand-in shard tasks; per phase CPU and peak
    RSS of this driver process, and the peak RSS of Ray's own processes (GCS, raylet, ...; not its workers)."""
    import psutil
    import subspectral.pipeline.prepare as prepare_module
    from subspectral.pipeline.prepare_cli import add_arguments, options_from_args

    minimum, val = filters(rows)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--src", str(listing), "--out", str(out), "--min-per-class", str(minimum),
                              "--val-per-class", str(val), "--shard-size", str(shard_size)])
    options = options_from_args(args)
    phases: dict[str, dict] = {}

    def timed(name: str, function):
        def wrapper(*arguments, **keywords):
            _reset_peak_rss()
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return function(*arguments, **keywords)
            finally:
                phases[name] = {"cpu_seconds": time.process_time() - cpu, "wall_seconds": time.perf_counter() - wall,
                                "peak_rss_bytes": _peak_rss()}
        return wrapper

    prepare_module._listing = timed("listing", prepare_module._listing)
    prepare_module.make_plan = timed("planning", prepare_module.make_plan)
    prepare_module._run_shards = timed("dispatch", prepare_module._run_shards)
    prepare_module._finalise = timed("finalising", prepare_module._finalise)
    prepare_module.write_shard = stand_in_shard
    ray_peak = [0]
    stop = threading.Event()

    def watch_ray() -> None:
        me = psutil.Process()
        while not stop.wait(0.5):
            total = 0
            for child in me.children(recursive=True):
                try:
                    if "default_worker" not in " ".join(child.cmdline()):
                        total += child.memory_info().rss
                except psutil.Error:
                    continue
            ray_peak[0] = max(ray_peak[0], total)

    watcher = threading.Thread(target=watch_ray, daemon=True)
    watcher.start()
    started = time.perf_counter()
    summary = prepare_module.prepare(options, num_workers=2, ray_address=None, dry_run=False, executor="ray",
                                     max_reject_fraction=1.0, log=lambda _: None)
    stop.set()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"phases": phases, "driver_peak_rss_bytes": max([p["peak_rss_bytes"] for p in phases.values()]),
            "driver_cpu_seconds": usage.ru_utime + usage.ru_stime, "wall_seconds": time.perf_counter() - started,
            "ray_processes_peak_rss_bytes": ray_peak[0], "shards": summary["splits"],
            "written": summary["counts"]["written"]}


def real_run(listing: Path, out: Path, rows: int, shard_size: int, sample_bytes: float) -> dict:
    command = [sys.executable, __file__, "--child-real-run", str(listing), str(out), str(rows), str(shard_size)]
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env={**os.environ, "BENCH_SCALE_SAMPLE_BYTES": str(int(sample_bytes))})
    if result.returncode != 0:
        raise RuntimeError(f"real run failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- object storage: requests, counted by the server

class Moto:
    """A moto S3 server on loopback whose request log is the request counter."""

    def __init__(self, work: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.log_path = work / "moto.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=self._log, stderr=self._log)
        self.url = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": self.url}
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        self._mark = 0

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="bench", aws_secret_access_key="bench",
                            region_name="us-east-1")

    def mark(self) -> None:
        time.sleep(0.5)
        self._mark = self.log_path.stat().st_size

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of the requests since ``mark()``."""
        import re

        time.sleep(0.5)
        pattern = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|HEAD|PUT|POST|DELETE) (/[^ ?]*)\S* HTTP/')
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            log.seek(self._mark)
            return [(m.group(1), m.group(2)) for m in pattern.finditer(log.read())]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self._log.close()


def tiny_jpeg(seed: int, width: int = 64, height: int = 48) -> bytes:
    import simplejpeg

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 1, 3))
    pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    return simplejpeg.encode_jpeg(pixels, 85, "RGB")


def class_tar(path: Path, name: str, members: int, seed: int, member_bytes: int | None = None) -> None:
    """A class tar of ``members`` JPEGs; ``member_bytes`` pads each to that size with JPEG comments (as large as
    real photos), for the listing of a tar over 64 MB."""
    import io

    with tarfile.open(path, "w") as archive:
        for i in range(members):
            data = tiny_jpeg(seed * 100_000 + i)
            if member_bytes:
                data = data[:2] + _comments(os.urandom(member_bytes - len(data))) + data[2:]
            info = tarfile.TarInfo(f"{name}_{i}.JPEG")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _comments(payload: bytes) -> bytes:
    """JPEG COM segments carrying ``payload`` (at most 65,533 bytes each)."""
    parts = []
    for start in range(0, len(payload), 65533):
        chunk = payload[start : start + 65533]
        parts.append(b"\xff\xfe" + (len(chunk) + 2).to_bytes(2, "big") + chunk)
    return b"".join(parts)


def _restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def requests_part(work: Path, tars: int, full_shard_size: int) -> dict:
    from subspectral.pipeline import prepare as prepare_module
    from subspectral.pipeline import reader as reader_module
    from subspectral.pipeline.listing import ListingUnit, list_unit
    from subspectral.pipeline.prepare_cli import add_arguments, options_from_args

    moto = Moto(work)
    try:
        client = moto.client()
        client.create_bucket(Bucket="corpus")
        sizes = {}
        for c in range(tars):
            name = f"n{1440764 + 3217 * c:08d}"
            path = work / f"{name}.tar"
            class_tar(path, name, KEPT_TAR_MEMBERS, seed=c)
            client.put_object(Bucket="corpus", Key=f"tars/{name}.tar", Body=path.read_bytes())
            sizes[f"/corpus/tars/{name}.tar"] = path.stat().st_size
            path.unlink()
        big = work / "n09999999.tar"
        class_tar(big, "n09999999", 1000, seed=99_999, member_bytes=84_000)  # photo-sized members: ~84 MB
        client.put_object(Bucket="corpus", Key="big/n09999999.tar", Body=big.read_bytes())
        big_size = big.stat().st_size
        big.unlink()
        saved = {key: os.environ.get(key) for key in moto.env}
        os.environ.update(moto.env)
        try:
            listing = {}
            for key, size in [*sizes.items(), ("/corpus/big/n09999999.tar", big_size)]:
                moto.mark()
                listed = list_unit(ListingUnit("tar", f"s3:/{key}", key.rsplit("/", 1)[1][:-4], None))
                count = sum(1 for method, path in moto.requests() if path == key and method in ("GET", "HEAD"))
                listing[key] = {"bytes": size, "members": listed.inputs.num_rows, "requests": count,
                                "budget": 1 + math.ceil(size / STREAM_BLOCK)}
        finally:
            _restore(saved)
        # A shard of the default size draws the same share of every kept class tar as in 21K-P (shard / 11.58 M,
        # ~4.7 of a tar's 1,108 planned members), and reads them in place. The members here are ~1.6 KB, not
        # ~110 KB: the gap read through to join two members shrinks in proportion, so that the same members
        # are joined as with photos.
        density = full_shard_size / 11_582_723
        shard_size = max(1, round(density * tars * KEPT_TAR_MEMBERS))
        member_span = sum(sizes.values()) / (tars * KEPT_TAR_MEMBERS)
        gap = int(reader_module.COALESCE_GAP * member_span / PHOTO_MEMBER_SPAN)
        out = work / "moto-out"
        shutil.rmtree(out, ignore_errors=True)
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--src", "s3://corpus/tars", "--out", str(out), "--split", str(SPLIT), "--size", "8",
                                  "--shard-size", str(shard_size)])
        saved_gap = reader_module.COALESCE_GAP
        reader_module.COALESCE_GAP = gap
        os.environ.update(moto.env)
        moto.mark()
        try:
            summary = prepare_module.prepare(options_from_args(args), num_workers=1, ray_address=None, dry_run=False,
                                             executor="serial", log=lambda _: None)
        finally:
            reader_module.COALESCE_GAP = saved_gap
            _restore(saved)
        counted = [r for r in moto.requests() if r[1].startswith("/corpus/tars/") and r[0] in ("GET", "HEAD")]
        images = summary["run"]["images"]
        reported = summary["run"]["requests"]
        shutil.rmtree(out)
        return {
            "listing": listing,
            "listing_requests_per_tar_max": max(v["requests"] for k, v in listing.items() if "/tars/" in k),
            "big_tar": listing["/corpus/big/n09999999.tar"],
            "prepare": {"tars": tars, "members_per_tar": KEPT_TAR_MEMBERS, "shard_size": shard_size,
                        "members_per_tar_per_shard": shard_size / tars, "coalesce_gap_bytes": gap,
                        "images": images, "requests_on_tars_counted_by_server": len(counted),
                        "listing_and_detection_requests": 2 * tars + 2, "shard_requests_reported": reported,
                        "requests_per_image": reported / images, "shards": summary["splits"]},
        }
    finally:
        moto.stop()


# ---------------------------------------------------------------- bytes on disk, dct storage

def _load_bench_prepare():
    spec = importlib.util.spec_from_file_location("bench_prepare", REPO / "bench" / "bench_prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def bytes_part(work: Path, images: int) -> dict:
    from subspectral.pipeline import prepare as prepare_module
    from subspectral.pipeline.prepare_cli import add_arguments, options_from_args

    bench_prepare = _load_bench_prepare()
    cache = Path(tempfile.gettempdir()) / "subspectral-bench"
    cache.mkdir(exist_ok=True)
    corpus = bench_prepare.build_corpus(cache, images)
    results = {}
    for name, extra in (("jpg", []), ("jpg_sample_json", ["--sample-json"]), ("dct_npy", ["--transform", "dct",
                        "--format", "npy"]), ("dct_dctz", ["--transform", "dct"])):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        out = work / f"bytes-{name}"
        args = parser.parse_args(["--src", str(corpus), "--out", str(out), "--split", str(SPLIT), "--size", str(SIZE),
                                  "--quality", str(QUALITY), "--shard-size", str(images), *extra])
        cpu = time.process_time()
        summary = prepare_module.prepare(options_from_args(args), num_workers=1, ray_address=None, dry_run=False,
                                         executor="serial", log=lambda _: None)
        cpu = time.process_time() - cpu
        members = _member_sizes(out)
        written = summary["counts"]["written"]
        stage = summary["run"]["stage_seconds"]
        results[name] = {
            "written": written,
            "bytes_per_sample_per_sub_dataset": summary["bytes"]["per_sample_per_sub_dataset"],
            "image_member_bytes_mean": members["image"],
            "cpu_seconds_per_image": cpu / written,
            "encode_ms_per_image": 1000 * (stage.get("encode", 0) + stage.get("decompose", 0)) / written,
            "decode_us_per_member": _decode_time(out, summary) if name.startswith("dct") or name == "jpg" else None,
        }
        shutil.rmtree(out)
    jpg = results["jpg"]
    results["jpg_ratio_to_image"] = jpg["bytes_per_sample_per_sub_dataset"] / jpg["image_member_bytes_mean"]
    results["jpg_sample_json_ratio_to_image"] = (results["jpg_sample_json"]["bytes_per_sample_per_sub_dataset"]
                                                 / jpg["image_member_bytes_mean"])
    results["dctz_over_npy_bytes"] = (results["dct_dctz"]["image_member_bytes_mean"]
                                      / results["dct_npy"]["image_member_bytes_mean"])
    return results


def _member_sizes(out: Path) -> dict:
    sizes = []
    for path in sorted(out.glob("sub-*/*.tar")):
        with tarfile.open(path) as archive:
            sizes += [m.size for m in archive.getmembers() if m.name.rsplit(".", 1)[1] in ("jpg", "npy", "dctz")]
    return {"image": sum(sizes) / len(sizes)}


def _decode_time(out: Path, card: dict) -> float:
    """Microseconds per member for the trainer's ``decode_into``, over every image member of sub-00 … sub-35."""
    from subspectral.train.shards import decode_into, iter_samples, to_sample

    dtype = np.int16 if card["transform"] == "dct" else np.uint8
    target = np.empty((card["size"], card["size"], 3), dtype)
    samples = []
    for path in sorted(out.glob("sub-*/*.tar")):
        samples += [to_sample(key, parts) for key, parts in iter_samples(path.read_bytes())]
    started = time.process_time()
    for sample in samples:
        if not decode_into(target, sample):
            raise RuntimeError(f"cannot decode {sample.key}")
    return 1e6 * (time.process_time() - started) / len(samples)


# ---------------------------------------------------------------- growth laws and the summary

def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = a + b·x: intercept, slope per million rows, and the value at 13.15 M."""
    slope, intercept = np.polyfit(np.asarray(xs) / 1e6, np.asarray(ys), 1) if len(xs) > 1 else (0.0, ys[0])
    return {"intercept": float(intercept), "per_million_rows": float(slope),
            "at_13_15M": float(intercept + slope * WINTER21_IMAGES / 1e6)}


def machine() -> dict:
    import PIL
    import pyarrow

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "load_average": os.getloadavg(), "python": platform.python_version(), "pillow": PIL.__version__,
            "pyarrow": pyarrow.__version__, "numpy": np.__version__}


def report(results: dict) -> str:
    gb = 1e9
    lines = ["| rows | dry run: peak RSS | CPU s | real run driver: peak RSS | CPU s (listing, planning, dispatch, "
             "finalising) | Ray's own processes | shards × 36 |", "| ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for size in results["plan"]["sizes"]:
        dry, real = size["dry_run"], size["real_run"]
        phases = real["phases"]
        split_cpu = ", ".join(f"{phases[p]['cpu_seconds']:.1f}" for p in ("listing", "planning", "dispatch",
                                                                           "finalising"))
        shards = sum(s["shards"] for s in real["shards"].values())
        lines.append(f"| {size['rows']:,} | {dry['peak_rss_bytes'] / gb:.2f} GB | {dry['cpu_seconds']:.1f} | "
                     f"{real['driver_peak_rss_bytes'] / gb:.2f} GB | {real['driver_cpu_seconds']:.1f} ({split_cpu}) | "
                     f"{real['ray_processes_peak_rss_bytes'] / gb:.2f} GB | {shards} × 36 = {36 * shards:,} |")
    for size in results["plan"].get("baseline", []):
        dry = size["dry_run"]
        lines.append(f"| {size['rows']:,} (baseline) | {dry['peak_rss_bytes'] / gb:.2f} GB | "
                     f"{dry['cpu_seconds']:.1f} | | | | |")
    lines.append("")
    lines.append("Growth laws (least squares over the sizes): " + "; ".join(
        f"{name}: {fit['intercept']:.2f} + {fit['per_million_rows']:.3f}/M rows → {fit['at_13_15M']:.2f} at 13.15 M"
        for name, fit in results["plan"]["fits"].items()))
    if "requests" in results:
        req = results["requests"]
        lines.append(f"Requests: listing ≤ {req['listing_requests_per_tar_max']} per class tar "
                     f"(budget 1 + 1 per 64 MB); the {req['big_tar']['bytes'] / 1e6:.0f} MB tar: "
                     f"{req['big_tar']['requests']} "
                     f"(budget {req['big_tar']['budget']}); prepare: {req['prepare']['requests_per_image']:.3f} "
                     f"requests per image at {req['prepare']['members_per_tar_per_shard']:.1f} members per tar per "
                     "shard")
    if "bytes" in results:
        b = results["bytes"]
        lines.append(f"Bytes per sample per sub-dataset: jpg {b['jpg']['bytes_per_sample_per_sub_dataset']:.0f} = "
                     f"{b['jpg_ratio_to_image']:.3f} × the {b['jpg']['image_member_bytes_mean']:.0f}-byte JPEG "
                     f"(with --sample-json {b['jpg_sample_json']['bytes_per_sample_per_sub_dataset']:.0f} = "
                     f"{b['jpg_sample_json_ratio_to_image']:.3f} ×); dct: dctz / npy = {b['dctz_over_npy_bytes']:.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,3000000,13150000", help="list rows per size (comma-separated)")
    parser.add_argument("--baseline", type=Path, help="another checkout (with its .venv): its dry run, side by side")
    parser.add_argument("--baseline-sizes", default="1000000,3000000",
                        help="sizes for the baseline (the old driver needs ~0.9 GB per million rows)")
    parser.add_argument("--tars", type=int, default=16, help="class tars of 700 tiny JPEGs on moto")
    parser.add_argument("--images", type=int, default=200, help="photo-like images for the bytes part")
    parser.add_argument("--parts", default="bytes,plan,requests")
    parser.add_argument("--quick", action="store_true", help="smoke run: sizes 100k and 300k, 4 tars, 40 images")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "subspectral-bench" / "scale")
    parser.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "subspectral-bench" /
                        "bench_scale.json")
    parser.add_argument("--child-real-run", nargs=4, metavar=("LIST", "OUT", "ROWS", "SHARD_SIZE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_real_run:
        from subspectral.pipeline.prepare_cli import lean_driver_memory

        lean_driver_memory()  # as cli.py prepare does, before pyarrow is imported
        listing, out, rows, shard_size = args.child_real_run
        print(json.dumps(real_run_driver(Path(listing), Path(out), int(rows), int(shard_size))))
        return 0
    if args.quick:
        args.sizes, args.baseline_sizes, args.tars, args.images = "100000,300000", "100000", 4, 40
    parts = set(args.parts.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "command": " ".join(sys.argv)}
    from subspectral.pipeline.plan import DEFAULT_SHARD_BYTES
    from subspectral.pipeline.prepare import shard_size_for

    sample_bytes = 5000.0
    if "bytes" in parts:
        results["bytes"] = bytes_part(args.work, args.images)
        sample_bytes = results["bytes"]["jpg"]["bytes_per_sample_per_sub_dataset"]
    shard_size = shard_size_for(DEFAULT_SHARD_BYTES, sample_bytes)  # what the default --shard-bytes gives
    results["default_shard_size"] = shard_size
    results["tars_for_21k_p"] = SPLIT * (math.ceil(11_060_223 / shard_size) + math.ceil(522_500 / shard_size))
    if "plan" in parts:
        sizes = []
        for rows in (int(r) for r in args.sizes.split(",")):
            listing = write_list(args.work / f"list-{rows}.csv", rows)
            out = args.work / f"out-{rows}"
            shutil.rmtree(out, ignore_errors=True)
            entry = {"rows": rows, "filters": filters(rows), "list_bytes": listing.stat().st_size,
                     "dry_run": dry_run(sys.executable, REPO, listing, out, rows, shard_size),
                     "real_run": real_run(listing, out, rows, shard_size, sample_bytes)}
            shutil.rmtree(out, ignore_errors=True)
            sizes.append(entry)
            print(f"plan: {rows:,} rows done", file=sys.stderr)
        plan = {"sizes": sizes}
        xs = [s["rows"] for s in sizes]
        plan["fits"] = {
            "dry_run_peak_rss_GB": linear_fit(xs, [s["dry_run"]["peak_rss_bytes"] / 1e9 for s in sizes]),
            "dry_run_cpu_s": linear_fit(xs, [s["dry_run"]["cpu_seconds"] for s in sizes]),
            "real_run_driver_peak_rss_GB": linear_fit(xs, [s["real_run"]["driver_peak_rss_bytes"] / 1e9
                                                           for s in sizes]),
            "real_run_planning_cpu_s": linear_fit(xs, [s["real_run"]["phases"]["listing"]["cpu_seconds"]
                                                      + s["real_run"]["phases"]["planning"]["cpu_seconds"]
                                                      for s in sizes]),
            "real_run_finalising_cpu_s": linear_fit(xs, [s["real_run"]["phases"]["finalising"]["cpu_seconds"]
                                                        for s in sizes]),
        }
        if args.baseline:
            python = str(args.baseline / ".venv" / "bin" / "python")
            baseline = []
            for rows in (int(r) for r in args.baseline_sizes.split(",")):
                listing = write_list(args.work / f"list-{rows}.csv", rows)
                baseline.append({"rows": rows, "dry_run": dry_run(python, args.baseline, listing,
                                                                  args.work / "baseline-out", rows, shard_size)})
            plan["baseline"] = baseline
            xs = [s["rows"] for s in baseline]
            plan["fits"]["baseline_dry_run_peak_rss_GB"] = linear_fit(
                xs, [s["dry_run"]["peak_rss_bytes"] / 1e9 for s in baseline])
            plan["fits"]["baseline_dry_run_cpu_s"] = linear_fit(xs, [s["dry_run"]["cpu_seconds"] for s in baseline])
        results["plan"] = plan
    if "requests" in parts:
        results["requests"] = requests_part(args.work, args.tars, shard_size)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    if "plan" in parts:
        print(report(results))
    print(json.dumps({k: v for k, v in results.items() if k != "plan"}, indent=2))
    print(f"results: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
