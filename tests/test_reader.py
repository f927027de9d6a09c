"""SourceReader: whole local files whatever their listed size says, tar members by offset (members that lie
together in one read), clear OSErrors."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from subspectral.pipeline import reader as reader_module
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


@pytest.mark.parametrize("name", ["missing.JPEG", "."])
def test_unreadable_paths_raise_oserror(tmp_path, name):
    with pytest.raises(OSError):
        SourceReader().read(str(tmp_path / name), -1, 10)


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


def test_members_that_lie_together_are_fetched_by_one_read_per_run(tmp_path, monkeypatch):
    payloads = {"a.JPEG": b"a" * 1000, "b.JPEG": b"b" * 900, "big.JPEG": os.urandom(600 * 1024),
                "c.JPEG": b"c" * 1100, "d.JPEG": b"d" * 10, "e.JPEG": b"e" * 20}
    archive = tmp_path / "n01440764.tar"
    with tarfile.open(archive, "w") as tar:
        for name, payload in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
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
