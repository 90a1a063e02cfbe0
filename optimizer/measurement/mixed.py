"""A mixed load: several models of one server measured at once, their requests in the traffic mix.

The clients are shared: each sends its next request, on a reply, to the next model of a schedule in
which every model appears as often as its share of the traffic (:func:`mix_schedule`). So the requests
arrive in the mix whatever each model's speed, as a population of users of several models sends them: a
fast model is not driven far past its share, taking cores from the slow one, as it would be with clients
of its own. What the mix sustains is limited by the model that falls furthest behind its share: with
shares s_m (summing to 1) and measured throughputs t_m, the server serves min_m(t_m / s_m) requests a
second *in the mix* (equal to the sum of the t_m when the requests kept to the mix exactly).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from optimizer.measurement.builtin import measure_pooled, measurement_deadline_s, run_measurement
from optimizer.measurement.levels import LevelResult, MeasureSettings

__all__ = ["MixLevel", "measure_mix", "mix_schedule", "mix_throughput", "shares_of"]

SCHEDULE_LENGTH = 120  # one cycle of the schedule, at least; longer when a share needs it to appear once


@dataclass(frozen=True)
class MixLevel:
    """One level of a mixed sweep: its clients, each model's figures, and what the mix sustained."""

    clients: int  # closed-loop clients, shared by the models in the traffic mix
    results: Mapping[str, LevelResult]
    mix_throughput: float  # requests/s served in the traffic mix (min over models of throughput / share)
    over_budget: tuple[str, ...]  # the models whose p99 broke their budget at this level

    @property
    def feasible(self) -> bool:
        return not self.over_budget

    def to_dict(self) -> dict:
        return {
            "clients": self.clients,
            "mix_throughput": self.mix_throughput,
            "over_budget": list(self.over_budget),
            "models": {
                name: {
                    "throughput": r.throughput,
                    "p99_ms": r.p99_ms,
                    "p95_ms": r.p95_ms,
                    "p50_ms": r.p50_ms,
                    "requests": r.requests,
                    "duration_s": r.duration_s,
                }
                for name, r in self.results.items()
            },
        }


def shares_of(traffic: Mapping[str, float]) -> dict[str, float]:
    """The traffic mix as fractions that sum to 1."""
    total = sum(traffic.values())
    return {name: weight / total for name, weight in traffic.items()}


def mix_schedule(shares: Mapping[str, float], length: int = SCHEDULE_LENGTH) -> tuple[str, ...]:
    """A cycle of ``length`` requests in the mix, the models interleaved as evenly as their shares allow.

    Each step goes to the model furthest behind its share so far, so every stretch of the cycle keeps
    the mix within one request of each share (not bursts of one model, then of the other).
    """
    length = max(length, math.ceil(1 / min(shares.values())))  # the smallest share is sent too
    sent = dict.fromkeys(shares, 0)
    schedule = []
    for step in range(1, length + 1):
        name = max(shares, key=lambda n: shares[n] * step - sent[n])
        sent[name] += 1
        schedule.append(name)
    return tuple(schedule)


def mix_throughput(results: Mapping[str, LevelResult], shares: Mapping[str, float]) -> float:
    """Requests a second the server sustained in the mix: the model furthest behind its share decides."""
    return min(results[name].throughput / share for name, share in shares.items())


def measure_mix(
    url: str,
    samples: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    clients: int,
    shares: Mapping[str, float],
    budgets_ms: Mapping[str, float],
    settings: MeasureSettings,
    *,
    client_options: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> MixLevel:
    """Measure every model at once under ``clients`` shared clients sending in the traffic mix.

    ``client_options`` (TLS) and ``headers`` (auth) are the serving target's, as for one model.
    """
    pooled = measure_pooled(
        url, samples, mix_schedule(shares), clients, settings, client_options=client_options, headers=headers
    )
    results = run_measurement(pooled, measurement_deadline_s(settings, 1), "the mixed load")
    over = tuple(name for name in shares if results[name].p99_ms > budgets_ms[name])
    return MixLevel(clients, results, mix_throughput(results, shares), over)
