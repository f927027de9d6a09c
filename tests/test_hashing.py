"""pipeline.hashing: BLAKE2b of Arrow strings, in C and through hashlib, gives hashlib's numbers exactly."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
from subspectral.pipeline import hashing

# Around BLAKE2b's 128-byte block: empty, one short of a block, a block, one more, two blocks; non-ASCII.
STRINGS = ["", "a", "n01440764_10026", "x" * 127, "y" * 128, "z" * 129, "w" * 256, "ß-ñ-日本", "a\x00b"]


def reference(values: list[str], salt: bytes) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8, salt=salt).digest(), "little")
                     for v in values], dtype=np.uint64)


@pytest.fixture(params=["c", "hashlib"])
def implementation(request, monkeypatch):
    if request.param == "c":
        if hashing._keyhash is None:
            pytest.fail("pipeline._keyhash is not built: setup.py builds it with any C compiler")
    else:
        monkeypatch.setattr(hashing, "_keyhash", None)
    return request.param


@pytest.mark.parametrize("salt", [b"", b"0:order", b"sixteen bytes!!!"])
def test_hashes_equal_hashlibs(implementation, salt):
    np.testing.assert_array_equal(hashing.blake2b64(pa.array(STRINGS), salt), reference(STRINGS, salt))


def test_chunks_slices_nulls_large_strings_and_dictionaries(implementation):
    values = [f"key{i}" for i in range(300)] + STRINGS
    expected = reference(values, b"s")
    array = pa.array(values)
    chunked = pa.chunked_array([array.slice(0, 7), array.slice(7, 200), array.slice(207)])
    np.testing.assert_array_equal(hashing.blake2b64(chunked, b"s"), expected)
    np.testing.assert_array_equal(hashing.blake2b64(array.slice(5, 20), b"s"), expected[5:25])
    np.testing.assert_array_equal(hashing.blake2b64(array.cast(pa.large_string()), b"s"), expected)
    np.testing.assert_array_equal(hashing.blake2b64(array.dictionary_encode(), b"s"), expected)
    nulls = hashing.blake2b64(pa.array(["a", None]), b"s")
    np.testing.assert_array_equal(nulls, reference(["a", ""], b"s"))


def test_hex_prefix_is_the_hexdigest_prefix():
    hashes = reference(STRINGS, b"")
    want = [hashlib.blake2b(v.encode(), digest_size=8).hexdigest()[:10] for v in STRINGS]
    assert hashing.hex_prefix(hashes, 10).to_pylist() == want


def test_a_salt_over_16_bytes_is_refused():
    with pytest.raises(ValueError, match="16 bytes"):
        hashing.blake2b64(pa.array(["a"]), b"x" * 17)
