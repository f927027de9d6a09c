"""Equiangular Basis Vectors (Shen, Sun, Wei, CVPR 2023): generation and the classifier head.

The generator follows the official ``Generate_EBV.py`` (row-normalised Gaussian start; minimise
sum(relu(|cos| - threshold)) over all pairs by SGD, renormalising rows every step; stop when the
largest |cos| is within 1e-4 of the threshold or after ``max_steps``), vectorised: the gradient of
that loss is ``2 * S @ B`` with ``S = sign(G) * [|G| > threshold]`` off the diagonal, computed in
row blocks so memory stays O(block * C) for ImageNet-21K class counts.

When C > d no basis can beat the Welch bound, and with a threshold below it this L1 hinge loss
prefers collapsing vectors onto each other (measured: C=100, d=64, threshold 0.002 ends with max
|cos| = 0.99996). The threshold is therefore raised to ``WELCH_MARGIN`` x the Welch bound when
it is lower; C <= d (e.g. the published 1000 classes in 1000 dimensions) is unaffected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_BLOCK_ROWS = 2048
WELCH_MARGIN = 2.0


def welch_bound(num_vectors: int, dim: int) -> float:
    """The smallest max |cos| any set of ``num_vectors`` unit vectors in ``dim`` dimensions can reach."""
    if num_vectors <= dim:
        return 0.0
    return math.sqrt((num_vectors - dim) / (dim * (num_vectors - 1)))


def reachable_threshold(num_vectors: int, dim: int, threshold: float) -> float:
    return max(threshold, WELCH_MARGIN * welch_bound(num_vectors, dim))


def _step(basis: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float]:
    """Gradient of sum(relu(|cos| - threshold)) over ordered pairs i != j, and the max off-diagonal |cos|."""
    grad = torch.empty_like(basis)
    worst = 0.0
    for start in range(0, basis.shape[0], _BLOCK_ROWS):
        rows = basis[start:start + _BLOCK_ROWS]
        gram = rows @ basis.T
        gram.diagonal(offset=start).zero_()
        magnitude = gram.abs()
        worst = max(worst, float(magnitude.max()))
        push = torch.where(magnitude > threshold, gram.sign(), torch.zeros((), dtype=gram.dtype))
        grad[start:start + _BLOCK_ROWS] = 2.0 * (push @ basis)
    return grad, worst


def generate_ebv(num_classes: int, dim: int, *, threshold: float = 0.002, seed: int = 42,
                 max_steps: int = 100_000, lr: float = 1e-3,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, float, int]:
    """(basis C x d with unit rows on the CPU, max pairwise |cos| reached, steps taken).

    Deterministic per seed on a given device; the start is drawn on the CPU.
    """
    threshold = reachable_threshold(num_classes, dim, threshold)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(num_classes, dim, generator=generator, dtype=torch.float32)
    basis = F.normalize(start.to(device), dim=1)
    steps = 0
    worst = 1.0
    with torch.no_grad():
        while True:
            grad, worst = _step(basis, threshold)
            if worst <= threshold + 1e-4 or steps >= max_steps:
                break
            basis = F.normalize(basis - lr * grad, dim=1)
            steps += 1
    return basis.cpu().contiguous(), worst, steps


def max_abs_cos(basis: torch.Tensor) -> float:
    return _step(basis, 1.0)[1]


class EBVHead(nn.Module):
    """logits = normalize(W f + b) . B^T / tau; only the projection W, b trains, B is a persistent buffer."""

    def __init__(self, in_features: int, basis: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, basis.shape[1])
        self.register_buffer("basis", basis.clone(), persistent=True)
        self.tau = tau

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embedding = F.normalize(self.proj(features), dim=-1)
        return embedding @ self.basis.to(embedding.dtype).T / self.tau
