"""Fusion of member outputs: pure tensor code, no I/O.

Members' logits ``[B, C]`` (B samples, C classes) come one member at a time, in *rank order*: member 0
is the one with the best validation accuracy of its own (see ``rank_members``). ``PrefixFusion`` and
``BatchFusion`` keep running sums, so a batch of M members needs O(B·C) memory and the accuracy
against the number of members (every prefix 1 … M, every method) O(M·B·C) time; functions that
take all members at once accept ``[M, B, C]`` or a sequence of ``[B, C]``. Fused outputs are class
scores ``[B, C]``; higher is better.

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

from collections.abc import Iterable, Iterator, Sequence
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


class PrefixFusion:
    """One method's fusion of members added one at a time, in rank order: the scores of every prefix.

    After ``add(logits)`` of the n-th member (logits ``[B, C]``), ``scores()`` are the fused scores of
    the first n, ``Σᵢ wᵢ·termᵢ / Σᵢ wᵢ``, kept as a running sum: the curve over n = 1 … M costs one pass
    over the members and holds one ``[B, C]`` sum, never the ``[M, B, C]`` terms. The arithmetic is
    the same, operation for operation, as summing the stacked terms (the terms are added in rank order
    to a zero start; a weight of 1 is not multiplied, since x·1 = x), so the scores are bit-identical
    to that. For ``vote`` the tie-break term is scaled by the full M given here, which keeps it below
    half a vote for every prefix.
    """

    def __init__(self, method: str, num_members: int, p: float = 0.3) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown fusion method {method!r}; choose from {', '.join(METHODS)}")
        self.method = method
        self.num_members = num_members
        unit = torch.ones(num_members, dtype=torch.float64)
        self.weights = geo_weights(num_members, p) if method == "geo" else unit
        self.added = 0
        self._running: torch.Tensor | None = None
        self._weight_sum = 0.0

    def _term(self, logits: torch.Tensor) -> torch.Tensor:
        if self.method == "mean-probs":
            return logits.softmax(dim=-1)
        if self.method == "vote":  # one vote for the top-1 class + mean probability as tie-break
            term = logits.double().softmax(dim=-1).div_(2 * self.num_members)
            term[torch.arange(term.shape[0], device=term.device), logits.argmax(dim=-1)] += 1.0
            return term
        return logits  # mean-logits, geo

    def add(self, logits: torch.Tensor) -> None:
        """Add the next member's logits ``[B, C]``."""
        if self.added == self.num_members:
            raise ValueError(f"all {self.num_members} members were already added")
        term = self._term(logits)
        if self._running is None:
            self._running = torch.zeros_like(term)
        if self.method == "geo":
            term = term * self.weights[self.added].to(device=term.device, dtype=term.dtype)
        self._running += term
        self.added += 1
        self._weight_sum = self.weights[: self.added].sum().item()

    def _check_added(self) -> torch.Tensor:
        if self._running is None:
            raise ValueError("no member was added yet")
        return self._running

    def scores(self) -> torch.Tensor:
        """Fused scores ``[B, C]`` of the members added so far."""
        return self._check_added() / self._weight_sum

    def top_k(self, k: int) -> torch.Tensor:
        """``top_k_classes(self.scores(), k)``, without dividing the whole running sum."""
        return top_k_of_quotient(self._check_added(), self._weight_sum, k)


def fuse_prefixes(method: str, logits: Iterable[torch.Tensor], p: float = 0.3) -> Iterator[torch.Tensor]:
    """Fused scores of the first 1, 2, …, M members of ``logits`` (``[M, B, C]`` or M tensors ``[B, C]``)."""
    members = list(logits)
    fusion = PrefixFusion(method, len(members), p)
    for member_logits in members:
        fusion.add(member_logits)
        yield fusion.scores()


def fuse(method: str, logits: Iterable[torch.Tensor], p: float = 0.3) -> torch.Tensor:
    """Fused class scores ``[B, C]`` of all M members."""
    members = list(logits)
    fusion = PrefixFusion(method, len(members), p)
    for member_logits in members:
        fusion.add(member_logits)
    return fusion.scores()


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


def top_k_of_quotient(numerator: torch.Tensor, divisor: float, k: int) -> torch.Tensor:
    """``top_k_classes(numerator / divisor, k)`` (``divisor`` > 0), dividing only what decides it.

    Dividing by a positive number keeps the order of values but can round two of them to one quotient,
    which then ties (lower index first). So only the k+1 largest numerators of each row are divided:
    where their quotients are all distinct (and not NaN) nothing outside them can enter the top k and
    topk's order is the exact answer; the other rows are ranked from their full quotients.
    """
    k = min(k, numerator.shape[-1])
    width = min(k + 1, numerator.shape[-1])
    values, indices = numerator.topk(width, dim=-1)
    quotients = values / divisor
    unsure = (quotients[:, 1:] == quotients[:, :-1]).any(dim=-1) | quotients.isnan().any(dim=-1)
    if bool(unsure.any()):
        indices[unsure, :k] = top_k_classes(numerator[unsure] / divisor, k)
    return indices[:, :k]


def hit_counts(ranked: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[top-1 hits, top-k hits]`` of ranked classes ``[B, k]`` against ``labels`` ``[B]``, on their device."""
    match = ranked == labels[:, None]
    return torch.stack([match[:, 0].sum(), match.any(dim=-1).sum()])


@dataclass
class Hits:
    """Correct top-1 / top-k counts over the samples seen so far (integers, so merges are exact)."""

    top1: int = 0
    topk: int = 0

    def add(self, ranked: torch.Tensor, labels: torch.Tensor) -> None:
        top1, topk = hit_counts(ranked, labels).tolist()  # one device sync
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


class BatchFusion:
    """One batch, fed member by member in rank order: each member's and each prefix's hits, every method.

    Only one member's logits ``[B, C]`` and one running sum per method are held, so an ensemble of M
    members needs O(B·C) memory, not O(M·B·C), and the curve costs O(M·B·C) time for all methods
    together. Counts stay on the device until ``finish``, which adds them to the tally in one sync.
    """

    def __init__(self, tally: Tally, labels: torch.Tensor) -> None:
        self.tally = tally
        self.labels = labels
        self.fusions = {method: PrefixFusion(method, tally.num_members, tally.p) for method in tally.methods}
        self.member_ranked: list[torch.Tensor] = []
        self.ranked: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[Hits, torch.Tensor]] = []

    def add(self, logits: torch.Tensor) -> None:
        """The next member's logits ``[B, C]`` (rank order)."""
        rank = len(self.member_ranked)
        ranked = top_k_classes(logits, self.tally.k)
        self.member_ranked.append(ranked)
        self._pending.append((self.tally.members[rank], hit_counts(ranked, self.labels)))
        for method, fusion in self.fusions.items():
            fusion.add(logits)
            self.ranked[method] = fusion.top_k(self.tally.k)
            self._pending.append((self.tally.curve[method][rank], hit_counts(self.ranked[method], self.labels)))

    def finish(self) -> dict[str, torch.Tensor]:
        """Add the batch to the tally; each member's (``"members"`` → ``[M, B, k]``) and each method's
        (``[B, k]``, all M members) ranked classes."""
        if len(self.member_ranked) != self.tally.num_members:
            raise ValueError(f"{len(self.member_ranked)} of {self.tally.num_members} members were added")
        counts = torch.stack([count for _, count in self._pending]).tolist()
        for (hits, _), (top1, topk) in zip(self._pending, counts, strict=True):
            hits.top1 += top1
            hits.topk += topk
        self.tally.samples += int(self.labels.shape[0])
        return {"members": torch.stack(self.member_ranked), **self.ranked}


def tally_batch(tally: Tally, logits: Iterable[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Add one batch (``[M, B, C]`` or M tensors ``[B, C]``, rank order) to ``tally``; returns each
    member's and each method's ranked classes: ``"members"`` → ``[M, B, k]``, a method → ``[B, k]``."""
    fusion = BatchFusion(tally, labels)
    for member_logits in logits:
        fusion.add(member_logits)
    return fusion.finish()


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
