"""The learning-rate schedule as a pure function of the optimizer step, shared by both backends."""

from __future__ import annotations

import math

from subspectral.train.config import ScheduleConfig


def lr_factor(step: int, steps_per_epoch: int, config: ScheduleConfig, base_lr: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (per-step warmup, then the schedule)."""
    epoch = step / steps_per_epoch
    warmup = config.warmup_epochs
    if warmup > 0 and epoch < warmup:
        return config.warmup_start_factor + (1 - config.warmup_start_factor) * epoch / warmup
    if config.name == "constant":
        return 1.0
    if config.name == "step":
        return config.gamma ** (int(epoch) // config.step_epochs)
    progress = min(1.0, (epoch - warmup) / max(config.epochs - warmup, 1e-9))
    floor = config.min_lr / base_lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
