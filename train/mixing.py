"""Mixup and CutMix of a raw batch, shared by both backends (the MindSpore trainer mixes on the host).

The draws come from the caller's numpy generator, so a backend that mixes the same batches with the
same generator gets the same mixed batches.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from subspectral.train.config import TrainConfig


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, config: TrainConfig,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (chosen at random when both are on) on the raw NHWC batch; soft targets.

    Mixing happens before normalisation, which is affine, so it equals mixing normalised inputs.
    """
    targets = F.one_hot(labels, num_classes).float()
    use_mixup = config.mixup_alpha > 0
    use_cutmix = config.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or rng.random() >= config.mix_prob:
        return images, targets
    if use_mixup and use_cutmix:
        use_cutmix = bool(rng.random() < 0.5)
    alpha = config.cutmix_alpha if use_cutmix else config.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    mixed = images.float()
    rolled = mixed.roll(1, dims=0)
    if use_cutmix:
        height, width = images.shape[1:3]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy = int(rng.integers(height))
        cx = int(rng.integers(width))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        mixed[:, y0:y1, x0:x1] = rolled[:, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        mixed = lam * mixed + (1 - lam) * rolled
    return mixed, lam * targets + (1 - lam) * targets.roll(1, dims=0)
