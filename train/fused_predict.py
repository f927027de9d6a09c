"""ensemble-eval's member forward passes: torch members of one architecture fused K at a time.

``MemberPredictor(members, device, fuse)(images)`` yields each member's logits ``[B, C]`` of a lockstep batch
(``images[i]``: member i's sub-images, stored layout). Torch members whose networks are the same (run.json
``model`` but its input constants, and ``num_classes``) are evaluated ``fuse`` at a time by one
``train.fused.FusedNetwork`` holding copies of their weights: one forward pass for K members. Every other
member (another architecture or backend, or one left alone) predicts on its own, as with ``fuse=1``.
Results equal the members' own up to float rounding (summation order in the grouped layers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from subspectral.train.ensemble.members import Member, TorchMember
from subspectral.train.fused import FusedNetwork, fuse_members


def _architecture(member: Member) -> str | None:
    """What must agree for members to be fused; None for members that cannot be."""
    if not isinstance(member, TorchMember):
        return None
    spec = {key: value for key, value in member.meta["model"].items() if key != "input"}
    return json.dumps([spec, member.meta["num_classes"]], sort_keys=True)


class MemberPredictor:
    """Logits of every member for one lockstep batch, fusing members ``fuse`` at a time where possible."""

    def __init__(self, members: Sequence[Member], device: torch.device, fuse: int) -> None:
        self.members, self.device = list(members), device
        same: dict[str, list[int]] = {}
        for position, member in enumerate(self.members):
            key = _architecture(member)
            if key is not None:
                same.setdefault(key, []).append(position)
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.groups: list[tuple[list[int], FusedNetwork]] = []
        for positions in same.values():
            for first in range(0, len(positions), fuse):
                chunk = positions[first:first + fuse]
                if len(chunk) > 1:
                    net = fuse_members([self.members[i].model for i in chunk], memory_format=layout)
                    self.groups.append((chunk, net.to(device).eval()))
        self.group_of = {position: group for group in self.groups for position in group[0]}

    def __call__(self, images: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
        """Each member's logits ``[B, C]`` in member order; a fused group's K are computed together and held
        until their members' turn."""
        group_of = self.group_of
        ready: dict[int, torch.Tensor] = {}
        for position, member in enumerate(self.members):
            if position in group_of and position not in ready:
                positions, net = group_of[position]
                with torch.inference_mode():
                    batch = torch.cat([torch.as_tensor(images[i]).to(self.device, non_blocking=True)
                                       for i in positions], dim=-1)  # [B, H, W, K·C]
                    ready.update(zip(positions, net(batch).float(), strict=True))
            yield ready.pop(position) if position in group_of else member.predict(images[position])
