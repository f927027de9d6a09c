"""The ``dctz`` sample format: integer DCT bands stored losslessly in about half their ``.npy`` size. Pure.

Part of the data contract (docs/format.md): ``prepare`` writes it, ``train`` and ``ensemble-eval``
read it. One member holds one band of one sample: an s × s × 3 array of the card's integer dtype
(int16; int32 above N = 64, as ``decompose.dct_quantisation`` says), laid out as:

1. channel-planar (3, s, s), the channels turned into Y = ⌊(R + 2G + B) / 4⌋, U = B − G, V = R − G
   (JPEG 2000's reversible colour transform: the channels of a band are strongly correlated);
2. every value zigzag-mapped to an unsigned integer (0, −1, 1, −2 … → 0, 1, 2, 3 …);
3. the bytes of those integers, width + 1 bytes each (U and V need one bit more than the band),
   split into planes, most significant first: the high planes are mostly zero;
4. one zstd frame (level 3) of the result.

Decoding reverses it: planes → integers → zigzag⁻¹ → G = Y − ⌊(U + V) / 4⌋, R = V + G, B = U + G.
The dtype is not stored: it is the one the card gives, and the decoded length must match it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

EXTENSION = "dctz"
ZSTD_LEVEL = 3  # zlib at level 6 stores ~2 % more in ~2.5× the time; zstd at 9, ~1 % less in ~1.7× (BENCHMARKS.md)
_CODEC = pa.Codec("zstd", compression_level=ZSTD_LEVEL)


def encode_bands(bands: np.ndarray) -> list[bytes]:
    """(N, s, s, 3) signed integer bands → the N members' bytes, in one numpy pass over all bands."""
    if bands.dtype.kind != "i" or bands.shape[-1] != 3:
        raise ValueError(f"dctz stores signed integer bands of 3 channels, got {bands.dtype} {bands.shape}")
    count = bands.shape[0]
    width = bands.dtype.itemsize + 1
    red, green, blue = np.moveaxis(bands.astype(np.int64), -1, 0)
    planar = np.stack([(red + 2 * green + blue) >> 2, blue - green, red - green], axis=1).reshape(count, -1)
    codes = ((planar << 1) ^ (planar >> 63)).view(np.uint64)  # zigzag; >> 63 copies the sign
    planes = codes.astype("<u8").view(np.uint8).reshape(count, -1, 8)[:, :, width - 1 :: -1].transpose(0, 2, 1)
    planes = np.ascontiguousarray(planes).reshape(count, -1)
    return [_CODEC.compress(plane, asbytes=True) for plane in planes]


def decode_band(payload: bytes, out: np.ndarray) -> bool:
    """Decode one member into ``out`` (s × s × 3, the card's integer dtype); False when corrupt or mis-shaped."""
    if out.dtype.kind != "i" or out.ndim != 3 or out.shape[-1] != 3:
        return False
    width = out.dtype.itemsize + 1
    try:
        raw = _CODEC.decompress(payload, decompressed_size=out.size * width, asbytes=True)
    except (OSError, ValueError, pa.ArrowException):
        return False
    if len(raw) != out.size * width:
        return False
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(width, -1)[::-1]
    codes = np.zeros(planes.shape[1], dtype=np.uint64)
    for shift, plane in enumerate(planes):  # least significant plane first
        codes |= plane.astype(np.uint64) << np.uint64(8 * shift)
    values = (codes >> np.uint64(1)).astype(np.int64) ^ -(codes & np.uint64(1)).astype(np.int64)
    luma, u, v = values.reshape(3, *out.shape[:-1])
    green = luma - ((u + v) >> 2)
    channels = np.stack([v + green, green, u + green], axis=-1)
    info = np.iinfo(out.dtype)
    if channels.min() < info.min or channels.max() > info.max:
        return False
    out[...] = channels
    return True
