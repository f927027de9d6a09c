"""Streaming batches of one sub-dataset as numpy arrays: shard partition, shuffle, decode, augment, batch.

Framework-free, so both backends feed the same batches: ``train.data`` wraps these streams in torch's
DataLoader, ``train.mindspore.data`` in MindSpore's GeneratorDataset.

A stream is a ``webdataset.DataPipeline`` of small stages: pieces of shards -> webdataset samples
(``{"__key__", "__url__", "jpg", "cls"}``) -> ``webdataset.shuffle`` (seeded buffer) -> decode into
batch buffers of the card's sample shape and dtype -> augment. Tar bytes are parsed by
``train.shards`` (plain ustar directly, anything else through webdataset's own tar iterator):
webdataset's ``tarfile_to_samples`` costs ~100 us per sample here, more than decoding the 56x56
JPEG, against ~7 us.

Work is split into *slots*, one per (DDP rank, DataLoader worker). Each shard is cut into
``parts`` interleaved pieces (sample i goes to piece i % parts) with parts = ceil(slots / shards),
and the pieces are dealt to the slots round-robin, so the slots always partition the data, however
few shards there are. In training every rank runs exactly ``train_samples // global_batch``
batches per epoch: a slot cycles over its pieces until its quota of batches is full (a slot with
less data wraps around, one with more leaves the rest to later epochs), so ranks never wait on each
other and never drop a partial batch silently. All randomness derives from (seed, epoch, slot):
an epoch's batches are the same whether the run was resumed or not.

Error policy, the same for every stream (as webdataset's ``handler``, decided here once):
damaged bytes are skipped and counted (``StreamStats.skipped``, reported per batch): a sample
whose image does not decode or whose ``.cls`` is missing or not an integer, and the samples lost
at the end of a shard that is cut short or damaged (the samples before the damage are used; the
number lost comes from the shard's ``stats/`` file, or counts as one when that is unreadable).
Anything that means the data is not what the card says is refused with a ``DataError``: a label
outside ``0 .. num_classes - 1`` (at the first such sample), and a training slot that has read
every one of its samples without a usable one (instead of cycling forever).
"""

from __future__ import annotations

import functools
import math
import posixpath
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import webdataset as wds
from subspectral.schemas import DatasetCard
from subspectral.train.config import DataConfig
from subspectral.train.shards import CorruptShard, decode_into, iter_samples, to_sample
from subspectral.train.storage import DataError, is_remote, join, read_bytes, read_json


@dataclass(frozen=True)
class Piece:
    shard: int
    part: int
    parts: int


def pieces_for_slot(num_shards: int, slot: int, num_slots: int) -> list[Piece]:
    parts = max(1, math.ceil(num_slots / num_shards))
    pieces = [Piece(shard, part, parts) for part in range(parts) for shard in range(num_shards)]
    return pieces[slot::num_slots]


@functools.lru_cache(maxsize=1024)
def shard_sample_count(tar_uri: str) -> int | None:
    """How many samples shard ``ROOT/sub-KK/SPLIT-J.tar`` holds, from ``ROOT/stats/SPLIT-J.json``; None if unknown.

    Read only when a shard turns out damaged, to count the samples lost after the damage.
    """
    base, sep, query = tar_uri.partition("?") if is_remote(tar_uri) else (tar_uri, "", "")
    folder, name = posixpath.split(base)
    stats_uri = join(posixpath.dirname(folder) + sep + query, "stats", name.removesuffix(".tar") + ".json")
    try:
        return int(read_json(stats_uri)["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class StreamStats:
    """Shared by the stages of one stream: samples read, dropped as unusable, and in one cycle of the pieces."""

    read: int = 0
    skipped: int = 0
    cycle: int = 0  # samples in one whole pass over the stream's pieces; 0 until the first pass ends


# Pipeline stages, webdataset style: a source, then functions of the previous stage's iterator.

def piece_source(uris: list[str], pieces: list[Piece], *, stats: StreamStats, rng: random.Random | None = None,
                 forever: bool = False) -> Iterator[dict[str, Any]]:
    """``{"url", "piece"}`` per piece; ``forever`` cycles (training), reshuffling each cycle when ``rng``."""
    while True:
        order = list(pieces)
        if rng is not None:
            rng.shuffle(order)
        read_before = stats.read
        for piece in order:
            yield {"url": uris[piece.shard], "piece": piece}
        if not forever:
            return
        stats.cycle = stats.read - read_before
        if stats.cycle == 0:
            shards = _shard_list(uris[p.shard] for p in pieces)
            raise DataError(f"no readable sample in {shards}: every shard is damaged")


def _shard_list(urls: Iterable[str]) -> str:
    """Shards for a message: the first three and how many more."""
    names = sorted(set(urls))
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"shard{'s' if len(names) > 1 else ''} {', '.join(names[:3])}{more}"


def piece_samples(sources: Iterator[dict[str, Any]], *, stats: StreamStats) -> Iterator[dict[str, Any]]:
    """Each piece's webdataset samples: ``{"__key__", "__url__", "jpg": bytes, "cls": bytes, ...}``."""
    for source in sources:
        url, piece = source["url"], source["piece"]
        try:
            buffer = read_bytes(url)
        except OSError as exc:
            raise DataError(f"cannot read {url}: {exc}") from exc
        read = 0
        try:
            for index, (key, sample) in enumerate(iter_samples(buffer)):
                if index % piece.parts == piece.part:
                    sample["__key__"], sample["__url__"] = key, url
                    stats.read += 1
                    read += 1
                    yield sample
        except CorruptShard:
            # The readable head of a damaged shard is used; what follows the damage is counted as skipped.
            total = shard_sample_count(url)
            stats.skipped += 1 if total is None else max(len(range(piece.part, total, piece.parts)) - read, 0)


def decode_sample(out: np.ndarray, parts: dict[str, Any], num_classes: int) -> int | None:
    """Decode one webdataset sample into ``out`` (H x W x C); its label, or None when it is unusable.

    A label outside the card's classes means the shards are not the card's: refused."""
    sample = to_sample(parts["__key__"], parts)
    if sample is not None and not 0 <= sample.label < num_classes:
        raise DataError(f"{parts['__url__']}: sample {sample.key!r} has label {sample.label}, outside the "
                        f"{num_classes} classes of the dataset card (0..{num_classes - 1})")
    if sample is not None and decode_into(out, sample):
        return sample.label
    return None


def decoded_batches(samples: Iterator[dict[str, Any]], *, shape: tuple[int, int, int], dtype: np.dtype,
                    num_classes: int, batch_size: int, max_batches: int | None, drop_last: bool,
                    stats: StreamStats, decode: Callable[[np.ndarray, dict[str, Any], int], int | None] = decode_sample,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Decode into batch buffers: ``(images N x H x W x C, labels, samples skipped since the last batch)``."""
    made = reported = 0
    # Samples that failed since the last usable one: once they are every sample of a whole pass over
    # the pieces, no sample of this stream is usable (decoding the same bytes gives the same result).
    failing: set[tuple[str, str]] = set()
    while max_batches is None or made < max_batches:
        images = np.empty((batch_size, *shape), dtype)
        labels = np.empty(batch_size, np.int64)
        filled = 0
        for parts in samples:
            label = decode(images[filled], parts, num_classes)
            if label is not None:
                labels[filled] = label
                filled += 1
                failing.clear()
                if filled == batch_size:
                    break
            else:
                stats.skipped += 1
                failing.add((parts["__url__"], parts["__key__"]))
                if len(failing) >= stats.cycle > 0:
                    shards = _shard_list(url for url, _ in failing)
                    raise DataError(f"no usable sample in {shards}: all {stats.cycle} samples are damaged or "
                                    "cannot be decoded")
        if filled < batch_size and (drop_last or filled == 0):
            return
        yield images[:filled], labels[:filled], stats.skipped - reported
        reported = stats.skipped
        made += 1


def padding_pixels(crop_padding: int | float, side: int) -> int:
    """``data.crop_padding`` in pixels for a ``side``-pixel image: an integer is pixels; a fraction below 1
    is that share of the side, rounded half up, and at least 1 px when it is not 0 (0.125 → 1 px at 7,
    2 at 14, 4 at 28 and 32, 7 at 56)."""
    if isinstance(crop_padding, float) and crop_padding < 1:
        return max(1, int(crop_padding * side + 0.5)) if crop_padding > 0 else 0
    return int(crop_padding)


def augment(images: np.ndarray, config: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Random crop (zero padding or resized) and horizontal flip of an N x H x W x C batch."""
    count, height, width, _ = images.shape
    flips = rng.random(count) < 0.5 if config.hflip else np.zeros(count, bool)
    pad = padding_pixels(config.crop_padding, min(height, width))
    if config.crop == "pad" and pad > 0:
        # A random crop of the zero-padded image is the image shifted by (dy, dx) in [-pad, pad] with
        # zeros filled in: one slice copy per sample, no padded copy of the batch. Mirroring after a
        # shift by -dx equals shifting the mirrored image by dx, so the flip runs once, batched.
        shifts = rng.integers(-pad, pad + 1, size=(count, 2))
        shifts[flips, 1] *= -1
        out = np.zeros_like(images)
        for i, (dy, dx) in enumerate(shifts.tolist()):
            out[i, max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
                images[i, max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    elif config.crop == "resized":
        out = _resized_crops(images, config.resized_scale, rng)
    else:
        out = images.copy()
    _mirror(out, flips)
    return out


def _mirror(images: np.ndarray, flips: np.ndarray) -> None:
    """Flip ``images[flips]`` left-right in place."""
    if not flips.any():
        return
    _, height, width, channels = images.shape
    # One gather of each row's elements: ~4x faster than numpy's negative-stride copy of 3-element pixels.
    order = (np.arange(width - 1, -1, -1)[:, None] * channels + np.arange(channels)).ravel()
    rows = images[flips].reshape(-1, height, width * channels)
    images[flips] = np.take(rows, order, axis=2).reshape(-1, height, width, channels)


def _resized_crops(images: np.ndarray, min_scale: float, rng: np.random.Generator) -> np.ndarray:
    """Inception-style random resized crop (area in [min_scale, 1], aspect in [3/4, 4/3]), bilinear."""
    count, height, width, _ = images.shape
    area = rng.uniform(min_scale, 1.0, count) * height * width
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), count))
    crop_w = np.clip(np.sqrt(area * aspect), 1, width)
    crop_h = np.clip(np.sqrt(area / aspect), 1, height)
    top = rng.uniform(0, height - crop_h)
    left = rng.uniform(0, width - crop_w)
    # Sample every output pixel's source position, then interpolate bilinearly (vectorised).
    grid = (np.arange(height) + 0.5) / height
    ys = top[:, None] + grid[None, :] * crop_h[:, None] - 0.5
    xs = left[:, None] + (np.arange(width) + 0.5)[None, :] / width * crop_w[:, None] - 0.5
    y0 = np.clip(np.floor(ys).astype(int), 0, height - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, width - 1)
    y1 = np.minimum(y0 + 1, height - 1)
    x1 = np.minimum(x0 + 1, width - 1)
    wy = np.clip(ys - y0, 0, 1)[:, :, None, None]
    wx = np.clip(xs - x0, 0, 1)[:, None, :, None]
    batch = np.arange(count)[:, None, None]
    src = images.astype(np.float32)

    def row(y: np.ndarray) -> np.ndarray:
        left_px = src[batch, y[:, :, None], x0[:, None, :]]
        return left_px * (1 - wx) + src[batch, y[:, :, None], x1[:, None, :]] * wx

    return np.rint(row(y0) * (1 - wy) + row(y1) * wy).astype(images.dtype)


class TrainStream:
    """An epoch of training batches for one DDP rank (``set_epoch`` before each epoch)."""

    # The stages that read a piece's samples and decode one sample; ``train.fused_data`` swaps them to
    # read K aligned sub-datasets in lockstep (``uris`` then holds a tuple of K URIs per shard).
    read_samples = staticmethod(piece_samples)
    decode = staticmethod(decode_sample)

    def __init__(self, uris: list[str], card: DatasetCard, config: DataConfig, *, batch_size: int,
                 batches_per_epoch: int, rank: int, world: int, seed: int) -> None:
        self.uris = uris
        self.shape, self.dtype = card.sample_shape, card.dtype  # as the card states them, never guessed
        self.num_classes = card.num_classes
        self.config = config
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.rank = rank
        self.world = world
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def pipeline(self, worker: int, workers: int) -> wds.DataPipeline:
        """The ``webdataset.DataPipeline`` of loader worker ``worker`` of ``workers`` on this rank.

        It yields numpy ``(images, labels, skipped)``: ``skipped`` counts the samples dropped since the
        previous batch.
        """
        slot, slots = self.rank * workers + worker, self.world * workers
        quota = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        seed = (self.seed, self.epoch, slot)
        stats = StreamStats()
        buffer = self.config.shuffle_buffer
        augment_rng = np.random.default_rng(list(seed))
        return wds.DataPipeline(
            partial(piece_source, self.uris, pieces_for_slot(len(self.uris), slot, slots), stats=stats,
                    rng=random.Random(hash(seed)) if self.config.shuffle_shards else None, forever=quota > 0),
            partial(self.read_samples, stats=stats),
            *([wds.shuffle(buffer, initial=buffer, rng=random.Random(hash((*seed, 1))))] if buffer > 1 else []),
            partial(decoded_batches, shape=self.shape, dtype=self.dtype, num_classes=self.num_classes,
                    batch_size=self.batch_size, max_batches=quota, drop_last=True, stats=stats, decode=self.decode),
            wds.map(lambda batch: (augment(batch[0], self.config, augment_rng), *batch[1:])),
        )

class EvalStream:
    """Every validation sample once, in shard order, partitioned over ranks and workers; no augmentation."""

    read_samples = staticmethod(piece_samples)  # hooks as in TrainStream
    decode = staticmethod(decode_sample)

    def __init__(self, uris: list[str], card: DatasetCard, *, batch_size: int, rank: int, world: int) -> None:
        self.uris = uris
        self.shape, self.dtype = card.sample_shape, card.dtype
        self.num_classes = card.num_classes
        self.batch_size = batch_size
        self.rank = rank
        self.world = world

    def pipeline(self, worker: int, workers: int) -> wds.DataPipeline:
        """The batches of loader worker ``worker`` of ``workers`` on this rank: ``(images, labels, skipped)``."""
        stats = StreamStats()
        pieces = pieces_for_slot(len(self.uris), self.rank * workers + worker, self.world * workers)
        return wds.DataPipeline(
            partial(piece_source, self.uris, pieces, stats=stats),
            partial(self.read_samples, stats=stats),
            partial(decoded_batches, shape=self.shape, dtype=self.dtype, num_classes=self.num_classes,
                    batch_size=self.batch_size, max_batches=None, drop_last=False, stats=stats, decode=self.decode),
        )
