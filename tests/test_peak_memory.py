"""Per-member peak memory: the process's resident-set high-water mark, reset between members."""

from __future__ import annotations

import numpy as np

from train import peak_memory


def test_peak_follows_an_allocation_and_resets_to_the_current_size():
    size = 256 * 2**20
    block = np.ones(size, np.uint8)  # written, so resident
    assert peak_memory.peak_bytes() >= size
    del block
    assert peak_memory.reset_peak()  # Linux: /proc/self/clear_refs
    after_reset = peak_memory.peak_bytes()
    assert after_reset < size  # the freed block no longer counts
    block = np.ones(size // 2, np.uint8)
    assert peak_memory.peak_bytes() >= size // 2 > 0
    assert peak_memory.peak_bytes() < after_reset + size  # the new peak is this block's, not the old one
    del block
