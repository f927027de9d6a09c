"""Model registry (torchvision builders), stems, heads and the on-device input normalisation.

Every model takes the samples exactly as stored in the shards, stacked: an integer batch
N x H x W x 3 (uint8, or int16 DCT bands); ``InputNorm`` turns it into the normalised float
NCHW tensor on whatever device the model is on. The NHWC -> NCHW permute of a contiguous batch is
already channels_last in memory, so no copy is made. An evaluator rebuilds a member with
``model_from_run(record.model, record.num_classes)`` and loads its state_dict: the normalisation constants and the EBV
basis are buffers in it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision.models as tvm
from subspectral.schemas import ModelSpec
from subspectral.train.config import STEMS
from subspectral.train.ebv import EBVHead, generate_ebv
from torch import nn

# Same names in every backend's registry (torch here; MindSpore later).
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
    "resnext50_32x4d": tvm.resnext50_32x4d,
    "alexnet": tvm.alexnet,
    "vgg16": tvm.vgg16,
}


def _resnet_lowres(net: nn.Module) -> None:
    # The source method's 56x56 stem: 3x3 stride-1 conv, no max-pool (a CIFAR-style stem), so
    # a 56x56 input gives the feature-map sizes of a standard ResNet on 224x224.
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()


def _alexnet_lowres(net: nn.Module) -> None:
    # 11x11/4 conv + max-pool would leave 6x6 before conv2 (and 0x0 at the last pool) at 56x56.
    net.features[0] = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1)
    net.features[2] = nn.Identity()


def _vgg_lowres(net: nn.Module) -> None:
    # Drop the first two of the five max-pools: 56x56 input ends on the 7x7 grid VGG has at 224.
    pools = [i for i, layer in enumerate(net.features) if isinstance(layer, nn.MaxPool2d)]
    for index in pools[:2]:
        net.features[index] = nn.Identity()


def _resnet_fc(net: nn.Module) -> tuple[nn.Module, str]:
    return net, "fc"


def _classifier_fc(net: nn.Module) -> tuple[nn.Module, str]:
    return net.classifier, str(len(net.classifier) - 1)


# family -> (lowres stem adapter, locator of the final linear layer)
_FAMILIES: dict[str, tuple[Callable[[nn.Module], None], Callable[[nn.Module], tuple[nn.Module, str]]]] = {
    "res": (_resnet_lowres, _resnet_fc),
    "alexnet": (_alexnet_lowres, _classifier_fc),
    "vgg": (_vgg_lowres, _classifier_fc),
}


def _family(name: str) -> str:
    return "res" if name.startswith("res") else name.rstrip("0123456789")


class InputNorm(nn.Module):
    """N x H x W x C integers -> float NCHW: (x * scale - mean) / std, per channel."""

    def __init__(self, scale: float, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).float()
        return (x * self.scale - self.mean) / self.std


class SubNetwork(nn.Module):
    """One ensemble member: input normalisation followed by the torchvision network."""

    def __init__(self, input_norm: InputNorm, net: nn.Module) -> None:
        super().__init__()
        self.input_norm = input_norm
        self.net = net

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_norm(batch))


def create_model(name: str, num_classes: int, *, stem: str = "lowres", head: str = "linear",
                 ebv_dim: int | None = None, ebv_tau: float = 0.07, ebv_seed: int = 42,
                 ebv_threshold: float = 0.002, ebv_steps: int = 100_000,
                 ebv_basis: torch.Tensor | None = None, input_scale: float = 1 / 255,
                 mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)) -> SubNetwork:
    """Build a member network. With ``head='ebv'`` the basis is ``ebv_basis`` if given, else generated."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_BUILDERS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; use imagenet or lowres (resolve auto with resolve_stem)")
    net = MODEL_BUILDERS[name](weights=None, num_classes=num_classes)
    lowres, locate_fc = _FAMILIES[_family(name)]
    if stem == "lowres":
        lowres(net)
    if head == "ebv":
        parent, attr = locate_fc(net)
        fc = parent[int(attr)] if attr.isdigit() else getattr(parent, attr)
        if ebv_basis is None:
            ebv_basis = generate_ebv(num_classes, ebv_dim or num_classes, threshold=ebv_threshold,
                                     seed=ebv_seed, max_steps=ebv_steps)[0]
        new_head = EBVHead(fc.in_features, ebv_basis, ebv_tau)
        if attr.isdigit():
            parent[int(attr)] = new_head
        else:
            setattr(parent, attr, new_head)
    elif head != "linear":
        raise ValueError(f"unknown head {head!r}; use linear or ebv")
    return SubNetwork(InputNorm(input_scale, mean, std), net)


def ebv_basis_of(model: nn.Module) -> torch.Tensor | None:
    for module in model.modules():
        if isinstance(module, EBVHead):
            return module.basis
    return None


def model_from_run(spec: ModelSpec, num_classes: int) -> SubNetwork:
    """Rebuild a member from its run record (``record.model``, ``record.num_classes``), ready for ``load_state_dict``.

    The EBV basis is a placeholder of the right shape (its values come from the state_dict), so no
    basis is regenerated here.
    """
    placeholder = torch.zeros(num_classes, spec.ebv_dim) if spec.head == "ebv" else None
    return create_model(spec.name, num_classes, stem=spec.stem, head=spec.head, ebv_dim=spec.ebv_dim,
                        ebv_tau=spec.ebv_tau, ebv_basis=placeholder, input_scale=spec.input.scale,
                        mean=spec.input.mean, std=spec.input.std)
