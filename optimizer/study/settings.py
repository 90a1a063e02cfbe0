"""What a study is asked to do: the leaf record the run, the trial and the command line share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from optimizer.config.space import SearchSpace
from optimizer.measurement.levels import MeasureSettings
from optimizer.measurement.sweep import DEFAULT_LEVELS
from optimizer.model.accuracy import DEFAULT_TOLERANCE

__all__ = [
    "CROSS_CHECK_ENGINES",
    "SAMPLERS",
    "CrossCheckEngine",
    "Sampler",
    "SearchSettings",
    "StudySettings",
]


class Sampler(str, Enum):
    """How the study proposes configs."""

    tpe = "tpe"  # Bayesian (Optuna's TPE), the default
    random = "random"
    grid = "grid"  # every point of a space of listed values, once


SAMPLERS = tuple(s.value for s in Sampler)


class CrossCheckEngine(str, Enum):
    """The load generators that can cross-check the built-in one (``--confirm-with``)."""

    perf_analyzer = "perf_analyzer"


CROSS_CHECK_ENGINES = tuple(e.value for e in CrossCheckEngine)


@dataclass(frozen=True)
class SearchSettings:
    """How the sampler and the pruner search, chosen with bench/replay_search.py on the recorded surfaces.

    A study takes these as data (``StudySettings.search``); a benchmark trying others passes its own.

    Attributes:
        tpe_startup_trials, tpe_multivariate, tpe_constant_liar: the default sampler's settings.
        prune_percentile: a trial in the bottom (100 - this) percent at a level is pruned; None: no pruner.
            Big batches and long queue delays start slow and win late: only trials in the bottom quarter
            are pruned, and only after a few levels. The median pruner (50) dropped the encoder's
            optimum too often on the recordings: 90.8% of it at budget 20 against 95.6% at 75.
        prune_startup_trials, prune_warmup_steps: trials and levels before the pruner may act.
        starting_points: names of :func:`optimizer.config.space.starting_points` measured right after the
            baseline in a new study (none: they hurt on the encoder recording).
        start_from_profile: measure first, after the baseline, the batching config at the variant and
            batch size the in-process profile found fastest within the latency budget (one trial).
        warm_start_configs: how many of a warm-start study's best configs are measured first.
        max_repeated_configs: proposals of measured configs in a row that end the study (space exhausted).
        confirm_finalists: how many of the best distinct configs are re-measured side by side before the
            study exports (0 or 1: the best single measurement is exported as it is).
        confirm_rounds: how many times each finalist is measured again (alternating their order).
        second_load_margin: a trial scoring within this fraction of the best so far (0: above it), or the
            first feasible trial of its provider x precision, is measured again on a second load and scored
            by the mean of both; None: every trial is one load. 0.1 spent 3.9 of 10.5 minutes on second
            loads in a live 40-trial study of a flat surface (33 of 40 trials); 0 does only new bests.
    """

    tpe_startup_trials: int = 5
    tpe_multivariate: bool = True
    tpe_constant_liar: bool = True
    prune_percentile: float | None = 75.0
    prune_startup_trials: int = 5
    prune_warmup_steps: int = 2
    starting_points: tuple[str, ...] = ()
    start_from_profile: bool = True
    warm_start_configs: int = 3
    max_repeated_configs: int = 25
    confirm_finalists: int = 3
    confirm_rounds: int = 2
    second_load_margin: float | None = 0.0


@dataclass(frozen=True)
class StudySettings:
    """Everything ``optimize study`` was asked to do."""

    model_path: Path | None = None  # None: the bundled example model
    budget: int = 40
    latency_budget_ms: float | None = None
    space: str | SearchSpace = "cpu"  # a name under spaces/, a YAML path, or a space itself
    study_name: str | None = None
    storage: str | None = None
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    concurrency: tuple[int, ...] = DEFAULT_LEVELS
    seed: int | None = None
    measure: MeasureSettings = MeasureSettings()
    output_dir: Path | None = None  # default: studies/
    input_data: Path | None = None  # .npz with one array per input; default: realistic synthetic inputs
    accuracy_tolerance: float = DEFAULT_TOLERANCE
    allow_shared_host: bool = False  # let several workers of one study measure on the same machine
    cpus: frozenset[int] = frozenset()  # pin this worker (and its server) to these CPU cores
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES for this worker's server
    sampler: str = (
        "tpe"  # a Sampler: tpe (the default), random, or grid (every point of a listed space, once)
    )
    warm_start: str | None = None  # a finished study of the same model whose best configs go first
    pruning: bool = True  # stop trials early that trail earlier ones (see SearchSettings)
    search: SearchSettings = SearchSettings()
    # How trials are measured: engine, protocol, open-loop rates, and a memory limit.
    load_generator: str = "builtin"  # or "perf_analyzer"
    confirm_with: str | None = None  # "perf_analyzer": the baseline and the best measured by it too
    protocol: str = "grpc"  # or "http"
    request_rates: tuple[float, ...] = ()  # Poisson arrivals at these rates instead of the concurrency sweep
    max_memory_mb: float | None = None  # the server's process-tree RSS (see serving/metrics.memory_figure)
