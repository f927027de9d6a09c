"""A stop request (SIGTERM from a batch scheduler) that survives landing where Python drops exceptions.

``cli.py`` turns SIGTERM into ``SystemExit`` at once. A signal that arrives while Python runs an
at-fork callback (a DataLoader starting its workers), a ``__del__`` or a weakref callback has its
exception printed and dropped there ("Exception ignored in ..."), and the run would go on to the
end. So the request is also recorded here, and the training loops call ``check()`` at every step.
"""

from __future__ import annotations

_requested: str | None = None


def request(message: str) -> None:
    global _requested
    _requested = message


def check() -> None:
    """Raise ``SystemExit`` if a stop was requested (a no-op otherwise: one global read)."""
    if _requested is not None:
        raise SystemExit(_requested)
