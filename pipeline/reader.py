"""Read the bytes of one input: a whole file, or a member of a tar read in place by offset.

A shard task announces its members first (``expect``): members of one tar that lie next to each
other (gaps under ``COALESCE_GAP``) are fetched by one ranged read and served from memory, so a task
makes at most one read per such run, never one per member. On object storage a read is one GET;
opening an object costs one more request (pyarrow asks for its size), once per object and task.

What is read per input is bounded: a file over ``max_bytes`` is rejected before it is read (and a
file that grows past it while read is rejected at that point), and a local path that is not a
regular file — a FIFO, a device such as /dev/zero, a socket — is rejected without being opened.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from subspectral.schemas.reasons import RejectReason

from .decode import DEFAULT_MAX_FILE_BYTES, RejectedInput
from .storage import Location, is_remote
from .walk import special_kind

COALESCE_GAP = 512 * 1024  # bytes between two members read through rather than paying another request
MAX_RUN = 64 * 2**20  # bytes of one coalesced read
MAX_CACHED = 256 * 2**20  # bytes of fetched runs held for members still to come


@dataclass
class _Run:
    source: str
    start: int
    end: int
    remaining: int  # members of this run still to be served
    data: bytes | None = field(default=None, repr=False)


class SourceReader:
    """Reads inputs; counts its requests (``reads``: ranged reads or whole files; ``opens``: objects opened)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_FILE_BYTES, max_open: int = 64) -> None:
        self.max_bytes = max_bytes
        self._files: OrderedDict[str, Any] = OrderedDict()
        self._objects: dict[str, Any] = {}
        self._max_open = max_open
        self._runs: dict[tuple[str, int], _Run] = {}
        self._cached: OrderedDict[int, _Run] = OrderedDict()
        self._cached_bytes = 0
        self.reads = 0
        self.opens = 0

    def expect(self, members: list[tuple[str, int, int]]) -> None:
        """The tar members (source, offset, size) about to be read, in any order: plans the coalesced reads."""
        by_source: dict[str, list[tuple[int, int]]] = {}
        for source, offset, size in members:
            if offset >= 0:
                by_source.setdefault(source, []).append((offset, size))
        self._runs.clear()
        for source, extents in by_source.items():
            run = None
            for offset, size in sorted(set(extents)):
                end = offset + size
                if run is None or offset - run.end > COALESCE_GAP or end - run.start > MAX_RUN:
                    run = _Run(source, offset, end, 0)
                run.end = max(run.end, end)
                run.remaining += 1
                self._runs[(source, offset)] = run

    def read(self, source: str, offset: int, size: int) -> bytes:
        """The whole file when ``offset`` < 0 (``size``, the listed size or -1, only sizes the first read),
        else ``size`` bytes at ``offset`` of a container tar. Raises :class:`RejectedInput` for an input
        too large or not a file, ``OSError`` when reading fails."""
        if offset < 0:
            self.reads += 1
            if not is_remote(source):
                return _read_local_file(source, size, self.max_bytes)
            self.opens += 1
            filesystem, path = Location(source).resolve()
            with filesystem.open_input_file(path) as handle:
                _check_size(handle.size(), self.max_bytes)
                return handle.read()
        _check_size(size, self.max_bytes)
        run = self._runs.get((source, offset))
        if run is None or run.end - run.start == size:  # a member alone: read it straight
            data = self._read_at(source, offset, size)
        else:
            data = self._from_run(run, offset, size)
        if len(data) != size:
            raise OSError(f"tar member ends early: {len(data)} of {size} bytes at offset {offset}")
        return data

    def _from_run(self, run: _Run, offset: int, size: int) -> bytes:
        if run.data is None:
            run.data = self._read_at(run.source, run.start, run.end - run.start)
            self._cached[id(run)] = run
            self._cached_bytes += len(run.data)
            while self._cached_bytes > MAX_CACHED and len(self._cached) > 1:
                _, oldest = self._cached.popitem(last=False)
                self._drop(oldest)
        data = run.data[offset - run.start : offset - run.start + size]
        run.remaining -= 1
        if run.remaining <= 0:
            self._cached.pop(id(run), None)
            self._drop(run)
        return data

    def _drop(self, run: _Run) -> None:
        if run.data is not None:
            self._cached_bytes -= len(run.data)
            run.data = None

    def _read_at(self, source: str, offset: int, size: int) -> bytes:
        self.reads += 1
        return self._container(source).read_at(size, offset)

    def _container(self, source: str) -> Any:
        # Local files hold a descriptor each: a few stay open. Objects hold none, and reopening one costs a
        # request: they stay open for the task.
        if is_remote(source):
            handle = self._objects.get(source)
            if handle is None:
                filesystem, path = Location(source).resolve()
                handle = self._objects[source] = filesystem.open_input_file(path)
                self.opens += 1
            return handle
        handle = self._files.pop(source, None)
        if handle is None:
            filesystem, path = Location(source).resolve()
            handle = filesystem.open_input_file(path)
            if len(self._files) >= self._max_open:
                _, oldest = self._files.popitem(last=False)
                oldest.close()
        self._files[source] = handle
        return handle

    def close(self) -> None:
        for handle in [*self._files.values(), *self._objects.values()]:
            handle.close()
        self._files.clear()
        self._objects.clear()
        self._runs.clear()
        self._cached.clear()
        self._cached_bytes = 0


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
