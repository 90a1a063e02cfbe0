"""The checks a study's settings pass before any work: one clear line for each thing that is wrong."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    IntDistribution,
    check_distribution_compatibility,
)

from optimizer.config.space import SearchSpace, suggest_candidate
from optimizer.errors import StudyError, UsageError
from optimizer.measurement.levels import ENGINES, PROTOCOLS, RULES, MeasureSettings
from optimizer.measurement.perf_analyzer import ensure_perf_analyzer
from optimizer.serving.base import ServingTarget
from optimizer.study.settings import CROSS_CHECK_ENGINES, SAMPLERS, StudySettings

__all__ = ["check_same_space", "check_settings", "check_target", "space_distributions"]


def check_settings(settings: StudySettings) -> None:
    if settings.budget < 1:
        raise UsageError(f"--budget must be at least 1 trial, got {settings.budget}")
    if settings.sampler not in SAMPLERS:
        raise UsageError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {settings.sampler!r}")
    if settings.gpus is not None and not all(part.isdigit() for part in settings.gpus.split(",")):
        raise UsageError(f"--gpus takes GPU indexes separated by commas, e.g. 0,1; got {settings.gpus!r}")
    if settings.is_joint and settings.sampler == "grid":
        raise UsageError("several models are sampled, not searched on a grid: use the tpe or random sampler")
    budget = settings.latency_budget_ms
    if budget is not None and (math.isnan(budget) or math.isinf(budget) or budget <= 0):
        raise UsageError(f"--latency-budget-ms must be a positive number of milliseconds, got {budget}")
    tolerance = settings.accuracy_tolerance
    if math.isnan(tolerance) or not 0 <= tolerance <= 2:
        raise UsageError(
            f"--accuracy-tolerance must be between 0 and 2 (1 - cosine similarity), got {tolerance}"
        )
    _check_measure_settings(settings)


def _check_measure_settings(settings: StudySettings) -> None:
    checks = [
        (settings.load_generator in ENGINES, f"--load-generator must be one of {', '.join(ENGINES)}"),
        (settings.protocol in PROTOCOLS, f"--protocol must be one of {', '.join(PROTOCOLS)}"),
        (settings.measure.rule in RULES, f"--stop-rule must be one of {', '.join(RULES)}"),
        (all(math.isfinite(r) and r > 0 for r in settings.request_rates), "--request-rate must be positive"),
        (
            settings.max_memory_mb is None
            or (math.isfinite(settings.max_memory_mb) and settings.max_memory_mb > 0),
            f"--max-memory-mb must be a positive number of MiB, got {settings.max_memory_mb}",
        ),
        (
            settings.max_gpu_memory_mb is None
            or (math.isfinite(settings.max_gpu_memory_mb) and settings.max_gpu_memory_mb > 0),
            f"--max-gpu-memory-mb must be a positive number of MiB, got {settings.max_gpu_memory_mb}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    _check_window(settings.measure)
    if settings.confirm_with not in (None, *CROSS_CHECK_ENGINES):
        raise UsageError(f"--confirm-with must be one of {', '.join(CROSS_CHECK_ENGINES)}")
    if "perf_analyzer" in (settings.load_generator, settings.confirm_with):
        ensure_perf_analyzer()  # found, or installed now: never a missing binary in the middle of a study


def _check_window(measure: MeasureSettings) -> None:
    if not (measure.warmup_s >= 0 and 0 < measure.window_s <= measure.max_window_s):
        raise UsageError(
            f"--window-s ({measure.window_s:g}) must be positive and at most --max-window-s "
            f"({measure.max_window_s:g}), --warmup-s ({measure.warmup_s:g}) not negative"
        )
    if not (math.isfinite(measure.screen_s) and measure.screen_s >= 0):
        raise UsageError(f"--screen-s must be 0 (no screening) or positive seconds, got {measure.screen_s:g}")
    if not (0 < measure.throughput_ci and 0 < measure.p99_ci):
        raise UsageError("--throughput-ci and --p99-ci must be positive fractions, e.g. 0.05 for within 5%")


def check_target(settings: StudySettings, target: ServingTarget) -> None:
    """Refuse, before any work, what the target cannot give: a cross-check of a recording, or over TLS."""
    engine = settings.confirm_with
    if engine is None:
        return
    if not target.capabilities.serves_requests:
        raise UsageError(
            f"--confirm-with {engine} measures a live server, and the {target.name} target answers from a "
            "recording: drop --confirm-with, or study a server"
        )
    if target.client_options():
        raise UsageError(
            f"--confirm-with {engine} cannot reach a server over TLS (only the built-in gRPC generator can): "
            "drop --confirm-with, or cross-check from a machine that reaches the server without TLS"
        )


def space_distributions(
    space: SearchSpace, *, batching: bool, cores: int, prefix: str = ""
) -> dict[str, BaseDistribution]:
    """The Optuna distribution of every parameter ``space`` suggests (named ``prefix + name``)."""
    recorder = _DistributionRecorder(prefix)
    suggest_candidate(recorder, space, batching=batching, cores=cores)
    return recorder.distributions


class _DistributionRecorder:
    """Stands in for an Optuna trial and notes the distribution of each suggestion."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.distributions: dict[str, BaseDistribution] = {}

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        self.distributions[self.prefix + name] = CategoricalDistribution(choices)
        return choices[0]

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> int:
        self.distributions[self.prefix + name] = IntDistribution(low, high, log=log)
        return low


def check_same_space(
    study, distributions: Mapping[str, BaseDistribution], *, before_settling: bool = False
) -> None:
    """Refuse to resume ``study`` in a space Optuna cannot put beside the one its trials were drawn from.

    A parameter suggested as a list of choices in one space and a range in another (or with other
    choices) makes Optuna fail the next trial; a range merely narrowed or widened is fine.
    ``before_settling``: the space's precisions are not yet cut to the accurate ones, so the stored
    precisions need only be among them (checked again, exactly, once settled).
    """
    for trial in study.get_trials(deepcopy=False):
        for name, stored in trial.distributions.items():
            new = distributions.get(name)
            if new is None or (before_settling and _narrowed_precisions(name, stored, new)):
                continue
            try:
                check_distribution_compatibility(stored, new)
            except ValueError:
                raise StudyError(
                    f"study {study.study_name!r} searched another space ({name}: {_described(stored)}, "
                    f"now {_described(new)}): resume it with the same --space, or use another --study-name"
                ) from None


def _narrowed_precisions(name: str, stored: BaseDistribution, new: BaseDistribution) -> bool:
    """The precision parameter, its stored choices among the new ones (the accuracy guard cuts them)."""
    return (
        name.rsplit(".", 1)[-1] == "precision"
        and isinstance(stored, CategoricalDistribution)
        and isinstance(new, CategoricalDistribution)
        and set(stored.choices) <= set(new.choices)
    )


def _described(distribution: BaseDistribution) -> str:
    if isinstance(distribution, CategoricalDistribution):
        return "one of " + ", ".join(str(choice) for choice in distribution.choices)
    if isinstance(distribution, IntDistribution):
        return f"{distribution.low}..{distribution.high}"
    return repr(distribution)
