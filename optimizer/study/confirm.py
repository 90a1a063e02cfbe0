"""Confirmation before export: the top configs re-measured side by side, the pick by the mean of them all.

One window decides a trial, and this machine drifts by tens of percent within minutes: a lucky window of a
worse config can beat the best one. So the finalists (the best few distinct configs) are measured again in
rounds, alternating their order each round so that drift cancels, each at the load its trial was best at;
the study exports the finalist with the highest mean throughput whose median p99 stays within the budget.
The record is the study attribute ``confirmation``; a resumed study whose finalists did not change keeps it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from optimizer.study.records import config_digest_of

__all__ = [
    "CONFIRMATION",
    "Finalist",
    "RemeasureFailed",
    "choose",
    "confirm",
    "finalists_of",
    "load_label",
    "stored_confirmation",
]

CONFIRMATION = "confirmation"
# Two-sided 95% Student t quantiles by degrees of freedom (n - 1); 1.96 beyond the table.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


class RemeasureFailed(Exception):
    """A finalist could not be measured again (rejected, crashed, over budget everywhere): it drops out."""


@dataclass(frozen=True)
class Finalist:
    """One finalist: its trial's own measurement first, then each re-measurement."""

    trial: int
    candidate: str
    load: str
    throughput: tuple[float, ...]
    p99_ms: tuple[float, ...]
    failure: str | None = None  # why a re-measurement failed (the finalist is then out)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.throughput)

    @property
    def half_width(self) -> float:
        """Half-width of the mean's 95% interval (Student t over the measurements)."""
        n = len(self.throughput)
        if n < 2:
            return math.nan
        return _T95.get(n - 1, 1.96) * statistics.stdev(self.throughput) / math.sqrt(n)

    def within(self, budget_ms: float) -> bool:
        return self.failure is None and statistics.median(self.p99_ms) <= budget_ms

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "trial": self.trial,
            "candidate": self.candidate,
            "load": self.load,
            "throughput": [round(v, 3) for v in self.throughput],
            "p99_ms": [round(v, 3) for v in self.p99_ms],
            "mean": round(self.mean, 3),
            "half_width": None if math.isnan(self.half_width) else round(self.half_width, 3),
        }
        if self.failure:
            record["failure"] = self.failure
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Finalist:
        return cls(
            trial=int(record["trial"]),
            candidate=str(record["candidate"]),
            load=str(record["load"]),
            throughput=tuple(record["throughput"]),
            p99_ms=tuple(record["p99_ms"]),
            failure=record.get("failure"),
        )


def finalists_of(trials: Sequence[FrozenTrial], count: int) -> list[FrozenTrial]:
    """The ``count`` best feasible completed trials with distinct configs, best first."""
    if count <= 0:
        return []
    measured = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.user_attrs.get("feasible")
        and "same_config_as" not in t.user_attrs
        and t.value is not None
    ]
    ranked = sorted(measured, key=lambda t: (-(t.value or 0.0), t.number))
    chosen: list[FrozenTrial] = []
    keys: set[str] = set()
    for trial in ranked:
        key = config_digest_of(trial.user_attrs) or str(trial.number)
        if key not in keys:
            keys.add(key)
            chosen.append(trial)
        if len(chosen) == count:
            break
    return chosen


def stored_confirmation(attrs: dict[str, Any], finalists: Sequence[FrozenTrial]) -> dict[str, Any] | None:
    """The study's confirmation when it confirmed these very finalists (a resume with nothing new on top)."""
    stored = attrs.get(CONFIRMATION)
    if not stored:
        return None
    confirmed = [f["trial"] for f in stored.get("finalists", [])]
    return stored if confirmed == [t.number for t in finalists] else None


def confirm(
    finalists: Sequence[FrozenTrial],
    remeasure: Callable[[FrozenTrial], tuple[float, float]],
    rounds: int,
) -> list[Finalist]:
    """Re-measure ``finalists`` ``rounds`` times, alternating their order; ``remeasure`` gives (inf/s, p99)."""
    throughput = {t.number: [float(t.user_attrs["throughput"])] for t in finalists}
    p99 = {t.number: [float(t.user_attrs["p99_ms"])] for t in finalists}
    failures: dict[int, str] = {}
    order = list(finalists)
    for _ in range(rounds):
        for trial in order:
            if trial.number in failures:
                continue
            try:
                value, latency = remeasure(trial)
            except RemeasureFailed as exc:
                failures[trial.number] = str(exc)
                continue
            throughput[trial.number].append(value)
            p99[trial.number].append(latency)
        order.reverse()  # A B C, then C B A: each finalist's mean sees early and late drift alike
    return [
        Finalist(
            trial=t.number,
            candidate=str(t.user_attrs.get("candidate", "")),
            load=load_label(t),
            throughput=tuple(throughput[t.number]),
            p99_ms=tuple(p99[t.number]),
            failure=failures.get(t.number),
        )
        for t in finalists
    ]


def choose(finalists: Sequence[Finalist], budget_ms: float) -> Finalist | None:
    """The finalist with the highest mean throughput whose median p99 is within the budget."""
    within = [f for f in finalists if f.within(budget_ms)]
    return max(within, key=lambda f: (f.mean, -f.trial), default=None)


def load_label(trial: FrozenTrial) -> str:
    rate = trial.user_attrs.get("request_rate")
    if rate is not None:
        return f"request rate {rate:g}/s"
    return f"concurrency {trial.user_attrs.get('concurrency')}"
