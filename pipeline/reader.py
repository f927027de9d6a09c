"""Read the bytes of one input: a whole file, or a member of a class tar read in place by offset."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .storage import Location


class SourceReader:
    """Reads inputs; keeps a few container tars open, since a shuffled shard revisits them often."""

    def __init__(self, max_open: int = 64) -> None:
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._max_open = max_open

    def read(self, source: str, offset: int, size: int) -> bytes:
        if offset < 0:
            if "://" not in source:  # a local path: Python's open costs a third of pyarrow's here
                with open(source, "rb") as handle:
                    return handle.read()
            filesystem, path = Location(source).resolve()
            with filesystem.open_input_file(path) as handle:
                return handle.read()
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
