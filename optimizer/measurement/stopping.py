"""When a measurement window has seen enough: the uncertainty of throughput and p99, and the stopping rule.

Pure functions of the completions seen so far (finish time and latency of each request), tested on
synthetic streams. A window stops when the 95% confidence intervals of both figures are narrower than
their targets, and never before a minimum window or after a time cap:

- throughput: batch means. The window is cut into ``BATCHES`` equal slices; the completion rate of each
  slice is one observation, and Student's t gives the interval of their mean. Slices absorb the short-term
  correlation of a closed loop that makes single requests a poor sample.
- p99: the distribution-free interval of a quantile from order statistics (the binomial rank interval).
  It needs about 400 completions before its upper rank exists at all: below that, p99 is unbounded.
  It treats latencies as independent; neighbouring requests of a closed loop are not quite, so the
  interval is somewhat optimistic (bench/fidelity.py compares it with the spread of real repeats).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

__all__ = ["BATCHES", "StoppingRule", "Uncertainty", "estimate_uncertainty", "should_stop"]

BATCHES = 10
CONFIDENCE = 0.95


@dataclass(frozen=True)
class StoppingRule:
    """Targets as relative half-widths of the 95% intervals (0.05: the estimate is known to within 5%)."""

    throughput_ci: float = 0.05
    p99_ci: float = 0.10
    min_window_s: float = 1.0
    max_window_s: float = 8.0
    min_requests: int = 30


@dataclass(frozen=True)
class Uncertainty:
    """How well a window pins its figures: relative half-widths of their 95% intervals (inf: unbounded)."""

    throughput_ci: float
    p99_ci: float
    requests: int
    window_s: float

    def within(self, rule: StoppingRule) -> bool:
        return bool(self.throughput_ci <= rule.throughput_ci and self.p99_ci <= rule.p99_ci)

    def to_dict(self) -> dict[str, float | None]:
        return {
            "throughput_ci": _finite_or_none(self.throughput_ci),
            "p99_ci": _finite_or_none(self.p99_ci),
        }


def estimate_uncertainty(
    finish_times: Sequence[float], latencies: Sequence[float], start: float, now: float
) -> Uncertainty:
    """The uncertainty of throughput and p99 for the requests that finished between ``start`` and ``now``."""
    window = now - start
    return Uncertainty(
        throughput_ci=throughput_half_width(finish_times, start, now),
        p99_ci=quantile_half_width(latencies, 0.99),
        requests=len(latencies),
        window_s=window,
    )


def should_stop(uncertainty: Uncertainty, rule: StoppingRule) -> bool:
    """True when the window may end: the minimum is done and the targets are met, or the cap is reached."""
    if uncertainty.window_s >= rule.max_window_s:
        return True
    if uncertainty.window_s < rule.min_window_s or uncertainty.requests < rule.min_requests:
        return False
    return uncertainty.within(rule)


def throughput_half_width(finish_times: Sequence[float], start: float, now: float) -> float:
    """Relative half-width of the 95% interval of the completion rate, by ``BATCHES`` batch means."""
    if now <= start or len(finish_times) < 2:
        return math.inf
    import numpy as np  # here, not at the top: the command line imports this module for --help

    counts, _ = np.histogram(np.fromiter(finish_times, dtype=float), bins=BATCHES, range=(start, now))
    mean = float(counts.mean())
    if mean == 0:
        return math.inf
    spread = float(counts.std(ddof=1)) / math.sqrt(BATCHES)
    return float(t_quantile((1 + CONFIDENCE) / 2, BATCHES - 1) * spread / mean)


def quantile_half_width(latencies: Sequence[float], q: float) -> float:
    """Relative half-width of the 95% order-statistic interval of the ``q`` quantile (inf when unbounded)."""
    n = len(latencies)
    if n == 0:
        return math.inf
    z = NormalDist().inv_cdf((1 + CONFIDENCE) / 2)
    spread = z * math.sqrt(n * q * (1 - q))
    lower, upper = math.floor(n * q - spread), math.ceil(n * q + spread)
    if lower < 0 or upper > n - 1:
        return math.inf
    import numpy as np  # here, not at the top: the command line imports this module for --help

    # Partial ordering (O(n)): the check runs inside the event loop that times the requests.
    values = np.fromiter(latencies, dtype=float, count=n)
    low, high = (int(np.floor((n - 1) * q)), int(np.ceil((n - 1) * q)))
    ordered = np.partition(values, sorted({lower, low, high, upper}))
    estimate = float(ordered[low] + ((n - 1) * q - low) * (ordered[high] - ordered[low]))  # numpy's "linear"
    if estimate <= 0:
        return math.inf
    return float(max(ordered[upper] - estimate, estimate - ordered[lower]) / estimate)


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile by the Cornish-Fisher expansion (within 0.3% of exact for dof >= 5)."""
    z = NormalDist().inv_cdf(p)
    return (
        z
        + (z**3 + z) / (4 * dof)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3)
    )


def _finite_or_none(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None
