"""The study: one Optuna study over the joint space, each trial hot-reloaded into Triton and measured.

``run_study`` reads top to bottom as the pipeline: intake, space, storage, server, latency budget,
baseline, trials, export. A bad trial (a config Triton rejects, a crash, a timeout) is recorded on the
trial with its reason and the study goes on; bad input stops the run before any trial.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimizer.config.space import (
    SearchSpace,
    baseline_params,
    fit_params,
    grid_of,
    load_space,
    profile_point,
    space_from_dict,
    starting_points,
)
from optimizer.errors import (
    StorageError,
    StudyError,
)
from optimizer.model import examples
from optimizer.model.intake import ModelInfo, load_requests
from optimizer.model.profile import best_point, fastest_first
from optimizer.model.providers import check_providers
from optimizer.paths import cache_dir, check_name, studies_dir
from optimizer.serving.base import ServingTarget
from optimizer.serving.environment import available_cores
from optimizer.study.checks import check_same_space, check_settings, check_target, space_distributions
from optimizer.study.confirm import CONFIRMATION, choose, confirm, finalists_of, stored_confirmation
from optimizer.study.crosscheck import cross_check_study_step, needs_cross_check, stored_cross_check
from optimizer.study.driver import (
    BUDGET_PROBES,
    DEFAULT_BUDGET_FACTOR,
    MIN_DEFAULT_BUDGET_MS,
    default_latency_budget_ms,
    enqueue_baseline,
    open_study,
    pin_worker,
    sampler_for,
    serving,
    study_storage,
)
from optimizer.study.precisions import (
    accurate_precisions,
    inprocess_points,
    int8_recipe_of,
    profile_in_process,
)
from optimizer.study.results import (
    StudySummary,
    TrialReport,
    best_throughput,
    best_trial,
    confirmed_baseline,
    export_trial,
    finalists,
    report_of,
)
from optimizer.study.settings import SearchSettings, StudySettings
from optimizer.study.storage import (
    count_finished,
    count_running,
    default_storage_url,
    fail_stale,
    open_storage,
    recover_dead_local_trials,
    register_worker,
    worker_id,
)
from optimizer.study.trial import TrialFailed, TrialRunner

__all__ = ["QuietReporter", "Reporter", "cross_check_study", "run_study"]


class Reporter(Protocol):
    def note(self, message: str) -> None: ...

    def trial_started(self, number: int, summary: str, done: int, budget: int) -> None: ...

    def trial_finished(self, report: TrialReport, best_throughput: float | None) -> None: ...


class QuietReporter:
    def note(self, message: str) -> None:
        pass

    def trial_started(self, number: int, summary: str, done: int, budget: int) -> None:
        pass

    def trial_finished(self, report: TrialReport, best_throughput: float | None) -> None:
        pass


def run_study(
    settings: StudySettings,
    reporter: Reporter | None = None,
    *,
    target: ServingTarget | None = None,
    storage: optuna.storages.BaseStorage | None = None,
) -> StudySummary:
    """Run (or resume) a study to its budget and export the best config. See the module docstring.

    Args:
        settings: what to study and how.
        reporter: told about each trial (default: nothing is shown).
        target: the server to measure on (default: a new embedded Triton). One that is already running
            is used as it is and left running (tests share one server); one that is not is started and
            stopped here.
        storage: an Optuna storage object to use instead of ``settings.storage`` (the replay benchmark
            passes an in-memory one: thousands of replayed trials, none worth a database).
    """
    reporter = reporter or QuietReporter()
    plan = _plan(settings, target)
    with study_storage(plan.storage_url, storage) as opened:
        study, created = open_study(opened, plan.study_name, settings.search, pruning=settings.pruning)
        if created:  # first thing, so workers joining a moment later find it and do not enqueue another
            enqueue_baseline(study, baseline_params(plan.space))
        space = _join(study, plan, settings, reporter)
        if (
            count_finished(study) < settings.budget
            or _unconfirmed(study, settings.search)
            or needs_cross_check(study.user_attrs, settings.confirm_with, best_trial(study))
        ):
            _measure(study, plan, space, settings, reporter, target, created=created)
        else:
            reporter.note(f"study {plan.study_name!r} already has {count_finished(study)} finished trials")
        return _summarise(study, plan, settings.budget)


def cross_check_study(
    study_name: str,
    engine: str = "perf_analyzer",
    reporter: Reporter | None = None,
    *,
    storage: str | None = None,
    output_dir: Path | None = None,
    input_data: Path | None = None,
    target: ServingTarget | None = None,
) -> StudySummary:
    """Measure a finished study's baseline and best with ``engine`` beside ours (``optimize confirm``).

    The study is resumed as it was made (its model, shapes, space and latency budget, read from the
    study), with nothing left to run but the cross-check; its record joins the ``confirmation`` attribute.

    Raises:
        StudyError: no such study, or it has no feasible trial to cross-check.
    """
    out_dir = output_dir or studies_dir()
    url = storage or default_storage_url(out_dir, study_name)
    if storage is None and not (out_dir / f"{study_name}.db").is_file():
        raise StudyError(
            f"no study {study_name!r} in {out_dir}: give the name of a finished study (or --storage)"
        )
    attrs, finished, best = _stored_study(url, study_name)
    if "model_path" not in attrs and "models" in attrs:
        raise StudyError(
            f"study {study_name!r} tunes several models together: optimize confirm cross-checks one model's "
            "study (serve the joint best with optimize serve --study-name and run perf_analyzer per model)"
        )
    out_dir = Path(attrs.get("output_dir") or out_dir)
    if best is None:
        raise StudyError(
            f"study {study_name!r} has no feasible trial to cross-check: run it to its budget first"
        )
    settings = StudySettings(
        model_path=Path(attrs["model_path"]),
        shapes={name: tuple(dims) for name, dims in attrs.get("shapes", {}).items()},
        study_name=study_name,
        storage=url,
        output_dir=out_dir,
        budget=finished,
        latency_budget_ms=float(attrs["latency_budget_ms"]),
        space=space_from_dict(attrs["space"]),
        concurrency=tuple(attrs.get("concurrency_levels") or StudySettings().concurrency),
        input_data=input_data,
        accuracy_tolerance=float(attrs.get("accuracy_tolerance", StudySettings().accuracy_tolerance)),
        search=SearchSettings(confirm_finalists=0),  # the finalists' rounds, if any, are kept as they are
        confirm_with=engine,
    )
    return run_study(settings, reporter, target=target)


def _stored_study(url: str, study_name: str):
    """A stored study's attributes, finished-trial count and exported trial (the database left as it is)."""
    storage = open_storage(url, create_dirs=False)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        return dict(study.user_attrs), count_finished(study), best_trial(study)
    except KeyError:
        raise StudyError(f"no study {study_name!r} in {url}: give the name of a finished study") from None
    finally:
        storage.engine.dispose()


@dataclass(frozen=True)
class _Plan:
    """What the run is about, settled before the database is touched."""

    model: ModelInfo
    shapes: dict[str, tuple[int, ...]]
    samples: list
    space: SearchSpace
    study_name: str
    model_name: str
    out_dir: Path
    storage_url: str
    cores: int  # the CPU cores the server's instances share
    int8_recipes: tuple[str, ...] | None  # the ones the target can serve (a recording's), None: all
    same_machine: bool  # the server runs here, so the in-process profile measures its hardware
    warm_start: tuple[dict, ...] = ()  # parameters of another study's best configs, best first


def _plan(settings: StudySettings, target: ServingTarget | None) -> _Plan:
    check_settings(settings)
    if target is not None:  # the default, a new embedded Triton, serves requests without TLS
        check_target(settings, target)
    model, shapes, samples = _intake(settings)
    space = settings.space if isinstance(settings.space, SearchSpace) else load_space(settings.space)
    cores = _cores(settings, target)
    if settings.sampler == "grid":
        grid_of(
            space, batching=model.batching, cores=cores
        )  # a space without a grid is refused before any work
    check_providers(space.execution_providers)
    study_name = check_name(settings.study_name or model.source_path.stem, "study name")
    out_dir = settings.output_dir or studies_dir()
    storage_url = settings.storage or default_storage_url(out_dir, study_name)
    return _Plan(
        model=model,
        shapes=shapes,
        samples=samples,
        space=space,
        study_name=study_name,
        model_name=check_name(_model_name(model), "model name"),
        out_dir=out_dir,
        storage_url=storage_url,
        cores=cores,
        int8_recipes=target.int8_recipes() if target is not None else None,
        same_machine=target is None or target.capabilities.same_machine,
        warm_start=_warm_start_params(settings, model, space, out_dir, cores) if settings.warm_start else (),
    )


def _cores(settings: StudySettings, target: ServingTarget | None) -> int:
    """The cores this worker's server may use: ``--cpus``, else the target's (a recording's, or ours)."""
    if settings.cpus:
        return len(settings.cpus)
    return target.cpu_cores() if target is not None else available_cores()


def _join(study, plan: _Plan, settings: StudySettings, reporter: Reporter) -> SearchSpace:
    """Check the study is this one, register this worker, and settle the space it searches."""
    _check_same_study(study, plan.model, settings)
    check_same_space(  # before the accuracy checks' work; again, exactly, once the space is settled
        study,
        space_distributions(plan.space, batching=plan.model.batching, cores=plan.cores),
        before_settling=True,
    )
    joined = register_worker(study, settings)
    space = accurate_precisions(
        study,
        plan.model,
        plan.space,
        plan.samples,
        settings.accuracy_tolerance,
        reporter,
        plan.int8_recipes,
    )
    check_same_space(study, space_distributions(space, batching=plan.model.batching, cores=plan.cores))
    grid = (
        grid_of(space, batching=plan.model.batching, cores=plan.cores) if settings.sampler == "grid" else None
    )
    study.sampler = sampler_for(
        settings.sampler, settings.search, seed=settings.seed, per_worker=joined, grid=grid
    )
    for number in recover_dead_local_trials(study):
        reporter.note(f"trial {number} was left running by a worker that died: it will be retried")
    return space


def _measure(
    study,
    plan: _Plan,
    space: SearchSpace,
    settings: StudySettings,
    reporter: Reporter,
    target: ServingTarget | None,
    *,
    created: bool,
) -> None:
    """Start the server (unless it runs already) and run trials until the study reaches its budget.

    Only the worker that created the study enqueues its starting points: two workers joining a new
    study at once would each enqueue them and measure them twice.
    """
    pin_worker(settings.cpus, settings.gpus)
    with serving(target) as server:
        server.check_model(plan.model.sha256)  # a recording answers for the model it recorded only
        runner = TrialRunner(
            server,
            plan.model,
            plan.samples,
            space,
            plan.model_name,
            settings,
            reporter,
            cores=plan.cores,
            int8_recipe=int8_recipe_of(study),
        )
        runner.check_memory_limit()
        # Before any trial loads a model, so the idle server leaves ONNX Runtime this machine's cores.
        profile_in_process(
            study,
            plan.model,
            space,
            plan.samples,
            plan.cores,
            same_machine=plan.same_machine,
            reporter=reporter,
        )
        runner.latency_budget_ms = _latency_budget(study, runner, settings, reporter)
        _record_study_attrs(study, plan, space, server, runner.latency_budget_ms, settings)
        if not study.get_trials(deepcopy=False):  # a crash between creating the study and enqueuing
            enqueue_baseline(study, baseline_params(plan.space))
        if created:
            _enqueue_starting_points(study, plan, space, settings.search, runner.latency_budget_ms)
        _run_trials(study, runner, settings, reporter)
        _confirm(study, runner, settings.search, reporter)  # the budget is in (or the space exhausted)
        cross_check_study_step(study, runner.remeasure_with, settings.confirm_with, reporter.note)


# --- set-up --------------------------------------------------------------------------------------------


def _intake(settings: StudySettings) -> tuple[ModelInfo, dict[str, tuple[int, ...]], list[dict]]:
    """The model, the request shapes, and the request samples (the user's data or synthetic)."""
    shapes = dict(settings.shapes)
    if settings.model_path is None:
        path = examples.example_model(cache_dir() / "examples")
        shapes = {**examples.EXAMPLE_SHAPES, **shapes}
    else:
        path = settings.model_path
    return load_requests(path, shapes, settings.input_data, cache=cache_dir())


def _model_name(model: ModelInfo) -> str:
    stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in model.source_path.stem)
    return stem.lstrip("_-.") or "model"


def _check_same_study(study, model: ModelInfo, settings: StudySettings) -> None:
    latency_budget_ms = settings.latency_budget_ms
    attrs = study.user_attrs
    if "model_sha256" in attrs and attrs["model_sha256"] != model.sha256:
        raise StudyError(
            f"study {study.study_name!r} was made for a different model (sha256 {attrs['model_sha256'][:12]}…, "
            f"this one {model.sha256[:12]}…): use another --study-name"
        )
    stored = attrs.get("latency_budget_ms")
    if stored is not None and latency_budget_ms is not None and not math.isclose(stored, latency_budget_ms):
        raise StudyError(
            f"study {study.study_name!r} uses a latency budget of {stored:g} ms, not {latency_budget_ms:g} ms: "
            "resume it with the same budget (or no --latency-budget-ms), or use another --study-name"
        )
    tolerance = attrs.get("accuracy_tolerance")
    if tolerance is not None and not math.isclose(tolerance, settings.accuracy_tolerance):
        raise StudyError(
            f"study {study.study_name!r} uses an accuracy tolerance of {tolerance:g}, not "
            f"{settings.accuracy_tolerance:g}: resume it with the same tolerance, or use another --study-name"
        )


def _latency_budget(study, runner: TrialRunner, settings: StudySettings, reporter: Reporter) -> float:
    stored = study.user_attrs.get("latency_budget_ms")
    if stored is not None:
        return float(stored)
    if settings.latency_budget_ms is not None:
        return settings.latency_budget_ms
    probes = runner.probe_baseline_p99s(BUDGET_PROBES)
    median = statistics.median(probes)
    budget = default_latency_budget_ms(probes)
    study.set_user_attr(
        "latency_budget_source",
        {
            "rule": f"{DEFAULT_BUDGET_FACTOR:g} x the median single-request p99 of the untuned config",
            "factor": DEFAULT_BUDGET_FACTOR,
            "probes_ms": [round(p99, 3) for p99 in probes],
            "median_ms": round(median, 3),
            "minimum_ms": MIN_DEFAULT_BUDGET_MS,
        },
    )
    reporter.note(
        f"latency budget: {budget:g} ms ({DEFAULT_BUDGET_FACTOR:g} x the median single-request p99 of the "
        f"untuned config, {median:.1f} ms over {len(probes)} probes ranging {min(probes):.1f}-{max(probes):.1f} ms; "
        "set --latency-budget-ms to choose)"
    )
    return budget


def _record_study_attrs(
    study, plan: _Plan, space: SearchSpace, server: ServingTarget, budget_ms: float, settings: StudySettings
) -> None:
    model = plan.model
    attrs = {
        "model_sha256": model.sha256,
        "model_path": str(model.source_path),
        "model_name": _model_name(model),
        "shapes": {name: list(dims) for name, dims in plan.shapes.items()},
        "latency_budget_ms": budget_ms,
        "space": space.to_dict(),
        "server_version": server.server_version(),
        "target": server.name,
        "hardware": server.hardware(),  # a replay: the recording's machine
        "budget": settings.budget,
        "concurrency_levels": list(settings.concurrency),
        "cpu_cores": plan.cores,  # what a space that does not oversubscribe derived its threads from
        "output_dir": str(plan.out_dir),  # where its exports and reports go (optimize confirm writes there)
    }
    for key, value in attrs.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


def _enqueue_starting_points(
    study, plan: _Plan, space: SearchSpace, search: SearchSettings, latency_budget_ms: float
) -> None:
    """In a new study: the warm-start study's best configs, the in-process profile's fastest point, then
    the fixed starting points (variants ordered fastest in process first).

    Done once the space is settled (a precision that failed its accuracy check is not in it), and only
    while the study holds nothing but its baseline, so a resumed study or a joining worker adds none.
    """
    if len(study.get_trials(deepcopy=False)) > 1:
        return
    batching = plan.model.batching
    warm = [
        fitted
        for params in plan.warm_start
        if (fitted := fit_params(space, params, batching=batching, cores=plan.cores))
    ]
    for params in warm:
        study.enqueue_trial(params, user_attrs={"warm_start": True}, skip_if_exists=True)
    profile = inprocess_points(study)
    fast = best_point(profile, latency_budget_ms) if search.start_from_profile else None
    if fast is not None and (point := profile_point(space, fast.precision, fast.batch)) is not None:
        study.enqueue_trial(point, user_attrs={"starting_point": "profile"}, skip_if_exists=True)
    fastest = fastest_first(profile, space.precisions)  # start where the model is fast
    for params in starting_points(space, search.starting_points, precision_order=fastest):
        study.enqueue_trial(params, user_attrs={"starting_point": True}, skip_if_exists=True)


def _warm_start_params(
    settings: StudySettings, model: ModelInfo, space: SearchSpace, out_dir: Path, cores: int
):
    """The parameters of the best configs of study ``settings.warm_start`` that this space can propose."""
    name = settings.warm_start
    assert name is not None
    url = settings.storage or default_storage_url(out_dir, name)
    if settings.storage is None and not (out_dir / f"{name}.db").is_file():
        raise StudyError(
            f"no study {name!r} to warm-start from in {out_dir}: give the name of a finished study"
        )
    storage = open_storage(url, create_dirs=False)
    try:
        prior = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(
            f"no study {name!r} to warm-start from in {url}: give the name of a finished study"
        ) from None
    finally:
        storage.engine.dispose()
    if prior.user_attrs.get("model_sha256") not in (None, model.sha256):
        raise StudyError(
            f"study {name!r} was made for a different model: warm-start only from a study of this model"
        )
    done = [t for t in prior.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    fitted = []
    for trial in sorted(done, key=lambda t: t.value or 0.0, reverse=True):
        params = fit_params(space, trial.params, batching=model.batching, cores=cores)
        if params is not None and params not in fitted:
            fitted.append(params)
    return tuple(fitted[: settings.search.warm_start_configs])


# --- the trials ----------------------------------------------------------------------------------------


WAIT_FOR_OTHERS_S = 2.0


def _run_trials(study, runner: TrialRunner, settings: StudySettings, reporter: Reporter) -> None:
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
            continue
        runner.progress = (done, budget)
        recover_dead_local_trials(
            study
        )  # a worker on this host died: retry its trial now, not after the grace period
        last = _run_one(study, runner)
        repeats = repeats + 1 if "same_config_as" in last.user_attrs else 0
        reporter.trial_finished(report_of(last), best_throughput(study))


def _run_one(study, runner: TrialRunner) -> FrozenTrial:
    """Run one trial and return it, as Optuna hands it to its callbacks.

    Not the study's highest-numbered trial: that can be a starting point still waiting in the queue,
    which the progress then reported as "failed: interrupted" while the trial that ran went unseen.
    """
    ran: list[FrozenTrial] = []
    study.optimize(runner, n_trials=1, catch=(TrialFailed,), callbacks=[lambda _, trial: ran.append(trial)])
    return ran[-1]


# --- confirmation ----------------------------------------------------------------------------------


def _unconfirmed(study, search: SearchSettings) -> bool:
    """Whether the study's finalists still need re-measuring (none yet, or new trials changed the top)."""
    finalists = finalists_of(study.get_trials(deepcopy=False), search.confirm_finalists)
    return len(finalists) >= 2 and stored_confirmation(study.user_attrs, finalists) is None


def _confirm(study, runner: TrialRunner, search: SearchSettings, reporter: Reporter) -> None:
    """Re-measure the best few configs side by side and record which one the study exports (confirm.py)."""
    finalists = finalists_of(study.get_trials(deepcopy=False), search.confirm_finalists)
    if len(finalists) < 2 or search.confirm_rounds < 1:
        return
    if stored_confirmation(study.user_attrs, finalists) is not None:
        reporter.note("the top configs were confirmed before and no new trial changed them")
        return
    numbers = ", ".join(f"#{t.number}" for t in finalists)
    # The baseline is measured in the same interleaved rounds: the speed-up's denominator is then a mean
    # over as many loads as its numerator, not one draw of a config whose fresh loads spread most.
    baseline = _feasible_baseline(study, finalists)
    measured = [*finalists, baseline] if baseline is not None else list(finalists)
    reporter.note(
        f"confirming the top {len(finalists)} ({numbers}){' and the baseline' if baseline else ''}: "
        f"{search.confirm_rounds} more measurements each, interleaved"
    )
    results = confirm(measured, runner.remeasure, search.confirm_rounds)
    confirmed, reference = results[: len(finalists)], results[len(finalists) :]
    chosen = choose(confirmed, runner.latency_budget_ms)
    record = {
        "finalists": [f.to_dict() for f in confirmed],
        "rounds": search.confirm_rounds,
        "chosen": chosen.trial if chosen is not None else None,
        "rule": "highest mean throughput whose median p99 is within the latency budget",
    }
    if reference:
        record["baseline_rounds"] = reference[0].to_dict()
    study.set_user_attr(CONFIRMATION, record)


def _feasible_baseline(study, finalists) -> FrozenTrial | None:
    """The baseline trial to re-measure beside the finalists (None: infeasible, or a finalist itself)."""
    numbers = {t.number for t in finalists}
    return next(
        (
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("baseline") and t.user_attrs.get("feasible") and t.number not in numbers
        ),
        None,
    )


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


def _summarise(study, plan: _Plan, budget: int) -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    reports = [
        report_of(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    ]
    baseline = next(
        (report_of(t) for t in trials if t.user_attrs.get("baseline") and t.state.is_finished()), None
    )
    best = best_trial(study)  # the confirmed finalist when the study confirmed its top configs
    best_dir = plan.out_dir / plan.study_name / "best"
    repository = export_trial(study, best, best_dir, plan.model) if best is not None else None
    return StudySummary(
        study_name=plan.study_name,
        storage_url=plan.storage_url,
        latency_budget_ms=float(study.user_attrs.get("latency_budget_ms", math.nan)),
        budget=budget,
        finished=count_finished(study),
        baseline=baseline,
        best=report_of(best) if best is not None else None,
        pruned=sum(r.state == "pruned" for r in reports),
        failed=sum(r.state == "failed" for r in reports),
        reasons=tuple(f"#{r.number} {r.state}: {r.reason}" for r in reports if r.state != "complete"),
        best_repository=repository,
        finalists=finalists(study),
        confirmed_baseline=confirmed_baseline(study),
        cross_check=stored_cross_check(study.user_attrs),
    )
