"""MindSpore model registry: ResNet-18/34/50/101 and ResNeXt-50 32x4d, stems, heads, input normalisation.

The networks mirror torchvision's (v1.5 bottleneck: stride on the 3x3 conv; the same widths, groups,
kaiming-normal fan_out conv init, BatchNorm eps 1e-5 / torch momentum 0.1, Linear init uniform
+-1/sqrt(fan_in)), so a member has the same architecture and parameter count in both backends; the
names in ``MODEL_BUILDERS`` are those of ``train.models``. MindCV is not used: its ResNet builds the
stem inside the class (no lowres variant), and its EBV layer regenerates the basis at every build
(the pitfall METHOD.md records). Written here it is ~150 lines and adds no dependency.

Like the torch members, a network takes the batch exactly as stored (N x H x W x 3 integers, or
float after mixup) and normalises it itself (``InputNorm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeNormal, Uniform
from subspectral.schemas import ModelSpec


@dataclass(frozen=True)
class Arch:
    block: str  # basic | bottleneck
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


# Same names in every backend's registry (train.models.MODEL_BUILDERS for torch).
ARCHS: dict[str, Arch] = {
    "resnet18": Arch("basic", (2, 2, 2, 2)),
    "resnet34": Arch("basic", (3, 4, 6, 3)),
    "resnet50": Arch("bottleneck", (3, 4, 6, 3)),
    "resnet101": Arch("bottleneck", (3, 4, 23, 3)),
    "resnext50_32x4d": Arch("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
}

_BN_MOMENTUM = 0.9  # MindSpore keeps momentum * running + (1 - momentum) * batch: torch's 0.1


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, pad_mode="pad", padding=kernel // 2,
                     group=groups, has_bias=False, weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=_BN_MOMENTUM)


def _dense(in_features: int, out_features: int) -> nn.Dense:
    bound = 1.0 / math.sqrt(in_features)  # torch.nn.Linear's default init
    return nn.Dense(in_features, out_features, weight_init=Uniform(bound), bias_init=Uniform(bound))


class BasicBlock(nn.Cell):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Cell | None,
                 groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, planes, 3, stride)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def construct(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Cell):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Cell | None,
                 groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        self.conv1 = _conv(in_channels, width, 1)
        self.bn1 = _bn(width)
        self.conv2 = _conv(width, width, 3, stride, groups)
        self.bn2 = _bn(width)
        self.conv3 = _conv(width, planes * self.expansion, 1)
        self.bn3 = _bn(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def construct(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class EBVHead(nn.Cell):
    """logits = normalize(W f + b) . B^T / tau; B is a fixed (non-trainable) parameter saved in checkpoints."""

    def __init__(self, in_features: int, basis: np.ndarray, tau: float) -> None:
        super().__init__()
        self.proj = _dense(in_features, basis.shape[1])
        self.basis = Parameter(Tensor(np.ascontiguousarray(basis, np.float32)), name="basis", requires_grad=False)
        self.tau = float(tau)

    def construct(self, features: Tensor) -> Tensor:
        embedding = ops.L2Normalize(axis=-1, epsilon=1e-12)(self.proj(features))
        return ops.matmul(embedding, self.basis.astype(embedding.dtype).T) / self.tau


class ResNet(nn.Cell):
    def __init__(self, arch: Arch, num_classes: int, stem: str, head: nn.Cell | None = None) -> None:
        super().__init__()
        block = BasicBlock if arch.block == "basic" else Bottleneck
        self.groups, self.width_per_group = arch.groups, arch.width_per_group
        if stem == "lowres":
            # The source method's 56x56 stem: 3x3 stride-1 conv, no max-pool (as train.models._resnet_lowres).
            self.conv1 = _conv(3, 64, 3)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = _conv(3, 64, 7, stride=2)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="pad", padding=1)
        self.bn1 = _bn(64)
        self.relu = nn.ReLU()
        self.in_channels = 64
        self.layer1 = self._layer(block, 64, arch.layers[0], 1)
        self.layer2 = self._layer(block, 128, arch.layers[1], 2)
        self.layer3 = self._layer(block, 256, arch.layers[2], 2)
        self.layer4 = self._layer(block, 512, arch.layers[3], 2)
        features = 512 * block.expansion
        self.num_features = features
        self.fc = head if head is not None else _dense(features, num_classes)

    def _layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.SequentialCell:
        downsample = None
        if stride != 1 or self.in_channels != planes * block.expansion:
            downsample = nn.SequentialCell([_conv(self.in_channels, planes * block.expansion, 1, stride),
                                            _bn(planes * block.expansion)])
        layers = [block(self.in_channels, planes, stride, downsample, self.groups, self.width_per_group)]
        self.in_channels = planes * block.expansion
        layers += [block(self.in_channels, planes, 1, None, self.groups, self.width_per_group)
                   for _ in range(1, blocks)]
        return nn.SequentialCell(layers)

    def construct(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(axis=(2, 3)))


class InputNorm(nn.Cell):
    """N x H x W x C (integers or float) -> float32 NCHW: (x * scale - mean) / std, per channel."""

    def __init__(self, scale: float, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.scale = float(scale)
        self.mean = Tensor(np.asarray(mean, np.float32).reshape(1, -1, 1, 1))
        self.std = Tensor(np.asarray(std, np.float32).reshape(1, -1, 1, 1))

    def construct(self, batch: Tensor) -> Tensor:
        x = ops.transpose(batch, (0, 3, 1, 2)).astype(ms.float32)
        return (x * self.scale - self.mean) / self.std


class SubNetwork(nn.Cell):
    """One ensemble member: input normalisation followed by the network (as train.models.SubNetwork)."""

    def __init__(self, input_norm: InputNorm, net: ResNet) -> None:
        super().__init__()
        self.input_norm = input_norm
        self.net = net

    def construct(self, batch: Tensor) -> Tensor:
        return self.net(self.input_norm(batch))


def _builder(name: str) -> Callable[..., ResNet]:
    def build(num_classes: int, stem: str, head: nn.Cell | None = None) -> ResNet:
        return ResNet(ARCHS[name], num_classes, stem, head)

    return build


MODEL_BUILDERS: dict[str, Callable[..., ResNet]] = {name: _builder(name) for name in ARCHS}


def create_model(name: str, num_classes: int, *, stem: str = "lowres", head: str = "linear",
                 ebv_basis: np.ndarray | None = None, ebv_tau: float = 0.07, input_scale: float = 1 / 255,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> SubNetwork:
    """Build a member network; an EBV head needs ``ebv_basis`` (C x d, from ``train.mindspore.ebv``)."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r} for the mindspore backend; known: {', '.join(MODEL_BUILDERS)}")
    if stem not in ("imagenet", "lowres"):
        raise ValueError(f"unknown stem {stem!r}; use imagenet or lowres")
    features = 512 * (BasicBlock if ARCHS[name].block == "basic" else Bottleneck).expansion
    if head == "ebv":
        if ebv_basis is None:
            raise ValueError("head 'ebv' needs its basis")
        fc = EBVHead(features, ebv_basis, ebv_tau)
    elif head == "linear":
        fc = None
    else:
        raise ValueError(f"unknown head {head!r}; use linear or ebv")
    return SubNetwork(InputNorm(input_scale, mean, std), MODEL_BUILDERS[name](num_classes, stem, fc))


def model_from_run(spec: ModelSpec, num_classes: int) -> SubNetwork:
    """Rebuild a member from its run record (``record.model``, ``record.num_classes``), ready for
    ``load_param_into_net`` (basis: a placeholder)."""
    basis = np.zeros((num_classes, spec.ebv_dim), np.float32) if spec.head == "ebv" else None
    return create_model(spec.name, num_classes, stem=spec.stem, head=spec.head, ebv_basis=basis,
                        ebv_tau=spec.ebv_tau, input_scale=spec.input.scale, mean=spec.input.mean,
                        std=spec.input.std)


def ebv_heads(network: nn.Cell) -> set[str]:
    """Paths of the EBV heads inside ``network`` (``fc`` for a ResNet)."""
    return {name for name, cell in network.cells_and_names() if isinstance(cell, EBVHead)}


def ebv_basis_of(model: nn.Cell) -> np.ndarray | None:
    for _, cell in model.cells_and_names():
        if isinstance(cell, EBVHead):
            return cell.basis.asnumpy()
    return None


def count_parameters(model: nn.Cell) -> int:
    """Trainable parameters (torchvision's count: BatchNorm running statistics excluded)."""
    return int(sum(np.prod(p.shape) for p in model.trainable_params()))
