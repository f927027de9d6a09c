"""Peak resident memory of this process, per member: reset when a member starts, read when it ends.

Linux keeps a per-process high-water mark of the resident set (``VmHWM`` in /proc/self/status), and
writing ``5`` to /proc/self/clear_refs resets it to the current size, so members trained one after
another in one process (``--shard all``) each get their own peak. Elsewhere the peak is
``getrusage``'s ``ru_maxrss``, which cannot be reset: the process's peak since it started.
DataLoader worker processes (``data.workers`` > 0) are separate processes and are not included.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_PROC = Path("/proc/self")


def reset_peak() -> bool:
    """Start a new peak at the current resident size; False where the platform cannot."""
    try:
        (_PROC / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_bytes() -> int:
    """The resident-set peak since the last ``reset_peak`` (since the start where it cannot reset)."""
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes
