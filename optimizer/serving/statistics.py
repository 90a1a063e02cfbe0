"""The server's side of a measurement: where a request's time went, from Triton's statistics API.

Triton keeps cumulative counters per model (``inference_stats``: success, queue, compute_input,
compute_infer, compute_output, each a count and nanoseconds). Reading them before and after a window
and dividing the differences by the requests served gives the average time of each phase, the
breakdown perf_analyzer prints as "Server Queue / Compute Input / Compute Infer / Compute Output".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ServerBreakdown", "breakdown"]


@dataclass(frozen=True)
class ServerBreakdown:
    """Average milliseconds per request in each server phase, and the batching the server did."""

    requests: int
    executions: int
    request_ms: float  # the whole time inside the server
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float

    @property
    def average_batch(self) -> float:
        """Inferences per model execution: how much the dynamic batcher merged."""
        return self.requests / self.executions if self.executions else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "executions": self.executions,
            "average_batch": round(self.average_batch, 3),
            "request_ms": round(self.request_ms, 4),
            "queue_ms": round(self.queue_ms, 4),
            "compute_input_ms": round(self.compute_input_ms, 4),
            "compute_infer_ms": round(self.compute_infer_ms, 4),
            "compute_output_ms": round(self.compute_output_ms, 4),
        }


def breakdown(before: Mapping[str, Any], after: Mapping[str, Any], model: str) -> ServerBreakdown | None:
    """The breakdown of the requests ``model`` served between two statistics answers; None if it served none.

    Accepts the JSON of either protocol (gRPC's writes 64-bit counters as strings, HTTP's as numbers).
    """
    first, last = _model_stats(before, model), _model_stats(after, model)
    if first is None or last is None:
        return None
    requests = _counter(last, "success", "count") - _counter(first, "success", "count")
    if requests <= 0:
        return None

    def average_ms(phase: str) -> float:
        return (_counter(last, phase, "ns") - _counter(first, phase, "ns")) / requests / 1e6

    return ServerBreakdown(
        requests=requests,
        executions=int(last.get("execution_count", 0)) - int(first.get("execution_count", 0)),
        request_ms=average_ms("success"),
        queue_ms=average_ms("queue"),
        compute_input_ms=average_ms("compute_input"),
        compute_infer_ms=average_ms("compute_infer"),
        compute_output_ms=average_ms("compute_output"),
    )


def _model_stats(answer: Mapping[str, Any], model: str) -> Mapping[str, Any] | None:
    # A study loads one version of a model at a time: its entry is the one.
    for entry in answer.get("model_stats", []):
        if entry.get("name") == model:
            return entry
    return None


def _counter(stats: Mapping[str, Any], phase: str, field: str) -> int:
    return int(stats.get("inference_stats", {}).get(phase, {}).get(field, 0))
