"""Read whole files from a local path or an object-store URI (s3://, gs://, ...) via pyarrow.fs."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

_REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")


class DataError(ValueError):
    """Data that cannot be trained on; the message is one line for the user."""


def is_remote(uri: str) -> bool:
    return uri.startswith(_REMOTE_SCHEMES)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_remote(base) else str(Path(base, *parts))


@lru_cache(maxsize=8)
def _filesystem(uri_root: str) -> Any:
    from pyarrow import fs  # only remote URIs need pyarrow's filesystems

    return fs.FileSystem.from_uri(uri_root)[0]


def _remote_path(uri: str) -> tuple[Any, str]:
    scheme, _, rest = uri.partition("://")
    bucket = rest.split("/", 1)[0]
    return _filesystem(f"{scheme}://{bucket}"), rest


def read_bytes(uri: str) -> bytes:
    if not is_remote(uri):
        return Path(uri).read_bytes()
    filesystem, path = _remote_path(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return Path(uri).exists()
    from pyarrow import fs

    filesystem, path = _remote_path(uri)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def read_json(uri: str) -> dict[str, Any]:
    return json.loads(read_bytes(uri))
