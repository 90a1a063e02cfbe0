"""The load generator: closed-loop clients at a fixed concurrency, or open-loop Poisson arrivals at a rate.

One asyncio event loop drives every client from one process, over tritonclient's asyncio gRPC client
(the default) or its asyncio HTTP client (aiohttp-based; the classic HTTP client is gevent-based and not
thread-safe). A level warms up, then measures a window and returns the throughput and the latency
percentiles of every request that finished inside it, Triton's own breakdown of where the time went
(statistics API), and, when a probe is given, the server's memory and utilisation under that load.

How long a window runs is the ``rule`` of :class:`~optimizer.measurement.levels.MeasureSettings`.

In request-rate mode the offered load is fixed and throughput follows it, so only p99 must settle; a
request's latency is counted from when it was due, so a client that falls behind shows it (no
coordinated omission).
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np

from optimizer.errors import InferenceError
from optimizer.measurement.deadlines import CANCEL_GRACE_S, DeadlineExceeded, run_bounded, settle, within
from optimizer.measurement.levels import (
    MODES,
    PROTOCOLS,
    RULES,
    WARMUP_AGREEMENT,
    LevelResult,
    MeasureSettings,
)
from optimizer.measurement.stopping import Uncertainty, estimate_uncertainty, should_stop
from optimizer.measurement.streams import StreamChannel, Watchdog, end_of_stream, stream_slots
from optimizer.serving.control import triton_error_parts
from optimizer.serving.statistics import breakdown

__all__ = [
    "LoadGenerator",
    "describe_failure",
    "level_deadline_s",
    "measure_pooled",
    "measurement_deadline_s",
    "run_measurement",
    "summarise_level",
]

T = TypeVar("T")

# An open loop whose server falls this far behind stops sending more: its p99 already says enough.
MAX_OUTSTANDING = 1024
# Defaults of a generator made without settings: the library's and the command line's.
DEFAULT_SETTINGS = MeasureSettings()
# The warm-up compares slices of this length (doubled while a slice sees too few requests to compare).
WARMUP_SLICE_S = 0.1
WARMUP_SLICE_REQUESTS = 5
# Triton's statistics and the server's resources are a bonus to a level: read within this, or go without.
STATISTICS_TIMEOUT_S = 5.0
RESOURCES_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0
# An open loop waiting for its next arrival looks at least this often whether the level has ended.
STOP_CHECK_S = 0.1
# What a sweep's own code may take between levels (the pruner's reads and writes: a locked SQLite
# database waits up to a minute), on top of the levels' deadlines.
BETWEEN_LEVELS_S = 60.0


def level_deadline_s(settings: MeasureSettings) -> float:
    """The last-resort deadline of one level, from its settings alone.

    The longest warm-up and window, the statistics before and after, the resources, and the requests in
    flight finishing (or timing out) after the window, each with its grace. A hung server fails a level
    in about the request timeout long before this: it only catches an await that nothing else bounds.
    """
    statistics_s = min(STATISTICS_TIMEOUT_S, settings.request_timeout_s) + CANCEL_GRACE_S
    return (
        settings.warmup_s
        + settings.max_window_s
        + 2 * statistics_s
        + RESOURCES_TIMEOUT_S
        + CANCEL_GRACE_S
        + settings.request_timeout_s
        + 3 * CANCEL_GRACE_S
    )


def measurement_deadline_s(settings: MeasureSettings, levels: int) -> float:
    """The last-resort deadline of a whole measurement of ``levels`` levels (its set-up and the sweep's
    own work between levels included)."""
    return max(1, levels) * (level_deadline_s(settings) + BETWEEN_LEVELS_S) + 2 * CLOSE_TIMEOUT_S


def run_measurement(main: Coroutine[Any, Any, T], deadline_s: float, what: str) -> T:
    """Run a measurement's coroutine on a loop of its own; at its last-resort deadline it fails as a hang."""
    try:
        return run_bounded(main, deadline_s)
    except DeadlineExceeded as exc:
        raise _outlasted(what, deadline_s) from exc


def _outlasted(what: str, deadline_s: float) -> InferenceError:
    return InferenceError(f"{what} outlasted its {deadline_s:.0f} s deadline (server hung or overloaded)")


def summarise_level(
    concurrency: int, latencies_s: Sequence[float], duration_s: float, batch: int = 1
) -> LevelResult:
    """Throughput and percentiles from the latencies of the requests completed in a window."""
    if not latencies_s or duration_s <= 0:
        raise InferenceError(f"no request completed in the measurement window at concurrency {concurrency}")
    millis = np.asarray(latencies_s) * 1000.0
    p50, p95, p99 = np.percentile(millis, [50, 95, 99])
    return LevelResult(
        concurrency=concurrency,
        throughput=len(millis) * batch / duration_s,
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
        requests=len(millis),
        duration_s=duration_s,
    )


class _Window:
    """The requests that finished between ``start`` and ``end`` (both unset during warm-up)."""

    def __init__(self) -> None:
        self.start = math.inf
        self.end = math.inf
        self.finish_times: list[float] = []
        self.latencies: list[float] = []
        # Every completion, warm-up included: the warm-up watches these settle.
        self.completed = 0
        self.latency_sum = 0.0

    def record(self, due: float, finished: float) -> None:
        self.completed += 1
        self.latency_sum += finished - due
        if self.start <= finished <= self.end:
            self.finish_times.append(finished)
            self.latencies.append(finished - due)

    def uncertainty(self, now: float) -> Uncertainty:
        return estimate_uncertainty(self.finish_times, self.latencies, self.start, now)


class LoadGenerator:
    """Load over gRPC (default) or HTTP: closed-loop clients, or Poisson arrivals at a request rate.

    Args:
        url: the server's gRPC (``host:port``) or HTTP address, matching ``protocol``.
        model_name: the model every request goes to.
        samples: the requests, sent in turn.
        settings: warm-up, window and stopping rule.
        protocol: ``"grpc"`` or ``"http"``.
        mode: ``"concurrency"`` (levels are client counts) or ``"request_rate"`` (requests per second).
        client_options: TLS options for tritonclient's gRPC client.
        headers: sent with every request (auth).
        resources: called (in a thread) at the end of each window, under load; its figures are kept.
        streaming: closed-loop gRPC levels over Triton's stream API (False: tritonclient's unary calls,
            as TLS targets always use; bench/fidelity.py compares the two).
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        samples: Sequence[Mapping[str, np.ndarray]],
        settings: MeasureSettings = DEFAULT_SETTINGS,
        *,
        protocol: str = "grpc",
        mode: str = "concurrency",
        client_options: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        resources: Callable[[], Mapping[str, float]] | None = None,
        streaming: bool = True,
    ) -> None:
        if not samples:
            raise ValueError("the load generator needs at least one input sample")
        if protocol not in PROTOCOLS or mode not in MODES or settings.rule not in RULES:
            raise ValueError(f"unknown protocol {protocol!r}, mode {mode!r} or rule {settings.rule!r}")
        self.url = url
        self.model_name = model_name
        self.samples = list(samples)
        self.settings = settings
        self.protocol = protocol
        self.mode = mode
        self.client_options = dict(client_options or {})
        self.headers = dict(headers) if headers else None
        self.resources = resources
        self.streaming = streaming

    def run_levels(self, levels: Sequence[float], on_level) -> list[LevelResult]:
        """Measure ``levels`` in order; ``on_level(index, result)`` returns False to stop the sweep.

        Raises:
            InferenceError: a request failed or timed out, or the measurement outlasted its deadline.
        """
        deadline_s = measurement_deadline_s(self.settings, len(levels))
        return run_measurement(self._run_levels(levels, on_level), deadline_s, "the measurement")

    def measure(self, level: float) -> LevelResult:
        """Measure a single level."""
        return self.run_levels([level], lambda index, result: False)[0]

    async def _run_levels(self, levels: Sequence[float], on_level) -> list[LevelResult]:
        client = _Client(self, connections=int(max(levels, default=1)) if self.mode == "concurrency" else 0)
        results: list[LevelResult] = []
        # A full collection of the study's large heap (optuna, onnx, numpy...) pauses every client at once
        # and lands in p99: move what exists now out of the collector's sight while measuring.
        gc.collect()
        gc.freeze()
        try:
            prepared = client.prepare(self.samples)
            for index, level in enumerate(levels):
                result = await self._measure_within_deadline(client, prepared, level)
                results.append(result)
                if not on_level(index, result):
                    break
        finally:
            gc.unfreeze()
            await client.close()
        return results

    async def _measure_within_deadline(self, client: _Client, prepared, level: float) -> LevelResult:
        deadline_s = level_deadline_s(self.settings)
        try:
            return await within(self._measure(client, prepared, level), deadline_s)
        except DeadlineExceeded as exc:
            raise _outlasted(f"the level at {level:g}", deadline_s) from exc

    async def _measure(self, client: _Client, prepared, level: float) -> LevelResult:
        started = time.perf_counter()
        window = _Window()
        stop = asyncio.Event()
        if self.mode == "concurrency" and client.streams:
            tasks = [
                asyncio.create_task(self._streamed_closed_loop(client, slots, window, stop))
                for slots in stream_slots(int(level))
            ]
        elif self.mode == "concurrency":
            tasks = [
                asyncio.create_task(self._closed_loop(client, prepared, offset, window, stop))
                for offset in range(int(level))
            ]
        else:
            tasks = [asyncio.create_task(self._open_loop(client, prepared, level, window, stop))]
        try:
            warmup_s = await self._warm_up(window, tasks)
            before = await client.statistics()
            cpu_before = time.process_time()
            window.start = time.perf_counter()
            reached = await self._wait_for_window(window, tasks)
            # The client's own CPU per request (this process: the event loop and its gRPC threads). On a
            # small machine it competes with the server, so it is recorded beside every level.
            client_cpu_ms = 1000 * (time.process_time() - cpu_before) / max(1, len(window.latencies))
            resources = await self._resources()
            window.end = time.perf_counter()
            after = await client.statistics()
        finally:
            stop.set()
            # Each client finishes the request it has in flight, or times out: no longer than that.
            outcomes = await settle(tasks, self.settings.request_timeout_s + 2 * CANCEL_GRACE_S)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            raise _as_inference_error(failures[0], self.settings.request_timeout_s)
        concurrency = int(level) if self.mode == "concurrency" else 0
        # Each request carries one inference; Triton's dynamic batcher does the batching.
        result = summarise_level(concurrency, window.latencies, window.end - window.start)
        return replace(
            result,
            request_rate=float(level) if self.mode == "request_rate" else None,
            uncertainty={**reached.to_dict(), "settled": reached.within(self.settings.targets(self.mode))},
            server=breakdown(before, after, self.model_name) if before and after else None,
            resources=resources,
            measure_s=time.perf_counter() - started,
            warmup_s=warmup_s,
            client_cpu_ms=client_cpu_ms,
        )

    async def _resources(self) -> Mapping[str, float] | None:
        """The server's resources under load (read in a thread), or None when they are not read in time."""
        if self.resources is None:
            return None
        try:
            return await within(asyncio.to_thread(self.resources), RESOURCES_TIMEOUT_S)
        except TimeoutError:
            return None

    async def _warm_up(self, window: _Window, tasks) -> float:
        """Warm up as long as the config needs: until two slices in a row agree, at most ``warmup_s``.

        A fresh load (new instances, new thread pools, first allocations) needs longer than a warm model
        at a new level; a constant warm-up is too long for one and can be too short for the other. Slices
        compare completion rates in a closed loop and mean latencies in an open one (whose rate is fixed).
        Returns the seconds it took.
        """
        cap = self.settings.warmup_s
        started = time.perf_counter()
        slice_s, previous = WARMUP_SLICE_S, None
        while (elapsed := time.perf_counter() - started) < cap:
            count, latency_sum = window.completed, window.latency_sum
            seconds = min(slice_s, cap - elapsed)
            await _sleep_or_fail(seconds, tasks)
            count = window.completed - count
            if count < WARMUP_SLICE_REQUESTS:  # too few to compare: look at longer slices
                slice_s, previous = slice_s * 2, None
                continue
            figure = (
                count / seconds if self.mode == "concurrency" else (window.latency_sum - latency_sum) / count
            )
            if previous is not None and abs(figure - previous) <= WARMUP_AGREEMENT * max(figure, previous):
                break
            previous = figure
        return time.perf_counter() - started

    async def _wait_for_window(self, window: _Window, tasks) -> Uncertainty:
        """Let the window run until the stopping rule says it has seen enough; what it reached."""
        rule = self.settings.stopping_rule(self.mode)
        await _sleep_or_fail(rule.min_window_s, tasks)
        while True:
            reached = window.uncertainty(time.perf_counter())
            if should_stop(reached, rule):
                return reached
            # Checking costs time in proportion to the requests seen: check less often as they pile up.
            pause = max(self.settings.check_s, reached.window_s / 10)
            await _sleep_or_fail(min(pause, rule.max_window_s - reached.window_s), tasks)

    async def _closed_loop(self, client: _Client, prepared, offset: int, window: _Window, stop) -> None:
        index = offset
        while not stop.is_set():
            inputs = prepared[index % len(prepared)]
            index += 1
            due = time.perf_counter()
            await client.infer(inputs, stop)
            window.record(due, time.perf_counter())

    async def _streamed_closed_loop(self, client: _Client, slots: range, window: _Window, stop) -> None:
        """Closed-loop clients ``slots`` over one gRPC stream: each response's slot sends its next request.

        A stream costs the client less CPU per request than a unary call (bench/fidelity.py), and on a
        small machine what the client saves, the server gets. A stream has no per-request deadline, so
        a watchdog ends it when no response came for the request timeout.
        """
        stream = client.open_stream()
        due = dict.fromkeys(slots, 0.0)
        sent = slots.start
        # The watchdog cancels this task too: a write or done_writing can wait on the stream for ever.
        watchdog = Watchdog(stream, client.timeout_s, owner=asyncio.current_task())

        async def send(slot: int) -> None:
            nonlocal sent
            due[slot] = time.perf_counter()
            await client.write_request(stream, client.streamed_request(sent, slot), stop)
            sent += 1

        try:
            for slot in slots:
                await send(slot)
            outstanding = len(slots)
            while outstanding:
                slot = await client.read_response(stream, stop, watchdog)
                finished = watchdog.last = time.perf_counter()
                window.record(due[slot], finished)
                if stop.is_set():
                    outstanding -= 1
                else:
                    await send(slot)
            await stream.done_writing()
        except asyncio.CancelledError as exc:
            if not watchdog.fired:
                raise  # the level is being torn down
            stop.set()
            raise InferenceError(describe_failure(asyncio.TimeoutError(), client.timeout_s)) from exc
        finally:
            watchdog.stop()
            stream.cancel()

    async def _open_loop(self, client: _Client, prepared, rate: float, window: _Window, stop) -> None:
        """Send requests at Poisson arrival times until ``stop``; each one's latency counts from when it was due."""

        async def one(inputs, due: float) -> None:
            await client.infer(inputs, stop)
            window.record(due, time.perf_counter())

        rng = np.random.default_rng(len(prepared))
        pending: set[asyncio.Task] = set()
        due, index = time.perf_counter(), 0
        try:
            while not stop.is_set():
                due += rng.exponential(1.0 / rate)
                # Not one long sleep: at a low rate the next arrival can be later than the level's end.
                while (wait := due - time.perf_counter()) > 0 and not stop.is_set():
                    await asyncio.sleep(min(wait, STOP_CHECK_S))
                if stop.is_set():
                    break
                _raise_failures(pending, client.timeout_s)
                if len(pending) >= MAX_OUTSTANDING:
                    done, _ = await asyncio.wait(
                        pending,
                        timeout=client.timeout_s + CANCEL_GRACE_S,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not done:
                        raise InferenceError(describe_failure(asyncio.TimeoutError(), client.timeout_s))
                task = asyncio.create_task(one(prepared[index % len(prepared)], due))
                pending.add(task)
                task.add_done_callback(_forget_if_fine(pending))
                index += 1
        finally:
            outcomes = await settle(pending, client.timeout_s + CANCEL_GRACE_S)
        _raise_failures((task for task in outcomes if isinstance(task, BaseException)), client.timeout_s)


def _forget_if_fine(pending: set[asyncio.Task]):
    """A done-callback dropping a finished request from ``pending``; failed ones stay, to be raised."""

    def forget(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is None:
            pending.discard(task)

    return forget


def _raise_failures(items, timeout_s: float) -> None:
    for item in list(items):
        error = item if isinstance(item, BaseException) else (item.exception() if item.done() else None)
        if error is not None:
            raise _as_inference_error(error, timeout_s)


async def measure_pooled(
    url: str,
    samples: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    schedule: Sequence[str],
    clients: int,
    settings: MeasureSettings,
    *,
    client_options: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> dict[str, LevelResult]:
    """Closed-loop clients shared by several models of one server: a mixed load in a traffic mix.

    Each of ``clients`` clients sends its next request, on a reply, to the next model of ``schedule`` (a
    cycle in which each model appears as often as its share of the traffic; each client starts at its own
    place in it), so the requests arrive in the mix whatever each model's speed, as a population of users
    of several models would send them. One fixed window after ``settings.warmup_s``, extended (up to
    ``max_window_s``) until every model has ``min_requests``; the figures are per model. Unary calls
    (streams are per model); ``client_options`` (TLS) and ``headers`` as for :class:`LoadGenerator`.

    Raises:
        InferenceError: a request failed or timed out, or a model completed none in the window.
    """
    names = list(dict.fromkeys(schedule))
    generators = {
        n: LoadGenerator(
            url, n, samples[n], settings, client_options=client_options, headers=headers, streaming=False
        )
        for n in names
    }
    channels: dict[str, _Client] = {}
    windows = {n: _Window() for n in names}
    stop = asyncio.Event()

    async def client_loop(client: int) -> None:
        position, index = client * len(schedule) // clients, client
        while not stop.is_set():
            name = schedule[position % len(schedule)]
            inputs = prepared[name][index % len(prepared[name])]
            position, index = position + 1, index + 1
            due = time.perf_counter()
            await channels[name].infer(inputs, stop)
            windows[name].record(due, time.perf_counter())

    gc.collect()
    gc.freeze()  # as in a level of one model: no full collection pauses every client at once
    tasks: list[asyncio.Task] = []
    try:
        for name, generator in generators.items():
            channels[name] = _Client(generator, connections=clients)
        prepared = {n: channels[n].prepare(samples[n]) for n in names}
        tasks = [asyncio.create_task(client_loop(client)) for client in range(clients)]
        await _sleep_or_fail(settings.warmup_s, tasks)
        start = time.perf_counter()
        for window in windows.values():
            window.start = start
        await _sleep_or_fail(settings.window_s, tasks)
        while (
            min(len(w.latencies) for w in windows.values()) < settings.min_requests
            and time.perf_counter() - start < settings.max_window_s
        ):
            await _sleep_or_fail(settings.check_s, tasks)
        end = time.perf_counter()
        for window in windows.values():
            window.end = end
    finally:
        stop.set()
        outcomes = await settle(tasks, settings.request_timeout_s + CANCEL_GRACE_S)
        for channel in channels.values():
            await channel.close()
        gc.unfreeze()
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        raise _as_inference_error(failures[0], settings.request_timeout_s)
    idle = next((n for n in names if not windows[n].latencies), None)
    if idle is not None:
        raise InferenceError(f"no request to {idle} completed in the window of {clients} clients")
    return {n: summarise_level(clients, windows[n].latencies, end - start) for n in names}


class _Client:
    """One asyncio tritonclient (gRPC or HTTP) with the few calls a measurement makes."""

    def __init__(self, generator: LoadGenerator, connections: int) -> None:
        self.generator = generator
        self.timeout_s = generator.settings.request_timeout_s
        # A server that does not answer its statistics within a request's timeout is hung, not slow.
        self.statistics_timeout_s = min(STATISTICS_TIMEOUT_S, self.timeout_s)
        self.streams = None
        if generator.protocol == "grpc":
            from tritonclient.grpc.aio import InferenceServerClient

            self.client = InferenceServerClient(generator.url, **generator.client_options)
            if generator.streaming and not generator.client_options:  # TLS: tritonclient's unary calls
                self.streams = StreamChannel(generator.url, generator.model_name, generator.samples)
        else:
            from tritonclient.http.aio import InferenceServerClient as HttpClient

            self.client = HttpClient(generator.url, conn_limit=max(100, connections + 4))

    def prepare(self, samples: Sequence[Mapping[str, np.ndarray]]) -> list[list]:
        """Each sample as the protocol's InferInput list, serialised once."""
        if self.generator.protocol == "grpc":
            from tritonclient.grpc import InferInput
        else:
            from tritonclient.http import InferInput  # type: ignore[assignment]
        from tritonclient.utils import np_to_triton_dtype

        prepared = []
        for sample in samples:
            inputs = []
            for name, array in sample.items():
                tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            prepared.append(inputs)
        return prepared

    async def infer(self, inputs, stop: asyncio.Event) -> None:
        generator = self.generator
        try:
            if generator.protocol == "grpc":
                await self.client.infer(
                    generator.model_name, inputs, headers=generator.headers, client_timeout=self.timeout_s
                )
            else:
                await asyncio.wait_for(
                    self.client.infer(generator.model_name, inputs, headers=generator.headers),
                    self.timeout_s,
                )
        except Exception as exc:
            stop.set()
            raise InferenceError(describe_failure(exc, self.timeout_s)) from exc

    async def statistics(self) -> Mapping[str, Any] | None:
        """Triton's cumulative statistics of the model, or None when the server will not say."""
        generator = self.generator
        try:
            if generator.protocol == "grpc":
                call = self.client.get_inference_statistics(
                    generator.model_name,
                    headers=generator.headers,
                    as_json=True,
                    client_timeout=self.statistics_timeout_s,
                )
            else:
                call = self.client.get_inference_statistics(generator.model_name, headers=generator.headers)
            # gRPC's own deadline answers first; ours holds if it does not.
            return await within(call, self.statistics_timeout_s + CANCEL_GRACE_S)
        except Exception:  # the breakdown is a bonus: a server that hides it (or hangs) still gets measured
            return None

    def open_stream(self):
        assert self.streams is not None
        return self.streams.open(self.generator.headers)

    def streamed_request(self, index: int, slot: int) -> bytes:
        assert self.streams is not None
        return self.streams.request(index, slot)

    async def write_request(self, stream, request: bytes, stop: asyncio.Event) -> None:
        try:
            await stream.write(request)
        except Exception as exc:  # the server went away or refused the stream
            stop.set()
            raise InferenceError(describe_failure(exc, self.timeout_s)) from exc

    async def read_response(self, stream, stop: asyncio.Event, watchdog: Watchdog) -> int:
        """The slot of the next response on ``stream``; a failed or late one raises InferenceError."""
        try:
            response = await stream.read()
        except (Exception, asyncio.CancelledError) as exc:
            if not watchdog.fired and isinstance(exc, asyncio.CancelledError):
                raise  # the level is being torn down, not a late response
            stop.set()
            failure: Exception = (
                asyncio.TimeoutError() if watchdog.fired or not isinstance(exc, Exception) else exc
            )
            raise InferenceError(describe_failure(failure, self.timeout_s)) from exc
        if response is end_of_stream():
            stop.set()
            raise InferenceError("a request failed: the server closed the stream")
        if response.error_message:
            stop.set()
            raise InferenceError(f"a request failed: {response.error_message.strip().splitlines()[0]}")
        return int(response.infer_response.id)

    async def close(self) -> None:
        """Close the connections; one that does not close in time is left to the garbage collector."""
        closing = [self.client.close] + ([self.streams.close] if self.streams is not None else [])
        for close in closing:
            try:
                await within(close(), CLOSE_TIMEOUT_S)
            except DeadlineExceeded:
                pass


async def _sleep_or_fail(seconds: float, tasks) -> None:
    done, _ = await asyncio.wait(tasks, timeout=max(0.0, seconds), return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        if task.exception() is not None:
            raise task.exception()


def _as_inference_error(failure: BaseException, timeout_s: float) -> BaseException:
    """A client's failure as the level reports it: a task left at its deadline timed out."""
    if isinstance(failure, TimeoutError):
        return InferenceError(describe_failure(failure, timeout_s))
    return failure


def describe_failure(exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"a request timed out after {timeout_s:g} s (server hung or overloaded)"
    _, message = triton_error_parts(exc)
    message = (message or type(exc).__name__).strip().splitlines()[0]
    if "deadline" in message.lower():
        return f"a request timed out after {timeout_s:g} s (server hung or overloaded)"
    return f"a request failed: {message}"
