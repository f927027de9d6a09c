"""The hand-written ustar writer: standard readers agree, and output is reproducible."""

import io
import tarfile

import pytest
import webdataset as wds
from subspectral.pipeline.tarwriter import BLOCK, MemberHeader, TarShardWriter, member_bytes, padding


def write(samples):
    buffer = io.BytesIO()
    writer = TarShardWriter(buffer)
    for key, payloads in samples:
        for ext, data in payloads:
            writer.add(f"{key}.{ext}", data)
    writer.finish()
    return buffer.getvalue()


SAMPLES = [(f"k{i:03d}", [("cls", str(i).encode()), ("jpg", bytes(range(256)) * (i + 1)), ("json", b"{}")])
           for i in range(5)]


def test_python_tarfile_reads_every_member_with_reproducible_headers():
    data = write(SAMPLES)
    assert len(data) % 10240 == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == [f"{k}.{e}" for k, p in SAMPLES for e, _ in p]
        for member, (_, payload) in zip(members, [p for _, ps in SAMPLES for p in ps], strict=True):
            assert archive.extractfile(member).read() == payload
            assert (member.mtime, member.uid, member.gid, member.uname, member.mode) == (0, 0, 0, "", 0o644)
            assert member.isfile()
    assert write(SAMPLES) == data


def test_webdataset_groups_members_into_samples(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(write(SAMPLES))
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [k for k, _ in SAMPLES]
    assert [int(s["cls"]) for s in samples] == list(range(5))


def test_names_longer_than_ustar_allows_are_refused():
    with pytest.raises(ValueError, match="longer than 100"):
        member_bytes("x" * 101, b"")


def test_batched_headers_equal_single_headers_and_read_back():
    header = MemberHeader("n01440764_10026.jpg")
    sizes = [0, 1, 511, 512, 513, 3054, 8**6 - 1, 8**6, 8**10, 8**11 - 1]
    batch = header.many(sizes)
    assert len(batch) == BLOCK * len(sizes)
    assert [bytes(batch[k * BLOCK : (k + 1) * BLOCK]) for k in range(len(sizes))] == [bytes(header(s)) for s in sizes]
    small = [s for s in sizes if s < 1 << 16]
    buffer = io.BytesIO()
    writer = TarShardWriter(buffer)
    blocks = header.many(small)
    for k, size in enumerate(small):
        payload = bytes([k]) * size
        writer.write_parts(blocks[k * BLOCK : (k + 1) * BLOCK], payload, padding(size))
    writer.finish()
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as archive:  # checksums verified on read
        assert [(m.name, m.size) for m in archive.getmembers()] == [("n01440764_10026.jpg", s) for s in small]
