"""Per-member peak memory: the process's resident-set high-water mark, reset between members."""

from __future__ import annotations

import numpy as np
from subspectral.train import peak_memory


def test_peak_follows_an_allocation_and_resets_to_the_current_size():
    # Relative to the resident size at the start: other tests in this process may hold hundreds of MB.
    assert peak_memory.reset_peak()  # Linux: /proc/self/clear_refs
    start = peak_memory.peak_bytes()
    size = 256 * 2**20
    block = np.ones(size, np.uint8)  # written, so resident
    assert peak_memory.peak_bytes() >= start + size * 0.9
    del block
    assert peak_memory.reset_peak()
    after_reset = peak_memory.peak_bytes()
    assert after_reset < start + size // 4  # the freed block no longer counts
    block = np.ones(size // 2, np.uint8)
    assert peak_memory.peak_bytes() >= after_reset + size // 2 * 0.9
    assert peak_memory.peak_bytes() < after_reset + size  # the new peak is this block's, not the old one
    del block
