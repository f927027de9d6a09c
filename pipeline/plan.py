"""Inputs → plan: classes, keys, splits, shard and position of every input. Pure (Arrow in, Arrow out).

Everything downstream follows this plan, which is why the N sub-datasets align: a shard task
writes shard j of all N sub-datasets from the plan's rows for shard j, in plan order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from subspectral.schemas.reasons import RejectReason
from subspectral.schemas.tables import PLAN_SCHEMA, REJECTS_SCHEMA

MAX_KEY_LENGTH = 80  # keeps every tar member name (key + extension) inside ustar's 100 bytes


@dataclass(frozen=True)
class PlanOptions:
    shard_size: int
    seed: int
    val_per_class: int = 0
    min_per_class: int = 0


@dataclass
class Plan:
    rows: pa.Table  # PLAN_SCHEMA, sorted by (split, shard, position)
    classes: list[str]  # index → class name
    rejects: pa.Table  # inputs dropped by planning (below_min_per_class)


def seeded_hash(values: list[str], seed: int, purpose: str) -> np.ndarray:
    """Stable 64-bit hashes: the same key and seed give the same number on every machine and run."""
    salt = f"{seed}:{purpose}".encode()[:16]
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8, salt=salt).digest(), "little") for v in values),
        dtype=np.uint64,
        count=len(values),
    )


def make_keys(names: pa.Array, sources: list[str]) -> list[str]:
    """Keys from file names: stem, [A-Za-z0-9_-] only, ≤ 80 chars; colliding keys all get a hash suffix."""
    stems = pc.replace_substring_regex(names, r"\.[^.]*$", "")
    cleaned = pc.utf8_slice_codeunits(pc.replace_substring_regex(stems, r"[^A-Za-z0-9_-]", "_"), 0, MAX_KEY_LENGTH)
    keys = cleaned.to_pylist()
    counts = pc.value_counts(cleaned)
    duplicated = {item["values"] for item in counts.to_pylist() if item["counts"] > 1}
    for index, key in enumerate(keys):
        if key in duplicated or not key:
            digest = hashlib.sha1(sources[index].encode()).hexdigest()[:10]
            keys[index] = f"{key}-{digest}" if key else digest
    return keys


def make_plan(inputs: pa.Table, options: PlanOptions) -> Plan:
    if options.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {options.shard_size}")
    sources = source_uris(inputs).to_pylist()
    counts = {item["values"]: item["counts"] for item in pc.value_counts(inputs.column("class")).to_pylist()}
    kept = sorted(name for name, count in counts.items() if count >= options.min_per_class)
    keep_mask = pc.is_in(inputs.column("class"), pa.array(kept, pa.string()))
    dropped = inputs.filter(pc.invert(keep_mask))
    rejects = pa.table(
        {
            "source": [sources[i] for i in np.flatnonzero(~keep_mask.to_numpy(zero_copy_only=False))],
            "reason": [RejectReason.BELOW_MIN_PER_CLASS.value] * dropped.num_rows,
            "detail": [f"class {c} has fewer than {options.min_per_class} images" for c in
                       dropped.column("class").to_pylist()],
        },
        schema=REJECTS_SCHEMA,
    )
    inputs = inputs.filter(keep_mask)
    sources = [sources[i] for i in np.flatnonzero(keep_mask.to_numpy(zero_copy_only=False))]
    keys = make_keys(inputs.column("name"), sources)
    order_hash = seeded_hash(keys, options.seed, "order")
    labels = pc.index_in(inputs.column("class"), pa.array(kept, pa.string())).to_numpy().astype(np.int32)
    splits = _assign_splits(inputs.column("split").to_pylist(), labels, order_hash, options.val_per_class)

    key_array = np.array(keys, dtype=object)
    shard = np.zeros(len(keys), dtype=np.int32)
    position = np.zeros(len(keys), dtype=np.int32)
    order_parts = []
    for split in ("train", "val"):
        members = np.flatnonzero(splits == split)
        # Seeded shuffle before sharding (each shard mixes classes); the key breaks hash ties.
        members = members[np.lexsort((key_array[members], order_hash[members]))]
        rank = np.arange(len(members))
        shard[members] = rank // options.shard_size
        position[members] = rank % options.shard_size
        order_parts.append(members)
    order = np.concatenate(order_parts) if order_parts else np.zeros(0, dtype=np.int64)
    rows = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "label": pa.array(labels, pa.int32()),
            "class": inputs.column("class"),
            "split": pa.array(splits.tolist(), pa.string()),
            "shard": pa.array(shard, pa.int32()),
            "position": pa.array(position, pa.int32()),
            "source": inputs.column("source"),
            "member": inputs.column("member"),
            "offset": inputs.column("offset"),
            "size": inputs.column("size"),
        },
        schema=PLAN_SCHEMA,
    ).take(pa.array(order, pa.int64()))
    return Plan(rows, kept, rejects)


def source_uris(table: pa.Table) -> pa.Array:
    """One URI per input row; a class-tar member is ``TAR_URI#MEMBER``."""
    joined = pc.binary_join_element_wise(table.column("source"), table.column("member"), "#")
    return pc.coalesce(joined, table.column("source"))


def _assign_splits(
    given: list[str | None], labels: np.ndarray, order_hash: np.ndarray, val_per_class: int
) -> np.ndarray:
    """A source's own train/val is kept; otherwise each class's N lowest-hash inputs go to val.

    A class keeps at least one training image: it gives min(N, count − 1) to val.
    """
    splits = np.array([s if s is not None else "" for s in given], dtype=object)
    free = splits == ""
    splits[free] = "train"
    if val_per_class > 0 and free.any():
        candidates = np.flatnonzero(free)
        by_class = candidates[np.lexsort((order_hash[candidates], labels[candidates]))]
        class_of = labels[by_class]
        starts = np.flatnonzero(np.r_[True, class_of[1:] != class_of[:-1]])
        ends = np.r_[starts[1:], len(by_class)]
        for start, end in zip(starts, ends, strict=True):
            take = min(val_per_class, end - start - 1)
            splits[by_class[start : start + take]] = "val"
    return splits
