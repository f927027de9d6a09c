"""Inputs → plan: classes, keys, splits, shard and position of every input. Pure (Arrow and numpy in and out).

Everything downstream follows this plan, which is why the N sub-datasets align: a shard task
writes shard j of all N sub-datasets from the plan's rows for shard j, in plan order.

Built for the 13 M inputs of ImageNet-21K in a driver of a few GB: no Python object per input.
Keys, hashes, duplicates, the class filter, the val hold-out and the shuffle are Arrow kernels and
numpy over the compact input table. The plan keeps, per planned input, its row in that table, its
key and its label, in plan order; a shard's ``PLAN_SCHEMA`` rows are built when its task is made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from subspectral.schemas.reasons import RejectReason
from subspectral.schemas.tables import PLAN_SCHEMA, REJECTS_SCHEMA

from .hashing import blake2b64, hex_prefix
from .listing import source_uris, sources_and_members

MAX_KEY_LENGTH = 80  # keeps every tar member name (key + extension) inside ustar's 100 bytes
SUFFIX_DIGITS = 10  # hex digits of the source's hash appended to colliding keys
KEY_CHUNK = 1 << 20  # inputs whose keys are cleaned at once (the strings of one chunk are held, not all)
DEFAULT_SHARD_BYTES = 256 * 10**6  # target size of one tar of one sub-dataset when --shard-size is not given
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # spreads folder codes over 64 bits before mixing them into a hash


@dataclass(frozen=True)
class PlanOptions:
    shard_size: int | None  # samples per shard; None: prepare derives it from shard_bytes
    seed: int
    val_per_class: int = 0
    min_per_class: int = 0
    shard_bytes: int = DEFAULT_SHARD_BYTES


@dataclass(frozen=True)
class ShardRange:
    """Shard ``shard`` of ``split``: plan positions ``start`` (inclusive) to ``end``."""

    split: str
    shard: int
    start: int
    end: int


@dataclass(frozen=True)
class Keys:
    """Keys of input rows: each row's cleaned name (``clean_keys``), except the renamed rows (collisions)."""

    renamed_rows: np.ndarray  # input rows whose key is not their cleaned name, ascending
    renamed_keys: pa.Array  # their keys

    def of(self, inputs: pa.Table, rows: np.ndarray) -> pa.Array:
        keys = clean_keys(take_rows(inputs.select(["entry"]), rows).column(0))
        if not len(self.renamed_rows) or not len(rows):
            return keys
        at = np.searchsorted(self.renamed_rows, rows).clip(max=len(self.renamed_rows) - 1)
        found = self.renamed_rows[at] == rows
        if not found.any():
            return keys
        return pc.replace_with_mask(keys, pa.array(found), self.renamed_keys.take(pa.array(at[found])))


@dataclass(frozen=True)
class PlanRejects:
    """Inputs that planning drops, kept compact (1.6 M of them in 21K-P): input rows, reasons and details
    (dictionary-encoded); ``tables`` writes them out as ``REJECTS_SCHEMA`` rows, a chunk at a time."""

    rows: np.ndarray  # int32 input rows
    reason: pa.Array  # dictionary<int32, string>
    detail: pa.Array  # dictionary<int32, string>

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def tables(self, inputs: pa.Table, chunk: int = KEY_CHUNK) -> Iterator[pa.Table]:
        for start in range(0, self.num_rows, chunk):
            rows = pa.array(self.rows[start : start + chunk])
            yield pa.table({"source": source_uris(inputs.take(rows)),
                            "reason": pc.cast(self.reason.slice(start, chunk), pa.string()),
                            "detail": pc.cast(self.detail.slice(start, chunk), pa.string())}, schema=REJECTS_SCHEMA)

    def table(self, inputs: pa.Table) -> pa.Table:
        """All of them at once (for small plans and tests)."""
        return pa.concat_tables([REJECTS_SCHEMA.empty_table(), *self.tables(inputs)])


@dataclass
class Plan:
    """Per planned input, in plan order (train inputs first, then val): its input row and label. Keys are
    made again from the input table when needed (``key_at``): holding 13 M of them would cost ~330 MB."""

    inputs: pa.Table  # INPUTS_SCHEMA: every listed input, planned or not
    rows: np.ndarray  # int32 input row of each planned input, in plan order
    labels: np.ndarray  # int32 class index of each planned input, in plan order
    keys: Keys
    num_train: int
    classes: list[str]  # index → class name
    rejects: PlanRejects  # inputs dropped by planning (duplicate_input, below_min_per_class)

    def key_at(self, start: int, end: int) -> pa.Array:
        """The keys of plan positions ``start`` to ``end`` (unique across the plan)."""
        return self.keys.of(self.inputs, self.rows[start:end])

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_rows - self.num_train}

    def shards(self, shard_size: int) -> list[ShardRange]:
        """Every shard, train then val, each split numbered from 0."""
        if shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
        ranges = []
        for split, first, last in (("train", 0, self.num_train), ("val", self.num_train, self.num_rows)):
            for shard, start in enumerate(range(first, last, shard_size)):
                ranges.append(ShardRange(split, shard, start, min(start + shard_size, last)))
        return ranges

    def shard_rows(self, shard: ShardRange, shard_size: int, keys: pa.Array | None = None) -> pa.Table:
        """The ``PLAN_SCHEMA`` rows of one shard, in position order, in buffers of their own (a slice
        would carry, and ship to a Ray worker, the buffers of the whole plan). ``keys``: the shard's keys when
        known (as written by its task), instead of making them again."""
        positions = np.arange(shard.start, shard.end)
        inputs = take_rows(self.inputs, self.rows[shard.start : shard.end])
        source, member = sources_and_members(inputs)
        first = 0 if shard.split == "train" else self.num_train
        count = shard.end - shard.start
        return pa.table(
            {
                "key": self.key_at(shard.start, shard.end) if keys is None else keys,
                "label": pa.array(self.labels[shard.start : shard.end].copy(), pa.int32()),
                "class": pc.cast(inputs.column("class"), pa.string()),
                "split": pa.repeat(pa.scalar(shard.split), count),
                "shard": pa.repeat(pa.scalar(shard.shard, pa.int32()), count),
                "position": pa.array((positions - first) % shard_size, pa.int32()),
                "source": source,
                "member": member,
                "offset": inputs.column("offset"),
                "size": inputs.column("size"),
            },
            schema=PLAN_SCHEMA,
        ).combine_chunks()

    def planned_per_class(self) -> dict[str, np.ndarray]:
        """Planned inputs per class index and split (before decoding)."""
        split_of = np.arange(self.num_rows) >= self.num_train
        return {split: np.bincount(self.labels[split_of == (split == "val")], minlength=len(self.classes))
                for split in ("train", "val")}


def take_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table.take(rows)`` in time that grows with ``len(rows)``, not with the table: Arrow's take on a
    table of several chunks concatenates them first (a copy of the whole table per call: shard after shard
    at 13 M inputs, a cost of rows x shards)."""
    batches = table.to_batches()  # zero-copy views, one per chunk
    if len(batches) <= 1:
        return table.take(pa.array(rows, pa.int64()))
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.cumsum([0] + [batch.num_rows for batch in batches])
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    cuts = np.searchsorted(ordered, starts)
    parts = [batches[b].take(pa.array(ordered[cuts[b]:cuts[b + 1]] - starts[b]))
             for b in range(len(batches)) if cuts[b + 1] > cuts[b]]
    taken = pa.Table.from_batches(parts, schema=table.schema).combine_chunks()
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return taken.take(pa.array(inverse))


def make_plan(inputs: pa.Table, options: PlanOptions) -> Plan:
    inputs = inputs.unify_dictionaries()
    class_names, class_codes = dictionary_codes(inputs.column("class"))
    duplicate, duplicate_detail = _duplicates(inputs)
    counts = np.bincount(class_codes[~duplicate], minlength=len(class_names))
    kept = [i for i in range(len(class_names)) if counts[i] > 0 and counts[i] >= options.min_per_class]
    classes = order_classes([class_names[i] for i in kept])
    label_of_code = np.full(len(class_names), -1, dtype=np.int32)
    index = {name: label for label, name in enumerate(classes)}
    label_of_code[kept] = [index[class_names[i]] for i in kept]
    labels = label_of_code[class_codes]
    too_rare = ~duplicate & (labels < 0)
    rejects = _plan_rejects(duplicate, duplicate_detail, too_rare, class_codes, class_names, counts,
                            options.min_per_class)
    planned = _indices(~duplicate & ~too_rare)
    del duplicate, too_rare, class_codes
    keys, order_hash = make_keys(inputs, planned, options.seed)
    labels = labels[planned]
    _, split_codes = dictionary_codes(inputs.column("split"), rows=planned)
    split_names = inputs.column("split").unify_dictionaries().chunk(0).dictionary.to_pylist() if inputs.num_rows else []
    val_code = split_names.index("val") if "val" in split_names else -2

    def key_of(positions: np.ndarray) -> pa.Array:
        return keys.of(inputs, planned[positions])

    is_val = _assign_val(split_codes, val_code, labels, order_hash, key_of, options.val_per_class)
    del split_codes
    num_train = len(is_val) - int(is_val.sum())
    # Train before val, each shuffled by the seeded hash: one sort of all planned inputs, no copy of the hashes.
    order = hash_order(order_hash, key_of, np.arange(len(planned), dtype=np.int32), groups=is_val)
    return Plan(inputs, planned[order], labels[order], keys, num_train, classes, rejects)


def dictionary_codes(column: pa.ChunkedArray, rows: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """A dictionary column's values and each row's int32 code (-1 for null), optionally at ``rows`` only."""
    column = column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])
    if column.num_chunks and not all(chunk.dictionary.equals(column.chunk(0).dictionary) for chunk in column.chunks):
        column = column.unify_dictionaries()
    values = column.chunk(0).dictionary.to_pylist() if column.num_chunks else []
    parts = [chunk.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
             for chunk in column.chunks]
    codes = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return values, codes if rows is None else codes[rows]


def order_classes(names: list[str]) -> list[str]:
    """Class index order: by name, or by number when every name is a decimal integer (.cls labels, numeric lists)."""
    if names and all(name.isdecimal() and name.isascii() for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def clean_keys(entries: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each file or member name's stem, every character outside [A-Za-z0-9_-] replaced by ``_``, ≤ 80 characters."""
    if isinstance(entries, pa.ChunkedArray):
        entries = entries.combine_chunks() if entries.num_chunks else pa.array([], pa.string())
    # Each regex pass costs ~0.15 µs per name: skipped where no name needs it (names of files hold no "/";
    # ImageNet's hold no odd character).
    if pc.any(pc.match_substring(entries, "/")).as_py():
        entries = pc.replace_substring_regex(entries, r"^.*/", "")
    stems = pc.replace_substring_regex(entries, r"\.[^.]*$", "")
    if pc.any(pc.match_substring_regex(stems, r"[^A-Za-z0-9_-]")).as_py():
        stems = pc.replace_substring_regex(stems, r"[^A-Za-z0-9_-]", "_")
    return pc.utf8_slice_codeunits(stems, 0, MAX_KEY_LENGTH)


def make_keys(inputs: pa.Table, planned: np.ndarray, seed: int) -> tuple[Keys, np.ndarray]:
    """The keys of the planned input rows, and each one's seeded order hash.

    A key is the name's cleaned stem (``clean_keys``); where that is empty or shared by several inputs,
    each of them gets ``-`` and the first 10 hex digits of the BLAKE2b hash of its source URI (16
    digits, on a shorter stem, if a collision remains). Keys are unique, and do not depend on listing
    order. Cleaned in chunks, so that only the hashes of all the keys are held at once.
    """
    salt = order_salt(seed)
    entries, names = inputs.column("entry"), inputs.select(["entry"])
    hashes = np.empty(len(planned), np.uint64)
    empty = []
    for start in range(0, len(planned), KEY_CHUNK):
        keys = clean_keys(take_rows(names, planned[start : start + KEY_CHUNK]).column(0))
        hashes[start : start + len(keys)] = blake2b64(keys, salt)
        empty.append(start + np.flatnonzero(pc.equal(pc.utf8_length(keys), 0).to_numpy(zero_copy_only=False)))
    renamed = Keys(np.zeros(0, np.int32), pa.array([], pa.string()))

    def key_of(positions: np.ndarray) -> pa.Array:
        return renamed.of(inputs, planned[positions])

    for round_, (digits, stem_length) in enumerate(((SUFFIX_DIGITS, MAX_KEY_LENGTH), (16, MAX_KEY_LENGTH - 17))):
        clash = _shared(hashes, key_of)
        if round_ == 0 and empty:
            clash = np.union1d(clash, np.concatenate(empty)).astype(np.int64)
        if not len(clash):
            return renamed, hashes
        stem = pc.utf8_slice_codeunits(clean_keys(pc.take(entries, pa.array(planned[clash]))), 0, stem_length)
        suffix = hex_prefix(blake2b64(source_uris(inputs.take(pa.array(planned[clash])))), digits)
        new = pc.if_else(pc.equal(stem, ""), suffix, pc.binary_join_element_wise(stem, suffix, "-"))
        hashes[clash] = blake2b64(new, salt)
        stay = ~np.isin(renamed.renamed_rows, planned[clash])
        rows = np.concatenate([renamed.renamed_rows[stay], planned[clash]])
        keys = pa.concat_arrays([renamed.renamed_keys.filter(pa.array(stay)), new])
        order = np.argsort(rows, kind="stable")
        renamed = Keys(rows[order].astype(np.int32), keys.take(pa.array(order)))
    clash = _shared(hashes, key_of)
    if len(clash):
        raise ValueError(f"two inputs get the same key {key_of(clash[:1])[0]}; rename one of them")
    return renamed, hashes


def order_salt(seed: int) -> bytes:
    """The salt of the order hash: a given key and seed give the same hash on every machine."""
    return f"{seed}:order".encode()[:16]


def _shared(hashes: np.ndarray, key_of: Callable[[np.ndarray], pa.Array]) -> np.ndarray:
    """Positions whose key occurs more than once (equal hashes find candidates, the keys confirm them)."""
    candidates = _repeated(hashes)
    if not len(candidates):
        return candidates
    values = key_of(candidates)
    counts = pc.value_counts(values)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    return candidates[pc.is_in(values, repeated).to_numpy(zero_copy_only=False)]


def _repeated(hashes: np.ndarray) -> np.ndarray:
    """Indices whose hash occurs more than once, in ascending order."""
    ordered = np.sort(hashes)
    twice = ordered[1:][ordered[1:] == ordered[:-1]]
    del ordered
    return np.flatnonzero(np.isin(hashes, twice)) if len(twice) else np.zeros(0, np.int64)


def _duplicates(inputs: pa.Table) -> tuple[np.ndarray, dict[int, str]]:
    """Inputs listed more than once (same folder or tar, same name), to be rejected as ``duplicate_input``.

    Copies that agree in everything (member offset, size, class, split) keep one of them, the first
    listed (they are the same input); copies that disagree (two labels, both splits, two members of
    one name) are all rejected: no choice between them would be right.
    """
    _, parent_codes = dictionary_codes(inputs.column("parent"))
    identity = np.empty(inputs.num_rows, np.uint64)
    entries = inputs.column("entry")
    for start in range(0, inputs.num_rows, KEY_CHUNK):  # a chunk at a time: no row-sized temporaries
        spread = parent_codes[start : start + KEY_CHUNK].astype(np.uint64)
        spread *= _GOLDEN
        identity[start : start + len(spread)] = blake2b64(entries.slice(start, KEY_CHUNK)) ^ spread
    del parent_codes
    duplicate = np.zeros(inputs.num_rows, dtype=bool)
    details: dict[int, str] = {}
    candidates = _repeated(identity)
    if not len(candidates):
        return duplicate, details
    # Candidates are few: they are checked one by one.
    rows = inputs.take(pa.array(candidates)).to_pylist()
    groups: dict[tuple[int, str], list[int]] = {}
    for position, row in enumerate(rows):
        groups.setdefault((row["parent"], row["entry"]), []).append(position)
    for members in groups.values():
        if len(members) < 2:
            continue
        shapes = {(rows[p]["offset"], rows[p]["size"], rows[p]["class"], rows[p]["split"]) for p in members}
        agree = len(shapes) == 1
        for p in members[1:] if agree else members:
            row = int(candidates[p])
            duplicate[row] = True
            labels = sorted({str(rows[q]["class"]) for q in members})
            details[row] = (f"listed {len(members)} times" if agree else
                            f"listed {len(members)} times, differently (labels {', '.join(labels)})")
    return duplicate, details


def _plan_rejects(duplicate: np.ndarray, duplicate_detail: dict[int, str], too_rare: np.ndarray,
                  class_codes: np.ndarray, class_names: list[str], counts: np.ndarray,
                  min_per_class: int) -> PlanRejects:
    duplicates = _indices(duplicate)
    rare = _indices(too_rare)
    details = [f"class {name} has {count} images, fewer than --min-per-class {min_per_class}"
               for name, count in zip(class_names, counts.tolist(), strict=True)]  # one per class, not per input
    duplicate_text = sorted(set(duplicate_detail.values()))
    code_of = {text: len(details) + i for i, text in enumerate(duplicate_text)}
    detail_codes = np.concatenate([np.array([code_of[duplicate_detail[int(row)]] for row in duplicates], np.int32),
                                   class_codes[rare].astype(np.int32)])
    reason_codes = np.concatenate([np.zeros(len(duplicates), np.int32), np.ones(len(rare), np.int32)])
    return PlanRejects(
        np.concatenate([duplicates, rare]),
        pa.DictionaryArray.from_arrays(pa.array(reason_codes), pa.array([RejectReason.DUPLICATE_INPUT.value,
                                                                         RejectReason.BELOW_MIN_PER_CLASS.value])),
        pa.DictionaryArray.from_arrays(pa.array(detail_codes), pa.array(details + duplicate_text, pa.string())),
    )


def _assign_val(split_codes: np.ndarray, val_code: int, labels: np.ndarray, order_hash: np.ndarray,
                key_of: Callable[[np.ndarray], pa.Array], val_per_class: int) -> np.ndarray:
    """A source's own train/val is kept; otherwise each class's N lowest-hash inputs go to val.

    A class keeps at least one training image: it gives min(N, count − 1) to val.
    """
    is_val = split_codes == val_code
    free = _indices(split_codes < 0)
    if val_per_class <= 0 or not len(free):
        return is_val
    if len(free) == len(split_codes):  # no split given: every input is free, and no copies are needed
        free = hash_order(order_hash, key_of, free, groups=labels)
    else:
        free = free[hash_order(order_hash[free], key_of, free, groups=labels[free])]
    class_of = labels[free]
    # Rank of each input within its class (free inputs sorted by class, then hash): index − first index of its class.
    first = np.flatnonzero(np.r_[True, class_of[1:] != class_of[:-1]]).astype(np.int32)
    rank = np.zeros(len(free), np.int32)
    rank[first] = first
    np.maximum.accumulate(rank, out=rank)
    np.subtract(np.arange(len(free), dtype=np.int32), rank, out=rank)
    take = np.minimum(val_per_class, np.bincount(class_of, minlength=class_of.max() + 1) - 1).astype(np.int32)
    is_val[free[rank < take[class_of]]] = True
    return is_val


def _indices(mask: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(mask)`` as int32 (half the memory of int64 per input; inputs are fewer than 2³¹)."""
    return np.flatnonzero(mask).astype(np.int32)


def hash_order(hashes: np.ndarray, key_of: Callable[[np.ndarray], pa.Array], positions: np.ndarray,
                groups: np.ndarray | None = None) -> np.ndarray:
    """The order of ``positions`` by (group, hash), equal hashes broken by key: a seeded shuffle that does not
    depend on the order of the inputs. ``hashes`` and ``groups`` (≥ 0) are given per entry of ``positions``.

    One sort of one 64-bit key per input: the group in the top bits, the hash's top bits below it (a lexsort
    of two keys needs several times the memory, at 13 M inputs hundreds of MB). Equal keys (the same group
    and the same top bits: essentially never) are then ordered by the full hash, then the key.
    """
    if groups is None:
        bits, composite = 0, hashes
    else:
        bits = max(1, int(groups.max()).bit_length()) if len(groups) else 1
        composite = groups.astype(np.uint64) << np.uint64(64 - bits)
        composite |= hashes >> np.uint64(bits)
    order = np.argsort(composite).astype(np.int32)
    ties = []
    for start in range(0, len(order), KEY_CHUNK):  # equal neighbours, found a chunk at a time
        ordered = composite[order[start : start + KEY_CHUNK + 1]]
        ties.append(start + np.flatnonzero(ordered[1:] == ordered[:-1]))
    del composite
    tie = np.concatenate(ties) if ties else np.zeros(0, np.int64)
    if len(tie):
        breaks = np.flatnonzero(np.diff(tie) > 1)
        for start, last in zip(tie[np.r_[0, breaks + 1]].tolist(), tie[np.r_[breaks, len(tie) - 1]].tolist(),
                               strict=True):
            run = order[start : last + 2]
            names = key_of(positions[run]).to_pylist()
            order[start : last + 2] = run[sorted(range(len(run)), key=lambda i: (int(hashes[run[i]]), names[i]))]
    return order
