"""Local paths and object-storage URIs (s3://…) behind one small interface, via pyarrow.fs.

A local path is a path, whatever characters it holds (``?`` and ``#`` included); only a URI with a
scheme (``s3://``, ``gs://``) has a query. S3 endpoints other than AWS (MinIO, Ceph, a test server)
come from the URI's query (``s3://bucket/x?endpoint_override=127.0.0.1:9000&scheme=http``) or from
the ``AWS_ENDPOINT_URL`` environment variable.

Every object-store request has a timeout, so that a store that stops answering fails the command
with a message instead of blocking it (and its SIGTERM handling) for minutes: ``SUBSPECTRAL_STORAGE_TIMEOUT``
seconds without a byte (default 15), 5 s to connect, 3 attempts per request.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import posixpath
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import pyarrow.fs as pafs

TIMEOUT_ENV = "SUBSPECTRAL_STORAGE_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 15.0  # without a byte; a healthy store answers within a second or two
CONNECT_TIMEOUT_SECONDS = 5.0
ATTEMPTS = 3  # per request; pyarrow's from_uri default retried a dead endpoint for ~100 s
SCHEME_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*://"  # what makes a string a URI rather than a local path
_SCHEME = re.compile(SCHEME_PATTERN)
_S3_QUERY = ("endpoint_override", "scheme", "region", "allow_bucket_creation", "allow_bucket_deletion")
_GCS_QUERY = ("endpoint_override", "scheme", "anonymous")


@dataclass(frozen=True)
class Location:
    """A folder or file: a filesystem and a path on it. Picklable, so Ray tasks receive it as is."""

    uri: str

    def resolve(self) -> tuple[pafs.FileSystem, str]:
        return _resolve(self.uri)

    def join(self, *parts: str) -> Location:
        if not is_remote(self.uri):
            return Location(posixpath.join(self.uri, *parts))
        base, query = (self.uri.split("?", 1) + [""])[:2]
        joined = posixpath.join(base, *parts)
        return Location(f"{joined}?{query}" if query else joined)

    @property
    def path(self) -> str:
        """The path without any query: a local path as is, a URI without its ``?…``."""
        return self.uri.split("?", 1)[0] if is_remote(self.uri) else self.uri


def is_remote(uri: str) -> bool:
    """A URI with a scheme (s3://bucket/key, gs://…), read through pyarrow.fs, rather than a local path."""
    return bool(_SCHEME.match(uri))


def location(uri: str | os.PathLike) -> Location:
    text = os.fspath(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if not is_remote(text):
        text = os.path.abspath(text)
    return Location(text)


def storage_timeout() -> float:
    """Seconds an object-store request may go without a byte (``SUBSPECTRAL_STORAGE_TIMEOUT``)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds above 0, got {text!r}")
    return seconds


_FILESYSTEMS: dict[str, pafs.FileSystem] = {}  # one client per bucket and endpoint, reused by every read


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if not is_remote(uri):
        return pafs.LocalFileSystem(), uri
    base, _, query = uri.partition("?")
    if base.startswith("s3://") and not query and os.environ.get("AWS_ENDPOINT_URL"):
        endpoint = os.environ["AWS_ENDPOINT_URL"].rstrip("/")
        scheme = "http" if endpoint.startswith("http://") else "https"
        query = f"endpoint_override={endpoint.split('://', 1)[1]}&scheme={scheme}"
    cache_key = "/".join(base.split("/", 3)[:3]) + "?" + query  # the endpoint is part of the key
    if cache_key not in _FILESYSTEMS:
        _FILESYSTEMS[cache_key] = _filesystem(base, query)
    return _FILESYSTEMS[cache_key], base.split("://", 1)[1].rstrip("/")


def _filesystem(base: str, query: str) -> pafs.FileSystem:
    """A client for ``base``'s store, with the timeouts above (pyarrow's ``from_uri`` sets none)."""
    scheme = base.split("://", 1)[0]
    params = dict(parse_qsl(query, keep_blank_values=True))
    known = {"s3": _S3_QUERY, "gs": _GCS_QUERY, "gcs": _GCS_QUERY}.get(scheme)
    if known is None:  # hdfs://, abfs://, …: as pyarrow builds them
        return pafs.FileSystem.from_uri(base + ("?" + query if query else ""))[0]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{base}: unknown URI option {', '.join(unknown)} (known: {', '.join(known)})")
    endpoint = params.pop("endpoint_override", None)
    if endpoint and "://" in endpoint:  # accept http://host:port as well as host:port
        params.setdefault("scheme", endpoint.split("://", 1)[0])
        endpoint = endpoint.split("://", 1)[1]
    timeout = storage_timeout()
    if scheme != "s3":
        return pafs.GcsFileSystem(endpoint_override=endpoint, scheme=params.get("scheme"),
                                  anonymous=params.get("anonymous", "").lower() in ("1", "true"),
                                  retry_time_limit=datetime.timedelta(seconds=ATTEMPTS * timeout))
    flags = {name: params.pop(name).lower() in ("1", "true") for name in _S3_QUERY[3:] if name in params}
    region = params.pop("region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:  # AWS itself: the bucket's region, as from_uri finds it
        region = pafs.resolve_s3_region(base.split("://", 1)[1].split("/", 1)[0])
    return pafs.S3FileSystem(endpoint_override=endpoint, region=region, request_timeout=timeout,
                             connect_timeout=min(timeout, CONNECT_TIMEOUT_SECONDS),
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS), **params,
                             **flags)


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
    A failure removes the partial file, even when closing it fails too (a full disk fails the close
    that flushes the buffer); a kill leaves at most a partial file, which the rerun removes.
    """
    filesystem, path = loc.resolve()
    directory, name = posixpath.split(path)
    filesystem.create_dir(directory, recursive=True)
    staging = posixpath.join(directory, partial_name(name))
    if isinstance(filesystem, pafs.LocalFileSystem):  # Python's buffered file: cheaper per small write
        stream = open(staging, "wb", buffering=1 << 17)  # noqa: SIM115 - closed below, on every path
    else:
        stream = filesystem.open_output_stream(staging, compression=None, buffer_size=1 << 20)
    try:
        yield stream
        stream.close()
    except BaseException:
        with contextlib.suppress(Exception):  # the error being raised is the one to report
            stream.close()
        with contextlib.suppress(OSError):
            filesystem.delete_file(staging)
        raise
    try:
        filesystem.move(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            filesystem.delete_file(staging)
        raise


def partial_name(name: str) -> str:
    return f".{name}.partial"


def is_partial(name: str) -> bool:
    return name.startswith(".") and name.endswith(".partial")


def free_bytes(loc: Location) -> int | None:
    """Space left for ``loc`` on a local filesystem (its nearest existing folder); None for object stores."""
    if is_remote(loc.uri):
        return None
    path = loc.uri
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def write_bytes(loc: Location, data: bytes) -> None:
    with atomic_output(loc) as stream:
        stream.write(data)


def write_json(loc: Location, payload: Any) -> None:
    write_bytes(loc, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
