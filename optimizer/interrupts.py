"""Ctrl-C and SIGTERM that are never lost.

Python runs a signal's handler between two bytecodes of the main thread, wherever that is; when it is
inside a weakref callback or a ``__del__`` (the garbage collector's work), the KeyboardInterrupt the
handler raises is printed as "Exception ignored" and dropped, and the command would run on as if the
user had not asked it to stop. The handler therefore also latches the request, and the long-running
loops (between trials, between a sweep's levels, before the outputs) call :func:`raise_if_requested`.
"""

from __future__ import annotations

import signal
import sys
import threading

__all__ = ["install", "raise_if_requested", "reset"]

_requested = threading.Event()


def _handler(signum, frame) -> None:  # noqa: ARG001
    _requested.set()  # kept even where the exception below is swallowed
    raise KeyboardInterrupt


def install() -> None:
    """Ctrl-C and SIGTERM (a job scheduler's stop) both unwind as KeyboardInterrupt, and are latched.

    Also where SIGINT started ignored: a shell without job control starts background commands
    (``optimize study ... &`` in a script, a CI step) so, and ``kill -INT`` would leave the study running.
    """
    reset()
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    if getattr(sys.unraisablehook, "__name__", "") != _quiet_about_latched.__name__:
        _quiet_about_latched.previous = sys.unraisablehook  # type: ignore[attr-defined]
        sys.unraisablehook = _quiet_about_latched


def _quiet_about_latched(unraisable) -> None:
    """Python reports a dropped KeyboardInterrupt with a traceback on stderr: the latch answers it."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _requested.is_set():
        return
    _quiet_about_latched.previous(unraisable)  # type: ignore[attr-defined]


def reset() -> None:
    """Forget a request that was answered (the command ended with exit 130)."""
    _requested.clear()


def raise_if_requested() -> None:
    """Raise the KeyboardInterrupt a Ctrl-C or SIGTERM asked for, if its own was swallowed."""
    if _requested.is_set():
        raise KeyboardInterrupt
