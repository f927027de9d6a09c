"""The streaming fusion (train/ensemble.py) and reading (train/lockstep.py) equal what they replaced
exactly: against tests/ensemble_reference.py (the fusion before issue 10) the same scores bit for bit,
the same top-1/top-k counts per member, per method and per prefix, and the same ranked classes, on
synthetic logits built to tie and to saturate, and the whole command on the prepared sample."""

from __future__ import annotations

import ensemble_reference as reference
import numpy as np
import pytest
import torch
from subspectral.train.ensemble.fusion import METHODS, PrefixFusion, Tally, fuse_prefixes, tally_batch


def synthetic_batches(kind: str, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Batches of logits [M, B, C] and labels [B] of one kind; returns (logits, labels, C)."""
    generator = torch.Generator().manual_seed(seed)
    members, batch, classes = {"ties": (5, 40, 6), "quantised": (7, 32, 500), "saturated": (4, 32, 50),
                               "two-classes": (3, 16, 2)}[kind]
    logits, labels = [], []
    for _ in range(3):
        x = torch.randn(members, batch, classes, generator=generator)
        if kind == "ties":
            x = torch.randint(0, 3, (members, batch, classes), generator=generator).float()
            x[:, :4] = 1.0  # whole rows equal in every member: every method ties everywhere
        elif kind == "quantised":
            x = (2 * x).round() / 2
            x[:, :3] = x[0, :3]  # identical members on some samples: fused scores tie exactly
        elif kind == "saturated":
            x = 200 * x  # softmax of exactly 0 and 1
        logits.append(x)
        # Half the labels are some member's top class, so members, methods and prefixes score differently.
        voter = torch.randint(0, members, (batch,), generator=generator)
        label = torch.where(torch.arange(batch) % 2 == 0, x[voter, torch.arange(batch)].argmax(dim=-1),
                            torch.randint(0, classes, (batch,), generator=generator))
        labels.append(label)
    return logits, labels, classes


KINDS = ("ties", "quantised", "saturated", "two-classes")


def counts(tally: Tally) -> list[int]:
    return tally.counts()


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_scores_are_bit_identical(kind: str) -> None:
    logits, _, _ = synthetic_batches(kind, seed=1)
    for method in METHODS:
        new = list(fuse_prefixes(method, logits[0], p=0.3))
        old = list(reference.fuse_prefixes(method, logits[0], p=0.3))
        assert len(new) == len(old) == logits[0].shape[0]
        for n, (a, b) in enumerate(zip(new, old, strict=True)):
            assert a.dtype == b.dtype and torch.equal(a, b), (method, n + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_counts_per_member_method_and_prefix_and_ranked_classes_are_identical(kind: str) -> None:
    logits, labels, classes = synthetic_batches(kind, seed=2)
    members = logits[0].shape[0]
    new, old = (Tally(num_members=members, methods=METHODS, p=0.3, k=min(5, classes)) for _ in range(2))
    for batch, batch_labels in zip(logits, labels, strict=True):
        ranked_new = tally_batch(new, list(batch), batch_labels)  # member by member, as the command does
        ranked_old = reference.tally_batch(old, batch, batch_labels)
        assert ranked_new.keys() == ranked_old.keys()
        for name in ranked_old:
            assert torch.equal(ranked_new[name], ranked_old[name]), name
    assert counts(new) == counts(old)
    assert new.samples == 3 * labels[0].shape[0]
    # The fixtures are not degenerate: prefixes and methods disagree somewhere.
    assert len({hits.top1 for method in METHODS for hits in new.curve[method]}) > 1


def test_vote_keeps_its_tie_rule_when_streamed() -> None:
    # Ranks 0 and 1 vote for classes 1 and 2 (one vote each); class 2 has the higher mean probability.
    fusion = PrefixFusion("vote", num_members=2)
    fusion.add(torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    fusion.add(torch.tensor([[0.0, 0.0, 3.0, 0.0]]))
    assert fusion.scores()[0].argsort(descending=True, stable=True)[:2].tolist() == [2, 1]
    assert fusion.top_k(4).tolist() == [[2, 1, 0, 3]]
    with pytest.raises(ValueError, match="already added"):
        fusion.add(torch.zeros(1, 4))


def reference_batches(data: str, card: dict, shards: list[int], batch_size: int):
    """The val sets of ``shards`` read the way the command read them before issue 10 (whole shards in
    memory), decoded into batch buffers of ``batch_size`` in order: ``(entries, images per stream)``."""
    from subspectral.schemas import DatasetCard
    from subspectral.train.ensemble.lockstep import Stream
    from subspectral.train.prepared import shard_uris
    from subspectral.train.shards import decode_into

    typed = DatasetCard.from_json(card)
    shape, dtype = typed.sample_shape, typed.dtype
    entries = [list(reference.read_stream_whole_shards(Stream(f"sub-{k}", shard_uris(data, typed, k, "val"), shape,
                                                               dtype))) for k in shards]
    for start in range(0, len(entries[0]), batch_size):
        rows = [stream[start:start + batch_size] for stream in entries]
        images = [np.empty((len(row), *shape), dtype) for row in rows]
        for buffer, row in zip(images, rows, strict=True):
            assert all(decode_into(buffer[i], entry.sample) for i, entry in enumerate(row))
        yield rows[0], images


def test_the_command_on_the_sample_equals_the_reference(prepared_sample, tmp_path) -> None:
    """Real torch members (deterministic random weights) on the prepared sample's JPEG sub-datasets:
    report.json and predictions.parquet equal the pre-issue-10 reading and fusion, batch by batch."""
    import argparse
    import json

    import pyarrow.parquet as pq
    from ensemble_fixtures import make_torch_run
    from subspectral.train.ensemble import cli as ensemble_cli
    from subspectral.train.ensemble.members import load_member, read_run

    data, runs, out = str(prepared_sample), tmp_path / "runs", tmp_path / "report"
    card = json.loads((prepared_sample / "dataset.json").read_text())
    own_top1 = {0: 40.0, 14: 60.0, 35: 55.0}
    for shard, top1 in own_top1.items():
        make_torch_run(runs, card, shard, top1, data, seed=3)
    parser = argparse.ArgumentParser()
    ensemble_cli.add_arguments(parser)
    args = parser.parse_args(["--data", data, "--runs", str(runs), "--out", str(out), "--device", "cpu",
                              "--batch-size", "32", "--members", ",".join(map(str, own_top1))])
    assert ensemble_cli.run(args) == 0

    ranked_shards = sorted(own_top1, key=lambda k: (-own_top1[k], k))
    members = [load_member(read_run(runs / card["sub_datasets"][k], k), torch.device("cpu")) for k in ranked_shards]
    tally = Tally(num_members=len(members), methods=METHODS, p=0.3, k=5)
    expected = []
    with torch.inference_mode():
        for row, images in reference_batches(data, card, ranked_shards, batch_size=32):
            labels = torch.tensor([entry.sample.label for entry in row])
            logits = torch.stack([m.predict(batch) for m, batch in zip(members, images, strict=True)])
            ranked = reference.tally_batch(tally, logits, labels)
            for i, entry in enumerate(row):
                expected.append({
                    "key": entry.key, "label": entry.sample.label, "shard": entry.shard,
                    **{f"{m.replace('-', '_')}_topk": ranked[m][i].tolist() for m in METHODS},
                    **{f"sub_{k:02d}_top1": int(ranked["members"][r, i, 0]) for r, k in enumerate(ranked_shards)},
                })
    assert pq.read_table(out / "predictions.parquet").to_pylist() == expected
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == tally.samples == 100
    assert [(m["shard"], m["top1"], m["top5"]) for m in report["members"]] == [
        (k, h.top1 / 100, h.topk / 100) for k, h in zip(ranked_shards, tally.members, strict=True)]
    for method in METHODS:
        assert [(p["top1"], p["top5"]) for p in report["accuracy_vs_members"][method]] == [
            (h.top1 / 100, h.topk / 100) for h in tally.curve[method]], method
