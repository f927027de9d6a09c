"""Copies of a prepared dataset to damage, and tar rewriting, for the tests of hostile input."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path


def one_sub_dataset(prepared: Path, dest: Path) -> Path:
    """Sub-00 of ``prepared`` as a dataset of its own to damage, cut to its first train shard (128 samples)
    so that an epoch is short: the card, the stats files and the tars agree."""
    shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns("sub-0[1-9]", "sub-[1-3]*", "_work",
                                                                  "train-00000[1-9].tar"))
    card = json.loads((dest / "dataset.json").read_text())
    samples = json.loads((dest / "stats" / "train-000000.json").read_text())["samples"]
    card["splits"]["train"] = {"shards": 1, "samples": samples}
    (dest / "dataset.json").write_text(json.dumps(card))
    return dest


def rewrite_members(tar: Path, change: Callable[[str, bytes], bytes]) -> None:
    """Rewrite ``tar`` (plain ustar) with ``change(name, data) -> data`` applied to every member."""
    with tarfile.open(tar) as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def undecodable_images(name: str, data: bytes) -> bytes:
    """For ``rewrite_members``: every JPEG replaced by bytes that start like one and decode as nothing."""
    return b"\xff\xd8 not a jpeg" if name.endswith(".jpg") else data
