"""Fusion rules of train/ensemble.py against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from subspectral.train.ensemble.fusion import (
    METHODS,
    Tally,
    fuse,
    fuse_prefixes,
    geo_weights,
    rank_members,
    tally_batch,
    ten_crop,
    top_k_classes,
    top_k_of_quotient,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Three members (rank order), two samples, four classes.
LOGITS = torch.tensor(
    [
        [[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]],
        [[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0]],
        [[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
    ]
)


def softmax_by_hand(row: list[float]) -> list[float]:
    exps = [math.exp(x) for x in row]
    return [e / sum(exps) for e in exps]


def test_rank_members_best_first_ties_to_lower_shard() -> None:
    assert rank_members([0.5, 0.7, 0.7, 0.9], shards=[4, 9, 2, 7]) == [3, 2, 1, 0]


def test_geo_weights_are_p_times_one_minus_p_to_the_rank() -> None:
    assert geo_weights(3, 0.3).tolist() == pytest.approx([0.3, 0.21, 0.147])
    with pytest.raises(ValueError, match="0 < p < 1"):
        geo_weights(3, 1.0)


def test_mean_logits_by_hand() -> None:
    expected = [[2 / 3, 1.0, 0.0, 0.0], [0.0, 1 / 3, 4 / 3, 1 / 3]]
    assert fuse("mean-logits", LOGITS).tolist() == [pytest.approx(row) for row in expected]


def test_geo_by_hand_differs_from_mean() -> None:
    w = [0.3, 0.21, 0.147]
    sample0 = [w[0] * 2 / sum(w), (w[1] + w[2]) * 1.5 / sum(w), 0.0, 0.0]
    fused = fuse("geo", LOGITS, p=0.3)
    assert fused[0].tolist() == pytest.approx(sample0)
    # The best member alone outweighs the next two here; the plain mean picks class 1.
    assert fused[0].argmax() == 0
    assert fuse("mean-logits", LOGITS)[0].argmax() == 1


def test_mean_probs_by_hand() -> None:
    rows = [softmax_by_hand(LOGITS[m, 1].tolist()) for m in range(3)]
    expected = [sum(r[c] for r in rows) / 3 for c in range(4)]
    assert fuse("mean-probs", LOGITS)[1].tolist() == pytest.approx(expected)


def test_vote_counts_votes_then_mean_probability() -> None:
    scores = fuse("vote", LOGITS)
    # Sample 0: class 1 has two votes out of three.
    assert top_k_classes(scores, 1)[0].item() == 1
    # Sample 1: one vote each for classes 1, 2, 3: class 2 has the highest mean probability.
    assert top_k_classes(scores, 3)[1].tolist() == [2, 1, 3]


def test_vote_tie_on_votes_goes_to_higher_mean_probability_not_lower_index() -> None:
    logits = torch.tensor([[[0.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 3.0, 0.0]]])
    assert top_k_classes(fuse("vote", logits), 2)[0].tolist() == [2, 1]


def test_vote_exact_tie_goes_to_lower_class_index() -> None:
    logits = torch.tensor([[[0.0, 0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0, 0.0]]])
    assert top_k_classes(fuse("vote", logits), 4)[0].tolist() == [1, 2, 0, 3]


def test_top_k_classes_orders_exact_ties_by_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert top_k_classes(scores, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    assert top_k_classes(scores, 9).shape == (2, 5)


def test_top_k_of_a_quotient_ranks_ties_made_by_the_division_like_the_full_quotient() -> None:
    low = torch.tensor(1.5)
    high = torch.nextafter(low, torch.tensor(2.0))
    numerator = torch.stack([
        torch.stack([low, high, torch.tensor(0.0), torch.tensor(1.0)]),
        torch.tensor([0.0, 2.0, math.nan, 1.0]),
        torch.tensor([3.0, 1.0, 2.0, 0.0]),
    ])
    # Different numerators, one quotient (a divisor below 1 rounds to a coarser grid): a tie, lower index first.
    assert high > low and high / 0.3 == low / 0.3
    expected = top_k_classes(numerator / 0.3, 3)
    assert expected[0, :2].tolist() == [0, 1]
    assert top_k_of_quotient(numerator, 0.3, 3).tolist() == expected.tolist()
    assert top_k_of_quotient(numerator, 0.3, 9).tolist() == top_k_classes(numerator / 0.3, 9).tolist()


@pytest.mark.parametrize("method", METHODS)
def test_prefixes_end_with_the_full_fusion(method: str) -> None:
    prefixes = [s.clone() for s in fuse_prefixes(method, LOGITS)]
    assert len(prefixes) == 3
    torch.testing.assert_close(prefixes[-1], fuse(method, LOGITS).to(prefixes[-1].dtype))
    torch.testing.assert_close(prefixes[0].argmax(-1), LOGITS[0].argmax(-1))


def test_tally_counts_members_methods_and_curve() -> None:
    labels = torch.tensor([0, 2])
    tally = Tally(num_members=3, methods=METHODS, p=0.3, k=2)
    ranked = tally_batch(tally, LOGITS, labels)
    assert tally.samples == 2
    # Top-2 of [0, 1.5, 0, 0] is [1, 0] (equal zeros: lower index), which holds label 0.
    assert [(h.top1, h.topk) for h in tally.members] == [(1, 1), (1, 2), (0, 1)]
    # mean-logits: sample 0 -> class 1 (wrong; class 0 second), sample 1 -> class 2 (right).
    assert (tally.fused("mean-logits").top1, tally.fused("mean-logits").topk) == (1, 2)
    assert (tally.fused("geo").top1, tally.fused("geo").topk) == (2, 2)
    assert [h.top1 for h in tally.curve["mean-logits"]] == [1, 2, 1]
    assert ranked["members"].shape == (3, 2, 2)
    assert ranked["geo"][:, 0].tolist() == [0, 2]


def test_ten_crop_views_corners_centre_and_flips() -> None:
    image = torch.arange(8 * 8, dtype=torch.int16).reshape(1, 8, 8, 1)  # value = 8·row + column
    views = ten_crop(image, fraction=1.0)
    assert views.shape == (10, 1, 8, 8, 1) and views.dtype == torch.int16
    for view in views[:5]:  # a full-size crop is the image itself, wherever it is anchored
        torch.testing.assert_close(view, image)
    torch.testing.assert_close(views[5:], views[:5].flip(3))

    corners = ten_crop(image, fraction=0.5)  # 4x4 crops scaled back to 8x8
    assert corners[0, 0, 0, 0, 0] == 0 and corners[3, 0, -1, -1, 0] == 63
    means = corners[:5, 0, ..., 0].float().mean(dim=(1, 2)).tolist()
    assert means == pytest.approx([13.5, 17.5, 45.5, 49.5, 31.5])  # the crops' own means: 8·row + col


class LargestResult(TorchDispatchMode):
    """Records the largest tensor (in bytes) that any torch operation returns while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                self.bytes = max(self.bytes, leaf.numel() * leaf.element_size())
        return result


def test_a_batch_is_fused_and_tallied_without_a_members_by_batch_by_classes_tensor() -> None:
    members, batch, classes = 6, 8, 300
    logits = torch.randn(members, batch, classes, generator=torch.Generator().manual_seed(0))
    tally = Tally(num_members=members, methods=METHODS)
    with LargestResult() as largest:
        tally_batch(tally, logits, torch.arange(batch))
    # Nothing larger than one float64 [B, C] (vote's running sum); the [M, B, C] terms are never built.
    assert 0 < largest.bytes <= batch * classes * 8
    assert tally.samples == batch
