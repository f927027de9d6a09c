"""The ``dctz`` sample format: integer DCT bands stored losslessly in ~0.4 × their ``.npy`` size. Pure.

Part of the data contract (docs/format.md): ``prepare`` writes it, ``train`` and ``ensemble-eval``
read it. One member holds one band of one sample, an s × s × C array of int16 (int32 above N = 64,
as ``decompose.dct_quantisation`` says), laid out as:

1. channel-planar: the C planes of s × s values one after the other;
2. each value zigzag-mapped to an unsigned integer of the same width (0, −1, 1, −2, 2 … → 0, 1, 2, 3,
   4 …), so that small magnitudes of either sign have small codes;
3. the bytes of those integers split into planes, most significant first (all high bytes, then all
   low bytes): the high bytes are mostly zero and compress well;
4. one zlib stream (RFC 1950) of the result.

The dtype is not stored: it is the one the card gives, and the decoded length must match it.
"""

from __future__ import annotations

import zlib

import numpy as np

EXTENSION = "dctz"
ZLIB_LEVEL = 1  # level 6 saves another ~3 % of the bytes for ~1.5× the time (BENCHMARKS.md)


def encode_bands(bands: np.ndarray) -> list[bytes]:
    """(N, s, s, C) signed integer bands → the N members' bytes, in one numpy pass over all bands."""
    if bands.dtype.kind != "i":
        raise ValueError(f"dctz stores signed integer bands, got {bands.dtype}")
    count = bands.shape[0]
    width = bands.dtype.itemsize
    planar = np.moveaxis(bands, -1, 1).astype(bands.dtype.newbyteorder("<"), copy=False)
    signed = np.ascontiguousarray(planar).reshape(count, -1)
    codes = (signed << 1) ^ (signed >> (8 * width - 1))  # zigzag; arithmetic shift copies the sign
    planes = codes.view(np.uint8).reshape(count, -1, width)[:, :, ::-1].transpose(0, 2, 1)
    planes = np.ascontiguousarray(planes).reshape(count, -1)
    return [zlib.compress(plane.data, ZLIB_LEVEL) for plane in planes]


def decode_band(payload: bytes, out: np.ndarray) -> bool:
    """Decode one member into ``out`` (s × s × C, the card's integer dtype); False when corrupt or mis-shaped."""
    try:
        raw = zlib.decompress(payload)
    except zlib.error:
        return False
    width = out.dtype.itemsize
    if out.dtype.kind != "i" or len(raw) != out.size * width:
        return False
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(width, -1)[::-1].T
    codes = np.ascontiguousarray(planes).view(f"<u{width}").reshape(-1)
    values = (codes >> 1).astype(f"<i{width}") ^ -(codes & 1).astype(f"<i{width}")
    channels = out.shape[-1]
    out[...] = np.moveaxis(values.reshape(channels, *out.shape[:-1]), 0, -1)
    return True
