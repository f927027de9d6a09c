"""EBV basis: threshold reached, near-orthogonal when C <= d, deterministic, no collapse when C > d."""

from __future__ import annotations

import torch
from subspectral.train.ebv import EBVHead, generate_ebv, max_abs_cos, reachable_threshold, welch_bound


def test_basis_meets_threshold_and_has_unit_rows():
    basis, worst, steps = generate_ebv(40, 64, threshold=0.002, seed=42)
    assert basis.shape == (40, 64)
    assert torch.allclose(basis.norm(dim=1), torch.ones(40), atol=1e-5)
    assert max_abs_cos(basis) <= 0.002 + 1e-4
    assert abs(worst - max_abs_cos(basis)) < 1e-6 and steps > 0  # a random start does not meet it


def test_c_equal_d_is_near_orthogonal():
    basis, _, _ = generate_ebv(128, 128, threshold=0.002, seed=1)
    gram = basis @ basis.T
    assert (gram - torch.eye(128)).abs().max() <= 0.0021


def test_same_seed_same_basis_other_seed_differs():
    first, _, _ = generate_ebv(20, 32, seed=7)
    assert torch.equal(first, generate_ebv(20, 32, seed=7)[0])
    assert not torch.allclose(first, generate_ebv(20, 32, seed=8)[0])


def test_more_classes_than_dimensions_spreads_instead_of_collapsing():
    # 100 vectors in 64-d cannot go below the Welch bound (0.075); the raised threshold is reached.
    threshold = reachable_threshold(100, 64, 0.002)
    assert threshold == 2 * welch_bound(100, 64)
    basis, worst, _ = generate_ebv(100, 64, threshold=0.002, seed=42)
    assert worst <= threshold + 1e-4
    assert max_abs_cos(basis) < 0.2


def test_head_keeps_basis_fixed_and_in_state_dict():
    basis, _, _ = generate_ebv(10, 16, seed=0)
    head = EBVHead(32, basis, tau=0.07)
    assert torch.equal(head.state_dict()["basis"], basis)
    assert [name for name, _ in head.named_parameters()] == ["proj.weight", "proj.bias"]
    logits = head(torch.randn(4, 32))
    assert logits.shape == (4, 10) and logits.abs().max() <= 1 / 0.07 + 1e-4
    logits.sum().backward()
    assert head.proj.weight.grad is not None
