"""The one study driver: what every study does, whatever it tunes (a :class:`Workload`).

:func:`drive` runs a workload, one model (one_model.py) or several together (joint.py), through the same
steps: the storage opened, its errors mapped to one line and its connections closed; the study created
or joined with its pruner and sampler; the untuned baseline enqueued once; this worker registered,
pinned to its cores and GPUs, and the trials of dead workers retried; the server started and stopped
unless the caller runs it; the default latency budget from the untuned config's single-request p99; the
trials run to the study's budget (:func:`run_trials`). A rule changed here holds for both workloads.
What differs, the workload answers: its intake and identity, its space and the variants it keeps, its
objective, and what it does once the budget is in (one model confirms its finalists).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import optuna
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from optimizer import interrupts
from optimizer.errors import StorageError, StudyError, disk_full, is_disk_full
from optimizer.model.libraries import gpu_libraries
from optimizer.serving.base import ServingTarget
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.reconnect import PatientRDBStorage
from optimizer.study.settings import SearchSettings, StudySettings
from optimizer.study.storage import (
    count_finished,
    count_running,
    create_or_join,
    fail_stale,
    open_storage,
    recover_dead_local_trials,
    register_worker,
    worker_id,
    worker_seed,
)
from optimizer.study.trial_rules import TrialFailed

__all__ = [
    "BUDGET_PROBES",
    "QuietReporter",
    "Reporter",
    "Workload",
    "drive",
    "record_study",
    "run_trials",
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
WAIT_FOR_OTHERS_S = 2.0  # how often a worker whose budget is taken by others' running trials looks again


class Reporter(Protocol):
    def note(self, message: str) -> None: ...

    def trial_started(self, number: int, summary: str, done: int, budget: int) -> None: ...

    def trial_finished(self, report: Any, best_throughput: float | None) -> None: ...


class QuietReporter:
    def note(self, message: str) -> None:
        pass

    def trial_started(self, number: int, summary: str, done: int, budget: int) -> None:
        pass

    def trial_finished(self, report: Any, best_throughput: float | None) -> None:
        pass


class Objective(Protocol):
    """A workload's objective: one trial's config loaded and measured; ``progress`` is (done, budget)."""

    progress: tuple[int, int]

    def __call__(self, trial: optuna.Trial) -> float: ...


class Workload(Protocol):
    """What one kind of study tunes; settled before the database is touched (intake, checks, names)."""

    study_name: str
    storage_url: str

    def baseline_params(self) -> Mapping[str, Any]:
        """The untuned config's parameters: the study's first trial."""

    def check_same_study(self, study) -> None:
        """Refuse a stored study made for something else (models, budgets, space), before any work."""

    def settle(self, study, reporter: Reporter) -> None:
        """Settle what the trials search (the accurate variants), recorded in the study for resuming."""

    def grid(self) -> Mapping[str, Sequence[Any]] | None:
        """The grid of a grid sampler (None: the study samples)."""

    def work_after_budget(self, study) -> bool:
        """Whether a study at its budget still has work (finalists to confirm, a cross-check to run)."""

    def start(self, study, server: ServingTarget, reporter: Reporter, *, created: bool) -> Objective:
        """On the running server: the latency budgets, the study's records, the starting points."""

    def records(self) -> Mapping[str, Any]:
        """What the study records of what it tunes, once started (the models, the space, the budgets)."""

    def trial_finished(self, study, trial: FrozenTrial, reporter: Reporter) -> None:
        """Tell the reporter about a finished trial."""

    def finish(self, study, objective: Objective, reporter: Reporter) -> None:
        """Once the budget is in (or the space exhausted)."""

    def summarise(self, study) -> Any:
        """The study's summary; the best config exported."""


def drive(
    workload: Workload,
    settings: StudySettings,
    reporter: Reporter,
    target: ServingTarget | None = None,
    storage: optuna.storages.BaseStorage | None = None,
):
    """Run (or resume) ``workload``'s study to its budget; its summary. See the module docstring."""
    with study_storage(workload.storage_url, storage) as opened:
        if isinstance(opened, PatientRDBStorage):
            opened.set_wait(settings.storage_wait_s, reporter.note)
        study, created = open_study(opened, workload.study_name, settings.search, pruning=settings.pruning)
        if created:  # first thing, so workers joining a moment later find it and do not enqueue another
            enqueue_baseline(study, workload.baseline_params())
        _check_same_settings(study, settings)
        workload.check_same_study(study)
        joined = register_worker(study, settings)
        workload.settle(study, reporter)
        study.sampler = sampler_for(
            settings.sampler, settings.search, seed=settings.seed, per_worker=joined, grid=workload.grid()
        )
        for number in recover_dead_local_trials(study):
            reporter.note(f"trial {number} was left running by a worker that died: it will be retried")
        if count_finished(study) < settings.budget or workload.work_after_budget(study):
            pin_worker(settings.cpus, settings.gpus)
            with serving(target) as server:
                objective = workload.start(study, server, reporter, created=created)
                record_study(study, {**_server_records(server, settings), **workload.records()})
                if not study.get_trials(deepcopy=False):  # a crash between creating the study and enqueuing
                    enqueue_baseline(study, workload.baseline_params())
                run_trials(study, objective, settings, reporter, workload.trial_finished)
                workload.finish(study, objective, reporter)
        else:
            reporter.note(
                f"study {workload.study_name!r} already has {count_finished(study)} finished trials "
                f"(--budget {settings.budget}): no trial to run; give a larger --budget to add trials"
            )
        return workload.summarise(study)


def _check_same_settings(study, settings: StudySettings) -> None:
    """Refuse to resume a study with settings that decided what its trials search (before any work)."""
    tolerance = study.user_attrs.get("accuracy_tolerance")
    if tolerance is not None and not math.isclose(tolerance, settings.accuracy_tolerance):
        raise StudyError(
            f"study {study.study_name!r} uses an accuracy tolerance of {tolerance:g}, not "
            f"{settings.accuracy_tolerance:g}: resume it with the same tolerance, or use another --study-name"
        )


def record_study(study, records: Mapping[str, Any]) -> None:
    """Write the study's records where they differ from what it holds (a study of an earlier version gets
    the later ones on resume; a record that changes, such as the server's version, is brought up to date)."""
    for key, value in records.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


def _server_records(server: ServingTarget, settings: StudySettings) -> dict[str, Any]:
    hardware = server.hardware()  # a replay: the recording's machine
    records = {
        "server_version": server.server_version(),
        "target": server.name,
        "hardware": hardware,
        "budget": settings.budget,
    }
    if hardware.get("gpu") and server.capabilities.same_machine:
        # The CUDA, cuDNN and TensorRT the server's ONNX Runtime loads: this environment's wheels.
        records["gpu_libraries"] = gpu_libraries().to_dict()
    return records


def run_trials(
    study,
    objective: Objective,
    settings: StudySettings,
    reporter: Reporter,
    finished: Callable[[Any, FrozenTrial, Reporter], None],
) -> None:
    """Run trials until the study-wide count of finished trials reaches the budget.

    Trials running elsewhere count toward the budget (so workers never overshoot it); when they are
    all that is missing, wait for them to finish, or for their heartbeats to go stale (a dead worker),
    in which case Optuna fails them and re-enqueues their parameters for us to run.
    """
    # Proposals of already-measured configs cost nothing and do not count toward the budget; many in a
    # row mean the sampler has nothing new to try.
    budget = settings.budget
    waiting_noted, repeats = False, 0
    while (done := count_finished(study)) < budget:
        interrupts.raise_if_requested()
        if repeats >= settings.search.max_repeated_configs:
            reporter.note(
                f"the last {repeats} proposals repeated measured configs: the space looks exhausted"
            )
            return
        if done + count_running(study) >= budget:
            _check_none_left_running_by_us(study)
            if not waiting_noted:
                reporter.note(f"waiting for {count_running(study)} trial(s) running in other workers")
                waiting_noted = True
            time.sleep(WAIT_FOR_OTHERS_S)
            fail_stale(study)
            recover_dead_local_trials(study)  # and orphans no heartbeat will ever fail
            continue
        objective.progress = (done, budget)
        # A worker on this host died: retry its trial now, not after the grace period.
        recover_dead_local_trials(study)
        last = _run_one(study, objective)
        repeats = repeats + 1 if "same_config_as" in last.user_attrs else 0
        finished(study, last, reporter)


def _run_one(study, objective: Objective) -> FrozenTrial:
    """Run one trial and return it, as Optuna hands it to its callbacks.

    Not the study's highest-numbered trial: that can be a starting point still waiting in the queue,
    which the progress then reported as "failed: interrupted" while the trial that ran went unseen.
    """
    ran: list[FrozenTrial] = []
    study.optimize(
        objective, n_trials=1, catch=(TrialFailed,), callbacks=[lambda _, trial: ran.append(trial)]
    )
    return ran[-1]


def _check_none_left_running_by_us(study) -> None:
    """Between trials none of this worker's trials runs: one still RUNNING is one the database did not
    let us finish (it went read-only or away mid-write), and waiting for it would wait forever."""
    mine = [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get("worker") == worker_id()
    ]
    if mine:
        raise StorageError(
            f"the study database stopped accepting reads or writes (the end of trial {mine[0]} was not recorded): "
            "finished trials are kept; fix the storage (disk full? read-only? server down?) and rerun the same command"
        )


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
        said = _found_in_chain(exc, lambda seen: isinstance(seen, StorageError))
        if said is not None:  # said already: the database stayed away past --storage-wait-s
            # Python keeps the context chain free of cycles here; ``from exc`` would make one.
            raise said  # noqa: B904
        if url.startswith("sqlite:///") and _in_chain(exc, is_disk_full):
            raise disk_full(
                url[len("sqlite:///") :],
                kept="SQLite rolled back the unfinished write: finished trials are kept; rerun the same command",
            ) from exc
        detail = (str(database_error).strip().splitlines() or [type(database_error).__name__])[0]
        raise StorageError(
            f"the study database stopped accepting reads or writes ({detail[:160]}): finished trials are "
            "kept; fix the storage (disk full? read-only? server down?) and rerun the same command"
        ) from exc
    finally:
        if isinstance(storage, RDBStorage):
            storage.engine.dispose()  # close the database connections now, not at garbage collection


def _in_chain(exc: BaseException, test: Callable[[BaseException], bool]) -> bool:
    """Whether ``exc`` or an exception behind it passes ``test``."""
    return _found_in_chain(exc, test) is not None


def _found_in_chain(exc: BaseException, test: Callable[[BaseException], bool]) -> BaseException | None:
    """``exc`` or the first exception behind it that passes ``test``."""
    seen: BaseException | None = exc
    while seen is not None:
        if test(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


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
