"""What every study run does, whatever it tunes: one model (run.py) or several together (joint.py).

The storage opened, its errors mapped to one line and its connections closed; the study created or
joined with its pruner and sampler; the untuned baseline enqueued once; this worker pinned to its cores
and GPUs; the server started and stopped unless the caller runs it; the default latency budget from the
untuned config's single-request p99. A rule changed here holds for both workloads.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from sqlalchemy.exc import SQLAlchemyError

from optimizer.errors import StorageError
from optimizer.serving.base import ServingTarget
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.settings import SearchSettings
from optimizer.study.storage import create_or_join, open_storage, worker_seed

__all__ = [
    "BUDGET_PROBES",
    "DEFAULT_BUDGET_FACTOR",
    "MIN_DEFAULT_BUDGET_MS",
    "default_latency_budget_ms",
    "enqueue_baseline",
    "open_study",
    "pin_worker",
    "sampler_for",
    "serving",
    "study_storage",
]

# The default latency budget: this many single-request p99 probes of the untuned config, their median
# times the factor, never below the minimum (a sub-millisecond model would get a budget no load meets).
BUDGET_PROBES = 5
DEFAULT_BUDGET_FACTOR = 10.0
MIN_DEFAULT_BUDGET_MS = 5.0


@contextmanager
def study_storage(url: str, storage: optuna.storages.BaseStorage | None = None) -> Iterator[Any]:
    """The study's storage (``storage`` if given, else ``url`` opened) for the run; closed after it.

    A database error anywhere in the run (Optuna can wrap it while reporting a trial) becomes one
    :class:`StorageError`: finished trials are in the database, and the same command resumes.
    """
    storage = storage if storage is not None else open_storage(url)
    try:
        yield storage
    except Exception as exc:
        database_error = _database_error_in(exc)
        if database_error is None:
            raise
        detail = (str(database_error).strip().splitlines() or [type(database_error).__name__])[0]
        raise StorageError(
            f"the study database stopped accepting reads or writes ({detail[:160]}): finished trials are "
            "kept; fix the storage (disk full? read-only? server down?) and rerun the same command"
        ) from exc
    finally:
        if isinstance(storage, RDBStorage):
            storage.engine.dispose()  # close the database connections now, not at garbage collection


def _database_error_in(exc: BaseException) -> BaseException | None:
    """The database error behind ``exc``, if any (Optuna can mask it while reporting the trial)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (StorageInternalError, SQLAlchemyError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def open_study(storage, study_name: str, search: SearchSettings, *, pruning: bool = True):
    """Create the study, or join it, with the pruner ``search`` asks for; also whether this worker created it."""
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if pruning and search.prune_percentile is not None:
        pruner = optuna.pruners.PercentilePruner(
            search.prune_percentile,
            n_startup_trials=search.prune_startup_trials,
            n_warmup_steps=search.prune_warmup_steps,
        )
    return create_or_join(storage, study_name, pruner)


def sampler_for(
    kind: str,
    search: SearchSettings,
    *,
    seed: int | None,
    per_worker: bool,
    grid: Mapping[str, Sequence[Any]] | None = None,
) -> optuna.samplers.BaseSampler:
    """The study's sampler: ``tpe`` (the default), ``random``, or ``grid`` (over ``grid``).

    A worker joining a study others have run draws with a seed of its own (see ``worker_seed``).
    """
    seed = worker_seed(seed, per_worker=per_worker)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "grid":
        assert grid is not None, "a grid sampler needs the grid"
        return optuna.samplers.GridSampler(dict(grid), seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=search.tpe_startup_trials,
        multivariate=search.tpe_multivariate,
        constant_liar=search.tpe_constant_liar,
    )


def enqueue_baseline(study, params: Mapping[str, Any]) -> None:
    """The untuned config as the study's first trial; never twice (a crash right after creating the study)."""
    study.enqueue_trial(dict(params), user_attrs={"baseline": True}, skip_if_exists=True)


def pin_worker(cpus: frozenset[int], gpus: str | None) -> None:
    """Pin this worker to ``cpus`` and ``gpus``; the server, our child, inherits both."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus


@contextmanager
def serving(target: ServingTarget | None) -> Iterator[ServingTarget]:
    """The target, started and stopped here unless the caller runs it already (then it is the caller's)."""
    if target is not None and target.is_alive():
        yield target
        return
    with target or EmbeddedTriton() as server:
        yield server


def default_latency_budget_ms(probes_ms: Sequence[float]) -> float:
    """The default latency budget from single-request p99 probes of the untuned config."""
    return float(max(MIN_DEFAULT_BUDGET_MS, math.ceil(statistics.median(probes_ms) * DEFAULT_BUDGET_FACTOR)))
