"""Measurement of one trial: the concurrency sweep and its stopping rule.

The rule is pure and tested without a server: levels run in ascending order; the sweep stops when
p99 breaks the latency budget or when throughput stops growing. The trial's score is the highest
throughput among the levels whose p99 stayed within the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optimizer.loadgen import LevelResult

__all__ = ["DEFAULT_LEVELS", "SweepOutcome", "best_feasible", "next_step", "parse_levels", "parse_rates"]

DEFAULT_LEVELS = (1, 2, 4, 8, 16, 32, 64)
# A level must beat the best throughput so far by this fraction, or the sweep has found its plateau.
MIN_GAIN = 0.03


@dataclass(frozen=True)
class SweepOutcome:
    levels: tuple[LevelResult, ...]
    best: LevelResult | None  # highest throughput within the latency budget
    stop_reason: str

    @property
    def feasible(self) -> bool:
        return self.best is not None


def best_feasible(levels: Sequence[LevelResult], budget_ms: float) -> LevelResult | None:
    """The level with the highest throughput whose p99 is within ``budget_ms``."""
    feasible = [level for level in levels if level.p99_ms <= budget_ms]
    return max(feasible, key=lambda level: level.throughput, default=None)


def next_step(levels: Sequence[LevelResult], budget_ms: float, remaining: int) -> str | None:
    """Why the sweep stops after ``levels``, or None to measure the next level."""
    last = levels[-1]
    if last.p99_ms > budget_ms:
        return f"p99 {last.p99_ms:.1f} ms broke the {budget_ms:g} ms budget at {last.load}"
    earlier = [level.throughput for level in levels[:-1] if level.p99_ms <= budget_ms]
    if earlier and last.throughput < max(earlier) * (1 + MIN_GAIN):
        return f"throughput stopped growing at {last.load}"
    if remaining == 0:
        return (
            "highest concurrency level reached"
            if last.request_rate is None
            else "highest request rate reached"
        )
    return None


def parse_levels(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> (1, 2, 4, 8); ascending, each >= 1."""
    from optimizer.errors import UsageError

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
    import math

    from optimizer.errors import UsageError

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
