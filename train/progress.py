"""Per-epoch progress bar (loss, lr, images/s), shown on the main rank only."""

from __future__ import annotations

import sys
import time
from typing import SupportsFloat

from subspectral.train import stopping
from tqdm import tqdm

_REFRESH_STEPS = 10  # reading the loss is a CPU-GPU sync point: do it every few steps only


class EpochProgress:
    def __init__(self, total: int, description: str, *, enabled: bool, world: int) -> None:
        self.bar = tqdm(total=total, desc=description, disable=not enabled, leave=False, file=sys.stderr,
                        dynamic_ncols=True)
        self.world = world
        self.start = time.perf_counter()
        self.images = 0
        self.steps = 0

    def step(self, loss: SupportsFloat, lr: float, images: int) -> None:
        stopping.check()  # both backends call this after every optimizer step: a safe point to stop
        self.steps += 1
        self.images += images * self.world
        if self.bar.disable:
            return
        self.bar.update(1)
        if self.steps % _REFRESH_STEPS == 0 or self.steps == self.bar.total:
            rate = self.images / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}",
                                 refresh=False)

    def close(self) -> None:
        self.bar.close()
