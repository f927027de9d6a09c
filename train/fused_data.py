"""Batches of K aligned sub-datasets read in lockstep, for K members trained or evaluated as one network.

Sample i of shard j is the same image in every sub-dataset (docs/format.md, "Alignment"), so one
stream serves K members: each piece is read from the K sub-datasets at once and every sample's key
and label are checked to agree across them (a difference stops the run with one line naming it,
like ensemble-eval's lockstep reader). Shuffling, augmentation and batching are the trainer's own
stages (``train.stream``), drawn from the same seeds: member k sees exactly the batches it would see
trained alone. A batch is ``[B, H, W, K·C]``: member k's sub-image in channels k·C .. k·C + C - 1,
which is what ``train.fused.FusedNetwork`` takes. A sample unreadable in any sub-dataset is dropped
from all of them (counted in ``skipped``), so the members always see the same images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import zip_longest
from typing import Any

import numpy as np
from subspectral.schemas import DatasetCard
from subspectral.train.shards import CorruptShard, iter_samples
from subspectral.train.storage import DataError, read_bytes
from subspectral.train.stream import EvalStream, StreamStats, TrainStream, decode_sample, shard_sample_count


def _read(url: str) -> bytes:
    try:
        return read_bytes(url)
    except OSError as exc:
        raise DataError(f"cannot read {url}: {exc}") from exc


def aligned_piece_samples(sources: Iterator[dict[str, Any]], *, stats: StreamStats) -> Iterator[dict[str, Any]]:
    """Each piece's samples from K shards at once: ``{"__key__", "__url__", "members": [K webdataset dicts]}``.

    A source's ``url`` is the tuple of the K sub-datasets' URIs of one shard.
    """
    for source in sources:
        urls, piece = source["url"], source["piece"]
        readers = [iter_samples(_read(url)) for url in urls]
        read = 0
        try:
            for index, entries in enumerate(zip_longest(*readers)):
                _check_keys(urls, index, entries)
                if index % piece.parts == piece.part:
                    members = [parts for _, parts in entries]
                    for parts, url in zip(members, urls, strict=True):
                        parts["__key__"], parts["__url__"] = entries[0][0], url
                    stats.read += 1
                    read += 1
                    yield {"__key__": entries[0][0], "__url__": urls[0], "members": members}
        except CorruptShard:
            # As for one sub-dataset (train.stream.piece_samples): the readable head of a damaged shard is
            # used, what follows the damage counted as skipped (aligned shards hold the same samples).
            total = shard_sample_count(urls[0])
            stats.skipped += 1 if total is None else max(len(range(piece.part, total, piece.parts)) - read, 0)


def _check_keys(urls: Sequence[str], index: int, entries: Sequence[tuple[str, dict] | None]) -> None:
    first = entries[0]
    for url, entry in zip(urls[1:], entries[1:], strict=True):
        if entry is None or first is None or entry[0] != first[0]:
            ours = "nothing" if first is None else f"key {first[0]!r}"
            theirs = "nothing" if entry is None else f"key {entry[0]!r}"
            raise DataError(f"misaligned sub-datasets: sample {index} of {urls[0]} is {ours}, of {url} {theirs}")


def decode_aligned(out: np.ndarray, sample: dict[str, Any], num_classes: int) -> int | None:
    """Decode the K sub-images of one sample into ``out`` (H x W x K·C); the label, or None if any is unusable."""
    members = sample["members"]
    channels = out.shape[-1] // len(members)
    scratch = np.empty((*out.shape[:-1], channels), out.dtype)  # decoders write contiguous H x W x C
    label = None
    for k, parts in enumerate(members):
        mine = decode_sample(scratch, parts, num_classes)
        if mine is None:
            return None
        if label is not None and mine != label:
            raise DataError(f"misaligned sub-datasets: sample {parts['__key__']!r} has class {label} in "
                            f"{members[0]['__url__']} but {mine} in {parts['__url__']}")
        label = mine
        out[..., k * channels:(k + 1) * channels] = scratch
    return label


def _by_shard(member_uris: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    counts = {len(uris) for uris in member_uris}
    if len(counts) != 1:
        raise DataError(f"misaligned sub-datasets: they have different numbers of shards ({sorted(counts)})")
    return list(zip(*member_uris, strict=True))


def _widen(shape: tuple[int, int, int], members: int) -> tuple[int, int, int]:
    height, width, channels = shape
    return height, width, channels * members


class _Aligned:
    """Mixin: a ``train.stream`` stream over K aligned sub-datasets (``member_uris[k]``: member k's shards)."""

    read_samples = staticmethod(aligned_piece_samples)
    decode = staticmethod(decode_aligned)

    def __init__(self, member_uris: Sequence[Sequence[str]], card: DatasetCard, *args: Any, **kwargs: Any) -> None:
        super().__init__(_by_shard(member_uris), card, *args, **kwargs)
        self.shape = _widen(self.shape, len(member_uris))


class FusedTrainStream(_Aligned, TrainStream):
    """Training batches ``[B, H, W, K·C]`` of K members, the batches each would draw alone."""


class FusedEvalStream(_Aligned, EvalStream):
    """Every validation sample once for K members, ``[B, H, W, K·C]``."""
