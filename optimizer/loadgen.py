"""The load generator: closed-loop clients at a fixed concurrency over Triton's gRPC API.

One asyncio event loop drives every concurrent client from one process (tritonclient's gRPC asyncio
client; the HTTP client is gevent-based and not thread-safe). A level warms up, then measures a window
and returns the throughput and latency percentiles of the requests that completed inside the window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from optimizer.errors import InferenceError

__all__ = ["LevelResult", "MeasureSettings", "GrpcLoadGenerator", "summarise_level"]


@dataclass(frozen=True)
class MeasureSettings:
    """How long each concurrency level runs."""

    warmup_s: float = 1.0
    window_s: float = 3.0
    min_requests: int = 60  # the window extends (up to max_window_s) until this many completed
    max_window_s: float = 12.0
    request_timeout_s: float = 30.0


@dataclass(frozen=True)
class LevelResult:
    """What one concurrency level measured."""

    concurrency: int
    throughput: float  # inferences per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    duration_s: float

    def to_dict(self) -> dict[str, float]:
        return {
            "concurrency": self.concurrency,
            "throughput": round(self.throughput, 3),
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "requests": self.requests,
            "duration_s": round(self.duration_s, 3),
        }


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


class GrpcLoadGenerator:
    """Closed-loop load over gRPC: ``concurrency`` clients, each sending its next request on a reply."""

    def __init__(
        self,
        grpc_url: str,
        model_name: str,
        samples: Sequence[Mapping[str, np.ndarray]],
        settings: MeasureSettings = MeasureSettings(),
        *,
        client_options: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """``client_options`` (TLS) go to tritonclient's client, ``headers`` (auth) with every request."""
        if not samples:
            raise ValueError("the load generator needs at least one input sample")
        self.grpc_url = grpc_url
        self.model_name = model_name
        self.samples = list(samples)
        self.settings = settings
        self.client_options = dict(client_options or {})
        self.headers = dict(headers) if headers else None

    def _infer_inputs(self):
        from tritonclient.grpc import InferInput
        from tritonclient.utils import np_to_triton_dtype

        prepared = []
        for sample in self.samples:
            inputs = []
            for name, array in sample.items():
                tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            prepared.append(inputs)
        return prepared

    def run_levels(self, levels: Sequence[int], on_level) -> list[LevelResult]:
        """Measure ``levels`` in order; ``on_level(index, result)`` returns False to stop the sweep."""
        return asyncio.run(self._run_levels(levels, on_level))

    async def _run_levels(self, levels: Sequence[int], on_level) -> list[LevelResult]:
        from tritonclient.grpc.aio import InferenceServerClient

        client = InferenceServerClient(self.grpc_url, **self.client_options)
        results: list[LevelResult] = []
        try:
            prepared = self._infer_inputs()
            for index, concurrency in enumerate(levels):
                result = await self._measure(client, prepared, concurrency)
                results.append(result)
                if not on_level(index, result):
                    break
        finally:
            await client.close()
        return results

    def measure(self, concurrency: int) -> LevelResult:
        """Measure a single concurrency level."""
        return self.run_levels([concurrency], lambda index, result: False)[0]

    async def _measure(self, client, prepared, concurrency: int) -> LevelResult:
        settings = self.settings
        window: dict[str, float] = {"start": float("inf"), "end": float("inf")}
        latencies: list[float] = []
        stop = asyncio.Event()

        async def client_loop(offset: int) -> None:
            index = offset
            while not stop.is_set():
                inputs = prepared[index % len(prepared)]
                index += 1
                started = time.perf_counter()
                try:
                    await client.infer(
                        self.model_name,
                        inputs,
                        headers=self.headers,
                        client_timeout=settings.request_timeout_s,
                    )
                except Exception as exc:
                    stop.set()
                    raise InferenceError(_describe_failure(exc, settings.request_timeout_s)) from exc
                finished = time.perf_counter()
                if window["start"] <= started and finished <= window["end"]:
                    latencies.append(finished - started)

        tasks = [asyncio.create_task(client_loop(i)) for i in range(concurrency)]
        try:
            await self._sleep_or_fail(settings.warmup_s, tasks)
            window["start"] = time.perf_counter()
            await self._sleep_or_fail(settings.window_s, tasks)
            while (
                len(latencies) < settings.min_requests
                and time.perf_counter() - window["start"] < settings.max_window_s
            ):
                await self._sleep_or_fail(0.05, tasks)
            window["end"] = time.perf_counter()
        finally:
            stop.set()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            raise failures[0]
        # Each request carries one inference; Triton's dynamic batcher does the batching.
        return summarise_level(concurrency, latencies, window["end"] - window["start"])

    @staticmethod
    async def _sleep_or_fail(seconds: float, tasks) -> None:
        done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()


def _describe_failure(exc: Exception, timeout_s: float) -> str:
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    message = (message or type(exc).__name__).strip().splitlines()[0]
    if "deadline" in message.lower():
        return f"a request timed out after {timeout_s:g} s (server hung or overloaded)"
    return f"a request failed: {message}"
