"""A stop request (SIGTERM from a batch scheduler) that survives landing where Python drops exceptions.

``cli.py`` turns SIGTERM into ``SystemExit`` at once. A signal that arrives while Python runs an
at-fork callback (a DataLoader starting its workers), a ``__del__`` or a weakref callback has its
exception printed and dropped there ("Exception ignored in ..."), and the run would go on to the
end. So the request is also recorded here, and the training loops call ``check()`` at every step.
"""

from __future__ import annotations

import signal

_requested: str | None = None


def request(message: str) -> None:
    global _requested
    _requested = message


def check() -> None:
    """Raise ``SystemExit`` if a stop was requested (a no-op otherwise: one global read)."""
    if _requested is not None:
        raise SystemExit(_requested)


def leave_signals_to_parent(_worker: int = 0) -> None:
    """In a data-loading worker process: ignore SIGTERM and SIGINT, which the training process handles.

    A batch scheduler's SIGTERM or a Ctrl-C reaches the whole process group. A worker killed by it makes
    torch's DataLoader raise "worker killed by signal" in the trainer, in the middle of its own clean
    stop (a traceback instead of the one line); ignored, the workers are stopped by the DataLoader as
    the trainer unwinds.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
