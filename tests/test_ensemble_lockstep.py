"""Lockstep reading of aligned sub-datasets (train/lockstep.py) on tar shards in the exact format: alignment
errors, streaming without holding a shard (local and S3), and the background read-ahead."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from ensemble_fixtures import make_dataset, write_shard
from subspectral.schemas import DatasetCard
from subspectral.train.ensemble.lockstep import Lockstep, MisalignedError, Stream, prefetch
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


def digested_streams(root: Path, card: dict) -> list[Stream]:
    """The streams with each shard's SHA-256 as prepared (make_dataset writes them as they are now)."""
    import hashlib

    return [Stream(s.name, s.shards, s.shape, s.dtype, [hashlib.sha256(Path(u).read_bytes()).hexdigest()
                                                         for u in s.shards]) for s in streams(root, card)]


def test_a_shard_swapped_for_another_sub_datasets_is_refused_at_its_end(dataset) -> None:
    """Same keys and labels, other images: only the digest, computed as the shard streams past, sees it."""
    root, card, images = dataset
    prepared = digested_streams(root, card)
    assert sum(len(b.keys) for b in Lockstep(prepared, batch_size=4)) == NUM_SAMPLES
    (root / "sub-01" / "val-000001.tar").write_bytes((root / "sub-00" / "val-000001.tar").read_bytes())
    with pytest.raises(MisalignedError, match=r"^sub-01: .*val-000001.tar is not the shard prepared for sub-01"):
        list(Lockstep(prepared, batch_size=4))


def test_the_digest_covers_the_bytes_after_the_last_sample(dataset) -> None:
    """The tar reader stops at the end-of-archive block; the rest of the file is hashed too."""
    root, card, _ = dataset
    prepared = digested_streams(root, card)
    path = root / "sub-01" / "val-000002.tar"
    data = bytearray(path.read_bytes())
    data[-1] = 1  # in the trailing zero blocks, which no sample covers
    path.write_bytes(bytes(data))
    with pytest.raises(MisalignedError, match=r"val-000002.tar is not the shard prepared for sub-01"):
        list(Lockstep(prepared, batch_size=4))


def test_keys_that_differ_are_named_before_the_digest(dataset) -> None:
    root, card, images = dataset
    prepared = digested_streams(root, card)
    write_shard(root / "sub-01" / "val-000001.tar", ["img_0004", "img_0003", "img_0005"], [1, 0, 2], images[1, 3:6])
    with pytest.raises(MisalignedError, match=r"sub-00 has key 'img_0003'.*sub-01 has 'img_0004'"):
        list(Lockstep(prepared, batch_size=7))  # one batch: the shard's end comes before the batch's check


def big_shards(root: Path, streams_count: int, samples: int, side: int) -> tuple[list[Stream], int]:
    """One val shard per stream of ``samples`` npy images side x side x 3; returns the streams and the
    size of one shard in bytes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (samples, side, side, 3), dtype=np.uint8)
    keys = [f"img_{i:05d}" for i in range(samples)]
    result = []
    for k in range(streams_count):
        path = root / f"sub-{k:02d}" / "val-000000.tar"
        write_shard(path, keys, [i % 3 for i in range(samples)], images)
        result.append(Stream(f"sub-{k:02d}", [str(path)], (side, side, 3), np.dtype(np.uint8)))
    return result, path.stat().st_size


def test_a_stream_holds_neither_a_whole_shard_nor_a_copy_of_it(tmp_path: Path) -> None:
    import tracemalloc

    streams_, shard_bytes = big_shards(tmp_path, streams_count=2, samples=400, side=128)  # ~20 MB a shard
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        seen = sum(len(batch.keys) for batch in Lockstep(streams_, batch_size=8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 400
    # Each stream holds its 1 MiB read-ahead, one sample and its share of a batch of 8 (0.4 MB).
    assert peak < shard_bytes / 4, f"peak {peak / 1e6:.1f} MB for shards of {shard_bytes / 1e6:.1f} MB"


S3_STREAM_SCRIPT = """
import json, sys, tracemalloc
import numpy as np, pyarrow as pa
from subspectral.train.ensemble.lockstep import Lockstep, Stream
tracemalloc.start()
stream = Stream("sub-00", [sys.argv[1]], (128, 128, 3), np.dtype(np.uint8))
samples = sum(len(batch.keys) for batch in Lockstep([stream], batch_size=8))
print(json.dumps({"samples": samples, "python_peak": tracemalloc.get_traced_memory()[1],
                  "arrow_peak": pa.default_memory_pool().max_memory()}))
"""


def test_an_s3_stream_reads_the_shard_in_bounded_pieces(tmp_path: Path, s3_endpoint: str) -> None:
    """On an object store the bytes pass through pyarrow's memory pool, which tracemalloc does not see;
    a fresh process reports both peaks."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, S3_CREDENTIALS, s3_client
    from subspectral.train.storage import REMOTE_READ_AHEAD

    [stream], shard_bytes = big_shards(tmp_path, streams_count=1, samples=400, side=128)
    assert shard_bytes > 4 * REMOTE_READ_AHEAD
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="lockstep-stream")
    client.upload_file(stream.shards[0], "lockstep-stream", "sub-00/val-000000.tar")
    env = {**os.environ, **S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", S3_STREAM_SCRIPT, "s3://lockstep-stream/sub-00/val-000000.tar"],
                            env=env, capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout)
    assert measured["samples"] == 400
    assert measured["python_peak"] < shard_bytes / 4, measured
    assert measured["arrow_peak"] <= REMOTE_READ_AHEAD + (1 << 20), measured  # the read-ahead buffer, not the shard


def test_a_truncated_shard_stops_where_it_is_cut(dataset) -> None:
    root, card, _ = dataset
    shard = root / "sub-01" / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1600])  # headers and .cls of img_0003, then part of its image
    lockstep = Lockstep(streams(root, card), batch_size=2)
    batches = iter(lockstep)
    assert next(batches).keys == ["img_0000", "img_0001"]  # shard 0 is whole: its samples come first
    expected = r"^sub-01: corrupt shard .*val-000001.tar: tar member 'img_0003.npy' is truncated$"
    with pytest.raises(MisalignedError, match=expected):
        list(batches)


def test_an_unreadable_shard_is_one_line(dataset) -> None:
    root, card, _ = dataset
    shard = root / "sub-01" / "val-000001.tar"
    shard.unlink()
    shard.mkdir()  # opening a folder fails with an OSError that is not "missing"
    with pytest.raises(MisalignedError, match=r"^sub-01: cannot read .*val-000001.tar: .*Is a directory"):
        list(Lockstep(streams(root, card), batch_size=4))


def test_prefetch_reads_ahead_in_the_background_and_keeps_order() -> None:
    produced: list[int] = []
    third_ready = threading.Event()

    def source():
        for i in range(6):
            produced.append(i)
            if i == 2:
                third_ready.set()
            yield i

    items = prefetch(source(), depth=2)
    assert next(items) == 0
    # While the consumer still works on item 0, the reader has gone on to items 1 and 2 (depth 2).
    assert third_ready.wait(timeout=30)
    assert list(items) == [1, 2, 3, 4, 5]
    assert produced == list(range(6))


def test_prefetch_zero_reads_in_the_callers_thread() -> None:
    threads = []

    def source():
        for i in range(3):
            threads.append(threading.current_thread())
            yield i

    assert list(prefetch(source(), depth=0)) == [0, 1, 2]
    assert threads == [threading.current_thread()] * 3


def test_prefetch_raises_the_readers_error_after_the_items_before_it() -> None:
    def source():
        yield 1
        yield 2
        raise MisalignedError("sub-01: corrupt shard x.tar")

    items = prefetch(source(), depth=2)
    assert [next(items), next(items)] == [1, 2]
    with pytest.raises(MisalignedError, match="corrupt shard"):
        next(items)


def test_leaving_a_prefetched_loop_early_stops_the_reader_and_closes_the_source() -> None:
    closed = threading.Event()

    def source():
        try:
            yield from range(1000)
        finally:
            closed.set()

    items = prefetch(source(), depth=2)
    assert next(items) == 0
    items.close()
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "lockstep-prefetch"]
