"""Read the bytes of one input: a whole file, or a member of a class tar read in place by offset.

What is read per input is bounded: a file over ``max_bytes`` is rejected before it is read (and a
file that grows past it while read is rejected at that point), and a local path that is not a
regular file — a FIFO, a device such as /dev/zero, a socket — is rejected without being opened.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from typing import Any

from subspectral.schemas.reasons import RejectReason

from .decode import DEFAULT_MAX_FILE_BYTES, RejectedInput
from .storage import Location, is_remote
from .walk import special_kind


class SourceReader:
    """Reads inputs; keeps a few container tars open, since a shuffled shard revisits them often."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_FILE_BYTES, max_open: int = 64) -> None:
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._max_open = max_open
        self.max_bytes = max_bytes

    def read(self, source: str, offset: int, size: int) -> bytes:
        """The whole file when ``offset`` < 0 (``size``, the listed size or -1, only sizes the first read),
        else ``size`` bytes at ``offset`` of a container tar. Raises :class:`RejectedInput` for an input
        too large or not a file, ``OSError`` when reading fails."""
        if offset < 0:
            if not is_remote(source):
                return _read_local_file(source, size, self.max_bytes)
            filesystem, path = Location(source).resolve()
            with filesystem.open_input_file(path) as handle:
                _check_size(handle.size(), self.max_bytes)
                return handle.read()
        _check_size(size, self.max_bytes)
        handle = self._container(source)
        data = handle.read_at(size, offset)
        if len(data) != size:
            raise OSError(f"tar member ends early: {len(data)} of {size} bytes at offset {offset}")
        return data

    def _container(self, source: str) -> Any:
        handle = self._open.pop(source, None)
        if handle is None:
            filesystem, path = Location(source).resolve()
            handle = filesystem.open_input_file(path)
            if len(self._open) >= self._max_open:
                _, oldest = self._open.popitem(last=False)
                oldest.close()
        self._open[source] = handle
        return handle

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise RejectedInput(RejectReason.TOO_LARGE, f"{size} bytes, over the limit of {max_bytes} (--max-file-mb)")


def _read_local_file(path: str, size_hint: int, max_bytes: int) -> bytes:
    """A local file's bytes with five system calls (stat, open, read, read to confirm the end, close).

    Python's ``open(path, "rb").read()`` makes nine here (two fstat, an isatty ioctl, two lseek), and
    each costs microseconds on these VMs. The ``stat`` comes first so that a FIFO (which would block)
    or a device (whose open may act) is never opened; O_NONBLOCK keeps a FIFO swapped in after the
    ``stat`` from blocking. The file is read to its end whatever ``size_hint`` says, so a file that
    changed since listing is read whole, up to ``max_bytes``.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise RejectedInput(RejectReason.NOT_A_FILE, f"a {special_kind(info.st_mode)}: never opened")
    _check_size(info.st_size, max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        chunks, total = [], 0
        request = min(size_hint if size_hint >= 0 else 1 << 20, max_bytes) + 1
        while chunk := os.read(fd, request):
            chunks.append(chunk)
            total += len(chunk)
            _check_size(total, max_bytes)
            request = min(1 << 20, max_bytes + 1 - total)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
