"""The torch side of a member's input: numpy batch streams (``train.stream``) as DataLoader batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from subspectral.train import stopping
from subspectral.train.storage import DataError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class BatchStream(Protocol):
    def pipeline(self, worker: int, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]: ...


class TorchBatches(IterableDataset):
    """A ``train.stream`` stream as an IterableDataset: each DataLoader worker runs its own slot's pipeline."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        try:
            for images, labels, skipped in self.stream.pipeline(worker, workers):
                yield {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                       "skipped": torch.tensor(skipped)}
        except DataError as error:
            if info is None:
                raise
            # Raised in a worker, it would reach the trainer wrapped in the worker's traceback: send the line.
            yield {"error": str(error)}


class Batches:
    """A DataLoader over a stream whose batches are ``{"images", "labels", "skipped"}``; a worker's
    ``DataError`` is raised here as it was raised there (one line, no worker traceback)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            if "error" in batch:
                raise DataError(batch["error"])
            yield batch


def make_loader(stream: BatchStream, workers: int, pin_memory: bool) -> Batches:
    return Batches(DataLoader(TorchBatches(stream), batch_size=None, num_workers=workers, pin_memory=pin_memory,
                              prefetch_factor=4 if workers else None, persistent_workers=False,
                              worker_init_fn=stopping.leave_signals_to_parent))
