"""Measurement of one trial: the concurrency sweep, its stopping rule, and which levels to pin down.

The rules are pure and tested without a server: levels run in ascending order; the sweep stops when
p99 breaks the latency budget or when throughput stops growing (two levels in a row without a 3% gain).
The trial's score is the highest throughput among the levels whose p99 stayed within the budget.

A trial screens the levels with short windows and then measures precisely only the levels that can
be its answer (:func:`precise_plan`): the best screened level within the budget first, and, if its
precise p99 breaks the budget, the ones below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from optimizer.errors import UsageError
from optimizer.measurement.levels import LevelResult

__all__ = [
    "DEFAULT_LEVELS",
    "FAR_FROM_BUDGET",
    "MAX_PRECISE_WINDOWS",
    "SweepOutcome",
    "best_feasible",
    "merge_precise",
    "load_of",
    "next_step",
    "parse_levels",
    "pin_down",
    "parse_rates",
    "precise_plan",
]

DEFAULT_LEVELS = (1, 2, 4, 8, 16, 32, 64)
# A level must beat the best throughput so far by this fraction, or it counts toward a plateau.
MIN_GAIN = 0.03
# The sweep stops after this many levels in a row without that gain. One is not enough: a single noisy
# level (a dip from c=1 to c=2 in a config that peaks at c=16) ended 29 of 144 recorded sweeps of the
# example encoder more than 25% below the other repeat of the same config.
PLATEAU_PATIENCE = 2
# A screened p99 under this fraction of the budget is far from it: its precise window pins throughput
# only (p99's interval needs ~400 requests; far from the budget nothing depends on it).
FAR_FROM_BUDGET = 0.5
# A screening window that saw p99 up to this multiple of the budget may still be feasible: noise.
SCREEN_DOUBT = 2.0
# Precise windows per trial at most: the screened best and, while they break the budget, levels below.
MAX_PRECISE_WINDOWS = 3


@dataclass(frozen=True)
class SweepOutcome:
    levels: tuple[LevelResult, ...]
    best: LevelResult | None  # highest throughput within the latency budget
    stop_reason: str
    # Seconds every screening window took, those a precise window replaced in ``levels`` included.
    screen_s: float | None = None

    @property
    def feasible(self) -> bool:
        return self.best is not None

    @property
    def lowest_p99_ms(self) -> float:
        """How close the sweep came to the budget: its lowest p99."""
        return min(level.p99_ms for level in self.levels)


def best_feasible(levels: Sequence[LevelResult], budget_ms: float) -> LevelResult | None:
    """The level with the highest throughput whose p99 is within ``budget_ms``."""
    feasible = [level for level in levels if level.p99_ms <= budget_ms]
    return max(feasible, key=lambda level: level.throughput, default=None)


def next_step(levels: Sequence[LevelResult], budget_ms: float, remaining: int) -> str | None:
    """Why the sweep stops after ``levels``, or None to measure the next level."""
    last = levels[-1]
    if last.p99_ms > budget_ms:
        return f"p99 {last.p99_ms:.1f} ms broke the {budget_ms:g} ms budget at {last.load}"
    feasible = [level.throughput for level in levels if level.p99_ms <= budget_ms]
    if _levels_without_gain(feasible) >= PLATEAU_PATIENCE:
        return f"throughput stopped growing at {last.load}"
    if remaining == 0:
        return (
            "highest concurrency level reached"
            if last.request_rate is None
            else "highest request rate reached"
        )
    return None


def precise_plan(screened: Sequence[LevelResult], budget_ms: float) -> list[LevelResult]:
    """The screened levels to measure precisely, in order, until one stays within the budget.

    First the best screened level within the budget, then the levels below it (descending load). When
    no level screened within the budget, the lowest one if its screened p99 was close enough for a short
    window to have been wrong; otherwise nothing: the config is infeasible.
    """
    best = best_feasible(screened, budget_ms)
    if best is None:
        lowest = min(screened, key=load_of, default=None)
        doubtful = lowest is not None and lowest.p99_ms <= SCREEN_DOUBT * budget_ms
        return [lowest] if doubtful and lowest is not None else []
    below = sorted((level for level in screened if load_of(level) < load_of(best)), key=load_of)
    return [best, *reversed(below)][:MAX_PRECISE_WINDOWS]


def pin_down(
    screened: Sequence[LevelResult], budget_ms: float, measure: Callable[[LevelResult, bool], LevelResult]
) -> list[LevelResult]:
    """Full windows at the levels of :func:`precise_plan`, in order, until one stays within the budget.

    ``measure(screened_level, far)`` measures that level's load with the full window; ``far`` says its
    screened p99 was far inside the budget, so only throughput needs pinning.
    """
    precise: list[LevelResult] = []
    for level in precise_plan(screened, budget_ms):
        precise.append(measure(level, level.p99_ms < FAR_FROM_BUDGET * budget_ms))
        if precise[-1].p99_ms <= budget_ms:
            break
    return precise


def merge_precise(screened: Sequence[LevelResult], precise: Sequence[LevelResult]) -> tuple[LevelResult, ...]:
    """The trial's sweep: each screened level, replaced by its precise window where one was measured."""
    by_load = {load_of(level): level for level in screened}
    by_load.update({load_of(level): level for level in precise})
    return tuple(by_load[load] for load in sorted(by_load))


def load_of(level: LevelResult) -> float:
    """The level's offered load: its request rate, or its concurrency."""
    return level.request_rate if level.request_rate is not None else level.concurrency


def _levels_without_gain(throughputs: Sequence[float]) -> int:
    """How many of the last levels in a row failed to beat every level before them by MIN_GAIN."""
    count, best = 0, throughputs[0] if throughputs else 0.0
    for throughput in throughputs[1:]:
        count = 0 if throughput >= best * (1 + MIN_GAIN) else count + 1
        best = max(best, throughput)
    return count


def parse_levels(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> (1, 2, 4, 8); ascending, each >= 1."""

    rule = f"--concurrency {text!r} must list distinct whole numbers >= 1 in ascending order, e.g. 1,2,4,8"
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(rule) from None
    if any(level < 1 for level in levels) or list(levels) != sorted(set(levels)):
        raise UsageError(rule)
    return levels


def parse_rates(text: str) -> tuple[float, ...]:
    """``"50,100,200"`` -> (50.0, 100.0, 200.0): request rates per second, positive and ascending."""

    rule = (
        f"--request-rate {text!r} must list distinct positive requests/s in ascending order, e.g. 50,100,200"
    )
    try:
        rates = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(rule) from None
    if any(not math.isfinite(rate) or rate <= 0 for rate in rates) or list(rates) != sorted(set(rates)):
        raise UsageError(rule)
    return rates
