"""SourceReader: whole local files whatever their listed size says, tar members by offset, clear OSErrors."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
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
