"""Stream several aligned sub-datasets in lockstep, batch by batch (docs/format.md, "Alignment").

Sample i of the concatenated val shards is the same image in every sub-dataset. Each stream reads
its shards one at a time (local paths or object-store URIs, through the trainer's ``train.storage``
and ``train.shards``), so the val set is never held in memory. Every batch checks that all streams
hold the same keys and labels and stops with a one-line ``MisalignedError`` naming the first
difference. A stream given its shards' SHA-256s (shards.parquet) checks each shard against them,
so a sub-dataset's shard replaced by another's (same keys, other images) stops the evaluation too.
A sample that cannot be decoded in any stream is dropped from all of them (and counted in
``skipped``), so the members always see the same images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from subspectral.train.shards import CorruptShard, Sample, decode_into, iter_samples, to_sample
from subspectral.train.storage import read_bytes


class MisalignedError(ValueError):
    """The streams disagree (keys, labels, length), a shard is missing, or a shard is not the one prepared for
    its sub-dataset: samples cannot be paired."""


@dataclass(frozen=True)
class Stream:
    """One sub-dataset's split: a name for messages, its shard URIs in order, its sample shape and dtype,
    and the SHA-256 of each shard when they are known."""

    name: str
    shards: Sequence[str]
    shape: tuple[int, int, int]  # H, W, C as stored
    dtype: np.dtype
    sha256: Sequence[str] | None = None  # per shard, in the order of ``shards``

    def part(self, rank: int, world: int) -> Stream:
        """Shards rank, rank + world, …: one worker's share."""
        digests = None if self.sha256 is None else self.sha256[rank::world]
        return Stream(self.name, self.shards[rank::world], self.shape, self.dtype, digests)


@dataclass
class LockstepBatch:
    keys: list[str]
    labels: np.ndarray  # int64 [B]
    images: list[np.ndarray]  # one [B, H, W, C] array per stream, in the order the streams were given
    shards: np.ndarray  # int64 [B]: each sample's shard index in the first stream's shard list


@dataclass(frozen=True)
class _Entry:
    shard: int
    key: str
    sample: Sample | None  # None: no label or image member that parses
    where: str  # shard URI and position, for messages
    foreign: str | None = None  # why its shard is not the one prepared for this stream; None when it is


def _read_stream(stream: Stream) -> Iterator[_Entry]:
    for shard_index, uri in enumerate(stream.shards):
        try:
            buffer = read_bytes(uri)
        except FileNotFoundError as error:
            raise MisalignedError(f"{stream.name}: shard missing: {uri}") from error
        except OSError as error:
            raise MisalignedError(f"{stream.name}: cannot read {uri}: {error}") from error
        foreign = None
        if stream.sha256 is not None and hashlib.sha256(buffer).hexdigest() != stream.sha256[shard_index]:
            foreign = (f"{stream.name}: {uri} is not the shard prepared for {stream.name} (its SHA-256 differs "
                       "from shards.parquet): replaced by another sub-dataset's or modified")
        entries = 0
        try:
            for position, (key, parts) in enumerate(iter_samples(buffer)):
                entries += 1
                yield _Entry(shard_index, key, to_sample(key, parts), f"{uri} sample {position}", foreign)
        except CorruptShard as error:
            raise MisalignedError(f"{stream.name}: corrupt shard {uri}: {error}") from error
        if foreign and not entries:
            raise MisalignedError(foreign)


def _check_aligned(names: Sequence[str], rows: Sequence[Sequence[_Entry]]) -> None:
    def label(entry: _Entry) -> int | None:
        return None if entry.sample is None else entry.sample.label

    reference = rows[0]
    for name, row in zip(names[1:], rows[1:], strict=True):
        for a, b in zip(reference, row, strict=True):
            labels_differ = None not in (label(a), label(b)) and label(a) != label(b)
            if a.key != b.key or labels_differ:
                raise MisalignedError(
                    f"misaligned sub-datasets: {names[0]} has key {a.key!r} (class {label(a)}) at {a.where}, "
                    f"{name} has {b.key!r} (class {label(b)}) at {b.where}"
                )


class Lockstep:
    """Iterate ``LockstepBatch``es over ``streams``; ``skipped`` counts samples dropped as undecodable."""

    def __init__(self, streams: Sequence[Stream], batch_size: int) -> None:
        if not streams:
            raise ValueError("lockstep needs at least one stream")
        self.streams = list(streams)
        self.batch_size = batch_size
        self.skipped = 0

    def _rows(self) -> Iterator[list[list[_Entry]]]:
        """Lists of up to batch_size entries per stream, checked for equal length."""
        names = [s.name for s in self.streams]
        readers = [_read_stream(s) for s in self.streams]
        while True:
            rows: list[list[_Entry]] = [[] for _ in self.streams]
            for _ in range(self.batch_size):
                entries = [next(reader, None) for reader in readers]
                ended = [name for name, entry in zip(names, entries, strict=True) if entry is None]
                if ended and len(ended) < len(entries):
                    longer = next(entry for entry in entries if entry is not None)
                    raise MisalignedError(
                        f"misaligned sub-datasets: {', '.join(ended)} ended while {longer.where} "
                        f"(key {longer.key!r}) still follows in the others"
                    )
                if ended:
                    break
                for row, entry in zip(rows, entries, strict=True):
                    row.append(entry)
            if not rows[0]:
                return
            _check_aligned(names, rows)  # first: differing keys name the cause more precisely than a digest
            foreign = next((entry.foreign for row in rows for entry in row if entry.foreign), None)
            if foreign:
                raise MisalignedError(foreign)
            yield rows

    def __iter__(self) -> Iterator[LockstepBatch]:
        for rows in self._rows():
            count = len(rows[0])
            decoded = np.ones(count, dtype=bool)
            images = []
            for stream, row in zip(self.streams, rows, strict=True):
                buffer = np.empty((count, *stream.shape), stream.dtype)
                for i, entry in enumerate(row):
                    decoded[i] &= entry.sample is not None and decode_into(buffer[i], entry.sample)
                images.append(buffer)
            self.skipped += int(count - decoded.sum())
            if not decoded.any():
                continue
            kept = [entry for entry, ok in zip(rows[0], decoded, strict=True) if ok]
            yield LockstepBatch(
                keys=[entry.key for entry in kept],
                labels=np.array([entry.sample.label for entry in kept], dtype=np.int64),
                images=[buffer if decoded.all() else buffer[decoded] for buffer in images],
                shards=np.array([entry.shard for entry in kept], dtype=np.int64),
            )
