"""Benchmark of `cli.py prepare` against the floors of issue 2 ("Speed"), in one process run.

What is measured, on the same ImageNet-like JPEGs (~500×375, ~90–100 KB, built here from
scikit-image's bundled photos; no network), in interleaved rounds, medians reported:

* ``pillow-decode``: Pillow decode-only of the files' bytes (the floor every pipeline pays);
* ``simplejpeg-decode``: libjpeg-turbo decode-only through simplejpeg (RGBX, accurate DCT, as the pipeline);
* ``naive``: Pillow decode + resize, one PIL encode per sub-image, Python ``tarfile`` (the reference);
* ``ours-serial``: ``pipeline.shard.write_shard`` over the pipeline's own plan, in this process: what
  ``prepare(executor="serial")`` runs between planning and finalising (one process, one core);
* ``ours-simplejpeg``: the same with the C extension ``pipeline._splitjpeg`` switched off, as on an
  install that could not build it: decompose in numpy, then one simplejpeg call per component (same bytes);
* ``ours-ray-1`` / ``ours-ray-2``: the real ``prepare()`` on an embedded Ray with 1 and 2 workers.

The in-process pipelines are interleaved shard by shard (each runs on shard j's images before any
moves on to shard j+1), so on a shared machine floor and pipeline see the same load; rates are per
CPU-second (per core) and per wall second. Throughput is steady state: the shard-writing phase only.
Start-up (Ray start, listing and planning) and finalisation (manifest, card) are reported separately.
Each shard also pays a fixed cost, creating and renaming its 36 tars (~15 ms here); shards of 250
spread it over 250 images (< 2 %), the CLI's default of 5,000 over 5,000.
Every pipeline writes a fresh output each round. All runs use ``--split 36 --size 56 --format jpg
--quality 95 --resize-mode center-crop``. Results: a Markdown table on stdout and a JSON file.

    .venv/bin/python bench/bench_prepare.py --quick          # smoke run, 10-30 s, no Ray
    .venv/bin/python bench/bench_prepare.py                  # full run
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824 \\
        .venv/bin/python bench/bench_prepare.py              # the same under the malloc setting of ENVIRONMENT.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from subspectral.pipeline import encode  # noqa: E402
from subspectral.pipeline.prepare import pil_flavour  # noqa: E402

CORPUS_VERSION = 1  # bump when the generator changes, so a stale cache is not reused
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "stereo_motorcycle")
# ImageNet's common sizes; landscape 500×375 dominates, as in ImageNet.
IMAGE_SIZES = ((500, 375), (500, 375), (500, 375), (500, 333), (375, 500), (500, 400), (500, 500), (333, 500))
SPLIT, SIZE, QUALITY = 36, 56, 95
T = TypeVar("T")


# ---------------------------------------------------------------- corpus

def _photos() -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # stereo_motorcycle: (left, right, disparity)
        photos.append(np.ascontiguousarray(pixels[..., :3]))
    return photos


def render_photo(photos: list[np.ndarray], index: int, seed: int) -> bytes:
    """One ImageNet-like JPEG: a random crop of a real photo, rescaled, flipped, jittered, noised, q90–93."""
    rng = np.random.default_rng([seed, index])
    source = photos[rng.integers(len(photos))]
    width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    src_h, src_w = source.shape[:2]
    aspect = width / height
    crop_w = min(src_w, src_h * aspect) * rng.uniform(0.6, 1.0)
    crop_h = crop_w / aspect
    left, top = rng.uniform(0, src_w - crop_w), rng.uniform(0, src_h - crop_h)
    image = Image.fromarray(source).resize((width, height), Image.Resampling.BICUBIC,
                                           box=(left, top, left + crop_w, top + crop_h))
    # Sharpening and luma noise give the fine detail upscaled crops lack, so files compress like photos.
    image = image.filter(ImageFilter.UnsharpMask(radius=1.5, percent=int(rng.integers(100, 200)), threshold=1))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image).astype(np.float32) * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20)
    pixels += rng.normal(0, rng.uniform(6, 11), pixels.shape[:2])[..., None]
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=int(rng.integers(90, 94)))
    return buffer.getvalue()


def build_corpus(cache_dir: Path, count: int, classes: int = 10, seed: int = 0) -> Path:
    """An ImageFolder tree of ``count`` JPEGs in ``classes`` wnid-like folders; cached, built atomically."""
    root = cache_dir / f"corpus-v{CORPUS_VERSION}-n{count}-c{classes}-s{seed}"
    if (root / ".complete").exists():
        return root
    building = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=cache_dir))
    photos = _photos()
    for index in range(count):
        folder = building / f"n{index % classes:08d}"
        folder.mkdir(exist_ok=True)
        (folder / f"n{index % classes:08d}_{index}.JPEG").write_bytes(render_photo(photos, index, seed))
    (building / ".complete").write_text("")
    try:
        building.rename(root)
    except OSError:  # built meanwhile by another run
        shutil.rmtree(building)
    return root


def corpus_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.JPEG"))


# ---------------------------------------------------------------- timing

@dataclass
class Run:
    """One pipeline's work on one chunk (or, combined, one round), steady state only.

    ``cpu`` is this process's CPU time (user + system, all threads): on a machine shared with other
    jobs it is steadier than wall time, and images per CPU-second is what "per core" means. Runs whose
    work happens in other processes (Ray workers) have no ``cpu`` and no ``faults``. ``extra`` holds
    additive quantities (bytes, per-stage seconds), so chunks sum into a round.
    """

    images: int
    wall: float
    cpu: float | None = None
    faults: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rate_wall(self) -> float:
        return self.images / self.wall

    @property
    def rate_cpu(self) -> float | None:
        return self.images / self.cpu if self.cpu else None

    @property
    def rate(self) -> float:
        """Images per second per core: per CPU-second where known, else per wall second."""
        return self.rate_cpu or self.rate_wall


def combine(runs: list[Run]) -> Run:
    """The sum of several chunks' runs."""
    def total(values: list):
        return None if any(v is None for v in values) else sum(values)
    return Run(images=sum(r.images for r in runs), wall=sum(r.wall for r in runs), cpu=total([r.cpu for r in runs]),
               faults=total([r.faults for r in runs]), extra=_add_dicts([r.extra for r in runs]))


def _add_dicts(items: list[dict]) -> dict:
    merged: dict = {}
    for item in items:
        for key, value in item.items():
            if isinstance(value, dict):
                merged[key] = _add_dicts([merged.get(key, {}), value])
            else:
                merged[key] = merged.get(key, 0) + value
    return merged


def timed(work: Callable[[], T]) -> tuple[T, float, float, int]:
    """Run ``work`` once after a GC; returns its result, wall and CPU seconds, and minor page faults."""
    gc.collect()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, wall = time.process_time(), time.perf_counter()
    result = work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def timed_run(work: Callable[[], int]) -> Run:
    """Time ``work`` (which returns how many images it processed) in this process."""
    images, wall, cpu, faults = timed(work)
    return Run(images=images, wall=wall, cpu=cpu, faults=faults)


# ---------------------------------------------------------------- pipelines

def pillow_decode_only(blobs: list[bytes]) -> Run:
    def work() -> int:
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as image:
                image.load()
        return len(blobs)
    return timed_run(work)


def simplejpeg_decode_only(blobs: list[bytes]) -> Run:
    import simplejpeg

    def work() -> int:
        for blob in blobs:  # the pipeline's own call: RGBX, accurate DCT and upsampling
            simplejpeg.decode_jpeg(blob, colorspace="RGBX", fastdct=False, fastupsample=False)
        return len(blobs)
    return timed_run(work)


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def naive_reference(files: list[Path], out_dir: Path, split: int = SPLIT, size: int = SIZE,
                    quality: int = QUALITY) -> int:
    """The straightforward implementation: Pillow throughout, one PIL encode per sub-image, ``tarfile``.

    Same geometry as the pipeline (exact center-crop box, antialiased bicubic), same members per
    sample (``KEY.cls``, ``KEY.jpg``, ``KEY.json``), one tar per sub-dataset; keys and labels come
    from the ImageFolder tree directly (no plan, no shuffle). Returns the number of images written.
    """
    grid = int(round(split**0.5))
    side_out = grid * size
    classes = sorted({path.parent.name for path in files})
    label_of = {name: index for index, name in enumerate(classes)}
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        archives = [stack.enter_context(tarfile.open(out_dir / f"sub-{k:02d}.tar", "w")) for k in range(split)]
        for path in files:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) / 2, (height - side) / 2
            square = np.asarray(image.resize((side_out, side_out), Image.Resampling.BICUBIC,
                                             box=(left, top, left + side, top + side)))
            key = path.stem
            label = str(label_of[path.parent.name]).encode()
            meta = json.dumps({"class": path.parent.name, "height": height, "src": str(path), "width": width},
                              sort_keys=True).encode()
            for k, archive in enumerate(archives):
                a, b = divmod(k, grid)
                buffer = io.BytesIO()
                Image.fromarray(square[a::grid, b::grid]).save(buffer, "JPEG", quality=quality)
                _add_member(archive, f"{key}.cls", label)
                _add_member(archive, f"{key}.jpg", buffer.getvalue())
                _add_member(archive, f"{key}.json", meta)
    return len(files)


def naive_pipeline(files: list[Path], work_dir: Path) -> Run:
    out = Path(tempfile.mkdtemp(prefix="naive-", dir=work_dir))
    run = timed_run(lambda: naive_reference(files, out))
    run.extra = _output_bytes(out)
    shutil.rmtree(out)
    return run


def prepare_options(corpus: Path, out: Path, shard_size: int):
    """The options ``cli.py prepare --src CORPUS --out OUT --split 36 --format jpg --quality 95`` builds."""
    from subspectral.pipeline.prepare_cli import add_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--src", str(corpus), "--out", str(out), "--split", str(SPLIT), "--size", str(SIZE),
                              "--format", "jpg", "--quality", str(QUALITY), "--shard-size", str(shard_size)])
    return options_from_args(args)


def planned_shard_tasks(corpus: Path, shard_size: int) -> list:
    """The shard tasks ``prepare()`` would run, from the pipeline's own listing and plan (start-up, not timed)."""
    import pyarrow as pa
    from subspectral.pipeline.listing import list_unit, plan_units
    from subspectral.pipeline.plan import make_plan
    from subspectral.pipeline.shard import ShardTask
    from subspectral.pipeline.storage import Location

    options = prepare_options(corpus, corpus, shard_size)
    units, _ = plan_units(list(options.sources), options.layout)
    plan = make_plan(pa.concat_tables([list_unit(unit).inputs for unit in units]), options.plan)
    return [ShardTask(Location(""), shard.split, shard.shard, plan.shard_rows(shard, shard_size), options.spec)
            for shard in plan.shards(shard_size)]


def ours_serial(task, work_dir: Path, extension: bool = True) -> Run:
    """Our per-shard worker, ``write_shard``, on one planned shard in this process: exactly what
    ``prepare(executor="serial")`` runs for each shard between planning and finalising. With
    ``extension=False``, as where ``pipeline._splitjpeg`` is not built."""
    from subspectral.pipeline.shard import write_shard
    from subspectral.pipeline.storage import location

    out = tempfile.mkdtemp(prefix="ours-serial-", dir=work_dir)
    built = encode._splitjpeg
    encode._splitjpeg = built if extension else None
    try:
        stats, wall, cpu, faults = timed(lambda: write_shard(replace(task, out=location(out))))
    finally:
        encode._splitjpeg = built
    run = Run(images=stats["samples"], wall=wall, cpu=cpu, faults=faults)
    run.extra = {"stage_seconds": dict(stats["seconds"]), "rejected": stats["rejected"], **_output_bytes(Path(out))}
    shutil.rmtree(out)
    return run


def ours_prepare_ray(corpus: Path, work_dir: Path, shard_size: int, workers: int) -> Run:
    """The real ``prepare()`` on an embedded Ray into a fresh output; steady state = its shard phase."""
    from subspectral.pipeline.prepare import prepare

    out = Path(tempfile.mkdtemp(prefix=f"ours-ray-{workers}-", dir=work_dir)) / "out"
    marks: dict[str, float] = {}

    def log(message: str) -> None:
        if message.startswith("prepare:"):  # logged once planning is done, just before the shard phase
            marks["shards_start"] = time.perf_counter()

    options = prepare_options(corpus, out, shard_size)
    gc.collect()
    started = time.perf_counter()
    summary = prepare(options, num_workers=workers, ray_address=None, dry_run=False, executor="ray", log=log)
    wall = time.perf_counter() - started
    info = summary["run"]
    before_shards = marks["shards_start"] - started
    run = Run(images=info["images"], wall=info["seconds"])
    run.extra = {
        "ray_start_seconds": info["startup_seconds"],
        "listing_planning_seconds": before_shards - info["startup_seconds"],
        "finalise_seconds": wall - before_shards - info["seconds"],
        "total_seconds": wall,
        "bytes_per_sample_per_sub_dataset": summary["bytes"]["per_sample_per_sub_dataset"],
    }
    shutil.rmtree(out.parent)
    return run


def _output_bytes(root: Path) -> dict:
    """Bytes of every tar under ``root`` and of the .jpg members in them (additive across chunks)."""
    tar_bytes = jpeg_bytes = jpeg_count = 0
    for shard in root.rglob("*.tar"):
        tar_bytes += shard.stat().st_size
        with tarfile.open(shard) as archive:
            sizes = [member.size for member in archive.getmembers() if member.name.endswith(".jpg")]
        jpeg_bytes, jpeg_count = jpeg_bytes + sum(sizes), jpeg_count + len(sizes)
    return {"tar_bytes": tar_bytes, "jpeg_bytes": jpeg_bytes, "jpeg_count": jpeg_count}


# ---------------------------------------------------------------- rounds

def malloc_setting() -> str:
    value = os.environ.get("GLIBC_TUNABLES")
    return f"GLIBC_TUNABLES={value}" if value else "glibc default (GLIBC_TUNABLES unset)"


def run_rounds(corpus: Path, work_dir: Path, rounds: int, ray: bool, shard_size: int,
               log: Callable[[str], None]) -> dict[str, list[Run]]:
    """Interleaved measurements: within a round, every in-process pipeline runs on shard 0's images,
    then every one on shard 1's, …, so floor and pipeline see the same moments of a shared machine;
    the Ray runs (whole corpus, fresh output) close each round."""
    tasks = planned_shard_tasks(corpus, shard_size)
    chunks = [[Path(source) for source in task.rows.column("source").to_pylist()] for task in tasks]
    chunk_blobs = [[path.read_bytes() for path in chunk] for chunk in chunks]
    in_process: dict[str, Callable[[int], Run]] = {
        "pillow-decode": lambda c: pillow_decode_only(chunk_blobs[c]),
        "simplejpeg-decode": lambda c: simplejpeg_decode_only(chunk_blobs[c]),
        "naive": lambda c: naive_pipeline(chunks[c], work_dir),
        "ours-serial": lambda c: ours_serial(tasks[c], work_dir),
    }
    if encode._splitjpeg is not None:
        in_process["ours-simplejpeg"] = lambda c: ours_serial(tasks[c], work_dir, extension=False)
    whole: dict[str, Callable[[], Run]] = {}
    if ray:
        whole = {"ours-ray-1": lambda: ours_prepare_ray(corpus, work_dir, shard_size, 1),
                 "ours-ray-2": lambda: ours_prepare_ray(corpus, work_dir, shard_size, 2)}
    # Warm-up (imports, first-call caches, the allocator's first growth), not recorded.
    pillow_decode_only(chunk_blobs[0][:20])
    simplejpeg_decode_only(chunk_blobs[0][:20])
    naive_pipeline(chunks[0][:5], work_dir)
    ours_serial(replace(tasks[0], rows=tasks[0].rows.slice(0, 5)), work_dir)
    results: dict[str, list[Run]] = {name: [] for name in [*in_process, *whole]}
    for round_index in range(rounds):
        parts: dict[str, list[Run]] = {name: [] for name in in_process}
        for chunk in range(len(chunks)):
            for name, pipeline in in_process.items():
                parts[name].append(pipeline(chunk))
        runs = {name: combine(chunk_runs) for name, chunk_runs in parts.items()}
        runs.update({name: pipeline() for name, pipeline in whole.items()})
        for name, run in runs.items():
            results[name].append(run)
            cpu = f"{run.rate_cpu:7.1f} images/CPU-s, " if run.cpu else " " * 21
            log(f"round {round_index + 1}/{rounds} {name:18s} {cpu}{run.rate_wall:7.1f} images/s wall "
                f"({run.images} images, {run.wall:.2f} s)")
    return results


# ---------------------------------------------------------------- report

def _median(values: list[float]) -> float:
    return statistics.median(values)


def _ratio(results: dict[str, list[Run]], name: str, reference: str, wall: bool = False) -> float:
    """Median over rounds of the per-round ratio: each round compares runs made seconds apart."""
    def rate(run: Run) -> float:
        return run.rate_wall if wall else run.rate
    return _median([rate(a) / rate(b) for a, b in zip(results[name], results[reference], strict=True)])


def summarise(results: dict[str, list[Run]], corpus: Path, args: argparse.Namespace, load: list[tuple]) -> dict:
    ours, naive = results["ours-serial"], results["naive"]
    ray_ran = "ours-ray-1" in results
    summary = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "malloc": malloc_setting(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "pil": pil_flavour(), "simplejpeg": _version("simplejpeg"), "ray": _version("ray"),
                    "jpeg_encoder": encode.jpeg_library(),
                    "load_average_before": load[0], "load_average_after": load[1]},
        "corpus": _corpus_info(corpus),
        "rounds": args.rounds,
        "shard_size": args.shard_size,
        "pipelines": {
            name: {
                "images_per_cpu_second_median": _median([r.rate_cpu for r in runs]) if runs[0].cpu else None,
                "images_per_wall_second_median": _median([r.rate_wall for r in runs]),
                "ratio_vs_pillow_decode": _ratio(results, name, "pillow-decode"),
                "ratio_vs_pillow_decode_wall": _ratio(results, name, "pillow-decode", wall=True),
                "minor_faults_per_image_median": _median([r.faults / r.images for r in runs])
                if runs[0].faults is not None else None,
                "rounds": [{"images": r.images, "wall": r.wall, "cpu": r.cpu, "faults": r.faults, **r.extra}
                           for r in runs],
            }
            for name, runs in results.items()
        },
        "floors": {
            "ours_vs_pillow_decode": _ratio(results, "ours-serial", "pillow-decode"),
            "ours_vs_pillow_decode_wall": _ratio(results, "ours-serial", "pillow-decode", wall=True),
            "ours_vs_simplejpeg_decode": _ratio(results, "ours-serial", "simplejpeg-decode"),
            "ours_vs_naive": _ratio(results, "ours-serial", "naive"),
            "ours_vs_naive_wall": _ratio(results, "ours-serial", "naive", wall=True),
            "ours_vs_ours_simplejpeg": _ratio(results, "ours-serial", "ours-simplejpeg")
            if "ours-simplejpeg" in results else None,
        },
        "stage_ms_per_image": {stage: _median([1000 * r.extra["stage_seconds"][stage] / r.images for r in ours])
                               for stage in ours[0].extra["stage_seconds"]},
        "bytes_per_sample_per_sub_dataset": {
            "ours": _median([r.extra["tar_bytes"] / (r.images * SPLIT) for r in ours]),
            "ours_jpeg": _median([r.extra["jpeg_bytes"] / r.extra["jpeg_count"] for r in ours]),
            "naive": _median([r.extra["tar_bytes"] / (r.images * SPLIT) for r in naive]),
            "naive_jpeg": _median([r.extra["jpeg_bytes"] / r.extra["jpeg_count"] for r in naive]),
            "ours_prepare_card": _median([r.extra["bytes_per_sample_per_sub_dataset"]
                                          for r in results.get("ours-ray-1", [])]) if ray_ran else None,
        },
    }
    floors = summary["floors"]
    floors["pass"] = floors["ours_vs_pillow_decode"] >= 0.40 and floors["ours_vs_naive"] >= 3.0
    if "ours-ray-1" in results:
        one, two = results["ours-ray-1"], results["ours-ray-2"]
        summary["startup"] = {key: _median([r.extra[key] for r in one + two])
                              for key in ("ray_start_seconds", "listing_planning_seconds", "finalise_seconds")}
        summary["scaling"] = {
            "ray_1_worker_images_per_second": _median([r.rate_wall for r in one]),
            "ray_2_workers_images_per_second": _median([r.rate_wall for r in two]),
            "speedup_1_to_2": _ratio(results, "ours-ray-2", "ours-ray-1", wall=True),
            "total_seconds_1_worker": _median([r.extra["total_seconds"] for r in one]),
            "total_seconds_2_workers": _median([r.extra["total_seconds"] for r in two]),
        }
    return summary


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def _corpus_info(corpus: Path) -> dict:
    files = corpus_files(corpus)
    sizes = [path.stat().st_size for path in files]
    shapes = []
    for path in files[:: max(1, len(files) // 50)]:
        with Image.open(path) as image:
            shapes.append(image.size)
    return {"path": str(corpus), "images": len(files), "classes": len({p.parent.name for p in files}),
            "mean_kb": statistics.fmean(sizes) / 1000, "median_kb": statistics.median(sizes) / 1000,
            "common_size": max(set(shapes), key=shapes.count)}


PIPELINE_LABELS = {
    "pillow-decode": "Pillow decode-only (the floor)",
    "simplejpeg-decode": "simplejpeg decode-only",
    "naive": "naive: Pillow + one PIL encode per sub-image + tarfile",
    "ours-serial": "ours: write_shard over the plan, 1 process",
    "ours-simplejpeg": "ours without the C extension (simplejpeg per component), 1 process",
    "ours-ray-1": "ours: prepare() on embedded Ray, 1 worker",
    "ours-ray-2": "ours: prepare() on embedded Ray, 2 workers",
}


def _cell(value: float | None, pattern: str) -> str:
    return "" if value is None else format(value, pattern)


def markdown(summary: dict) -> str:
    corpus, floors, machine = summary["corpus"], summary["floors"], summary["machine"]
    lines = [
        f"Malloc: **{summary['malloc']}**. {machine['pil']}, simplejpeg {machine['simplejpeg']}, "
        f"JPEG encoder: {machine['jpeg_encoder']}, "
        f"{summary['rounds']} interleaved rounds, medians; load average before/after "
        f"{machine['load_average_before'][0]:.1f}/{machine['load_average_after'][0]:.1f} on {machine['cpus']} CPUs.",
        f"Corpus: {corpus['images']} JPEGs, {corpus['classes']} classes, mean {corpus['mean_kb']:.0f} KB, "
        f"mostly {corpus['common_size'][0]}×{corpus['common_size'][1]}.",
        "",
        "| pipeline | images per CPU-second | images/s wall | × Pillow decode (CPU) | × Pillow decode (wall) "
        "| minor faults / image |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, info in summary["pipelines"].items():
        lines.append(f"| {PIPELINE_LABELS[name]} | {_cell(info['images_per_cpu_second_median'], '.0f')} | "
                     f"{info['images_per_wall_second_median']:.0f} | "
                     f"{_cell(info['ratio_vs_pillow_decode'] if info['images_per_cpu_second_median'] else None, '.3f')}"
                     f" | {info['ratio_vs_pillow_decode_wall']:.3f} | "
                     f"{_cell(info['minor_faults_per_image_median'], '.1f')} |")
    verdict = "PASS" if floors["pass"] else "MISS"
    lines += [
        "",
        f"Floors, CPU time ({verdict}): ours / Pillow decode = **{floors['ours_vs_pillow_decode']:.3f}** (≥ 0.40); "
        f"ours / naive = **{floors['ours_vs_naive']:.2f}×** (≥ 3). Wall time: "
        f"{floors['ours_vs_pillow_decode_wall']:.3f} and {floors['ours_vs_naive_wall']:.2f}×. "
        f"Ours / simplejpeg decode (CPU): {floors['ours_vs_simplejpeg_decode']:.3f}."
        + (f" Ours / ours without the C extension (CPU): {floors['ours_vs_ours_simplejpeg']:.3f}."
           if floors["ours_vs_ours_simplejpeg"] else ""),
        "",
        "| stage (ours, 1 process) | wall ms / image, as `write_shard` times it | share | ≈ CPU ms / image |",
        "| --- | ---: | ---: | ---: |",
    ]
    stages = summary["stage_ms_per_image"]
    total = sum(stages.values())
    # write_shard times its stages in wall time; their shares times our CPU time per image estimate CPU cost.
    cpu_ms = 1000 / summary["pipelines"]["ours-serial"]["images_per_cpu_second_median"]
    lines += [f"| {stage} | {ms:.3f} | {100 * ms / total:.0f} % | {cpu_ms * ms / total:.2f} |"
              for stage, ms in stages.items()]
    lines += [f"| sum of stages | {total:.3f} | | {cpu_ms:.2f} (all of write_shard) |", ""]
    if not stages["decompose"]:
        lines += ["(With pipeline._splitjpeg the split happens inside the encode call: decompose is 0.)", ""]
    size = summary["bytes_per_sample_per_sub_dataset"]
    lines.append(f"Bytes per sample per sub-dataset: ours {size['ours']:.0f} (the 56×56 q95 JPEG itself "
                 f"{size['ours_jpeg']:.0f}; the rest is the .cls member and the two members' tar headers and "
                 "padding; the naive reference keeps the .json member); "
                 f"naive {size['naive']:.0f} (JPEG {size['naive_jpeg']:.0f}).")
    if "scaling" in summary:
        start, scale = summary["startup"], summary["scaling"]
        lines.append(f"Start-up: Ray start {start['ray_start_seconds']:.2f} s + listing and planning "
                     f"{start['listing_planning_seconds']:.2f} s; finalise (manifest, card) "
                     f"{start['finalise_seconds']:.2f} s.")
        lines.append(f"Scaling 1 → 2 workers (shard phase, wall): {scale['ray_1_worker_images_per_second']:.0f} → "
                     f"{scale['ray_2_workers_images_per_second']:.0f} images/s, "
                     f"**{scale['speedup_1_to_2']:.2f}×** (whole command: {scale['total_seconds_1_worker']:.1f} s → "
                     f"{scale['total_seconds_2_workers']:.1f} s).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 images, 3 rounds, no Ray (≤ 30 s)")
    parser.add_argument("--images", type=int, default=None, help="corpus size (default 1000; --quick: 100)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick: 3)")
    parser.add_argument("--no-ray", action="store_true", help="skip the embedded-Ray runs (start-up, scaling)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="samples per shard, also the unit of interleaving (default: 250; --quick: 50)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "subspectral-bench",
                        help="where the corpus is cached and outputs are written (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default: CACHE_DIR/bench_prepare-{default,mmap}-malloc[-quick].json)")
    args = parser.parse_args(argv)
    args.images = args.images or (100 if args.quick else 1000)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.ray = not (args.no_ray or args.quick)
    args.shard_size = args.shard_size or (50 if args.quick else 250)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus = build_corpus(args.cache_dir, args.images)
    print(f"corpus {corpus} ready in {time.perf_counter() - started:.1f} s; {malloc_setting()}; {pil_flavour()}; "
          "the machine may be shared: compare the ratios, which are measured side by side")
    work_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache_dir))
    try:
        load_before = os.getloadavg()
        results = run_rounds(corpus, work_dir, args.rounds, args.ray, args.shard_size, print)
        summary = summarise(results, corpus, args, [load_before, os.getloadavg()])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    summary["bench_seconds"] = time.perf_counter() - started
    label = "mmap" if "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "") else "default"
    json_path = args.json or args.cache_dir / f"bench_prepare-{label}-malloc{'-quick' if args.quick else ''}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(markdown(summary))
    print(f"\nresults: {json_path} ({summary['bench_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
