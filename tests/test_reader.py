"""SourceReader: whole local files whatever their listed size says, tar members by offset, clear OSErrors."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from conftest import call_within
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


def test_tar_members_are_read_by_offset_and_a_short_member_is_an_error(tmp_path):
    payloads = {"a.JPEG": b"first" * 100, "b.JPEG": b"second" * 50}
    archive = tmp_path / "n01440764.tar"
    with tarfile.open(archive, "w") as tar:
        for name, payload in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    reader = SourceReader()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            assert reader.read(str(archive), member.offset_data, member.size) == payloads[member.name]
    with pytest.raises(OSError, match="ends early"):
        reader.read(str(archive), archive.stat().st_size - 10, 100)
    reader.close()
