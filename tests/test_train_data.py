"""Input pipeline: tar parsing, the shard/worker/rank partition, per-rank batch counts, corrupt samples."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from damaged_data import one_sub_dataset
from subspectral.train.config import DataConfig
from subspectral.train.data import make_loader
from subspectral.train.prepared import read_card, shard_uris
from subspectral.train.shards import CorruptShard, iter_samples, stream_samples
from subspectral.train.storage import DataError
from subspectral.train.stream import (
    EvalStream,
    Piece,
    StreamStats,
    TrainStream,
    augment,
    padding_pixels,
    piece_samples,
    piece_source,
    pieces_for_slot,
)


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]


def _write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_fast_ustar_reader_matches_tarfile_and_pax_falls_back(prepared_sample, tmp_path):
    shard = prepared_sample / "sub-03" / "train-000001.tar"
    ours = [(key, parts) for key, parts in iter_samples(shard.read_bytes())]
    members = _members(shard)
    assert len(ours) == len(members) // 2 == 128  # KEY.cls and KEY.jpg per sample
    assert ours[5][1]["jpg"] == members[5 * 2 + 1][1] and ours[5][1]["cls"] == members[5 * 2][1]
    long_key = "x" * 120  # longer than a ustar name field: needs a pax header
    pax = tmp_path / "pax.tar"
    _write_tar(pax, [(f"{long_key}.cls", b"3"), (f"{long_key}.jpg", members[1][1])], tarfile.PAX_FORMAT)
    assert [(k, sorted(p)) for k, p in iter_samples(pax.read_bytes())] == [(long_key, ["cls", "jpg"])]
    with pytest.raises(CorruptShard):  # a truncated pax shard fails as corrupt, through webdataset's reader too
        list(iter_samples(pax.read_bytes()[:1500]))


def test_streamed_reader_yields_what_the_whole_shard_reader_yields(prepared_sample, tmp_path):
    shard = prepared_sample / "sub-03" / "train-000001.tar"
    with open(shard, "rb", buffering=4096) as stream:  # a buffer smaller than a member: reads cross it
        assert list(stream_samples(stream)) == list(iter_samples(shard.read_bytes()))
    jpg = _members(shard)[1][1]
    # Plain ustar members, then one whose name needs a pax header: the stream hands the rest to webdataset.
    mixed = tmp_path / "mixed.tar"
    _write_tar(mixed, [("a.cls", b"1"), ("a.jpg", jpg), (f"{'x' * 120}.cls", b"3"), (f"{'x' * 120}.jpg", jpg)],
               tarfile.PAX_FORMAT)
    with open(mixed, "rb") as stream:
        assert list(stream_samples(stream)) == list(iter_samples(mixed.read_bytes()))
    assert [key for key, _ in iter_samples(mixed.read_bytes())] == ["a", "x" * 120]
    # Cut inside the third sample's JPEG: the two whole samples, the third's members before the cut, then
    # the error; and cut right after a member (no end-of-archive block): the same as the whole-shard reader.
    with tarfile.open(shard) as archive:
        third_jpg = [m for m in archive if m.isfile() and m.name.endswith(".jpg")][2]
    whole = [key for key, _ in iter_samples(shard.read_bytes())]
    for end, error in ((third_jpg.offset_data + third_jpg.size // 2, "is truncated"),
                       (third_jpg.offset_data - 512, "without its end-of-archive block")):
        cut = tmp_path / "cut.tar"
        cut.write_bytes(shard.read_bytes()[:end])
        read: dict[str, list] = {"stream": [], "buffer": []}
        with open(cut, "rb") as stream:
            for name, samples in (("stream", stream_samples(stream)), ("buffer", iter_samples(cut.read_bytes()))):
                with pytest.raises(CorruptShard, match=error):
                    for sample in samples:
                        read[name].append(sample)
        assert read["stream"] == read["buffer"]
        assert [key for key, _ in read["stream"]] == whole[:3] and "jpg" not in read["stream"][2][1]


def test_samples_stage_yields_what_webdataset_reads(prepared_sample):
    uri = str(prepared_sample / "sub-03" / "train-000001.tar")
    stats = StreamStats()
    ours = list(piece_samples(piece_source([uri], [Piece(0, 0, 1)], stats=stats), stats=stats))
    theirs = [{k: v for k, v in sample.items() if k != "__local_path__"}  # webdataset's note of a local file
              for sample in wds.WebDataset(uri, shardshuffle=False)]
    assert len(ours) == len(theirs) == stats.read == 128
    assert ours == theirs  # same keys, same bytes for every extension, same __url__


@pytest.mark.parametrize("shards, slots", [(4, 1), (4, 2), (4, 3), (4, 4), (4, 9), (1, 4), (3, 8)])
def test_pieces_partition_every_sample_exactly_once(shards, slots):
    samples_per_shard = 10
    seen = Counter()
    for slot in range(slots):
        for piece in pieces_for_slot(shards, slot, slots):
            seen.update((piece.shard, i) for i in range(samples_per_shard) if i % piece.parts == piece.part)
    assert seen == Counter({(s, i): 1 for s in range(shards) for i in range(samples_per_shard)})


def _stream(data: Path, world: int, rank: int, batch: int, seed: int = 0, **config) -> TrainStream:
    card = read_card(str(data))
    uris = shard_uris(str(data), card, 0, "train")
    return TrainStream(uris, card, DataConfig(**config), batch_size=batch,
                       batches_per_epoch=card.splits["train"].samples // (batch * world),
                       rank=rank, world=world, seed=seed)


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_every_rank_runs_the_same_number_of_full_batches(prepared_sample, world, workers):
    counts = []
    for rank in range(world):
        batches = list(make_loader(_stream(prepared_sample, world, rank, batch=16), workers, False))
        assert all(b["images"].shape == (16, 56, 56, 3) and b["images"].dtype == torch.uint8 for b in batches)
        counts.append(len(batches))
    assert counts == [500 // (16 * world)] * world


def test_epochs_are_reproducible_and_differ_from_each_other(prepared_sample):
    def epoch_labels(epoch: int, workers: int) -> list[list[int]]:
        stream = _stream(prepared_sample, 1, 0, batch=25)
        stream.set_epoch(epoch)
        return [b["labels"].tolist() for b in make_loader(stream, workers, False)]

    first = epoch_labels(0, workers=2)
    assert first == epoch_labels(0, workers=2)
    assert first != epoch_labels(1, workers=2)
    assert sorted(sum(first, [])) != sum(first, [])  # shuffled, not in stream order


def test_eval_stream_covers_val_once_across_ranks(prepared_sample):
    card = read_card(str(prepared_sample))
    uris = shard_uris(str(prepared_sample), card, 7, "val")
    labels = []
    for rank in range(3):
        for batch in make_loader(EvalStream(uris, card, batch_size=32, rank=rank, world=3), 0, False):
            labels += batch["labels"].tolist()
    assert Counter(labels) == Counter({c: 10 for c in range(10)})


def test_corrupt_samples_are_skipped_and_counted(prepared_sample, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_sample, data, ignore=shutil.ignore_patterns("sub-0[1-9]", "sub-[1-3]*"))
    val = data / "sub-00" / "val-000000.tar"
    members = _members(val)
    # Two members per sample: KEY.cls, KEY.jpg.
    members[1] = (members[1][0], b"\xff\xd8 not a jpeg")  # sample 0: undecodable image
    members[5] = (members[5][0], members[5][1][: len(members[5][1]) // 2])  # sample 2: truncated JPEG
    del members[2]  # sample 1: no .cls
    _write_tar(val, members)
    card = read_card(str(data))
    stream = EvalStream(shard_uris(str(data), card, 0, "val"), card, batch_size=40, rank=0, world=1)
    batches = list(make_loader(stream, 0, False))
    assert sum(int(b["skipped"]) for b in batches) == 3
    assert sum(len(b["labels"]) for b in batches) == 97


def test_augment_flips_and_crops_without_changing_shape_or_dtype():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 56, 56, 3), dtype=np.uint8)
    flipped = augment(images, DataConfig(crop="none", hflip=True), np.random.default_rng(1))
    same = (flipped == images).all(axis=(1, 2, 3))
    mirrored = (flipped == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same | mirrored).all() and same.any() and mirrored.any()
    shifted = augment(images[:8], DataConfig(crop="pad", crop_padding=4, hflip=False), np.random.default_rng(3))
    padded = np.pad(images[:8], ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(8):  # each output is one 56x56 window of the zero-padded input
        assert any(np.array_equal(shifted[i], padded[i, y:y + 56, x:x + 56]) for y in range(9) for x in range(9))
    for crop in ("pad", "resized"):
        out = augment(images, DataConfig(crop=crop, hflip=False), np.random.default_rng(2))
        assert out.shape == images.shape and out.dtype == np.uint8 and not np.array_equal(out, images)


def test_pad_crop_with_flip_is_a_window_of_the_padded_image_or_of_its_mirror():
    images = np.random.default_rng(0).integers(0, 256, (32, 56, 56, 3), dtype=np.uint8)
    out = augment(images, DataConfig(crop="pad", crop_padding=4, hflip=True), np.random.default_rng(4))
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    mirrored = 0
    for i in range(len(images)):
        windows = [padded[i, y:y + 56, x:x + 56] for y in range(9) for x in range(9)]
        if any(np.array_equal(out[i], w) for w in windows):
            continue
        assert any(np.array_equal(out[i], w[:, ::-1]) for w in windows), i
        mirrored += 1
    assert 0 < mirrored < len(images)


def test_incomplete_dataset_and_bad_shard_are_refused(prepared_sample, tmp_path):
    with pytest.raises(DataError, match="not a complete prepared dataset"):
        read_card(str(tmp_path))
    card = read_card(str(prepared_sample))
    with pytest.raises(DataError, match="shard 36 is out of range"):
        shard_uris(str(prepared_sample), card, 36, "train")
    (tmp_path / "dataset.json").write_text(json.dumps(card.to_json()))
    with pytest.raises(DataError, match="sub-dataset 0 is missing"):
        shard_uris(str(tmp_path), card, 0, "train")


@pytest.mark.parametrize("padding, side, pixels", [
    (4, 7, 4), (0, 28, 0),  # integers are pixels, at every size
    (0.125, 7, 1), (0.125, 14, 2), (0.125, 28, 4), (0.125, 32, 4), (0.125, 56, 7),  # fractions of the side
    (4 / 56, 56, 4), (4 / 56, 7, 1), (4 / 56, 28, 2), (4 / 56, 112, 8),  # the default: 4 px at 56
    (0.01, 7, 1),  # a fraction above 0 pads at least 1 px
])
def test_padding_pixels(padding, side, pixels):
    assert padding_pixels(padding, side) == pixels


def test_default_pad_crop_keeps_a_7px_image_on_the_canvas():
    # 4 px of zero padding on a 7x7 image shifted most of it off the canvas; the default scales with the side.
    images = np.random.default_rng(0).integers(1, 256, (200, 7, 7, 3), dtype=np.uint8)
    out = augment(images, DataConfig(hflip=False), np.random.default_rng(5))
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(len(images)):  # each output is one 7x7 window of the image padded by 1 px
        assert any(np.array_equal(out[i], padded[i, y:y + 7, x:x + 7]) for y in range(3) for x in range(3)), i
    assert (out > 0).mean() > 0.7


def _usable_head(tar: Path, cut: int) -> int:
    """Samples whose .cls and image members lie wholly before byte ``cut`` (read with tarfile)."""
    whole = {}
    with tarfile.open(tar) as archive:
        for member in archive:
            key, _, ext = member.name.partition(".")
            whole.setdefault(key, set())
            if member.offset_data + member.size <= cut:
                whole[key].add(ext)
    return sum({"cls", "jpg"} <= exts for exts in whole.values())


def _eval_counts(data: Path, workers: int = 0) -> tuple[int, int]:
    card = read_card(str(data))
    stream = EvalStream(shard_uris(str(data), card, 0, "val"), card, batch_size=32, rank=0, world=1)
    batches = list(make_loader(stream, workers, False))
    return sum(len(b["labels"]) for b in batches), sum(int(b["skipped"]) for b in batches)


@pytest.mark.parametrize("where", ["half", "member boundary"])
def test_a_damaged_shard_gives_its_readable_head_and_counts_the_rest(prepared_sample, tmp_path, where):
    data = one_sub_dataset(prepared_sample, tmp_path / "data")
    val = data / "sub-00" / "val-000000.tar"
    original = val.read_bytes()
    with tarfile.open(val) as archive:
        members = list(archive)
    # "half": mid-member; "member boundary": after the 60th sample, the end-of-archive blocks cut away.
    cut = len(original) // 2 if where == "half" else members[3 * 60].offset
    head = _usable_head(val, cut)
    val.write_bytes(original[:cut])
    assert 0 < head < 100
    decoded, skipped = _eval_counts(data)
    assert (decoded, skipped) == (head, 100 - head)  # the stats file says the shard held 100


def test_a_damaged_shard_without_its_stats_file_counts_one_lost_sample(prepared_sample, tmp_path):
    data = one_sub_dataset(prepared_sample, tmp_path / "data")
    shutil.rmtree(data / "stats")
    val = data / "sub-00" / "val-000000.tar"
    val.write_bytes(val.read_bytes()[: val.stat().st_size // 2])
    decoded, skipped = _eval_counts(data)
    assert decoded > 0 and skipped == 1


@pytest.mark.parametrize("label, workers", [(b"42", 0), (b"-1", 2)])
def test_a_label_outside_the_class_table_is_one_line_error(prepared_sample, tmp_path, label, workers):
    data = one_sub_dataset(prepared_sample, tmp_path / "data")
    val = data / "sub-00" / "val-000000.tar"
    members = _members(val)
    members[3 * 40] = (members[3 * 40][0], label)  # sample 40's .cls
    _write_tar(val, members)
    with pytest.raises(DataError, match=f"has label {int(label)}, outside the 10 classes") as raised:
        _eval_counts(data, workers)
    assert "\n" not in str(raised.value)  # raised in a loader worker too, it is the stream's one line
