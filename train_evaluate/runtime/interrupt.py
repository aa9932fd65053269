"""Ctrl-C that stops a run between steps, never inside a library's write.

Python's default raises KeyboardInterrupt wherever the main thread happens to be: inside
Optuna's storage commit (which Optuna then reports as an unrelated error) or inside a garbage
collector callback (where it is silently dropped and the run goes on). Inside ``deferred()`` the
first Ctrl-C only records the request, and the run's own loops call ``check()`` at points where
stopping is safe: between training steps, image batches and trials. A second Ctrl-C stops at
once.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

_requested = False


def _record(_signum: int, _frame) -> None:
    global _requested
    if _requested:  # asked twice: stop now, wherever we are
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
    _requested = True


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed inside ``deferred()``."""
    if _requested:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    global _requested
    _requested = False
    previous = signal.signal(signal.SIGINT, _record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested = False
