"""The fusion of ``train/ensemble.py`` and the stream reader of ``train/lockstep.py`` as they were
before issue 10, kept as the reference the streaming versions must equal exactly
(``tests/test_ensemble_reference.py``) and as the "old" side of ``bench/bench_ensemble_scale.py``.

The fusion builds every method's per-member terms for the whole batch at once (``[M, B, C]``;
float64 softmax and one-hot for ``vote``) and ranks every prefix from them; the reader holds a whole
shard, and a copy of each of its members, in memory. Only these are kept here: ``top_k_classes``,
``Tally``, ``geo_weights`` and the parsing and decoding functions are unchanged and imported.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from subspectral.train.ensemble.fusion import Hits, Tally, geo_weights, top_k_classes
from subspectral.train.ensemble.lockstep import MisalignedError, Stream, _Entry
from subspectral.train.shards import CorruptShard, iter_samples, to_sample
from subspectral.train.storage import read_bytes


def member_contributions(method: str, logits: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
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
    raise ValueError(method)


def _weighted(terms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return terms * weight.to(device=terms.device, dtype=terms.dtype)


def fuse_prefixes(method: str, logits: torch.Tensor, p: float = 0.3) -> Iterator[torch.Tensor]:
    terms, weights = member_contributions(method, logits, p)
    running = torch.zeros_like(terms[0])
    for i in range(terms.shape[0]):
        running += _weighted(terms[i], weights[i])
        yield running / weights[: i + 1].sum().item()


def _add(hits: Hits, ranked: torch.Tensor, labels: torch.Tensor) -> None:
    match = ranked == labels[:, None]
    hits.top1 += int(match[:, 0].sum())
    hits.topk += int(match.any(dim=-1).sum())


def tally_batch(tally: Tally, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    member_ranked = torch.stack([top_k_classes(member_logits, tally.k) for member_logits in logits])
    for hits, ranked in zip(tally.members, member_ranked, strict=True):
        _add(hits, ranked, labels)
    result = {"members": member_ranked}
    for method in tally.methods:
        for hits, scores in zip(tally.curve[method], fuse_prefixes(method, logits, tally.p), strict=True):
            ranked = top_k_classes(scores, tally.k)
            _add(hits, ranked, labels)
        result[method] = ranked
    tally.samples += int(labels.shape[0])
    return result


def read_stream_whole_shards(stream: Stream) -> Iterator[_Entry]:
    """The lockstep stream reader before issue 10: each shard read whole into memory (``read_bytes``)
    and parsed from the buffer (``iter_samples``, which copies every member), one shard at a time."""
    for shard_index, uri in enumerate(stream.shards):
        try:
            buffer = read_bytes(uri)
        except FileNotFoundError as error:
            raise MisalignedError(f"{stream.name}: shard missing: {uri}") from error
        except OSError as error:
            raise MisalignedError(f"{stream.name}: cannot read {uri}: {error}") from error
        try:
            for position, (key, parts) in enumerate(iter_samples(buffer)):
                yield _Entry(shard_index, key, to_sample(key, parts), f"{uri} sample {position}")
        except CorruptShard as error:
            raise MisalignedError(f"{stream.name}: corrupt shard {uri}: {error}") from error
