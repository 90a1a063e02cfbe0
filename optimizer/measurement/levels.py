"""The records every measurement stage shares: how a level is measured, and what it measured.

A leaf module: the built-in generator, perf_analyzer, the replayed recordings, the sweep and the study
all import these, and nothing here imports them back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from optimizer.measurement.stopping import StoppingRule
from optimizer.serving.statistics import ServerBreakdown

__all__ = [
    "DEFAULT_MAX_WINDOW_S",
    "ENGINES",
    "MODES",
    "PROTOCOLS",
    "RULES",
    "Engine",
    "LevelResult",
    "MeasureSettings",
    "Mode",
    "Protocol",
    "StopRule",
    "WARMUP_AGREEMENT",
]


class Engine(str, Enum):
    """Which load generator measures a level."""

    builtin = "builtin"
    perf_analyzer = "perf_analyzer"


class Protocol(str, Enum):
    """The protocol of the measured requests."""

    grpc = "grpc"
    http = "http"


class StopRule(str, Enum):
    """When a measurement window ends (see :class:`MeasureSettings`)."""

    ci = "ci"
    fixed = "fixed"


class Mode(str, Enum):
    """Closed loop at a concurrency, or open loop at a request rate."""

    concurrency = "concurrency"
    request_rate = "request_rate"


ENGINES = tuple(e.value for e in Engine)
MODES = tuple(m.value for m in Mode)
PROTOCOLS = tuple(p.value for p in Protocol)
RULES = tuple(r.value for r in StopRule)
# The shortest cap on a ci window: p99's interval needs about 400 requests, which slow configs take long to send.
DEFAULT_MAX_WINDOW_S = 8.0
# A warm-up ends when two slices in a row completed requests at rates this close (relative).
WARMUP_AGREEMENT = 0.15
SCREEN_MIN_REQUESTS = 20


@dataclass(frozen=True)
class MeasureSettings:
    """How long each level runs; the one set of defaults the CLI and the library share.

    - ``rule="ci"``: a window runs until the 95% intervals of throughput and p99 are narrower than their
      targets (:mod:`optimizer.measurement.stopping`), between ``window_s`` and ``max_window_s``;
    - ``rule="fixed"``: ``window_s``, extended (up to ``max_window_s``) until ``min_requests`` finished.

    The warm-up before each window lasts until the completion rate settles (two slices in a row within
    :data:`WARMUP_AGREEMENT`), at most ``warmup_s``. A trial screens its levels with ``screen_s`` windows
    and spends the stopping rule's window only where the answer is (see :mod:`optimizer.study.trial`);
    ``screen_s=0`` measures every level with the full window.
    """

    @classmethod
    def with_window(
        cls, window_s: float, max_window_s: float | None = None, **fields: Any
    ) -> MeasureSettings:
        """Settings whose cap defaults to max(8 s, 4 x the shortest window), as on the command line."""
        cap = max_window_s if max_window_s is not None else max(DEFAULT_MAX_WINDOW_S, 4 * window_s)
        return cls(window_s=window_s, max_window_s=cap, **fields)

    warmup_s: float = 2.0  # the longest warm-up; it ends once the completion rate settles
    window_s: float = 1.0  # fixed: the window; ci: the shortest window
    min_requests: int = 30
    max_window_s: float = DEFAULT_MAX_WINDOW_S
    request_timeout_s: float = 30.0
    rule: str = "ci"
    throughput_ci: float = 0.05  # ci: target relative half-width of throughput's 95% interval
    p99_ci: float = 0.10  # ci: the same for p99
    check_s: float = 0.25  # ci: how often the interval is recomputed (at least; 10% of the window later on)
    screen_s: float = 0.25  # a trial's screening window per level; 0: no screening

    @property
    def screens(self) -> bool:
        """Whether a screening window is shorter than a full one, so screening saves time."""
        return 0 < self.screen_s and (self.rule == "ci" or self.screen_s < self.window_s)

    def screening(self) -> MeasureSettings:
        """A short fixed window that brackets the budget; 20 requests are enough to tell far from near."""
        return replace(
            self,
            rule="fixed",
            window_s=self.screen_s,
            max_window_s=max(4 * self.screen_s, 1.0),
            min_requests=min(self.min_requests, SCREEN_MIN_REQUESTS),
        )

    def throughput_only(self) -> MeasureSettings:
        """The stopping rule without a p99 target: for a level whose p99 is far inside the budget."""
        return replace(self, p99_ci=math.inf)

    def stopping_rule(self, mode: str = "concurrency") -> StoppingRule:
        """The rule a window follows; a fixed window is a rule whose targets are never met early."""
        if self.rule == "fixed":
            return StoppingRule(math.inf, math.inf, self.window_s, self.max_window_s, self.min_requests)
        return self.targets(mode)

    def targets(self, mode: str = "concurrency") -> StoppingRule:
        """The ci rule; under a fixed window too, it says whether the window happened to settle."""
        throughput_ci = math.inf if mode == "request_rate" else self.throughput_ci
        return StoppingRule(throughput_ci, self.p99_ci, self.window_s, self.max_window_s, self.min_requests)


@dataclass(frozen=True)
class LevelResult:
    """What one level (a concurrency, or a request rate) measured."""

    concurrency: int  # 0 in request-rate mode
    throughput: float  # inferences per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    duration_s: float
    request_rate: float | None = None
    uncertainty: Mapping[str, float | None] | None = None  # what the window reached (see stopping.py)
    server: ServerBreakdown | None = None
    resources: Mapping[str, float] | None = field(default=None, compare=False)
    measure_s: float = field(default=0.0, compare=False)  # warm-up + window, wall time
    warmup_s: float | None = field(default=None, compare=False)  # how long the warm-up ran
    phase: str | None = None  # in a trial: "screen" (a short window) or "precise" (the stopping rule's)
    client_cpu_ms: float | None = field(default=None, compare=False)  # the built-in client's CPU per request

    @property
    def load(self) -> str:
        """The offered load in words: ``concurrency 4`` or ``request rate 50/s``."""
        if self.request_rate is not None:
            return f"request rate {self.request_rate:g}/s"
        return f"concurrency {self.concurrency}"

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "concurrency": self.concurrency,
            "throughput": round(self.throughput, 3),
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "requests": self.requests,
            "duration_s": round(self.duration_s, 3),
        }
        extras = {
            "request_rate": self.request_rate,
            "uncertainty": dict(self.uncertainty) if self.uncertainty else None,
            "server": self.server.to_dict() if self.server else None,
            "resources": dict(self.resources) if self.resources else None,
            "measure_s": round(self.measure_s, 3) if self.measure_s else None,
            "warmup_s": round(self.warmup_s, 3) if self.warmup_s is not None else None,
            "phase": self.phase,
            "client_cpu_ms": round(self.client_cpu_ms, 4) if self.client_cpu_ms is not None else None,
        }
        record.update({key: value for key, value in extras.items() if value is not None})
        return record
