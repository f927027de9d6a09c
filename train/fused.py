"""K members of one architecture as one network whose every layer is grouped K ways (pure tensor code).

Member k's weights are block k of each layer: a convolution C_in -> C_out becomes K·C_in -> K·C_out in
K·groups groups (output block k sees input block k only), a BatchNorm over C channels one over K·C
(its statistics are per channel, so per member), a linear layer a batched matrix product, an EBV head
K heads each with its own basis. Activations are ``[B, K·C, H, W]`` all the way through, so
torchvision's own forward code (residual additions, pooling, flatten) runs unchanged. No gradient,
statistic or parameter crosses members.

Every fused tensor is the K member tensors concatenated along dim 0. ``fuse_members(..., share=True)``
then makes each member's parameters and buffers views of its block: an optimizer, a GradScaler or an
EMA stepping member k's own module steps block k of the fused network, and member k's state_dict is its
own weights (``own_storage`` copies them out of the block before saving). Dropout draws one mask per
batch for all members, as K members trained alone from the same seed draw the same mask.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from subspectral.train.ebv import EBVHead
from subspectral.train.models import InputNorm, SubNetwork
from torch import nn

# Modules whose forward is blind to the channel count: kept as they are (containers included).
_CHANNEL_BLIND = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Flatten,
                  nn.Sequential, tvm.ResNet, tvm.resnet.BasicBlock, tvm.resnet.Bottleneck, tvm.VGG, tvm.AlexNet)


class FusedInputNorm(nn.Module):
    """``[B, H, W, K·C]`` integers (member k's sample in channels k·C ..) -> float ``[B, K·C, H, W]``.

    Each member's own scale, mean and std (DCT band 0 has a mean, the other bands none)."""

    def __init__(self, norms: Sequence[InputNorm]) -> None:
        super().__init__()
        channels = norms[0].mean.numel()
        scale = torch.stack([n.scale.expand(channels) for n in norms]).reshape(1, -1, 1, 1)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("mean", torch.cat([n.mean for n in norms], dim=1).clone())
        self.register_buffer("std", torch.cat([n.std for n in norms], dim=1).clone())

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).float()
        return (x * self.scale - self.mean) / self.std


class GroupedLinear(nn.Module):
    """K linear layers: ``[B, K·in] -> [B, K·out]``; ``weight`` is ``[K·out, in]`` (member k: rows k·out ..)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, members: int) -> None:
        super().__init__()
        self.members = members
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.members
        out_features = self.weight.shape[0] // k
        stacked = x.reshape(x.shape[0], k, -1).transpose(0, 1)  # [K, B, in]
        weight = self.weight.view(k, out_features, -1).transpose(1, 2)  # [K, in, out]
        if self.bias is None:
            y = torch.bmm(stacked, weight)
        else:
            y = torch.baddbmm(self.bias.view(k, 1, out_features), stacked, weight)
        return y.transpose(0, 1).reshape(x.shape[0], k * out_features)


class GroupedEBVHead(nn.Module):
    """K EBV heads: ``normalize(W_k f_k + b_k) · B_kᵀ / τ`` for each member k; ``basis`` is ``[K·C, d]``."""

    def __init__(self, proj: GroupedLinear, basis: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.proj = proj
        self.register_buffer("basis", basis)
        self.tau = tau

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        k = self.proj.members
        embedding = F.normalize(self.proj(features).view(features.shape[0], k, -1), dim=-1)  # [B, K, d]
        basis = self.basis.view(k, -1, embedding.shape[-1]).to(embedding.dtype)  # [K, C, d]
        return torch.einsum("bkd,kcd->bkc", embedding, basis).reshape(features.shape[0], -1) / self.tau


class GroupedDropout(nn.Module):
    """Dropout of ``[B, K·F]`` with one ``[B, F]`` mask for all K members (what K seeded solo runs draw)."""

    def __init__(self, p: float, members: int) -> None:
        super().__init__()
        self.p = p
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        batch = x.shape[0]
        # The CPU's F.dropout draws empty_like(x).bernoulli_(1 - p) / (1 - p): the same draw, member-sized.
        noise = torch.empty((batch, x.shape[1] // self.members), dtype=x.dtype, device=x.device)
        noise.bernoulli_(1 - self.p).div_(1 - self.p)
        return (x.view(batch, self.members, -1) * noise[:, None, :]).view_as(x)


class FusedNetwork(nn.Module):
    """K members as one module: ``[B, H, W, K·C]`` integer batch -> logits ``[K, B, classes]``."""

    def __init__(self, input_norm: FusedInputNorm, net: nn.Module, members: int) -> None:
        super().__init__()
        self.input_norm = input_norm
        self.net = net
        self.members = members

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.input_norm(batch))
        return logits.view(logits.shape[0], self.members, -1).transpose(0, 1)


def _same(modules: Sequence[nn.Module]) -> None:
    first = modules[0]
    for other in modules[1:]:
        if type(other) is not type(first) or other.extra_repr() != first.extra_repr():
            raise ValueError(f"members differ in architecture: {first} against {other}")


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach() for t in tensors])


def _grouped_conv(convs: Sequence[nn.Conv2d]) -> nn.Conv2d:
    c, k = convs[0], len(convs)
    fused = nn.Conv2d(k * c.in_channels, k * c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                      k * c.groups, c.bias is not None, c.padding_mode, device="meta")
    fused.weight = nn.Parameter(_cat([m.weight for m in convs]))
    if c.bias is not None:
        fused.bias = nn.Parameter(_cat([m.bias for m in convs]))
    return fused


def _grouped_norm(norms: Sequence[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    n, k = norms[0], len(norms)
    fused = nn.BatchNorm2d(k * n.num_features, n.eps, n.momentum, n.affine, n.track_running_stats, device="meta")
    if n.affine:
        fused.weight = nn.Parameter(_cat([m.weight for m in norms]))
        fused.bias = nn.Parameter(_cat([m.bias for m in norms]))
    if n.track_running_stats:
        fused.running_mean = _cat([m.running_mean for m in norms])
        fused.running_var = _cat([m.running_var for m in norms])
        # Members take the same number of steps: one counter serves all (``share`` binds it to each).
        fused.num_batches_tracked = n.num_batches_tracked.detach().clone()
    return fused


def _grouped_linear(linears: Sequence[nn.Linear]) -> GroupedLinear:
    bias = None if linears[0].bias is None else _cat([m.bias for m in linears])
    return GroupedLinear(_cat([m.weight for m in linears]), bias, len(linears))


def _grouped_ebv(heads: Sequence[EBVHead]) -> GroupedEBVHead:
    if len({head.tau for head in heads}) != 1:
        raise ValueError("members differ in EBV temperature (model.ebv_tau)")
    return GroupedEBVHead(_grouped_linear([h.proj for h in heads]), _cat([h.basis for h in heads]), heads[0].tau)


def _grouped(modules: Sequence[nn.Module]) -> nn.Module:
    """The fused counterpart of one module position across the K members (children converted in place)."""
    _same(modules)
    first = modules[0]
    if isinstance(first, nn.Conv2d):
        return _grouped_conv(modules)
    if isinstance(first, nn.BatchNorm2d):
        return _grouped_norm(modules)
    if isinstance(first, nn.Linear):
        return _grouped_linear(modules)
    if isinstance(first, EBVHead):
        return _grouped_ebv(modules)
    if isinstance(first, nn.Dropout):
        return GroupedDropout(first.p, len(modules))
    if not isinstance(first, _CHANNEL_BLIND):
        raise ValueError(f"cannot fuse a {type(first).__name__} layer (fusable: ResNet, ResNeXt, VGG, AlexNet)")
    fused = copy.copy(first)  # shallow: same forward and hyper-parameters, new children
    fused._modules = {name: _grouped([getattr(m, name) for m in modules]) for name in first._modules}
    fused._parameters, fused._buffers = {}, {}
    if any(m._parameters or m._buffers for m in modules):
        raise ValueError(f"cannot fuse {type(first).__name__}: it holds tensors of its own")
    return fused


def fuse_members(members: Sequence[SubNetwork], *, share: bool = False,
                 memory_format: torch.memory_format = torch.contiguous_format) -> FusedNetwork:
    """One network computing all ``members`` (same architecture, own weights); logits ``[K, B, C]``.

    ``share=True``: afterwards each member's parameters and buffers are views of its block of the fused
    network, so stepping the member (optimizer, EMA reading it) is stepping the block, and the block's
    BatchNorm statistics are the member's. The fused parameters get zeroed ``.grad`` tensors whose blocks
    are the members' ``.grad``: zero them in place (``zero_grad(set_to_none=False)``), and backward
    accumulates into them. ``share=False``: the fused network holds copies.
    ``memory_format``: of the fused convolution weights (``torch.channels_last`` on CUDA), set before sharing.
    """
    if not members:
        raise ValueError("nothing to fuse")
    net = _grouped([m.net for m in members])
    fused = FusedNetwork(FusedInputNorm([m.input_norm for m in members]), net, len(members))
    fused.to(memory_format=memory_format)
    if share:
        for param in fused.parameters():
            param.grad = torch.zeros_like(param)
        for index, member in enumerate(members):
            bind_member(fused.net, member.net, index, len(members))
    return fused


def _blocks(fused: nn.Module, member: nn.Module) -> Iterator[tuple[nn.Module, nn.Module]]:
    members = dict(member.named_modules())
    for name, module in fused.named_modules():
        yield module, members[name]


def bind_member(fused: nn.Module, member: nn.Module, index: int, count: int) -> None:
    """Make ``member``'s tensors views of block ``index`` of ``fused`` (its grads too, once allocated)."""
    for fused_module, member_module in _blocks(fused, member):
        for name, tensor in fused_module.named_parameters(recurse=False):
            mine, block = member_module._parameters[name], _block(tensor.detach(), index, count)
            if block.shape != mine.shape:  # .data would silently take the new shape
                raise ValueError(f"block {index} of {name} is {tuple(block.shape)}, the member's {tuple(mine.shape)}")
            mine.data = block
            if tensor.grad is not None:
                mine.grad = _block(tensor.grad, index, count)
        for name, tensor in fused_module.named_buffers(recurse=False):
            member_module._buffers[name] = _block(tensor, index, count) if tensor.ndim else tensor


def _block(tensor: torch.Tensor, index: int, count: int) -> torch.Tensor:
    size = tensor.shape[0] // count
    return tensor[index * size:(index + 1) * size]


def own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict whose tensors own their memory: torch.save writes a view's whole storage (all K blocks)."""
    return {name: t.clone() if t.untyped_storage().nbytes() != t.nbytes else t for name, t in state.items()}
