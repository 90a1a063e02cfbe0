"""Deadlines on the measurement path hold whatever the awaited thing does with its cancellation.

The unit tests use awaitables that ignore cancellation (as a grpc.aio write on a stream cancelled before
its headers went out did); the load generator test swaps in such a client; tests/test_faults.py checks
each load path against a real stopped server.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from optimizer.errors import InferenceError
from optimizer.measurement import builtin
from optimizer.measurement.builtin import LoadGenerator, measurement_deadline_s
from optimizer.measurement.deadlines import CANCEL_GRACE_S, run_bounded, settle, within
from optimizer.measurement.levels import MeasureSettings


async def _deaf(seconds: float = 60.0) -> str:
    """Sleeps ``seconds`` and swallows every cancellation on the way: a hung await no cancel wakes."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            await asyncio.sleep(left)
        except asyncio.CancelledError:
            continue
    return "woke"


def _timed(function, *args):
    started = time.monotonic()
    try:
        return function(*args), time.monotonic() - started
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return exc, time.monotonic() - started


def test_within_returns_what_a_prompt_awaitable_returns():
    async def prompt() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert run_bounded(within(prompt(), 1.0), 5.0) == 7


def test_within_raises_at_its_deadline_though_the_awaitable_ignores_cancellation():
    outcome, seconds = _timed(run_bounded, within(_deaf(), 0.2), 30.0)
    assert isinstance(outcome, TimeoutError)
    assert seconds < 0.2 + 3 * CANCEL_GRACE_S + 1.0  # the deadline, its grace and the loop's teardown


def test_settle_gives_each_tasks_outcome_and_a_timeout_for_the_one_that_ignores_cancellation():
    async def main():
        async def fails():
            raise ValueError("refused")

        tasks = [asyncio.ensure_future(asyncio.sleep(0, "done")), asyncio.ensure_future(fails())]
        tasks.append(asyncio.ensure_future(_deaf()))
        return await settle(tasks, 0.2)

    (done, failed, deaf), seconds = _timed(run_bounded, main(), 30.0)
    assert done == "done" and isinstance(failed, ValueError) and isinstance(deaf, TimeoutError)
    assert seconds < 0.2 + 3 * CANCEL_GRACE_S + 1.0


def test_run_bounded_ends_a_run_whose_tasks_ignore_cancellation():
    async def main():
        asyncio.ensure_future(_deaf())  # a leftover task the run never awaits
        await _deaf()

    outcome, seconds = _timed(run_bounded, main(), 0.3)
    assert isinstance(outcome, TimeoutError)
    assert seconds < 0.3 + 3 * CANCEL_GRACE_S + 1.0


def test_run_bounded_returns_when_leftover_tasks_ignore_cancellation():
    async def main():
        asyncio.ensure_future(_deaf())
        return "measured"

    outcome, seconds = _timed(run_bounded, main(), 10.0)
    assert outcome == "measured" and seconds < 3 * CANCEL_GRACE_S + 1.0


def test_the_deadline_grows_with_levels_windows_and_the_request_timeout():
    short = MeasureSettings(warmup_s=0.3, window_s=1.0, max_window_s=2.0, request_timeout_s=2.0)
    assert measurement_deadline_s(short, 2) > 2 * (0.3 + 2.0 + 2.0)
    longer = MeasureSettings(warmup_s=0.3, window_s=1.0, max_window_s=2.0, request_timeout_s=30.0)
    assert measurement_deadline_s(longer, 2) - measurement_deadline_s(short, 2) >= 2 * 28.0


@pytest.mark.parametrize("mode, level", [("concurrency", 2), ("request_rate", 50)])
def test_a_request_that_ignores_its_timeout_and_cancellation_still_fails_the_level(monkeypatch, mode, level):
    async def deaf_infer(self, inputs, stop):
        await _deaf()

    monkeypatch.setattr(builtin._Client, "infer", deaf_infer)
    settings = MeasureSettings(
        warmup_s=0.2, window_s=0.3, max_window_s=0.5, min_requests=5, request_timeout_s=0.5, rule="fixed"
    )
    sample = {"x": np.zeros((1, 4), dtype=np.float32)}
    # A unary gRPC client aimed at a closed port: only infer is ever awaited for long.
    generator = LoadGenerator("127.0.0.1:9", "m", [sample], settings, mode=mode, streaming=False)
    outcome, seconds = _timed(generator.measure, level)
    assert isinstance(outcome, InferenceError), outcome
    assert "timed out" in outcome.message
    assert seconds < measurement_deadline_s(settings, 1) + 3 * CANCEL_GRACE_S
