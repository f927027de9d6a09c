"""schemas.bands, the dctz format: integer DCT bands stored losslessly, decoded by the trainer's reader."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import photo_like
from subspectral.pipeline import decompose
from subspectral.schemas.bands import decode_band, encode_bands
from subspectral.train.shards import Sample, decode_into


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
def test_any_integers_round_trip_exactly_extremes_included(dtype):
    info = np.iinfo(dtype)
    bands = np.random.default_rng(0).integers(info.min, info.max, (9, 12, 12, 3), dtype=dtype, endpoint=True)
    bands[0, 0, 0] = [info.min, info.max, 0]
    bands[1] = -1
    for k, payload in enumerate(encode_bands(bands)):
        out = np.empty((12, 12, 3), dtype)
        assert decode_band(payload, out)
        np.testing.assert_array_equal(out, bands[k])


def test_real_dct_bands_invert_to_the_pixels_and_the_trainer_reads_them():
    """dct_forward → dctz → the trainer's decode_into → dct_inverse gives back the uint8 components exactly."""
    components = decompose.decompose(photo_like(168, 168, seed=3), 6)
    bands = decompose.dct_forward(components)
    payloads = encode_bands(bands)
    decoded = np.empty_like(bands)
    for k, payload in enumerate(payloads):
        assert decode_into(decoded[k], Sample(f"key{k}", 0, "dctz", payload))
    np.testing.assert_array_equal(decompose.dct_inverse(decoded), components)
    npy = sum(len(_npy(band)) for band in bands)
    assert sum(len(p) for p in payloads) < npy  # the budget (≤ 0.5×) is measured on photos in bench/bench_scale.py


def test_damaged_or_mis_shaped_members_are_refused():
    payload = encode_bands(np.ones((1, 4, 4, 3), np.int16))[0]
    assert not decode_band(payload[:-3], np.empty((4, 4, 3), np.int16))  # truncated stream
    assert not decode_band(b"not zstd", np.empty((4, 4, 3), np.int16))
    assert not decode_band(payload, np.empty((5, 5, 3), np.int16))  # another size
    assert not decode_band(payload, np.empty((4, 4, 3), np.int32))  # another dtype than the card's
    assert not decode_band(payload, np.empty((4, 4, 3), np.uint8))  # not integer bands


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
