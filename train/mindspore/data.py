"""``mindspore.dataset.GeneratorDataset`` over one sub-dataset's WebDataset shards (MindSpore has no tar reader).

The partition, shuffling and augmentation are those of ``train.stream``, which the torch backend uses too: training
batches come from ``TrainStream``'s slots (one per rank and worker), evaluation batches from
``EvalStream``. Parallel workers: GeneratorDataset hands index i of a random-accessible source to
worker ``i % W`` in order (``SamplerFn``), and torch's DataLoader takes batch i from worker ``i % W``
too, so with W = ``data.workers`` the source below maps index i to the next batch of slot ``i % W``:
an epoch's batches are the torch backend's batches, in the same order, whichever backend trains.
A worker asked for a batch out of order (never, with the sequential sampler used here) rebuilds its
slot's stream and skips ahead, so the result never depends on scheduling. Sharding across devices
happens in the slots (rank r of R reads slots r*W .. r*W+W-1 of R*W), as in the torch backend;
GeneratorDataset's ``num_shards`` would need per-sample random access, which a tar stream has not.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from subspectral.schemas import DatasetCard
from subspectral.train.config import DataConfig
from subspectral.train.storage import DataError
from subspectral.train.stream import EvalStream, TrainStream

TRAIN_COLUMNS = ["images", "labels", "skipped"]
EVAL_COLUMNS = ["images", "labels", "count", "skipped"]


class TrainBatches:
    """Random-accessible source for GeneratorDataset: index i -> batch i of this rank's epoch."""

    def __init__(self, stream: TrainStream, workers: int) -> None:
        self.stream = stream
        self.workers = max(1, workers)
        self._slots: dict[int, tuple[Iterator, int]] = {}  # worker -> (its batches, next position)

    def __len__(self) -> int:
        return self.stream.batches_per_epoch

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        worker, position = index % self.workers, index // self.workers
        batches, next_position = self._slots.get(worker, (None, -1))
        if batches is None or next_position != position:
            batches = iter(self.stream.pipeline(worker, self.workers))
            for _ in range(position):
                next(batches)
        images, labels, skipped = next(batches)
        self._slots[worker] = (batches, position + 1)
        return images, labels.astype(np.int32), np.int32(skipped)


def train_dataset(stream: TrainStream, workers: int):
    """One epoch's batches (``stream.set_epoch`` first); W = max(1, workers) worker processes."""
    import mindspore.dataset as ds

    source = TrainBatches(stream, workers)
    return ds.GeneratorDataset(source, column_names=TRAIN_COLUMNS, shuffle=False,
                               num_parallel_workers=source.workers, python_multiprocessing=source.workers > 1)


class PaddedEval:
    """``EvalStream`` batches padded to a fixed size (one compiled graph), with the real count."""

    def __init__(self, stream: EvalStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        size = self.stream.batch_size
        for images, labels, skipped in self.stream.pipeline(0, 1):
            labels = labels.astype(np.int32)
            count = len(labels)
            if count < size:
                images = np.concatenate([images, np.zeros((size - count, *images.shape[1:]), images.dtype)])
                labels = np.concatenate([labels, np.zeros(size - count, np.int32)])
            yield images, labels, np.int32(count), np.int32(skipped)


def eval_dataset(stream: EvalStream):
    """Every val sample of this rank once; decoding runs in the pipeline's thread, beside the network."""
    import mindspore.dataset as ds

    return ds.GeneratorDataset(PaddedEval(stream), column_names=EVAL_COLUMNS, shuffle=False)


# The last line of the Python traceback MindSpore puts in its RuntimeError when a source raised DataError.
_DATA_ERROR = re.compile(r"^(?:[\w.]+\.)?DataError: (.*)$", re.MULTILINE)


def batches(dataset: Any) -> Iterator[tuple[np.ndarray, ...]]:
    """One pass over a GeneratorDataset as numpy tuples; a ``DataError`` of the stream is raised as itself.

    MindSpore turns an exception in a source (in its own thread or a worker process) into a RuntimeError
    holding the whole traceback as text; the stream's one-line message is taken back out of it.
    """
    try:
        yield from dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)
    except RuntimeError as error:
        found = _DATA_ERROR.findall(str(error))
        if not found:
            raise
        raise DataError(found[-1]) from None


def slot_stream(uris: list[str], card: DatasetCard, config: DataConfig, *, batch_size: int, batches_per_epoch: int,
                rank: int, world: int, seed: int) -> TrainStream:
    return TrainStream(uris, card, config, batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                      rank=rank, world=world, seed=seed)
