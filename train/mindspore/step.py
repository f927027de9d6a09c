"""Loss, optimizer, per-step learning rate, AMP level, loss scaling and the compiled train/eval steps.

The learning rate of every step comes from the torch backends' ``train.schedule.lr_factor`` (same
warmup and schedule), handed to the optimizer as a per-step list indexed by its ``global_step``
(saved in the checkpoint, so a resumed run continues the schedule). SGD is ``nn.Momentum``
(coupled L2 weight decay and buffer update as in ``torch.optim.SGD``); AdamW is
``nn.AdamWeightDecay`` (decoupled decay like torch's AdamW, but MindSpore's has no bias correction;
``mint.optim.AdamW`` has it but runs on Ascend only).
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from subspectral.train.config import ConfigError, Recipe, TrainConfig
from subspectral.train.schedule import lr_factor

# torch.amp.GradScaler's defaults: start at 2**16, double after 2000 clean steps, halve on overflow.
LOSS_SCALE_START, LOSS_SCALE_FACTOR, LOSS_SCALE_WINDOW = 2.0**16, 2, 2000


@dataclass(frozen=True)
class Precision:
    amp_level: str  # MindSpore's: O0 (float32) | O2 (network in low precision, BatchNorm and loss in float32)
    dtype: str | None  # float16 | bfloat16 | None
    loss_scaling: bool  # dynamic loss scaling (float16 only, as the torch backend's GradScaler)


def precision_for(config: TrainConfig, device_target: str) -> Precision:
    """``train.amp`` and ``train.amp_dtype`` -> AMP level: ``auto`` on GPU/Ascend only, ``true`` everywhere."""
    if config.amp is True and device_target == "CPU":
        # Unlike torch's CPU autocast, MindSpore's O2 on the CPU is not something we have seen work.
        raise ConfigError("train.amp=true: the MindSpore backend has no mixed precision on the CPU; "
                          "use train.amp=auto (float32 on the CPU) or false")
    if config.amp is False or device_target == "CPU":
        return Precision("O0", None, False)
    # O2 is MindCV's level for ResNets on Ascend: it keeps BatchNorm in float32, as autocast does.
    return Precision("O2", config.amp_dtype, config.amp_dtype == "float16")


def apply_precision(network: nn.Cell, precision: Precision) -> nn.Cell:
    if precision.amp_level == "O0":
        return network
    from mindspore import amp

    return amp.auto_mixed_precision(network, precision.amp_level, dtype=getattr(ms, precision.dtype))


def learning_rates(recipe: Recipe, steps_per_epoch: int) -> list[float]:
    base = recipe.optimizer.lr
    total = recipe.schedule.epochs * steps_per_epoch
    return [base * lr_factor(step, steps_per_epoch, recipe.schedule, base) for step in range(total)]


def build_optimizer(network: nn.Cell, recipe: Recipe, steps_per_epoch: int) -> nn.Optimizer:
    config = recipe.optimizer
    decay, no_decay = [], []
    for param in network.trainable_params():
        (no_decay if config.no_decay_norm_bias and len(param.shape) <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    lrs = learning_rates(recipe, steps_per_epoch)
    if config.name == "adamw":
        return nn.AdamWeightDecay(groups, learning_rate=lrs, eps=1e-8)
    return nn.Momentum(groups, learning_rate=lrs, momentum=config.momentum, use_nesterov=config.nesterov)


class SoftTargetLoss(nn.Cell):
    """Cross-entropy on soft targets with label smoothing, as ``F.cross_entropy(logits, probs, label_smoothing)``."""

    def __init__(self, network: nn.Cell, num_classes: int, label_smoothing: float) -> None:
        super().__init__()
        self.network = network
        self.keep = 1.0 - label_smoothing
        self.spread = label_smoothing / num_classes

    def construct(self, images: Tensor, targets: Tensor) -> Tensor:
        log_probs = ops.log_softmax(self.network(images).astype(ms.float32), -1)
        smoothed = targets * self.keep + self.spread
        return -(smoothed * log_probs).sum(-1).mean()


class TrainStep(nn.TrainOneStepWithLossScaleCell):
    """One optimizer step: grads (loss-scaled when enabled), data-parallel mean, optional clip, skip on overflow."""

    def __init__(self, loss_network: nn.Cell, optimizer: nn.Optimizer, loss_scaling: bool, grad_clip: float):
        if loss_scaling:
            sense = nn.DynamicLossScaleUpdateCell(LOSS_SCALE_START, LOSS_SCALE_FACTOR, LOSS_SCALE_WINDOW)
        else:
            sense = Tensor(np.array(1.0, np.float32))
        super().__init__(loss_network, optimizer, scale_sense=sense)
        self.loss_scaling = loss_scaling
        self.grad_clip = float(grad_clip)

    def construct(self, images: Tensor, targets: Tensor) -> Tensor:
        loss = self.network(images, targets)
        scaling = self.scale_sense
        grads = self.grad(self.network, self.weights)(images, targets,
                                                      ops.ones_like(loss) * ops.cast(scaling, ops.dtype(loss)))
        grads = self.grad_reducer(grads)
        if self.loss_scaling:
            grads = self.hyper_map(ops.partial(_unscale, scaling), grads)
            overflow = self.process_loss_scale(self.get_overflow_status(Tensor([0] * 8, ms.int32), grads))
            if self.grad_clip > 0:
                grads = ops.clip_by_global_norm(grads, self.grad_clip)
            if not overflow:
                loss = ops.depend(loss, self.optimizer(grads))
            return loss
        if self.grad_clip > 0:
            grads = ops.clip_by_global_norm(grads, self.grad_clip)
        return ops.depend(loss, self.optimizer(grads))


def _unscale(scale: Tensor, grad: Tensor) -> Tensor:
    return grad * ops.cast(ops.reciprocal(scale), ops.dtype(grad))


class EvalStep(nn.Cell):
    """Summed loss, top-1 and top-k hits over the first ``count`` rows of a padded batch."""

    def __init__(self, network: nn.Cell, k: int) -> None:
        super().__init__()
        self.network = network
        self.k = k

    def construct(self, images: Tensor, labels: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.network(images).astype(ms.float32)
        valid = (ops.arange(labels.shape[0]) < count).astype(ms.float32)
        losses = -ops.gather_elements(ops.log_softmax(logits, -1), 1, labels.reshape(-1, 1)).reshape(-1)
        _, top = ops.topk(logits, self.k)
        hits = (top == labels.reshape(-1, 1)).astype(ms.float32)
        return (losses * valid).sum(), (hits[:, 0] * valid).sum(), (hits.max(axis=1) * valid).sum()
