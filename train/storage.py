"""Whole-file reads for the trainer and the ensemble evaluator: a local path or an object-store URI.

Paths and URIs are plain strings here; what run.json and reports record is ``absolute_uri`` of what
the user wrote, so it holds from any directory. Local paths are plain files; URIs (s3://, gs://, …)
go through ``pipeline.storage``, the one place that turns a URI into a pyarrow filesystem, so
``cli.py train`` and ``cli.py prepare`` reach the same stores the same way: S3 endpoints other than
AWS (MinIO, moto) come from ``AWS_ENDPOINT_URL`` or the URI's ``?endpoint_override=host:port&scheme=http``,
credentials from the usual AWS environment variables. That URI layer is the one part of ``pipeline``
that ``train`` uses (everything about the data itself comes from ``subspectral.schemas``): two copies of
it would drift apart in exactly the places (endpoints, timeouts, odd local names) where they must agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

from subspectral.pipeline import storage as _store
from subspectral.pipeline.storage import is_remote

__all__ = ["DataError", "absolute_uri", "exists", "is_remote", "join", "open_stream", "read_bytes", "read_json"]

# Read-ahead of ``open_stream``: what a stream holds whatever the file's size. On an object store each
# refill is one ranged GET, so the remote buffer is larger: fewer round trips per shard.
LOCAL_READ_AHEAD = 1 << 20
REMOTE_READ_AHEAD = 4 << 20


class DataError(ValueError):
    """Data that cannot be trained on; the message is one line for the user."""


def absolute_uri(uri: str) -> str:
    """An object-store URI as is, a local path made absolute: what run records and reports keep."""
    return _store.location(uri).uri


def join(base: str, *parts: str) -> str:
    return _store.Location(base).join(*parts).uri if is_remote(base) else str(Path(base, *parts))


def read_bytes(uri: str) -> bytes:
    """The whole file. Missing: FileNotFoundError; other failures (network, permissions): OSError."""
    return _store.read_bytes(_store.Location(uri)) if is_remote(uri) else Path(uri).read_bytes()


def open_stream(uri: str) -> BinaryIO:
    """The file as a sequential binary stream, read ahead in ``*_READ_AHEAD`` bytes; a context
    manager.

    Missing: FileNotFoundError; other failures (network, permissions), on open or on any read: OSError."""
    if not is_remote(uri):
        return open(uri, "rb", buffering=LOCAL_READ_AHEAD)  # noqa: SIM115 - the caller closes it
    filesystem, path = _store.Location(uri).resolve()
    return filesystem.open_input_stream(path, compression=None, buffer_size=REMOTE_READ_AHEAD)


def exists(uri: str) -> bool:
    return _store.exists(_store.Location(uri)) if is_remote(uri) else Path(uri).exists()


def read_json(uri: str) -> dict[str, Any]:
    return json.loads(read_bytes(uri))
