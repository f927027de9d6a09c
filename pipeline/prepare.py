"""`cli.py prepare`: list → plan → write shards (in parallel) → manifest, rejects, classes, card.

Orchestration only: what to do and in which order; the work itself lives in ``listing``,
``plan`` and ``shard``, the scheduling in ``distributor``.
"""

from __future__ import annotations

import errno
import io
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from subspectral.schemas.card import (
    SHARDS_SCHEMA,
    ByteCounts,
    Counts,
    DatasetCard,
    Source,
    SplitSummary,
    shard_file,
    shards_table,
    sub_dataset_names,
)
from subspectral.schemas.documents import SCHEMA_VERSION, class_table_sha256, listing_sha256
from subspectral.schemas.reasons import RejectReason
from subspectral.schemas.tables import CLASSES_SCHEMA, MANIFEST_SCHEMA, REJECTS_SCHEMA, STATUS_SCHEMA

from subspectral import __version__

from . import decompose, encode, resize
from .decode import SizeLimits
from .distributor import RayRunner, run_serial
from .listing import LAYOUTS, Listed, ListingUnit, combine, list_unit, plan_units
from .outdir import claim, finished_shards, output_lock, remove_partials, verify_shards
from .plan import Plan, PlanOptions, make_plan, source_uris
from .shard import (
    SampleEncoder,
    SampleSpec,
    ShardTask,
    shard_name,
    stats_location,
    status_location,
    write_shard,
)
from .storage import Location, exists, free_bytes, read_bytes, read_json, write_bytes, write_json

# Each shard task keeps one tar per sub-dataset open, with a 128 KiB (local) or 1 MiB (object store)
# buffer each; 1024 is also the usual limit of open files per process.
MAX_SUB_DATASETS = 1024


@dataclass(frozen=True)
class PrepareOptions:
    sources: tuple[str, ...]
    out: str
    layout: str
    spec: SampleSpec
    plan: PlanOptions


def validate(options: PrepareOptions) -> None:
    spec = options.spec
    decompose.grid_factor(spec.split)
    if spec.split > MAX_SUB_DATASETS:
        raise ValueError(f"--split {spec.split}: at most {MAX_SUB_DATASETS} sub-datasets (each shard task keeps "
                         "one tar per sub-dataset open)")
    if spec.size < 1:
        raise ValueError(f"--size must be positive, got {spec.size}")
    if spec.image_size**2 > spec.limits.max_pixels:
        raise ValueError(f"--size {spec.size} with --split {spec.split} resizes every image to {spec.image_size}x"
                         f"{spec.image_size} = {spec.image_size**2} pixels, over the limit of {spec.limits.max_pixels}"
                         " pixels per image; use a smaller --size")
    if spec.limits.max_file_bytes < 1:
        raise ValueError(f"--max-file-mb must be positive, got {spec.limits.max_file_bytes / 2**20:g}")
    if spec.resize_mode not in resize.RESIZE_MODES:
        raise ValueError(f"--resize-mode must be one of {', '.join(resize.RESIZE_MODES)}, got {spec.resize_mode!r}")
    if spec.transform not in ("none", "dct"):
        raise ValueError(f"--transform must be none or dct, got {spec.transform!r}")
    encode.check_format(spec.image_format, spec.transform)
    if not 1 <= spec.quality <= 100:
        raise ValueError(f"--quality must be within 1..100, got {spec.quality}")
    if options.layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {options.layout!r}")
    if options.plan.val_per_class < 0 or options.plan.min_per_class < 0:
        raise ValueError("--val-per-class and --min-per-class must be ≥ 0")


def output_parameters(options: PrepareOptions) -> dict:
    """Everything that changes the output's bytes; a rerun against an existing --out must match it."""
    spec = asdict(options.spec)
    spec["limits"] = asdict(options.spec.limits)
    return {"sources": list(options.sources), "layout": options.layout, "spec": spec, "plan": asdict(options.plan),
            "schema_version": SCHEMA_VERSION}


def card_parameters(document: dict) -> dict:
    """``output_parameters`` as a dataset card records them: what a rerun compares with once _work/ is gone."""
    card = DatasetCard.from_json(document)
    limits = SizeLimits(min_side=card.min_side, max_pixels=card.max_pixels, max_file_bytes=card.max_file_bytes)
    spec = SampleSpec(split=card.split, size=card.size, resize_mode=card.resize_mode, transform=card.transform,
                      image_format=card.format, quality=card.quality, limits=limits)
    plan = PlanOptions(shard_size=card.shard_size, seed=card.seed, val_per_class=card.val_per_class,
                       min_per_class=card.min_per_class)
    options = PrepareOptions(sources=card.source.uris, out="", layout=card.source.layout, spec=spec, plan=plan)
    return output_parameters(options)


def pil_flavour() -> str:
    import PIL

    return f"pillow-simd {PIL.__version__}" if ".post" in PIL.__version__ else f"Pillow {PIL.__version__}"


def prepare(options: PrepareOptions, *, num_workers: int, ray_address: str | None, dry_run: bool,
            executor: str = "ray", log: Callable[[str], None] | None = None) -> dict:
    """Run the whole command; returns the summary (the dataset card plus run timings).

    Messages go to ``log`` (default: the ``subspectral.pipeline`` logger at INFO).
    """
    log = log or logging.getLogger(__name__).info
    validate(options)
    units = plan_units(list(options.sources), options.layout)  # checks the sources before --out is touched
    if dry_run:
        inputs, listing_rejects = _listing(options, units, None, run_serial)
        return _dry_run(options, make_plan(inputs, options.plan), listing_rejects, log)
    out = Location(options.out)
    with output_lock(out, log):
        claim(out, output_parameters(options), card_parameters, log)
        removed = remove_partials(out)
        if removed:
            log(f"prepare: removed {removed} partial file(s) left by an interrupted run")
        card = _intact_card(out, log)
        if card is not None:
            log(f"{out.uri} is already complete: {card.counts.written} samples in {card.split} "
                "sub-datasets; nothing to do")
            return card.to_json()
        return _write(options, units, out, num_workers=num_workers, ray_address=ray_address, executor=executor,
                      log=log)


def _write(options: PrepareOptions, units: tuple[list[ListingUnit], pa.Table], out: Location, *, num_workers: int,
           ray_address: str | None, executor: str, log: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    runner = RayRunner(num_workers, ray_address) if executor == "ray" else None
    startup = time.perf_counter() - started
    mapper = runner.map if runner else run_serial
    space, full_disk = _SpaceNeed(out), None
    try:
        inputs, listing_rejects = _listing(options, units, out.join("_work"), mapper)
        plan = make_plan(inputs, options.plan)
        tasks = list(_shard_tasks(options, out, plan))
        pending = _unfinished(out, tasks, options.spec.split, log)
        space.check(options, plan.rows, pending)
        if ".post" not in pil_flavour():
            log("prepare: note: plain Pillow is loaded, not pillow-simd (resize is several times slower); "
                "scripts/setup.sh installs pillow-simd")
        log(f"prepare: {plan.rows.num_rows} images, {len(plan.classes)} classes → {options.spec.split} sub-datasets "
            f"under {out.uri}; {len(pending)} shard(s) to write, {runner.parallelism if runner else 1} worker(s), "
            f"{pil_flavour()}, JPEG encoder {encode.jpeg_library()}")
        work_started = time.perf_counter()
        seconds = _run_shards(mapper, pending)
        elapsed = time.perf_counter() - work_started
        card = _finalise(options, out, plan, listing_rejects)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        full_disk = error
    finally:
        if runner:
            runner.shutdown()  # before removing partial files: no task writes any more
    if full_disk is not None:
        remove_partials(out)
        raise OSError(space.message(full_disk)) from None
    images = sum(task.rows.num_rows for task in pending)
    summary = {**card, "run": {"startup_seconds": startup, "seconds": elapsed, "images": images,
                               "images_per_second": images / elapsed if elapsed else 0.0, "stage_seconds": seconds}}
    log(format_summary(summary))
    return summary


def _intact_card(out: Location, log: Callable[[str], None]) -> DatasetCard | None:
    """The card of a complete dataset whose shards are all intact; None (and the card deleted) otherwise."""
    card_at = out.join("dataset.json")
    if not exists(card_at):
        return None
    card = DatasetCard.from_json(read_json(card_at), card_at.uri)
    shards = [shard_name(split, j) for split, info in card.splits.items() for j in range(info.shards)]
    finished, damaged = verify_shards(out, shards, list(card.sub_datasets), with_status=False)
    problems = [damaged.get(shard, f"stats/{shard}.json is missing") for shard in shards if shard not in finished]
    if not problems:
        return card
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    if not exists(out.join("_work", "params.json")):
        raise ValueError(f"{out.uri} is damaged: {problems[0]}{more}, and its _work/ folder, needed to rewrite it, "
                         "was deleted; delete the dataset and prepare it again")
    log(f"prepare: {out.uri} is damaged: {problems[0]}{more}; writing what is missing")
    filesystem, path = card_at.resolve()
    filesystem.delete_file(path)  # no longer complete: written again, last
    return None


def _unfinished(out: Location, tasks: list[ShardTask], split: int, log: Callable[[str], None]) -> list[ShardTask]:
    """The tasks to run: shards not finished, and finished ones whose files are no longer all intact."""
    finished, damaged = verify_shards(out, [shard_name(t.split, t.shard) for t in tasks], sub_dataset_names(split))
    for shard, problem in sorted(damaged.items()):
        log(f"prepare: {problem}: writing shard {shard} again")
        filesystem, path = out.join("stats", f"{shard}.json").resolve()
        filesystem.delete_file(path)  # unfinished until written again
    return [task for task in tasks if shard_name(task.split, task.shard) not in finished]


class _SpaceNeed:
    """The space a run needs on a local --out: refused up front when short, stated when the disk fills."""

    def __init__(self, out: Location) -> None:
        self.out = out
        self.per_image: float | None = None  # bytes of one image's N samples, estimated by encoding a few
        self.pending: list[ShardTask] = []

    def check(self, options: PrepareOptions, rows: pa.Table, pending: list[ShardTask]) -> None:
        self.pending = pending
        free = free_bytes(self.out)
        if free is None or not pending:
            return
        self.per_image = _estimate_sample_bytes(options, rows) * options.spec.split
        needed = self.per_image * sum(task.rows.num_rows for task in pending)
        if needed > free:
            raise OSError(f"not enough space for {self.out.uri}: about {_human(needed)} needed for {len(pending)} "
                          f"shard(s), {_human(free)} free; free some space or use another --out")

    def message(self, error: OSError) -> str:
        """One line for a full disk: where, about how much more the run needs, how much is free."""
        text = f"no space left on the device of {self.out.uri}"
        if error.filename:
            text += f" (writing {error.filename})"
        if self.per_image is not None:
            finished = finished_shards(self.out)
            left = sum(t.rows.num_rows for t in self.pending if shard_name(t.split, t.shard) not in finished)
            text += f": about {_human(self.per_image * left)} more needed"
        free = free_bytes(self.out)
        if free is not None:
            text += f", {_human(free)} free"
        return text + "; free some space and rerun the same command to resume"


def _listing(options: PrepareOptions, units: tuple[list[ListingUnit], pa.Table], work: Location | None,
             mapper: Callable) -> tuple[pa.Table, pa.Table]:
    """Inputs and listing rejects, cached in ``work`` (None: not cached)."""
    inputs_at, rejects_at = (work.join("inputs.parquet"), work.join("listing_rejects.parquet")) if work else (None,) * 2
    if work and exists(inputs_at) and exists(rejects_at):
        return _read_parquet(inputs_at), _read_parquet(rejects_at)
    units, top_rejects = units
    listed: list[Listed] = list(mapper(list_unit, units))
    inputs, rejects = combine(listed, top_rejects)
    if inputs.num_rows == 0:
        raise ValueError(f"no images found in {', '.join(options.sources)} (layout {options.layout})")
    # Units finish in any order on Ray; sorting makes every table independent of scheduling.
    inputs = inputs.sort_by([("source", "ascending"), ("member", "ascending")])
    rejects = rejects.sort_by([("source", "ascending")])
    if work:
        _write_parquet(inputs_at, inputs)
        _write_parquet(rejects_at, rejects)
    return inputs, rejects


def _shard_tasks(options: PrepareOptions, out: Location, plan: Plan) -> Iterator[ShardTask]:
    rows = plan.rows  # sorted by (split, shard, position): each shard is one contiguous slice
    split_code = pc.equal(rows.column("split"), "val").to_numpy(zero_copy_only=False).astype(np.int64)
    shard_id = split_code << 32 | rows.column("shard").to_numpy().astype(np.int64)
    starts = np.flatnonzero(np.r_[True, shard_id[1:] != shard_id[:-1]]) if len(shard_id) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(shard_id)]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        split = "val" if split_code[start] else "train"
        yield ShardTask(out, split, int(shard_id[start] & 0xFFFFFFFF), rows.slice(start, end - start), options.spec)


def _run_shards(mapper: Callable, tasks: list[ShardTask]) -> dict[str, float]:
    from tqdm import tqdm

    seconds: Counter = Counter()
    total = sum(task.rows.num_rows for task in tasks)
    with tqdm(total=total, unit="img", desc="prepare", file=sys.stderr, dynamic_ncols=True,
              disable=None if total else True) as bar:
        for stats in mapper(write_shard, tasks):
            seconds.update(stats["seconds"])
            bar.update(stats["samples"] + stats["rejected"])
    return dict(seconds)


def _finalise(options: PrepareOptions, out: Location, plan: Plan, listing_rejects: pa.Table) -> dict:
    spec = options.spec
    rows = plan.rows
    shards = _shard_index(rows)
    statuses = pa.concat_tables(
        [_read_parquet(status_location(out, split, shard)) for split, shard in shards]
    ) if shards else STATUS_SCHEMA.empty_table()
    if not statuses.column("key").equals(rows.column("key")):
        raise RuntimeError("shard status tables do not match the plan; delete OUT/stats and rerun")
    manifest = pa.table(
        {
            **{name: rows.column(name) for name in ("key", "label", "class", "split", "shard", "position", "source",
                                                     "member")},
            "width": statuses.column("width"),
            "height": statuses.column("height"),
            "status": statuses.column("status"),
            "reason": statuses.column("reason"),
        },
        schema=MANIFEST_SCHEMA,
    )
    rejected = manifest.filter(pc.equal(manifest.column("status"), "rejected"))
    rejected_sources = source_uris(rejected)
    failed = statuses.filter(pc.equal(statuses.column("status"), "rejected"))
    rejects = pa.concat_tables(
        [listing_rejects, plan.rejects,
         pa.table({"source": rejected_sources, "reason": failed.column("reason"), "detail": failed.column("detail")},
                  schema=REJECTS_SCHEMA)]
    ).sort_by([("source", "ascending"), ("reason", "ascending")])
    written = manifest.filter(pc.equal(manifest.column("status"), "written"))
    classes = _class_table(plan.classes, written)
    stats = [read_json(stats_location(out, split, shard)) for split, shard in shards]
    per_sub = [sum(s["bytes"][k] for s in stats) for k in range(spec.split)]
    listed = rows.num_rows + plan.rejects.num_rows + listing_rejects.num_rows
    if written.num_rows + rejects.num_rows != listed:
        raise RuntimeError(f"counts do not reconcile: {listed} listed, {written.num_rows} written, "
                           f"{rejects.num_rows} rejected")
    _write_parquet(out.join("manifest.parquet"), manifest)
    _write_parquet(out.join("rejects.parquet"), rejects)
    _write_parquet(out.join("classes.parquet"), classes)
    _write_parquet(out.join("shards.parquet"), pa.concat_tables(
        [shards_table(s["split"], s["shard"], s["samples"], s["bytes"], s["sha256"]) for s in stats]
    ) if stats else SHARDS_SCHEMA.empty_table())
    scale, _ = decompose.dct_quantisation(spec.split) if spec.transform == "dct" else (None, None)
    splits = {}
    for split in ("train", "val"):
        done = [s for s in stats if s["split"] == split]  # in shard order, as _shard_index lists them
        names = [shard_file(split, s["shard"]) for s in done]
        digests = None if split == "train" else tuple(  # write_shard hashes val shards only
            listing_sha256(names, [s["sha256"][k] for s in done]) for k in range(spec.split))
        splits[split] = SplitSummary(shards=len(done), samples=sum(s["samples"] for s in done), sha256=digests)
    card = DatasetCard(
        tool_version=__version__,
        split=spec.split,
        grid=spec.grid,
        size=spec.size,
        image_size=spec.image_size,
        sample_shape=(spec.size, spec.size, 3),
        sample_dtype=spec.sample_dtype.name,
        resize_mode=spec.resize_mode,
        transform=spec.transform,
        dct_scale=scale,
        format=spec.image_format,
        quality=spec.quality,
        seed=options.plan.seed,
        shard_size=options.plan.shard_size,
        val_per_class=options.plan.val_per_class,
        min_per_class=options.plan.min_per_class,
        min_side=spec.limits.min_side,
        max_pixels=spec.limits.max_pixels,
        max_file_bytes=spec.limits.max_file_bytes,
        num_classes=len(plan.classes),
        class_table_sha256=class_table_sha256(plan.classes),
        sub_datasets=tuple(sub_dataset_names(spec.split)),
        splits=splits,
        counts=Counts(inputs=listed, written=written.num_rows, rejected=rejects.num_rows,
                      rejected_by_reason=dict(sorted(Counter(rejects.column("reason").to_pylist()).items()))),
        bytes=ByteCounts(total=sum(per_sub), per_sub_dataset=tuple(per_sub),
                         per_sample_per_sub_dataset=sum(per_sub) / max(1, written.num_rows * spec.split)),
        source=Source(uris=tuple(options.sources), layout=options.layout),
        pil=pil_flavour(),
    )
    document = card.to_json()
    write_json(out.join("dataset.json"), document)
    return document


def _shard_index(rows: pa.Table) -> list[tuple[str, int]]:
    pairs = pa.table({"split": rows.column("split"), "shard": rows.column("shard")}).group_by(["split", "shard"])
    table = pairs.aggregate([]).sort_by([("split", "ascending"), ("shard", "ascending")])
    return list(zip(table.column("split").to_pylist(), table.column("shard").to_pylist(), strict=True))


def _class_table(classes: list[str], written: pa.Table) -> pa.Table:
    counts = written.group_by(["label", "split"]).aggregate([("key", "count")])
    per_split = {split: np.zeros(len(classes), dtype=np.int64) for split in ("train", "val")}
    for label, split, count in zip(*(counts.column(c).to_pylist() for c in ("label", "split", "key_count")),
                                   strict=True):
        per_split[split][label] = count
    return pa.table({"index": np.arange(len(classes), dtype=np.int32), "name": classes, **per_split},
                    schema=CLASSES_SCHEMA)


def _dry_run(options: PrepareOptions, plan: Plan, listing_rejects: pa.Table, log: Callable[[str], None]) -> dict:
    rows = plan.rows
    spec = options.spec
    splits = Counter(rows.column("split").to_pylist())
    shards = _shard_index(rows)
    estimate = _estimate_sample_bytes(options, rows)
    planned = {
        "classes": len(plan.classes),
        "images": dict(splits),
        "shards": {split: sum(1 for s, _ in shards if s == split) for split in ("train", "val")},
        "rejected_before_decoding": listing_rejects.num_rows + plan.rejects.num_rows,
        "sub_datasets": spec.split,
        "estimated_bytes_per_sample_per_sub_dataset": estimate,
        "estimated_total_bytes": int(estimate * rows.num_rows * spec.split),
    }
    log(f"dry run (nothing written) for {options.out}:")
    more = " …" if len(plan.classes) > 5 else ""
    log(f"  classes: {planned['classes']} (first: {', '.join(plan.classes[:5])}{more})")
    log(f"  images: train {splits.get('train', 0)}, val {splits.get('val', 0)}; "
        f"rejected before decoding: {planned['rejected_before_decoding']}")
    log(f"  shards per sub-dataset: train {planned['shards']['train']}, val {planned['shards']['val']} "
        f"(--shard-size {options.plan.shard_size}) × {spec.split} sub-datasets of {spec.size}×{spec.size} "
        f"from {spec.image_size}×{spec.image_size} ({spec.resize_mode}, transform {spec.transform}, "
        f"{spec.image_format})")
    log(f"  estimated output: {_human(planned['estimated_total_bytes'])} "
        f"(≈{estimate:.0f} bytes per sample per sub-dataset, from {min(16, rows.num_rows)} encoded images)")
    return planned


def _estimate_sample_bytes(options: PrepareOptions, rows: pa.Table, count: int = 16) -> float:
    """Encode a few planned images for real; tar overhead included (3 members per sample)."""
    from .decode import RejectedInput
    from .reader import SourceReader

    reader, sample_encoder, sizes = SourceReader(options.spec.limits.max_file_bytes), SampleEncoder(options.spec), []
    step = max(1, rows.num_rows // count)
    for row in rows.slice(0, rows.num_rows).take(list(range(0, rows.num_rows, step))[:count]).to_pylist():
        try:
            images, _, _ = sample_encoder(reader.read(row["source"], row["offset"], row["size"]))
        except (RejectedInput, OSError):
            continue
        sizes += [512 + len(image) + (-len(image) % 512) + 2 * 1024 for image in images]
    reader.close()
    return sum(sizes) / len(sizes) if sizes else 0.0


def format_summary(summary: dict) -> str:
    counts, run = summary["counts"], summary["run"]
    lines = [
        f"done: {counts['written']} written + {counts['rejected']} rejected = {counts['inputs']} inputs "
        f"(reconciled) into {summary['split']} sub-datasets, {summary['num_classes']} classes",
        "  splits: " + ", ".join(f"{k} {v['samples']} samples / {v['shards']} shards"
                                 for k, v in summary["splits"].items()),
        f"  written: {_human(summary['bytes']['total'])} "
        f"({summary['bytes']['per_sample_per_sub_dataset']:.0f} bytes per sample per sub-dataset)",
        f"  throughput: {run['images_per_second']:.1f} images/s over {run['seconds']:.1f} s "
        f"(+{run['startup_seconds']:.1f} s start-up); {summary['pil']}",
    ]
    if counts["rejected_by_reason"]:
        lines.append("  rejected: " + ", ".join(f"{k} {v}" for k, v in counts["rejected_by_reason"].items())
                     + "  (see rejects.parquet)")
        if counts["rejected_by_reason"].get(RejectReason.TOO_SMALL.value):
            lines.append(f"  {RejectReason.TOO_SMALL}: shorter side under --min-side {summary['min_side']} px "
                         f"(images are resized to {summary['image_size']}×{summary['image_size']}; "
                         "a lower --min-side keeps smaller ones, upscaled)")
    stage = run.get("stage_seconds") or {}
    if stage and run["images"]:
        lines.append("  ms per image per stage (summed over workers): "
                     + ", ".join(f"{k} {1000 * v / run['images']:.2f}" for k, v in stage.items()))
    return "\n".join(lines)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _read_parquet(loc: Location) -> pa.Table:
    # One thread: these tables are small, and a read on Arrow's thread pool can abort the process at exit
    # ("terminate called without an active exception", apache/arrow#34314; seen in 3 of 47 serial runs here).
    return pq.read_table(io.BytesIO(read_bytes(loc)), use_threads=False)


def _write_parquet(loc: Location, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(loc, buffer.getvalue())
