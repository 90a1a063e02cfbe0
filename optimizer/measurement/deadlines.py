"""Deadlines on the measurement path that hold whatever the server or the client library does.

A hung server never answers, and a client library's own cancellation may leave an await waiting for
ever: grpc.aio's ``write()`` on a stream that was cancelled before its headers went out (a fresh
channel to a stopped server never completes its HTTP/2 handshake) waits on an event nothing sets any
more. So nothing here waits on the server, nor on a cancellation being honoured: every wait is
``asyncio.wait(..., timeout)``, a timer of the event loop's own; a task still running at its deadline
is cancelled, given :data:`CANCEL_GRACE_S` to finish, and otherwise left behind.

:func:`run_bounded` is the last resort around a whole measurement: it runs the coroutine on a loop of
its own whose deadline and teardown are bounded too (``asyncio.run`` waits for every leftover task).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any, TypeVar

__all__ = ["CANCEL_GRACE_S", "DeadlineExceeded", "abandoned_tasks", "run_bounded", "settle", "within"]

T = TypeVar("T")

# How long a cancelled task may take to finish before it is left behind.
CANCEL_GRACE_S = 1.0

_LOG = logging.getLogger(__name__)
# Tasks left behind, kept referenced: a pending task that is garbage-collected logs an error. Only a
# task that ignored its cancellation lands here (one per hang at most), so the set stays small.
_ABANDONED: set[asyncio.Task] = set()


class DeadlineExceeded(TimeoutError):
    """A wait reached its deadline (the awaited thing's own exceptions, timeouts included, pass as they are)."""


def abandoned_tasks() -> int:
    """How many tasks this process left behind because they ignored their cancellation."""
    return len(_ABANDONED)


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable``, or raise :class:`TimeoutError` after ``seconds`` even if it ignores cancellation."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, seconds))
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task not in done:
        await _cancel_or_abandon([task])
        raise DeadlineExceeded(f"no answer within {seconds:g} s")
    return task.result()


async def settle(tasks: Iterable[asyncio.Task], seconds: float) -> list[BaseException | Any]:
    """Wait at most ``seconds`` for ``tasks``; each one's result or exception, in order.

    A task that has not finished by then is cancelled (and left behind if it ignores that); its
    outcome is a :class:`DeadlineExceeded`.
    """
    tasks = list(tasks)
    if not tasks:
        return []
    _, late = await asyncio.wait(tasks, timeout=max(0.0, seconds))
    if late:
        await _cancel_or_abandon(late)
    return [_outcome(task, seconds) for task in tasks]


def run_bounded(main: Coroutine[Any, Any, T], seconds: float) -> T:
    """Run ``main`` on a fresh event loop; raise :class:`DeadlineExceeded` if it has not finished in ``seconds``.

    Like ``asyncio.run``, but neither the run nor its teardown (leftover tasks, async generators) can
    outlast its deadline by more than a few grace periods. The default executor's threads are not
    joined (a thread blocked in a call would block the loop): closing the loop lets them finish alone.
    """
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_quiet_about_closed_loops)
    try:
        task = loop.create_task(main)
        done, _ = loop.run_until_complete(asyncio.wait({task}, timeout=max(0.0, seconds)))
        if task not in done:
            loop.run_until_complete(_cancel_or_abandon([task]))
            raise DeadlineExceeded(f"not finished within {seconds:.0f} s")
        return task.result()
    finally:
        _close_loop(loop)


def _quiet_about_closed_loops(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """grpc.aio's poller hands a late event of an earlier measurement's call (one a crashed server never
    answered) to that measurement's loop, closed since; asyncio would print its traceback to the user."""
    exc = context.get("exception")
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        _LOG.debug("a late gRPC event for a closed event loop: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on ``loop``, shut it down within grace periods, and close it."""
    try:
        leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if leftovers:
            loop.run_until_complete(_cancel_or_abandon(leftovers))
        try:
            loop.run_until_complete(within(loop.shutdown_asyncgens(), CANCEL_GRACE_S))
        except DeadlineExceeded:
            _LOG.debug("an async generator did not close in time")
    finally:
        asyncio.set_event_loop(None)
        loop.close()  # shuts the default executor down without waiting for its threads


async def _cancel_or_abandon(tasks: Iterable[asyncio.Task]) -> None:
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    finished, stuck = await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)
    for task in finished:
        if not task.cancelled():
            task.exception()  # retrieved: a failure after the deadline is not logged as unhandled
    for task in stuck:
        _LOG.debug("left behind a task that ignored its cancellation: %r", task)
        _ABANDONED.add(task)


def _outcome(task: asyncio.Task, seconds: float) -> BaseException | Any:
    if not task.done() or task.cancelled():
        return DeadlineExceeded(f"no answer within {seconds:g} s")
    return task.exception() or task.result()
