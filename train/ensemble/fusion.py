"""Fusion of member outputs: pure tensor code, no I/O.

Every function takes the members' logits stacked as ``[M, B, C]`` (M members, B samples, C classes)
in *rank order*: member 0 is the one with the best validation accuracy of its own (see
``rank_members``). Fused outputs are class scores ``[B, C]``; higher is better.

Methods (the source method's rule is ``Σ wᵢ·logitsᵢ / Σ wᵢ`` on raw logits):

* ``mean-logits``: wᵢ = 1, on logits.
* ``mean-probs``: wᵢ = 1, on softmax probabilities.
* ``geo``: wᵢ = p·(1−p)^i for the member at rank i, on logits (the source's default, p = 0.3).
* ``vote``: each member gives one vote to its top-1 class. Tie rule: among classes with equal votes
  the one with the higher mean softmax probability wins; exactly equal scores go to the lower class
  index (the same rule as every other method, see ``top_k_classes``). The tie-break is folded into
  one score, ``votes + Σ probs / (2M)``: the second term is below 1/2, so it never outweighs a vote.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

METHODS: tuple[str, ...] = ("mean-logits", "mean-probs", "geo", "vote")


def rank_members(accuracies: Sequence[float], shards: Sequence[int]) -> list[int]:
    """Positions of the members, best own accuracy first; equal accuracies go to the lower shard."""
    return sorted(range(len(accuracies)), key=lambda i: (-accuracies[i], shards[i]))


def geo_weights(num_members: int, p: float) -> torch.Tensor:
    """p·(1−p)^i for ranks i = 0 … num_members−1 (float64)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"geo needs 0 < p < 1, got p={p}")
    return p * (1.0 - p) ** torch.arange(num_members, dtype=torch.float64)


def member_contributions(method: str, logits: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member terms ``[M, B, C]`` and weights ``[M]`` whose weighted mean is the fused score."""
    num_members = logits.shape[0]
    ones = torch.ones(num_members, dtype=torch.float64)
    if method == "mean-logits":
        return logits, ones
    if method == "mean-probs":
        return logits.softmax(dim=-1), ones
    if method == "geo":
        return logits, geo_weights(num_members, p)
    if method == "vote":
        probs = logits.double().softmax(dim=-1)
        votes = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).double()
        return votes + probs / (2 * num_members), ones
    raise ValueError(f"unknown fusion method {method!r}; choose from {', '.join(METHODS)}")


def _weighted(terms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return terms * weight.to(device=terms.device, dtype=terms.dtype)


def fuse(method: str, logits: torch.Tensor, p: float = 0.3) -> torch.Tensor:
    """Fused class scores ``[B, C]`` of all M members."""
    terms, weights = member_contributions(method, logits, p)
    return _weighted(terms, weights[:, None, None]).sum(dim=0) / weights.sum().item()


def fuse_prefixes(method: str, logits: torch.Tensor, p: float = 0.3) -> Iterator[torch.Tensor]:
    """Fused scores of the first 1, 2, …, M members (accuracy against the number of members).

    Running sums, so the M fusions cost one pass. For ``vote`` the tie-break term is scaled by the
    full M, which keeps it below half a vote for every prefix.
    """
    terms, weights = member_contributions(method, logits, p)
    running = torch.zeros_like(terms[0])
    for i in range(terms.shape[0]):
        running += _weighted(terms[i], weights[i])
        yield running / weights[: i + 1].sum().item()


def top_k_classes(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, min(k, C)]`` of the k best classes, best first; equal scores: lower index first.

    ``torch.topk`` leaves the order of equal values unspecified, so rows with a tie anywhere in their
    first k+1 values are re-ranked with a stable sort; all other rows keep topk's (exact) answer.
    """
    k = min(k, scores.shape[-1])
    width = min(k + 1, scores.shape[-1])
    values, indices = scores.topk(width, dim=-1)
    tied = (values[:, 1:] == values[:, :-1]).any(dim=-1)
    if bool(tied.any()):
        indices[tied] = scores[tied].sort(dim=-1, descending=True, stable=True).indices[:, :width]
    return indices[:, :k]


@dataclass
class Hits:
    """Correct top-1 / top-k counts over the samples seen so far (integers, so merges are exact)."""

    top1: int = 0
    topk: int = 0

    def add(self, ranked: torch.Tensor, labels: torch.Tensor) -> None:
        match = ranked == labels[:, None]
        top1, topk = torch.stack([match[:, 0].sum(), match.any(dim=-1).sum()]).tolist()  # one device sync
        self.top1 += top1
        self.topk += topk


@dataclass
class Tally:
    """Everything the report needs, accumulated batch by batch.

    ``members[i]`` counts member i (rank order); ``curve[m][n-1]`` the ensemble of the n best members
    under method m, so ``curve[m][-1]`` is the whole ensemble (``fused(m)``).
    """

    num_members: int
    methods: tuple[str, ...]
    p: float = 0.3
    k: int = 5
    samples: int = 0
    members: list[Hits] = field(init=False)
    curve: dict[str, list[Hits]] = field(init=False)

    def __post_init__(self) -> None:
        self.members = [Hits() for _ in range(self.num_members)]
        self.curve = {m: [Hits() for _ in range(self.num_members)] for m in self.methods}

    def fused(self, method: str) -> Hits:
        return self.curve[method][-1]

    def _all_hits(self) -> list[Hits]:
        return self.members + [hits for method in self.methods for hits in self.curve[method]]

    def counts(self) -> list[int]:
        """Every counter as one flat list, for a sum across workers; ``set_counts`` takes it back."""
        return [self.samples] + [value for hits in self._all_hits() for value in (hits.top1, hits.topk)]

    def set_counts(self, counts: Sequence[int]) -> None:
        self.samples = int(counts[0])
        for i, hits in enumerate(self._all_hits()):
            hits.top1, hits.topk = int(counts[1 + 2 * i]), int(counts[2 + 2 * i])


def tally_batch(tally: Tally, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Add one batch to ``tally``; returns each member's and each method's ranked classes.

    Keys of the result: ``"members"`` → ``[M, B, k]``, and one key per method → ``[B, k]``.
    """
    member_ranked = torch.stack([top_k_classes(member_logits, tally.k) for member_logits in logits])
    for hits, ranked in zip(tally.members, member_ranked, strict=True):
        hits.add(ranked, labels)
    result = {"members": member_ranked}
    for method in tally.methods:
        for hits, scores in zip(tally.curve[method], fuse_prefixes(method, logits, tally.p), strict=True):
            ranked = top_k_classes(scores, tally.k)
            hits.add(ranked, labels)
        result[method] = ranked  # the last prefix: the whole ensemble
    tally.samples += int(labels.shape[0])
    return result


def ten_crop(images: torch.Tensor, fraction: float = 0.875) -> torch.Tensor:
    """10-crop test views of an integer batch ``[B, H, W, C]`` → ``[10, B, H, W, C]``, same dtype.

    Crops of ``fraction`` of each side at the four corners and the centre, then their horizontal
    flips; each crop is resized back to H×W (bilinear) and rounded, so the member sees inputs of
    the size it was trained on. Interpolation is a convex combination: values stay in range.
    """
    _, height, width, _ = images.shape
    crop_h, crop_w = round(height * fraction), round(width * fraction)
    corners = [(0, 0), (0, width - crop_w), (height - crop_h, 0), (height - crop_h, width - crop_w)]
    corners.append(((height - crop_h) // 2, (width - crop_w) // 2))
    planar = images.permute(0, 3, 1, 2).float()
    views = [
        torch.nn.functional.interpolate(
            planar[:, :, top : top + crop_h, left : left + crop_w], size=(height, width), mode="bilinear"
        )
        for top, left in corners
    ]
    views += [view.flip(-1) for view in views]
    return torch.stack(views).round().to(images.dtype).permute(0, 1, 3, 4, 2)
