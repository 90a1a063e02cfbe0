"""Which load generator measures a level: the built-in one, perf_analyzer, or a replayed recording.

One model's study asks :func:`make_load_generator`; a joint study measures the mixed load of several
models with :func:`make_mix_source`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from optimizer.errors import UsageError
from optimizer.measurement.builtin import LoadGenerator
from optimizer.measurement.levels import LevelResult, MeasureSettings
from optimizer.measurement.mixed import MixLevel, measure_mix
from optimizer.measurement.perf_analyzer import PerfAnalyzerLoadGenerator
from optimizer.serving.base import ServingTarget

__all__ = ["LevelSource", "MixSource", "make_load_generator", "make_mix_source"]

# (clients, traffic shares, each model's p99 budget) -> the level measured; None: a recording holds none
MixSource = Callable[[int, Mapping[str, float], Mapping[str, float]], "MixLevel | None"]


class LevelSource(Protocol):
    """What the sweep asks of any load generator."""

    def run_levels(
        self, levels: Sequence[float], on_level: Callable[[int, LevelResult], bool]
    ) -> list[LevelResult]:
        """Measure ``levels`` in order; ``on_level(index, result)`` returns False to stop."""
        ...

    def measure(self, level: float) -> LevelResult:
        """Measure one level."""
        ...


def make_load_generator(
    target: ServingTarget,
    model_name: str,
    samples: Sequence[Mapping[str, np.ndarray]],
    settings: MeasureSettings,
    *,
    engine: str = "builtin",
    protocol: str = "grpc",
    mode: str = "concurrency",
    batched: bool = True,
    client_options: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    resources: Callable[[], Mapping[str, float]] | None = None,
    streaming: bool = True,
) -> LevelSource:
    """The load generator a study asked for, aimed at ``target``'s endpoint for ``protocol``.

    ``engine`` is ``"builtin"`` (:class:`~optimizer.measurement.builtin.LoadGenerator`) or
    ``"perf_analyzer"`` (:class:`~optimizer.measurement.perf_analyzer.PerfAnalyzerLoadGenerator`); a
    replay target answers with its recording (:class:`~optimizer.measurement.replay.ReplayLoadGenerator`).
    ``streaming`` False: the built-in generator sends unary calls instead of Triton's stream API.

    Raises:
        UsageError: the combination needs what this target or engine lacks (HTTP address, TLS).
    """
    recorded = target.recorded_levels()
    if recorded is not None:  # a recording answers instead of a server
        return recorded
    url = target.grpc_url if protocol == "grpc" else _host_port(target.http_url)
    if not url:
        raise UsageError(
            f"--protocol {protocol} needs the server's {protocol} address, which the {target.name} target lacks"
        )
    if client_options and (protocol == "http" or engine == "perf_analyzer"):
        raise UsageError(
            "TLS to the server is supported by the built-in gRPC load generator only: drop --protocol http / --load-generator perf_analyzer"
        )
    if engine == "perf_analyzer":
        return PerfAnalyzerLoadGenerator(
            url,
            model_name,
            samples,
            settings,
            batched=batched,
            protocol=protocol,
            mode=mode,
            headers=headers,
            resources=resources,
        )
    return LoadGenerator(
        url,
        model_name,
        samples,
        settings,
        protocol=protocol,
        mode=mode,
        client_options=client_options,
        headers=headers,
        resources=resources,
        streaming=streaming,
    )


def make_mix_source(
    target: ServingTarget,
    samples: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    settings: MeasureSettings,
) -> MixSource:
    """How a joint study measures a level of the mixed load: on ``target``'s server (the built-in
    generator, its TLS and headers), or from a joint recording's levels.

    Raises:
        UsageError: ``target`` replays one model's recording, which cannot answer for a mix.
    """
    recorded = target.recorded_mix()
    if recorded is not None:  # a recording answers instead of a server
        return recorded

    def measure(clients: int, shares: Mapping[str, float], budgets_ms: Mapping[str, float]) -> MixLevel:
        return measure_mix(
            target.grpc_url,
            samples,
            clients,
            shares,
            budgets_ms,
            settings,
            client_options=target.client_options(),
            headers=target.request_headers(),
        )

    return measure


def _host_port(url: str) -> str:
    """``http://host:port`` -> ``host:port``, the form tritonclient's HTTP client and perf_analyzer take."""
    return url.split("://", 1)[-1].rstrip("/")
