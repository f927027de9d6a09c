"""Polyphase split and DCT: exact, and equal to torch's pixel_unshuffle as an independent reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from subspectral.pipeline.decompose import compose, dct_forward, dct_inverse, dct_quantisation, decompose, grid_factor


@pytest.mark.parametrize("split", [1, 4, 9, 16, 36, 64])
def test_components_are_pixel_unshuffle_channel_groups(split):
    r = grid_factor(split)
    image = np.random.default_rng(split).integers(0, 256, (r * 7, r * 7, 3), dtype=np.uint8)
    components = decompose(image, r)
    reference = F.pixel_unshuffle(torch.from_numpy(image).permute(2, 0, 1)[None], r)[0]  # (3·N, s, s)
    reference = reference.reshape(3, split, 7, 7).permute(1, 2, 3, 0).numpy()  # channel c·N + k → (k, s, s, c)
    np.testing.assert_array_equal(components, reference)
    for k in range(split):
        a, b = divmod(k, r)
        np.testing.assert_array_equal(components[k], image[a::r, b::r])
    np.testing.assert_array_equal(compose(components), image)


def test_rgbx_fast_path_equals_generic_path():
    image = np.random.default_rng(1).integers(0, 256, (336, 336, 4), dtype=np.uint8)
    fast = decompose(image, 6)
    generic = decompose(np.ascontiguousarray(image[..., :3]), 6)
    np.testing.assert_array_equal(fast[..., :3], generic)


@pytest.mark.parametrize("split", [0, 2, 35, -4])
def test_split_must_be_a_perfect_square(split):
    with pytest.raises(ValueError, match="perfect square"):
        grid_factor(split)


@pytest.mark.parametrize("split", [4, 16, 36, 64, 100])
def test_dct_inverse_after_rounding_is_exact(split):
    rng = np.random.default_rng(split)
    components = rng.integers(0, 256, (split, 8, 8, 3), dtype=np.uint8)
    components[:, 0, 0] = 0  # extremes: all-dark and alternating full-range columns
    components[::2, 1, 1] = 255
    components[1::2, 1, 1] = 0
    bands = dct_forward(components)
    scale, dtype = dct_quantisation(split)
    assert bands.dtype == dtype
    np.testing.assert_array_equal(dct_inverse(bands), components)
    # Band 0 is r · (block mean): a scaled average pool, as METHOD.md says.
    mean = components.reshape(split, -1).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(bands[0].reshape(-1) / scale, mean * np.sqrt(split), atol=1 / scale)


def test_dct_is_orthonormal_and_matches_scipy():
    from scipy.fft import dct

    x = np.random.default_rng(2).integers(0, 256, (36, 4, 4, 3), dtype=np.uint8)
    scale, _ = dct_quantisation(36)
    expected = np.rint(dct(x.astype(np.float64), type=2, norm="ortho", axis=0) * scale)
    np.testing.assert_array_equal(dct_forward(x), expected)
