"""`cli.py prepare`: list → plan → write shards (in parallel) → manifest, rejects, classes, card.

Orchestration only: what to do and in which order; the work itself lives in ``listing``,
``plan`` and ``shard``, the scheduling in ``distributor``. The driver holds the compact plan of
every input (``plan.Plan``) and nothing per input beyond it: shard tasks are made one at a time as
workers free up, and the manifest is written shard by shard.
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
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
from subspectral.schemas.tables import CLASSES_SCHEMA, MANIFEST_SCHEMA, REJECTS_SCHEMA

from subspectral import __version__

from . import decompose, encode, resize
from .decode import SizeLimits
from .distributor import RayRunner, run_serial
from .listing import LAYOUTS, Listed, ListingUnit, combine, list_unit, plan_units
from .outdir import claim, finished_shards, output_lock, remove_partials, verify_shards
from .plan import DEFAULT_SHARD_BYTES, Plan, PlanOptions, ShardRange, make_plan
from .shard import (
    SampleEncoder,
    SampleSpec,
    ShardTask,
    sample_member_bytes,
    shard_name,
    stats_location,
    status_location,
    write_shard,
)
from .storage import Location, atomic_output, exists, free_bytes, read_json, write_json

MAX_REJECT_FRACTION = 0.5  # default of --max-reject-fraction
ESTIMATE_SAMPLES = 32  # images encoded to estimate the bytes of a sample (and so the shard size)
ESTIMATE_ATTEMPTS = 256  # planned inputs tried for them before giving up

# What changes each reject reason, for the line that stops a run with too many rejects.
REJECT_HINTS = {
    RejectReason.TOO_SMALL.value: "--min-side {min_side} sets the limit",
    RejectReason.TOO_LARGE.value: "the limit is {max_pixels} pixels per image (decompression bombs)",
    RejectReason.BELOW_MIN_PER_CLASS.value: "--min-per-class {min_per_class} sets the limit",
    RejectReason.STRAY_FILE.value: "check --src and --layout {layout}",
    RejectReason.EMPTY_CLASS.value: "check --src and --layout {layout}",
    RejectReason.NO_LABEL.value: "check the shards' .cls members, or --label-field",
    RejectReason.DUPLICATE_INPUT.value: "the sources list these inputs more than once",
    RejectReason.UNSAFE_TAR_MEMBER.value: "these tars hold links, devices or paths outside the tar",
}
DAMAGED_HINT = "the inputs themselves cannot be read as images"

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
    label_field: str | None = None  # webdataset layout: the JSON field holding the label (None: .cls)


class TooManyRejects(ValueError):
    """The run finished, but wrote nothing or rejected more than --max-reject-fraction of its inputs."""


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
    if options.plan.shard_size is not None and options.plan.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {options.plan.shard_size}")
    if options.plan.shard_bytes < 1:
        raise ValueError(f"--shard-bytes must be positive, got {options.plan.shard_bytes}")


def output_parameters(options: PrepareOptions) -> dict:
    """Everything that changes the output's bytes; a rerun against an existing --out must match it."""
    spec = asdict(options.spec)
    spec["limits"] = asdict(options.spec.limits)
    plan = asdict(options.plan)
    if plan["shard_size"] is not None:  # --shard-size given: the target tar size plays no part
        plan["shard_bytes"] = None
    return {"sources": list(options.sources), "layout": options.layout, "label_field": options.label_field,
            "spec": spec, "plan": plan, "schema_version": SCHEMA_VERSION}


def card_parameters(document: dict) -> dict:
    """``output_parameters`` as a dataset card records them: what a rerun compares with once _work/ is gone."""
    card = DatasetCard.from_json(document)
    limits = SizeLimits(min_side=card.min_side, max_pixels=card.max_pixels, max_file_bytes=card.max_file_bytes)
    spec = SampleSpec(split=card.split, size=card.size, resize_mode=card.resize_mode, transform=card.transform,
                      image_format=card.format, quality=card.quality, limits=limits, sample_json=card.sample_json)
    # shard_bytes set: the shard size was derived from it (and recorded in the card); None: --shard-size given.
    plan = PlanOptions(shard_size=card.shard_size if card.shard_bytes is None else None, seed=card.seed,
                       val_per_class=card.val_per_class, min_per_class=card.min_per_class,
                       shard_bytes=card.shard_bytes or DEFAULT_SHARD_BYTES)
    options = PrepareOptions(sources=card.source.uris, out="", layout=card.source.layout, spec=spec, plan=plan,
                             label_field=card.source.label_field)
    return output_parameters(options)


def pil_flavour() -> str:
    import PIL

    return f"pillow-simd {PIL.__version__}" if ".post" in PIL.__version__ else f"Pillow {PIL.__version__}"


def prepare(options: PrepareOptions, *, num_workers: int, ray_address: str | None, dry_run: bool,
            executor: str = "ray", max_reject_fraction: float = MAX_REJECT_FRACTION,
            log: Callable[[str], None] | None = None) -> dict:
    """Run the whole command; returns the summary (the dataset card plus run timings).

    Messages go to ``log`` (default: the ``subspectral.pipeline`` logger at INFO). Raises ``TooManyRejects``
    (after writing everything but the card) when the run wrote nothing or rejected more than
    ``max_reject_fraction`` of its inputs.
    """
    log = log or logging.getLogger(__name__).info
    validate(options)
    if not 0 <= max_reject_fraction <= 1:
        raise ValueError(f"--max-reject-fraction must be within 0..1, got {max_reject_fraction}")
    # Checks the sources (and a WebDataset source's labels) before --out is touched or Ray started.
    units, top_rejects = plan_units(list(options.sources), options.layout, options.label_field)
    if dry_run:
        return _dry_run_command(options, units, top_rejects, num_workers=num_workers, ray_address=ray_address,
                                executor=executor, log=log)
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
        return _write(options, units, top_rejects, out, num_workers=num_workers, ray_address=ray_address,
                      executor=executor, max_reject_fraction=max_reject_fraction, log=log)


def _dry_run_command(options: PrepareOptions, units: list[ListingUnit], top_rejects: pa.Table, *, num_workers: int,
                     ray_address: str | None, executor: str, log: Callable[[str], None]) -> dict:
    """List and plan without writing: folders and tars are listed on Ray workers (a list file in this process)."""
    parallel_listing = any(unit.kind != "list" for unit in units)
    runner = RayRunner(num_workers, ray_address) if executor == "ray" and parallel_listing else None
    try:
        inputs, listing_rejects = _listing(options, units, top_rejects, None, runner.map if runner else run_serial)
        plan = make_plan(inputs, options.plan)
        del inputs
        shard_size, estimate = _shard_size(options, plan, None)
        return _dry_run(options, plan, listing_rejects, shard_size, estimate, runner.parallelism if runner else 1,
                        log)
    finally:
        if runner:
            runner.shutdown()


def _write(options: PrepareOptions, units: list[ListingUnit], top_rejects: pa.Table, out: Location, *,
           num_workers: int, ray_address: str | None, executor: str, max_reject_fraction: float,
           log: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    runner = RayRunner(num_workers, ray_address) if executor == "ray" else None
    startup = time.perf_counter() - started
    mapper = runner.map if runner else run_serial
    space, full_disk = _SpaceNeed(out), None
    try:
        work = out.join("_work")
        inputs, listing_rejects = _listing(options, units, top_rejects, work, mapper)
        plan = make_plan(inputs, options.plan)
        del inputs
        pa.default_memory_pool().release_unused()  # planning's temporaries, back to the system before the run
        shard_size, estimate = _shard_size(options, plan, work)
        shards = plan.shards(shard_size)
        pending = _unfinished(out, shards, options.spec.split, log)
        space.check(options, plan, pending, estimate)
        if ".post" not in pil_flavour():
            log("prepare: note: plain Pillow is loaded, not pillow-simd (resize is several times slower); "
                "scripts/setup.sh installs pillow-simd")
        log(f"prepare: {plan.num_rows} images, {len(plan.classes)} classes → {options.spec.split} sub-datasets "
            f"under {out.uri}; shards of {shard_size}: {len(pending)} shard(s) to write, "
            f"{runner.parallelism if runner else 1} worker(s), {pil_flavour()}, JPEG encoder {encode.jpeg_library()}")
        tasks = (ShardTask(out, shard.split, shard.shard, plan.shard_rows(shard, shard_size), options.spec)
                 for shard in pending)  # made one at a time, as workers free up
        work_started = time.perf_counter()
        totals = _run_shards(mapper, tasks, sum(shard.end - shard.start for shard in pending))
        elapsed = time.perf_counter() - work_started
        card, examples = _finalise(options, out, plan, shards, shard_size, listing_rejects)
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
    document = card.to_json()
    images = sum(shard.end - shard.start for shard in pending)
    summary = {**document, "run": {"startup_seconds": startup, "seconds": elapsed, "images": images,
                                   "images_per_second": images / elapsed if elapsed > 0 else None,
                                   "requests": totals["requests"], "stage_seconds": totals["seconds"]}}
    failure = reject_failure(document, max_reject_fraction, options, examples)
    log(format_summary(summary))
    if failure:
        raise TooManyRejects(failure)
    write_json(out.join("dataset.json"), document)
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


def _unfinished(out: Location, shards: list[ShardRange], split: int, log: Callable[[str], None]) -> list[ShardRange]:
    """The shards to write: those not finished, and finished ones whose files are no longer all intact."""
    finished, damaged = verify_shards(out, [shard_name(s.split, s.shard) for s in shards], sub_dataset_names(split))
    for shard, problem in sorted(damaged.items()):
        log(f"prepare: {problem}: writing shard {shard} again")
        filesystem, path = out.join("stats", f"{shard}.json").resolve()
        filesystem.delete_file(path)  # unfinished until written again
    return [s for s in shards if shard_name(s.split, s.shard) not in finished]


def _list_numbered(item: tuple[int, ListingUnit]) -> tuple[int, Listed]:
    """A listing task that says which unit it listed (Ray returns results as they finish)."""
    number, unit = item
    return number, list_unit(unit)


class _SpaceNeed:
    """The space a run needs on a local --out: refused up front when short, stated when the disk fills."""

    def __init__(self, out: Location) -> None:
        self.out = out
        self.per_image: float | None = None  # bytes of one image's N samples, estimated by encoding a few
        self.pending: list[ShardRange] = []

    def check(self, options: PrepareOptions, plan: Plan, pending: list[ShardRange], estimate: dict | None) -> None:
        self.pending = pending
        free = free_bytes(self.out)
        if free is None or not pending:
            return
        estimate = estimate or estimate_sample_bytes(options, plan)
        self.per_image = (estimate["bytes_per_sample_per_sub_dataset"] or 0.0) * options.spec.split
        needed = self.per_image * sum(shard.end - shard.start for shard in pending)
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
            left = sum(s.end - s.start for s in self.pending if shard_name(s.split, s.shard) not in finished)
            text += f": about {_human(self.per_image * left)} more needed"
        free = free_bytes(self.out)
        if free is not None:
            text += f", {_human(free)} free"
        return text + "; free some space and rerun the same command to resume"


def _listing(options: PrepareOptions, units: list[ListingUnit], top_rejects: pa.Table, work: Location | None,
             mapper: Callable) -> tuple[pa.Table, pa.Table]:
    """Every unit's inputs, in unit order: list files streamed here, folders and tars listed by the workers.
    Cached in ``work`` (None: not cached)."""
    inputs_at, rejects_at = (work.join("inputs.parquet"), work.join("listing_rejects.parquet")) if work else (None,) * 2
    if work and exists(inputs_at) and exists(rejects_at):
        return read_table(inputs_at), read_table(rejects_at)
    listed: dict[int, Listed] = {number: list_unit(unit) for number, unit in enumerate(units) if unit.kind == "list"}
    remote = [(number, unit) for number, unit in enumerate(units) if unit.kind != "list"]
    listed.update(mapper(_list_numbered, remote))
    # Units finish in any order on Ray; unit order makes every table independent of scheduling.
    inputs, rejects = combine([listed[number] for number in sorted(listed)], top_rejects)
    del listed
    if inputs.num_rows == 0:
        raise ValueError(f"no images found in {', '.join(options.sources)} (layout {options.layout})")
    if work:
        write_table(inputs_at, inputs)
        write_table(rejects_at, rejects)
    return inputs, rejects


def _shard_size(options: PrepareOptions, plan: Plan, work: Location | None) -> tuple[int | None, dict | None]:
    """``--shard-size``, or the number of samples that makes one tar of one sub-dataset about ``--shard-bytes``.

    The estimate encodes a few planned images. A run keeps its first estimate in ``_work/shard_size.json``, so
    a rerun (even on a machine whose Pillow resizes a little differently) cuts the same shards.
    """
    cache = work is not None  # a real run; a dry run (no work folder) only estimates
    if options.plan.shard_size is not None:  # a real run needs no estimate then; a dry run shows one
        return options.plan.shard_size, estimate_sample_bytes(options, plan) if not cache else None
    at = work.join("shard_size.json") if cache else None
    if cache and exists(at):
        recorded = read_json(at)
        return recorded["shard_size"], recorded["estimate"]
    estimate = estimate_sample_bytes(options, plan)
    if not estimate["samples"] and not cache:
        return None, estimate  # the dry run says so
    if not estimate["samples"]:
        raise ValueError(f"none of the first {estimate['tried']} planned inputs could be read and encoded to size "
                         "the shards; check the inputs, or give --shard-size")
    size = shard_size_for(options.plan.shard_bytes, estimate["bytes_per_sample_per_sub_dataset"])
    if cache:
        write_json(at, {"shard_size": size, "estimate": estimate})
    return size, estimate


def shard_size_for(shard_bytes: int, bytes_per_sample: float) -> int:
    """Samples that make a tar of about ``shard_bytes``, rounded down to two significant digits (48,731 → 48,000):
    round numbers, and the same number for estimates a little apart."""
    count = max(1, int(shard_bytes // bytes_per_sample))
    unit = 10 ** max(0, len(str(count)) - 2)
    return count // unit * unit


def estimate_sample_bytes(options: PrepareOptions, plan: Plan) -> dict:
    """Encode the first planned images (a seeded random sample) and measure their bytes in a tar, members and
    headers included: ``{"bytes_per_sample_per_sub_dataset", "samples", "tried"}``."""
    from .decode import RejectedInput
    from .reader import SourceReader

    reader = SourceReader(options.spec.limits.max_file_bytes)
    sample_encoder, sizes = SampleEncoder(options.spec), []
    tried = min(plan.num_rows, ESTIMATE_ATTEMPTS)
    rows = plan.shard_rows(ShardRange("train", 0, 0, tried), max(1, tried)).to_pylist() if tried else []
    reader.expect([(row["source"], row["offset"], row["size"]) for row in rows])
    for row in rows:
        try:
            images, width, height = sample_encoder(reader.read(row["source"], row["offset"], row["size"]))
        except (RejectedInput, OSError):
            continue
        sizes.append(sum(sample_member_bytes(options.spec, row, image, width, height) for image in images)
                     / len(images))
        if len(sizes) == ESTIMATE_SAMPLES:
            break
    reader.close()
    return {"bytes_per_sample_per_sub_dataset": sum(sizes) / len(sizes) if sizes else None, "samples": len(sizes),
            "tried": tried}


def _run_shards(mapper: Callable, tasks: Iterable[ShardTask], total: int) -> dict:
    from tqdm import tqdm

    seconds: Counter = Counter()
    requests = 0
    with tqdm(total=total, unit="img", desc="prepare", file=sys.stderr, dynamic_ncols=True,
              disable=None if total else True) as bar:
        for stats in mapper(write_shard, tasks):
            seconds.update(stats["seconds"])
            requests += stats["requests"]
            bar.update(stats["samples"] + stats["rejected"])
    return {"seconds": dict(seconds), "requests": requests}


def _finalise(options: PrepareOptions, out: Location, plan: Plan, shards: list[ShardRange], shard_size: int,
              listing_rejects: pa.Table) -> tuple[DatasetCard, dict[str, str]]:
    """Manifest, rejects, class and shard tables from the shards' status and stats files, one shard at a time.

    Returns the card (not written yet) and the first reject's detail for each reason.
    """
    spec = options.spec
    written_per_class = {split: np.zeros(len(plan.classes), dtype=np.int64) for split in ("train", "val")}
    per_sub = np.zeros(spec.split, dtype=np.int64)
    samples = Counter()
    shard_rows, val_names, val_digests = [], [], []
    tally = _RejectTally()
    # Rejects in a fixed order (listing, planning, then shard by shard): the same file whatever the scheduling.
    with atomic_output(out.join("manifest.parquet")) as manifest_stream, \
            pq.ParquetWriter(manifest_stream, MANIFEST_SCHEMA) as manifest, \
            atomic_output(out.join("rejects.parquet")) as rejects_stream, \
            pq.ParquetWriter(rejects_stream, REJECTS_SCHEMA) as rejects:
        for table in (listing_rejects, *plan.rejects.tables(plan.inputs)):
            tally.add(table)
            rejects.write_table(table)
        for shard in shards:
            # The keys come from the shard's status table (made again from the plan, they would cost more than the
            # rest of finalising); its length and first and last keys must be the plan's.
            status = read_table(status_location(out, shard.split, shard.shard))
            ends = plan.key_at(shard.start, shard.start + 1), plan.key_at(shard.end - 1, shard.end)
            keys = status.column("key").combine_chunks()
            if len(keys) != shard.end - shard.start or [keys[0], keys[-1]] != [ends[0][0], ends[1][0]]:
                raise RuntimeError("shard status tables do not match the plan; delete OUT/stats and rerun")
            rows = plan.shard_rows(shard, shard_size, keys=keys)
            manifest.write_table(pa.table(
                {**{name: rows.column(name) for name in ("key", "label", "class", "split", "shard", "position",
                                                         "source", "member")},
                 **{name: status.column(name) for name in ("width", "height", "status", "reason")}},
                schema=MANIFEST_SCHEMA))
            written = pc.equal(status.column("status"), "written").to_numpy(zero_copy_only=False)
            labels = rows.column("label").to_numpy()
            written_per_class[shard.split] += np.bincount(labels[written], minlength=len(plan.classes))
            if not written.all():
                failed = rows.filter(pa.array(~written))
                sources = pc.coalesce(pc.binary_join_element_wise(failed.column("source"), failed.column("member"),
                                                                  "#"), failed.column("source"))
                bad = status.filter(pa.array(~written))
                table = pa.table({"source": sources, "reason": bad.column("reason"), "detail": bad.column("detail")},
                                 schema=REJECTS_SCHEMA)
                tally.add(table)
                rejects.write_table(table)
            stats = read_json(stats_location(out, shard.split, shard.shard))
            per_sub += np.asarray(stats["bytes"], dtype=np.int64)
            samples[shard.split] += stats["samples"]
            shard_rows.append(shards_table(shard.split, shard.shard, stats["samples"], stats["bytes"], stats["sha256"]))
            if shard.split == "val":  # write_shard hashes val shards only
                val_names.append(shard_file("val", shard.shard))
                val_digests.append(stats["sha256"])
    written_total = int(sum(samples.values()))
    rejected = sum(tally.counts.values())
    listed = plan.num_rows + plan.rejects.num_rows + listing_rejects.num_rows
    if written_total + rejected != listed:
        raise RuntimeError(f"counts do not reconcile: {listed} listed, {written_total} written, {rejected} rejected")
    classes = pa.table({"index": np.arange(len(plan.classes), dtype=np.int32), "name": plan.classes,
                        **written_per_class}, schema=CLASSES_SCHEMA)
    write_table(out.join("classes.parquet"), classes)
    scale, _ = decompose.dct_quantisation(spec.split) if spec.transform == "dct" else (None, None)
    write_table(out.join("shards.parquet"),
                pa.concat_tables(shard_rows) if shard_rows else SHARDS_SCHEMA.empty_table())
    total_bytes = int(per_sub.sum())
    splits = {split: SplitSummary(shards=sum(1 for s in shards if s.split == split), samples=samples[split])
              for split in ("train", "val")}
    splits["val"] = SplitSummary(splits["val"].shards, samples["val"], tuple(
        listing_sha256(val_names, [digests[k] for digests in val_digests]) for k in range(spec.split)))
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
        sample_json=spec.sample_json,
        seed=options.plan.seed,
        shard_size=shard_size,
        shard_bytes=None if options.plan.shard_size is not None else options.plan.shard_bytes,
        val_per_class=options.plan.val_per_class,
        min_per_class=options.plan.min_per_class,
        min_side=spec.limits.min_side,
        max_pixels=spec.limits.max_pixels,
        max_file_bytes=spec.limits.max_file_bytes,
        num_classes=len(plan.classes),
        class_table_sha256=class_table_sha256(plan.classes),
        sub_datasets=tuple(sub_dataset_names(spec.split)),
        splits=splits,
        counts=Counts(inputs=listed, written=written_total, rejected=rejected,
                      rejected_by_reason=dict(sorted(tally.counts.items())),
                      short_classes=short_classes(classes, options.plan)),
        bytes=ByteCounts(total=total_bytes, per_sub_dataset=tuple(per_sub.tolist()),
                         per_sample_per_sub_dataset=total_bytes / (written_total * spec.split) if written_total
                         else None),
        source=Source(uris=tuple(options.sources), layout=options.layout, label_field=options.label_field),
        pil=pil_flavour(),
    )
    return card, tally.examples


class _RejectTally:
    """Rejects per reason, and the first one's detail for each reason, over the tables written."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        firsts = table.group_by("reason", use_threads=False).aggregate(
            [("detail", "first"), ("detail", "count", pc.CountOptions(mode="all"))])
        for reason, detail, count in zip(*(firsts.column(c).to_pylist() for c in ("reason", "detail_first",
                                                                                  "detail_count")), strict=True):
            self.counts[reason] += count
            self.examples.setdefault(reason, detail)


def short_classes(classes: pa.Table, plan: PlanOptions) -> dict:
    """Classes that ended up with fewer written images than asked: ``--min-per-class`` and ``--val-per-class``
    count listed inputs when planning (before decoding), so inputs rejected later can leave a class short.
    ``{"min_per_class": [[name, written], ...], "val_per_class": [[name, val written], ...]}``"""
    names = np.asarray(classes.column("name").to_pylist(), dtype=object)
    train, val = classes.column("train").to_numpy(), classes.column("val").to_numpy()
    below_min = np.flatnonzero(train + val < plan.min_per_class)
    below_val = np.flatnonzero(val < plan.val_per_class) if plan.val_per_class else np.zeros(0, int)
    return {"min_per_class": [[str(names[i]), int(train[i] + val[i])] for i in below_min],
            "val_per_class": [[str(names[i]), int(val[i])] for i in below_val]}


def reject_failure(card: dict, max_fraction: float, options: PrepareOptions, examples: dict[str, str]) -> str | None:
    """The one line that stops a run which wrote nothing or rejected more than ``max_fraction`` of its inputs."""
    counts = card["counts"]
    inputs, rejected, written = counts["inputs"], counts["rejected"], counts["written"]
    if written > 0 and rejected <= max_fraction * inputs:
        return None
    by_reason = counts["rejected_by_reason"]
    if not by_reason:
        return f"nothing written: {inputs} inputs"
    reason = max(sorted(by_reason), key=by_reason.get)
    limits = options.spec.limits
    hint = REJECT_HINTS.get(reason, DAMAGED_HINT).format(
        min_side=limits.min_side, max_pixels=limits.max_pixels, min_per_class=options.plan.min_per_class,
        layout=options.layout)
    example = examples.get(reason)
    how = f"{rejected:,} of {inputs:,} inputs rejected"
    if by_reason[reason] == rejected:
        how += f" as {reason}"
    else:
        how += f" ({rejected / inputs:.0%} > --max-reject-fraction {max_fraction:g}), {by_reason[reason]:,} as {reason}"
    detail = f" (e.g. {example})" if example else ""
    return f"{how}{detail}: {hint}; see {options.out}/rejects.parquet"


def _dry_run(options: PrepareOptions, plan: Plan, listing_rejects: pa.Table, shard_size: int | None,
             estimate: dict, listing_workers: int, log: Callable[[str], None]) -> dict:
    spec = options.spec
    sizes = plan.split_sizes()
    shards = plan.shards(shard_size) if shard_size else []
    per_sample = estimate["bytes_per_sample_per_sub_dataset"]
    tally = _RejectTally()
    tally.add(listing_rejects)
    tally.add(pa.table({"reason": pc.cast(plan.rejects.reason, pa.string()),
                        "detail": pa.nulls(plan.rejects.num_rows, pa.string())}))
    before = listing_rejects.num_rows + plan.rejects.num_rows
    planned_classes = plan.planned_per_class()
    short_val = int(np.sum(planned_classes["val"] < options.plan.val_per_class)) if options.plan.val_per_class else 0
    planned = {
        "classes": len(plan.classes),
        "images": sizes,
        "shard_size": shard_size,
        "shards": {split: sum(1 for s in shards if s.split == split) for split in ("train", "val")},
        "rejected_before_decoding": before,
        "rejected_before_decoding_by_reason": dict(sorted(tally.counts.items())),
        "classes_below_val_per_class": short_val,
        "sub_datasets": spec.split,
        "estimated_bytes_per_sample_per_sub_dataset": per_sample,
        "estimated_total_bytes": int(per_sample * plan.num_rows * spec.split) if per_sample else None,
        "estimated_tar_bytes": int(per_sample * min(shard_size, max(sizes.values())))
        if per_sample and shard_size else None,
        "listing_workers": listing_workers,
    }
    log(f"dry run (nothing written) for {options.out}:")
    more = " …" if len(plan.classes) > 5 else ""
    log(f"  classes: {planned['classes']} (first: {', '.join(plan.classes[:5])}{more})")
    by_reason = ", ".join(f"{k} {v}" for k, v in planned["rejected_before_decoding_by_reason"].items())
    log(f"  images: train {sizes['train']}, val {sizes['val']}; rejected before decoding: {before}"
        + (f" ({by_reason})" if by_reason else ""))
    if short_val:
        log(f"  warning: {short_val} classes list fewer than --val-per-class {options.plan.val_per_class} + 1 images "
            "and get fewer val images")
    geometry = (f"{spec.split} sub-datasets of {spec.size}×{spec.size} from {spec.image_size}×{spec.image_size} "
                f"({spec.resize_mode}, transform {spec.transform}, {spec.image_format})")
    if shard_size:
        origin = ("--shard-size" if options.plan.shard_size is not None else
                  f"about {_human(options.plan.shard_bytes)} per tar (--shard-bytes)")
        log(f"  shards per sub-dataset: train {planned['shards']['train']}, val {planned['shards']['val']} "
            f"of {shard_size} samples ({origin}) × {geometry}")
    else:
        log(f"  shards: unknown (sized from encoded images, and none could be read; or give --shard-size) × {geometry}")
    if per_sample:
        tars = f", {(planned['shards']['train'] + planned['shards']['val']) * spec.split} tars of up to " \
               f"{_human(planned['estimated_tar_bytes'])}" if shard_size else ""
        log(f"  estimated output: {_human(planned['estimated_total_bytes'])}{tars} "
            f"(≈{per_sample:.0f} bytes per sample per sub-dataset, from {estimate['samples']} encoded images)")
    elif estimate is not None:
        log(f"  estimated output: unknown (none of the first {estimate['tried']} planned inputs could be read)")
    log(f"  listed {'in parallel by ' + str(listing_workers) + ' worker(s)' if listing_workers > 1 else 'here'}")
    return planned


def format_summary(summary: dict) -> str:
    counts, run = summary["counts"], summary["run"]
    per_sample = summary["bytes"]["per_sample_per_sub_dataset"]
    rate = run["images_per_second"]
    lines = [
        f"done: {counts['written']} written + {counts['rejected']} rejected = {counts['inputs']} inputs "
        f"(reconciled) into {summary['split']} sub-datasets, {summary['num_classes']} classes",
        "  splits: " + ", ".join(f"{k} {v['samples']} samples / {v['shards']} shards"
                                 for k, v in summary["splits"].items()),
        f"  written: {_human(summary['bytes']['total'])} "
        + (f"({per_sample:.0f} bytes per sample per sub-dataset)" if per_sample is not None else "(no sample)"),
        f"  throughput: {f'{rate:.1f} images/s' if rate is not None else 'n/a'} over {run['seconds']:.1f} s "
        f"(+{run['startup_seconds']:.1f} s start-up); {summary['pil']}",
    ]
    if run["images"]:
        lines.append(f"  reads: {run['requests']} requests for {run['images']} images "
                     f"({run['requests'] / run['images']:.2f} per image)")
    if counts["rejected_by_reason"]:
        lines.append("  rejected: " + ", ".join(f"{k} {v}" for k, v in counts["rejected_by_reason"].items())
                     + "  (see rejects.parquet)")
        if counts["rejected_by_reason"].get(RejectReason.TOO_SMALL.value):
            lines.append(f"  {RejectReason.TOO_SMALL}: shorter side under --min-side {summary['min_side']} px "
                         f"(images are resized to {summary['image_size']}×{summary['image_size']}; "
                         "a lower --min-side keeps smaller ones, upscaled)")
    for field, option in (("min_per_class", "--min-per-class"), ("val_per_class", "--val-per-class")):
        short = counts["short_classes"][field]
        if short:
            examples = ", ".join(f"{name} {count}" for name, count in short[:5]) + (" …" if len(short) > 5 else "")
            lines.append(f"  warning: {len(short)} classes got fewer written {'val ' if 'val' in field else ''}"
                         f"images than {option} asked after rejects ({examples}); classes.parquet has every count")
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


def read_table(loc: Location) -> pa.Table:
    # One thread: these tables are small, and a read on Arrow's thread pool can abort the process at exit
    # ("terminate called without an active exception", apache/arrow#34314; seen in 3 of 47 serial runs here).
    filesystem, path = loc.resolve()
    with filesystem.open_input_file(path) as handle:
        return pq.read_table(handle, use_threads=False)


def write_table(loc: Location, table: pa.Table) -> None:
    with atomic_output(loc) as stream:
        pq.write_table(table, stream)

