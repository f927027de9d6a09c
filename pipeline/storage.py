"""Local paths and object-storage URIs (s3://…) behind one small interface, via pyarrow.fs.

S3 endpoints other than AWS (MinIO, Ceph, a test server) come from the URI's query
(``s3://bucket/x?endpoint_override=http://127.0.0.1:9000&scheme=http``) or from the
``AWS_ENDPOINT_URL`` environment variable.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    """A folder or file: a filesystem and a path on it. Picklable, so Ray tasks receive it as is."""

    uri: str

    def resolve(self) -> tuple[pafs.FileSystem, str]:
        return _resolve(self.uri)

    def join(self, *parts: str) -> Location:
        base, query = (self.uri.split("?", 1) + [""])[:2]
        joined = posixpath.join(base, *parts)
        return Location(f"{joined}?{query}" if query else joined)


def is_remote(uri: str) -> bool:
    """A URI with a scheme (s3://bucket/key, gs://…), read through pyarrow.fs, rather than a local path."""
    return "://" in uri


def location(uri: str | os.PathLike) -> Location:
    text = os.fspath(uri)
    if not is_remote(text):
        text = os.path.abspath(text)
    return Location(text)


_FILESYSTEMS: dict[str, pafs.FileSystem] = {}  # one client per bucket and endpoint, reused by every read


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    base, _, query = uri.partition("?")
    if not is_remote(base):
        return pafs.LocalFileSystem(), base
    if base.startswith("s3://") and not query and os.environ.get("AWS_ENDPOINT_URL"):
        endpoint = os.environ["AWS_ENDPOINT_URL"].rstrip("/")
        scheme = "http" if endpoint.startswith("http://") else "https"
        query = f"endpoint_override={endpoint.split('://', 1)[1]}&scheme={scheme}"
    cache_key = "/".join(base.split("/", 3)[:3]) + "?" + query  # the endpoint is part of the key
    if cache_key not in _FILESYSTEMS:
        _FILESYSTEMS[cache_key] = pafs.FileSystem.from_uri(base + ("?" + query if query else ""))[0]
    return _FILESYSTEMS[cache_key], base.split("://", 1)[1].rstrip("/")


def exists(loc: Location) -> bool:
    filesystem, path = loc.resolve()
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(loc: Location) -> bytes:
    filesystem, path = loc.resolve()
    with filesystem.open_input_file(path) as handle:
        return handle.read()


def read_json(loc: Location) -> Any:
    return json.loads(read_bytes(loc))


@contextlib.contextmanager
def atomic_output(loc: Location) -> Iterator[Any]:
    """A writable stream whose content appears at ``loc`` only once complete.

    The bytes go to a hidden ``.NAME.partial`` next to the target (a name no WebDataset glob or brace
    pattern matches), which is renamed into place on success (on object stores: a server-side copy).
    A failure removes the partial file; a kill leaves at most a partial file that the rerun overwrites.
    """
    filesystem, path = loc.resolve()
    directory, name = posixpath.split(path)
    filesystem.create_dir(directory, recursive=True)
    staging = posixpath.join(directory, f".{name}.partial")
    if isinstance(filesystem, pafs.LocalFileSystem):  # Python's buffered file: cheaper per small write
        stream = open(staging, "wb", buffering=1 << 17)  # noqa: SIM115 - closed below, on every path
    else:
        stream = filesystem.open_output_stream(staging, compression=None, buffer_size=1 << 20)
    try:
        yield stream
        stream.close()
    except BaseException:
        stream.close()
        with contextlib.suppress(OSError):
            filesystem.delete_file(staging)
        raise
    filesystem.move(staging, path)


def write_bytes(loc: Location, data: bytes) -> None:
    with atomic_output(loc) as stream:
        stream.write(data)


def write_json(loc: Location, payload: Any) -> None:
    write_bytes(loc, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
