"""The torch side of a member's input: numpy batch streams (``train.stream``) as DataLoader batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
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
        for images, labels, skipped in self.stream.pipeline(worker, workers):
            yield {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                   "skipped": torch.tensor(skipped)}


def make_loader(stream: BatchStream, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(TorchBatches(stream), batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
