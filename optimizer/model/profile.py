"""The in-process profile: each accepted variant run by ONNX Runtime in this process, per batch size and threads.

The reference pipeline tunes ONNX Runtime on its own before it tunes Triton, and shows three figures side
by side: the model as given, ONNX Runtime tuned, Triton tuned. This stage measures the middle one on this
machine instead of inferring it: for every variant the study may serve, the throughput and latency of one
batch at a time, for a few batch sizes and thread counts. The study records it once (before the server
starts, so nothing competes with it), starts its search with the fastest variant, and the report draws it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["PROFILE_BATCHES", "InprocessPoint", "best_point", "fastest_first", "profile_variant"]

PROFILE_BATCHES = (1, 4, 16)  # one request, a small batch, a large one: where the curve bends on CPU
PROFILE_S = 0.4  # how long each point is measured, after one warm-up run


@dataclass(frozen=True)
class InprocessPoint:
    """One variant at one batch size and thread count, run back to back in this process."""

    precision: str
    batch: int
    threads: int  # ONNX Runtime's intra-op threads (0: its default, a thread per core)
    throughput: float  # inferences/s
    latency_ms: float  # per batch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> InprocessPoint:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def profile_variant(
    precision: str,
    path: Path,
    samples: Sequence[Mapping[str, np.ndarray]],
    *,
    batches: Sequence[int],
    threads: Sequence[int],
    seconds: float = PROFILE_S,
) -> list[InprocessPoint]:
    """Measure ``path`` at every batch size x thread count (``batches`` (1,) for a model without batching).

    ``samples`` are single requests (batch 1 where the model batches); a batch of b is b of them stacked.
    """
    import onnxruntime as ort

    points = []
    for count in threads:
        options = ort.SessionOptions()
        options.intra_op_num_threads = count
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch in batches:
            feed = _stacked(samples, batch)
            runs, elapsed = _run_for(session, feed, seconds)
            points.append(
                InprocessPoint(
                    precision=precision,
                    batch=batch,
                    threads=count,
                    throughput=_four_digits(batch * runs / elapsed),
                    latency_ms=_four_digits(1000.0 * elapsed / runs),
                )
            )
    return points


def _four_digits(value: float) -> float:
    return float(f"{value:.4g}")


def _stacked(samples: Sequence[Mapping[str, np.ndarray]], batch: int) -> dict[str, np.ndarray]:
    chosen = [samples[i % len(samples)] for i in range(batch)]
    if batch == 1:
        return dict(chosen[0])
    return {name: np.concatenate([sample[name] for sample in chosen]) for name in chosen[0]}


def _run_for(session, feed: Mapping[str, np.ndarray], seconds: float) -> tuple[int, float]:
    session.run(None, dict(feed))  # the first run allocates
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs == 0:
        session.run(None, dict(feed))
        runs += 1
    return runs, elapsed


def best_point(
    points: Sequence[InprocessPoint], latency_budget_ms: float | None = None
) -> InprocessPoint | None:
    """The fastest point whose batch latency is within the budget (any point without one)."""
    within = [p for p in points if latency_budget_ms is None or p.latency_ms <= latency_budget_ms]
    return max(within, key=lambda p: p.throughput, default=None)


def fastest_first(points: Sequence[InprocessPoint], precisions: Sequence[str]) -> tuple[str, ...]:
    """``precisions`` ordered by their best in-process throughput, fastest first (unprofiled ones last)."""
    best: dict[str, float] = {}
    for point in points:
        best[point.precision] = max(best.get(point.precision, 0.0), point.throughput)
    return tuple(sorted(precisions, key=lambda p: -best.get(p, -1.0)))
