"""Stream several aligned sub-datasets in lockstep, batch by batch (docs/format.md, "Alignment").

Sample i of the concatenated val shards is the same image in every sub-dataset. Each stream reads
its shards one after another as byte streams (local paths or object-store URIs, through
``train.storage.open_stream`` and ``train.shards.stream_samples``): a stream holds its read-ahead
buffer and the current sample, never a whole shard, whatever the shard's size. Every batch checks
that all streams hold the same keys and labels and stops with a one-line ``MisalignedError`` naming
the first difference. A stream given its shards' SHA-256s (shards.parquet) hashes each shard as it
reads it and checks the digest at the shard's end, so a sub-dataset's shard replaced by another's
(same keys, other images) stops the evaluation too (batches of that shard already yielded are
discarded by the caller with everything else). A sample that cannot be decoded in any stream is
dropped from all of them (and counted in ``skipped``), so the members always see the same images.

``prefetch`` runs the reading and decoding in a background thread, a bounded number of batches
ahead, so they overlap the members' forward passes (JPEG decoding and torch both release the GIL).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

import numpy as np
from subspectral.train.shards import CorruptShard, Sample, decode_into, stream_samples, to_sample
from subspectral.train.storage import open_stream

T = TypeVar("T")


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


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # object-store errors can span lines


class _ForeignShard(MisalignedError):
    """A shard whose SHA-256 differs from the one prepared for its stream (known at the shard's end)."""


class _Hashing:
    """``stream``'s ``read`` with every byte read fed to a SHA-256."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def hexdigest(self) -> str:
        """The digest of the whole file: what the tar reader left unread (end-of-archive blocks) read too."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def _read_stream(stream: Stream) -> Iterator[_Entry]:
    for shard_index, uri in enumerate(stream.shards):
        try:
            with open_stream(uri) as handle:
                source = _Hashing(handle)
                for position, (key, parts) in enumerate(stream_samples(source)):
                    yield _Entry(shard_index, key, to_sample(key, parts), f"{uri} sample {position}")
                foreign = stream.sha256 is not None and source.hexdigest() != stream.sha256[shard_index]
        except FileNotFoundError as error:
            raise MisalignedError(f"{stream.name}: shard missing: {uri}") from error
        except CorruptShard as error:
            raise MisalignedError(f"{stream.name}: corrupt shard {uri}: {_one_line(error)}") from error
        except OSError as error:
            raise MisalignedError(f"{stream.name}: cannot read {uri}: {_one_line(error)}") from error
        if foreign:
            raise _ForeignShard(f"{stream.name}: {uri} is not the shard prepared for {stream.name} (its SHA-256 "
                                "differs from shards.parquet): replaced by another sub-dataset's or modified")


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
                try:
                    entries = [next(reader, None) for reader in readers]
                except _ForeignShard:
                    _check_aligned(names, rows)  # first: differing keys name the cause more precisely
                    raise
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
            _check_aligned(names, rows)
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


_END = object()


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` produced in a background thread, at most ``depth`` ahead of the consumer (0: in the
    caller's thread). An exception in the producer is raised here, at the item where it happened;
    leaving the loop early stops the producer and closes ``items``."""
    if depth < 1:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not offer((item, None)):
                    return
            offer((_END, None))
        except BaseException as error:  # handed to the consumer, which raises it
            offer((_END, error))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name="lockstep-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        producer.join()
