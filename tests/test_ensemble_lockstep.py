"""Lockstep reading of aligned sub-datasets (train/lockstep.py) on tar shards in the exact format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ensemble_fixtures import make_dataset, write_shard
from subspectral.schemas import DatasetCard
from subspectral.train.ensemble.lockstep import Lockstep, MisalignedError, Stream
from subspectral.train.prepared import shard_uris

NUM_SAMPLES = 7
LABELS = [0, 1, 2, 0, 1, 2, 0]


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, dict, np.ndarray]:
    # images[k, i] is filled with 10·k + i, so every pixel tells its stream and sample.
    images = (10 * np.arange(2)[:, None] + np.arange(NUM_SAMPLES)[None, :]).astype(np.uint8)
    images = np.broadcast_to(images[:, :, None, None, None], (2, NUM_SAMPLES, 4, 4, 3)).copy()
    card = make_dataset(tmp_path, images, LABELS, num_classes=3, shard_size=3)
    return tmp_path, card, images


def streams(root: Path, card: dict) -> list[Stream]:
    return [
        Stream(name, shard_uris(str(root), DatasetCard.from_json(card), k, "val"), (4, 4, 3), np.dtype(np.uint8))
        for k, name in enumerate(card["sub_datasets"])
    ]


def test_batches_cross_shards_and_keep_every_stream_aligned(dataset) -> None:
    root, card, images = dataset
    batches = list(Lockstep(streams(root, card), batch_size=4))
    assert [len(b.keys) for b in batches] == [4, 3]
    assert [b.shards.tolist() for b in batches] == [[0, 0, 0, 1], [1, 1, 2]]
    assert sum((b.keys for b in batches), []) == [f"img_{i:04d}" for i in range(NUM_SAMPLES)]
    assert np.concatenate([b.labels for b in batches]).tolist() == LABELS
    for k in range(2):
        np.testing.assert_array_equal(np.concatenate([b.images[k] for b in batches]), images[k])


def test_swapped_keys_in_one_sub_dataset_are_detected(dataset) -> None:
    root, card, images = dataset
    swapped = ["img_0004", "img_0003", "img_0005"]
    write_shard(root / "sub-01" / "val-000001.tar", swapped, [1, 0, 2], images[1, 3:6])
    with pytest.raises(MisalignedError, match=r"sub-00 has key 'img_0003'.*sub-01 has 'img_0004'"):
        list(Lockstep(streams(root, card), batch_size=4))


def test_a_sub_dataset_with_a_sample_less_is_detected(dataset) -> None:
    root, card, images = dataset
    write_shard(root / "sub-01" / "val-000002.tar", [], [], [])
    with pytest.raises(MisalignedError, match=r"sub-01 ended while .*img_0006"):
        list(Lockstep(streams(root, card), batch_size=4))


def test_same_key_with_another_label_is_detected(dataset) -> None:
    root, card, images = dataset
    keys = ["img_0000", "img_0001", "img_0002"]
    write_shard(root / "sub-01" / "val-000000.tar", keys, [0, 2, 2], images[1, :3])
    with pytest.raises(MisalignedError, match=r"'img_0001' \(class 1\).*'img_0001' \(class 2\)"):
        list(Lockstep(streams(root, card), batch_size=2))


def test_missing_shard_is_one_clear_error(dataset) -> None:
    root, card, _ = dataset
    (root / "sub-01" / "val-000001.tar").unlink()
    with pytest.raises(MisalignedError, match=r"sub-01: shard missing: .*val-000001.tar"):
        list(Lockstep(streams(root, card), batch_size=4))


def test_an_undecodable_sample_is_dropped_from_every_stream(dataset) -> None:
    root, card, images = dataset
    # img_0004 of sub-01 gets a 2x4 image: decode_into refuses the wrong shape.
    shard = [images[1, 3], images[1, 4, :2], images[1, 5]]
    write_shard(root / "sub-01" / "val-000001.tar", ["img_0003", "img_0004", "img_0005"], [0, 1, 2], shard)
    lockstep = Lockstep(streams(root, card), batch_size=4)
    batches = list(lockstep)
    kept = sum((b.keys for b in batches), [])
    assert "img_0004" not in kept and len(kept) == NUM_SAMPLES - 1
    assert lockstep.skipped == 1
    assert all(len(b.keys) == len(b.labels) == len(b.images[0]) == len(b.images[1]) for b in batches)
