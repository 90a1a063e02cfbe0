"""What a study is asked to do: the leaf record the run, the trial and the command line share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from optimizer.config.space import SearchSpace
from optimizer.measurement.levels import MeasureSettings
from optimizer.measurement.sweep import DEFAULT_LEVELS

if TYPE_CHECKING:  # the models file's reader imports the model stage; the command line's --help need not
    from optimizer.study.models_file import ModelEntry

__all__ = [
    "CROSS_CHECK_ENGINES",
    "JOINT_LEVELS",
    "JOINT_MEASURE",
    "SAMPLERS",
    "CrossCheckEngine",
    "Sampler",
    "SearchSettings",
    "StudySettings",
    "is_one_model_setting",
]

DEFAULT_MEASURE = MeasureSettings()

# Field metadata: a setting only one model's study reads. The command line refuses the option that sets it
# for several models (``is_one_model_setting``) rather than ignore it.
ONE_MODEL = {"workload": "one model"}


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
    starting_points: tuple[str, ...] = field(default=(), metadata=ONE_MODEL)
    start_from_profile: bool = True
    warm_start_configs: int = 3
    max_repeated_configs: int = 25
    confirm_finalists: int = field(default=3, metadata=ONE_MODEL)
    confirm_rounds: int = 2
    second_load_margin: float | None = 0.0


# The measurement of several models: one fixed window for every model at once, extended (up to
# max_window_s) until each model has min_requests (a model with a small share of the traffic needs longer
# to show its p99), at these clients per model.
JOINT_MEASURE = MeasureSettings(warmup_s=1.0, window_s=3.0, max_window_s=9.0, min_requests=20, rule="fixed")
JOINT_LEVELS = (1, 2, 4, 8)
JOINT_WINDOW_FIELDS = ("window_s", "warmup_s")  # what several models take of MeasureSettings


# How long a worker waits for a database server that went away (a restart) before it stops.
DEFAULT_STORAGE_WAIT_S = 300.0


@dataclass(frozen=True)
class StudySettings:
    """Everything ``optimize study`` was asked to do, for one model or for several tuned together.

    One model is ``model_path`` (None: the bundled example) with its shapes, input data and budget;
    several are ``models``, each with its own (:class:`optimizer.study.models_file.ModelEntry`). Left at
    their defaults, ``measure`` and ``concurrency`` are the workload's own: several models are measured in
    JOINT_MEASURE's shared windows at JOINT_LEVELS clients per model.
    """

    models: tuple[ModelEntry, ...] = ()  # several models tuned together (a joint study)
    model_path: Path | None = field(default=None, metadata=ONE_MODEL)  # None: the bundled example
    budget: int = 40
    latency_budget_ms: float | None = field(default=None, metadata=ONE_MODEL)  # several: each model's
    space: str | SearchSpace = "cpu"  # a name under spaces/, a YAML path, or a space itself
    study_name: str | None = None
    storage: str | None = None
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict, metadata=ONE_MODEL)
    concurrency: tuple[int, ...] = field(default=DEFAULT_LEVELS, metadata=ONE_MODEL)
    seed: int | None = None
    measure: MeasureSettings = DEFAULT_MEASURE
    output_dir: Path | None = None  # default: studies/
    # .npz with one array per input; default: realistic synthetic inputs (several: each model's)
    input_data: Path | None = field(default=None, metadata=ONE_MODEL)
    accuracy_tolerance: float = 0.01  # 1 - cosine similarity; 0.01 keeps outputs within about 8 degrees
    # The user's accuracy: a .npz of inputs and labels, metrics (built-in names or module:function) and
    # goals such as "squad_f1>=-1%" that decide instead of the cosine rule (optimizer.model.metrics).
    accuracy_data: Path | None = field(default=None, metadata=ONE_MODEL)
    accuracy_metrics: tuple[str, ...] = field(default=(), metadata=ONE_MODEL)
    accuracy_goals: tuple[str, ...] = field(default=(), metadata=ONE_MODEL)
    allow_shared_host: bool = False  # let several workers of one study measure on the same machine
    storage_wait_s: float = DEFAULT_STORAGE_WAIT_S
    cpus: frozenset[int] = frozenset()  # pin this worker (and its server) to these CPU cores
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES for this worker's server
    # A Sampler: tpe (the default), random, or grid (every point of a listed space, once).
    sampler: str = field(default="tpe", metadata=ONE_MODEL)
    # A finished study of the same model whose best configs go first.
    warm_start: str | None = field(default=None, metadata=ONE_MODEL)
    pruning: bool = True  # stop trials early that trail earlier ones (see SearchSettings)
    search: SearchSettings = SearchSettings()
    # How trials are measured: engine, protocol, open-loop rates, and a memory limit.
    load_generator: str = field(default="builtin", metadata=ONE_MODEL)  # or "perf_analyzer"
    # "perf_analyzer": the baseline and the best measured by it too.
    confirm_with: str | None = field(default=None, metadata=ONE_MODEL)
    protocol: str = field(default="grpc", metadata=ONE_MODEL)  # or "http"
    # Poisson arrivals at these rates instead of the concurrency sweep.
    request_rates: tuple[float, ...] = field(default=(), metadata=ONE_MODEL)
    # The server's process-tree RSS (see serving/metrics.memory_figure).
    max_memory_mb: float | None = field(default=None, metadata=ONE_MODEL)
    # The GPU memory the server uses under load, summed over its GPUs (/metrics nv_gpu_memory_used_bytes).
    max_gpu_memory_mb: float | None = field(default=None, metadata=ONE_MODEL)

    def __post_init__(self) -> None:
        # Several models measure in their own shared windows unless the caller chose others; the
        # defaults are told apart by identity, so equal settings given on purpose are kept.
        if self.is_joint and self.measure is DEFAULT_MEASURE:
            object.__setattr__(self, "measure", JOINT_MEASURE)
        if self.is_joint and self.concurrency is DEFAULT_LEVELS:
            object.__setattr__(self, "concurrency", JOINT_LEVELS)

    @property
    def is_joint(self) -> bool:
        """Whether several models are tuned together (one ensemble counts: it is tuned as its steps)."""
        return bool(self.models)


def is_one_model_setting(path: str) -> bool:
    """Whether the setting at ``path`` (``"measure.p99_ci"``, ``"sampler"``) is read by one model's study
    only, so a study of several models must refuse it."""
    record, _, leaf = path.partition(".")
    if record == "measure":
        return leaf not in JOINT_WINDOW_FIELDS
    owner, name = (SearchSettings, leaf) if record == "search" else (StudySettings, record)
    return next(f for f in fields(owner) if f.name == name).metadata == ONE_MODEL
