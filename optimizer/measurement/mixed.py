"""A mixed load: several models of one server measured at once, their clients in the traffic mix.

Each model gets its own closed-loop clients, as many as its share of the level's total (at least one),
and all of them run in the same window, so every model's figures are taken while the others load the
server. What the mix sustains is limited by the model that falls furthest behind its share: with
shares s_m (summing to 1) and measured throughputs t_m, the server serves min_m(t_m / s_m) requests a
second *in the mix*; anything a model answers above its share is load the mix did not ask for.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from optimizer.measurement.builtin import LoadGenerator
from optimizer.measurement.levels import LevelResult, MeasureSettings

__all__ = ["MixLevel", "measure_mix", "mix_throughput", "shares_of", "split_clients"]


@dataclass(frozen=True)
class MixLevel:
    """One level of a mixed sweep: each model's clients and figures, and what the mix sustained."""

    clients: Mapping[str, int]
    results: Mapping[str, LevelResult]
    mix_throughput: float  # requests/s served in the traffic mix (min over models of throughput / share)
    over_budget: tuple[str, ...]  # the models whose p99 broke their budget at this level

    @property
    def feasible(self) -> bool:
        return not self.over_budget

    def to_dict(self) -> dict:
        return {
            "clients": dict(self.clients),
            "mix_throughput": self.mix_throughput,
            "over_budget": list(self.over_budget),
            "models": {
                name: {
                    "throughput": r.throughput,
                    "p99_ms": r.p99_ms,
                    "p50_ms": r.p50_ms,
                    "requests": r.requests,
                }
                for name, r in self.results.items()
            },
        }


def shares_of(traffic: Mapping[str, float]) -> dict[str, float]:
    """The traffic mix as fractions that sum to 1."""
    total = sum(traffic.values())
    return {name: weight / total for name, weight in traffic.items()}


def split_clients(total: int, shares: Mapping[str, float]) -> dict[str, int]:
    """``total`` clients split by share (largest remainder), every model at least one."""
    exact = {name: total * share for name, share in shares.items()}
    clients = {name: max(1, math.floor(value)) for name, value in exact.items()}
    left = total - sum(clients.values())
    by_remainder = sorted(exact, key=lambda name: exact[name] - math.floor(exact[name]), reverse=True)
    for name in by_remainder[: max(0, left)]:
        clients[name] += 1
    return clients


def mix_throughput(results: Mapping[str, LevelResult], shares: Mapping[str, float]) -> float:
    """Requests a second the server sustained in the mix: the model furthest behind its share decides."""
    return min(results[name].throughput / share for name, share in shares.items())


def measure_mix(
    url: str,
    samples: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    clients: Mapping[str, int],
    shares: Mapping[str, float],
    budgets_ms: Mapping[str, float],
    settings: MeasureSettings,
) -> MixLevel:
    """Measure every model at once, each with its ``clients``, in one event loop (windows of one length)."""

    async def measure_all() -> list[LevelResult]:
        generators = [LoadGenerator(url, name, samples[name], settings) for name in clients]
        return await asyncio.gather(*(g.measure_async(clients[g.model_name]) for g in generators))

    results = dict(zip(clients, asyncio.run(measure_all())))
    over = tuple(name for name in clients if results[name].p99_ms > budgets_ms[name])
    return MixLevel(dict(clients), results, mix_throughput(results, shares), over)
