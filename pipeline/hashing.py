"""Stable 64-bit hashes of every string of an Arrow array: BLAKE2b, read in place from Arrow's buffers. Pure.

The same string and salt give the same number on every machine and run, in C (``pipeline._keyhash``,
built by setup.py) or, where that is not built, through hashlib: the same numbers, a Python object
per string and ~15× the time.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

try:  # optional: setup.py skips it where no C compiler is found
    from . import _keyhash
except ImportError:
    _keyhash = None

_FALLBACK_CHUNK = 1 << 16  # rows hashed per batch of Python objects when the C extension is missing


def blake2b64(strings: pa.Array | pa.ChunkedArray, salt: bytes = b"") -> np.ndarray:
    """``int.from_bytes(blake2b(s, digest_size=8, salt=salt).digest(), "little")`` of each string (null: b"")."""
    if len(salt) > 16:
        raise ValueError("a BLAKE2b salt is at most 16 bytes")
    chunks = strings.chunks if isinstance(strings, pa.ChunkedArray) else [strings]
    out = np.empty(len(strings), dtype=np.uint64)
    start = 0
    for chunk in chunks:
        _hash_chunk(chunk, salt, out[start : start + len(chunk)])
        start += len(chunk)
    return out


def hex_prefix(hashes: np.ndarray, digits: int) -> pa.Array:
    """The first ``digits`` hex digits of each hash's 8 little-endian digest bytes (``hexdigest()[:digits]``)."""
    if not 1 <= digits <= 16:
        raise ValueError("a 64-bit hash has 1 to 16 hex digits")
    digest = hashes.astype("<u8").view(np.uint8).reshape(-1, 8)
    nibbles = np.empty((len(hashes), 16), dtype=np.uint8)
    nibbles[:, 0::2] = digest >> 4
    nibbles[:, 1::2] = digest & 15
    text = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles[:, :digits]]
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(digits), len(hashes), [None, pa.py_buffer(text.tobytes())])
    return fixed.cast(pa.string())


def _hash_chunk(chunk: pa.Array, salt: bytes, out: np.ndarray) -> None:
    if pa.types.is_dictionary(chunk.type):
        values = blake2b64(chunk.dictionary, salt)
        indices = chunk.indices.fill_null(0).to_numpy(zero_copy_only=False)
        out[:] = values[indices] if len(values) else np.zeros(len(chunk), np.uint64)
        return
    if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
        chunk = chunk.cast(pa.string())
    if chunk.null_count:
        chunk = chunk.fill_null("")
    if _keyhash is None:
        _hash_with_hashlib(chunk, salt, out)
        return
    wide = pa.types.is_large_string(chunk.type)
    _, offsets_buffer, data_buffer = chunk.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64 if wide else np.int32)[chunk.offset :][: len(chunk) + 1]
    data = data_buffer if data_buffer is not None else b""
    _keyhash.blake2b64(np.ascontiguousarray(offsets), data, salt, out, wide)


def _hash_with_hashlib(chunk: pa.Array, salt: bytes, out: np.ndarray) -> None:
    for start in range(0, len(chunk), _FALLBACK_CHUNK):
        values = chunk.slice(start, _FALLBACK_CHUNK).to_pylist()
        out[start : start + len(values)] = np.fromiter(
            (int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8, salt=salt).digest(), "little")
             for v in values),
            dtype=np.uint64, count=len(values))
