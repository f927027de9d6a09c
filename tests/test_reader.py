"""SourceReader: whole local files whatever their listed size says, tar members by offset (members that lie
together in one read), clear OSErrors."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from conftest import call_within
from subspectral.pipeline import reader as reader_module
from subspectral.pipeline.decode import RejectedInput
from subspectral.pipeline.reader import SourceReader


@pytest.mark.parametrize("hint", ["unknown", "exact", "smaller", "larger", "zero"])
def test_local_file_is_read_whole_whatever_its_listed_size(tmp_path, hint):
    data = os.urandom(3_000_000)  # several reads' worth
    path = tmp_path / "image.JPEG"
    path.write_bytes(data)
    size = {"unknown": -1, "exact": len(data), "smaller": 1000, "larger": len(data) + 10, "zero": 0}[hint]
    assert SourceReader().read(str(path), -1, size) == data


def test_empty_file_reads_empty(tmp_path):
    path = tmp_path / "empty.JPEG"
    path.write_bytes(b"")
    assert SourceReader().read(str(path), -1, 0) == b""


def test_a_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        SourceReader().read(str(tmp_path / "missing.JPEG"), -1, 10)


def _fifo(folder):
    os.mkfifo(folder / "pipe.JPEG")  # opened for reading, it would wait for a writer forever
    return folder / "pipe.JPEG"


def _link(folder, target):
    (folder / "link.JPEG").symlink_to(target)
    return folder / "link.JPEG"


@pytest.mark.parametrize(("make", "kind"), [
    (_fifo, "a FIFO"),
    (lambda folder: _link(folder, "/dev/zero"), "a character device"),  # read to exhaustion, it never ends
    (lambda folder: "/dev/zero", "a character device"),
    (lambda folder: folder, "a folder"),
], ids=["fifo", "link-to-dev-zero", "dev-zero", "folder"])
def test_what_is_not_a_file_is_rejected_unopened(tmp_path, make, kind):
    with pytest.raises(RejectedInput, match=kind) as caught:
        call_within(30, SourceReader().read, str(make(tmp_path)), -1, -1)
    assert caught.value.reason == "not_a_file"


def test_reads_are_bounded_by_max_bytes(tmp_path):
    reader = SourceReader(max_bytes=1000)
    (tmp_path / "exact.JPEG").write_bytes(b"x" * 1000)
    assert reader.read(str(tmp_path / "exact.JPEG"), -1, -1) == b"x" * 1000
    (tmp_path / "big.JPEG").write_bytes(b"x" * 1001)
    for listed_size in (-1, 10, 1001):
        with pytest.raises(RejectedInput, match="1001 bytes, over the limit of 1000") as caught:
            reader.read(str(tmp_path / "big.JPEG"), -1, listed_size)
        assert caught.value.reason == "too_large"
    with pytest.raises(RejectedInput, match="over the limit"):  # a tar member: by its header's size, unread
        reader.read(str(tmp_path / "big.JPEG"), 0, 1001)


def _write_tar(archive, payloads: dict[str, bytes]) -> None:
    with tarfile.open(archive, "w") as tar:
        for name, payload in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_tar_members_are_read_by_offset_and_a_short_member_is_an_error(tmp_path):
    payloads = {"a.JPEG": b"first" * 100, "b.JPEG": b"second" * 50}
    archive = tmp_path / "n01440764.tar"
    _write_tar(archive, payloads)
    reader = SourceReader()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            assert reader.read(str(archive), member.offset_data, member.size) == payloads[member.name]
    with pytest.raises(OSError, match="ends early"):
        reader.read(str(archive), archive.stat().st_size - 10, 100)
    reader.close()


def test_members_that_lie_together_are_fetched_by_one_read_per_run(tmp_path, monkeypatch):
    payloads = {"a.JPEG": b"a" * 1000, "b.JPEG": b"b" * 900, "big.JPEG": os.urandom(600 * 1024),
                "c.JPEG": b"c" * 1100, "d.JPEG": b"d" * 10, "e.JPEG": b"e" * 20}
    archive = tmp_path / "n01440764.tar"
    _write_tar(archive, payloads)
    with tarfile.open(archive) as tar:
        where = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    wanted = ["d.JPEG", "a.JPEG", "c.JPEG", "b.JPEG", "e.JPEG"]  # the runs a+b and c+d+e; the big member between
    reader = SourceReader()
    reader.expect([(str(archive), *where[name]) for name in wanted])
    assert [reader.read(str(archive), *where[name]) for name in wanted] == [payloads[n] for n in wanted]
    assert reader.reads == 2
    # With room for one run only, a run dropped early is fetched again, and the bytes stay right.
    monkeypatch.setattr(reader_module, "MAX_CACHED", 1)
    reader = SourceReader()
    reader.expect([(str(archive), *where[name]) for name in wanted])
    assert [reader.read(str(archive), *where[name]) for name in wanted] == [payloads[n] for n in wanted]
    assert reader.reads == 5  # d+e's run, a+b's, d+e's again, a+b's again, d+e's again
    reader.close()
