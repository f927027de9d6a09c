"""Per-epoch progress bar (loss, lr, images/s), shown on the main rank only."""

from __future__ import annotations

import math
import sys
import time
from typing import SupportsFloat

from subspectral.train import stopping
from subspectral.train.run import Diverged
from tqdm import tqdm

_REFRESH_STEPS = 10  # reading the loss is a CPU-GPU sync point: do it every few steps only


class EpochProgress:
    """The bar, and the checks made between steps: a stop request, and (every few steps) a finite loss."""

    def __init__(self, total: int, description: str, *, enabled: bool, world: int) -> None:
        self.bar = tqdm(total=total, desc=description, disable=not enabled, leave=False, file=sys.stderr,
                        dynamic_ncols=True)
        self.total = total
        self.description = description
        self.world = world
        self.start = time.perf_counter()
        self.images = 0
        self.steps = 0

    def step(self, loss: SupportsFloat, lr: float, images: int) -> None:
        stopping.check()  # both backends call this after every optimizer step: a safe point to stop
        self.steps += 1
        self.images += images * self.world
        if self.steps % _REFRESH_STEPS and self.steps != self.total:
            self.bar.update(1)
            return
        value = float(loss)
        if not math.isfinite(value):  # once NaN, the weights are lost: stop before the next checkpoint
            raise Diverged(f"{self.description}: the training loss is {value} at step {self.steps}")
        self.bar.update(1)
        if not self.bar.disable:
            rate = self.images / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()
