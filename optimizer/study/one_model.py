"""One model's study: its workload for the driver (driver.py), from intake to the exported best config.

Read top to bottom as the pipeline: intake, space, the accuracy-checked variants, the in-process
profile, the latency budget, the starting points, the trials (trial.py), then the finalists confirmed
side by side (confirm.py) and, if asked, cross-checked by perf_analyzer (crosscheck.py). A bad trial (a
config Triton rejects, a crash, a timeout) is recorded on the trial with its reason and the study goes
on; bad input stops the run before any trial.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimizer.config.space import (
    SearchSpace,
    baseline_params,
    fit_params,
    grid_of,
    load_space,
    profile_point,
    starting_points,
)
from optimizer.errors import StudyError
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
    Reporter,
    default_latency_budget_ms,
)
from optimizer.study.precisions import (
    accuracy_guard,
    accurate_precisions,
    check_same_accuracy,
    guard_refusals,
    inprocess_points,
    int8_recipe_of,
    profile_in_process,
    record_accuracy,
)
from optimizer.study.records import is_joint
from optimizer.study.results import (
    StudySummary,
    best_throughput,
    best_trial,
    confirmed_baseline,
    export_trial,
    finalists,
    gpu_fit,
    precision_lines,
    report_of,
)
from optimizer.study.settings import SearchSettings, StudySettings
from optimizer.study.storage import count_finished, default_storage_url, open_storage
from optimizer.study.trial import TrialRunner

__all__ = ["OneModel"]


class OneModel:
    """One model's study (see the module docstring), settled before the database is touched."""

    def __init__(self, settings: StudySettings, target: ServingTarget | None) -> None:
        check_settings(settings)
        if target is not None:  # the default, a new embedded Triton, serves requests without TLS
            check_target(settings, target)
        self.settings = settings
        self.model, self.shapes, self.samples = _intake(settings)
        if target is not None:  # a recording answers for the model it recorded only
            target.check_model(self.model.sha256)
        self.space = settings.space if isinstance(settings.space, SearchSpace) else load_space(settings.space)
        # The accuracy guard, its metrics scored on fp32 now: a metric that cannot run is bad input.
        self.guard = accuracy_guard(settings, self.model, self.samples)
        self.fp32_scores = self.guard.fp32_scores(self.model.path) if self.guard.metrics else {}
        self.cores = _cores(settings, target)
        if settings.sampler == "grid":  # a space without a grid is refused before any work
            grid_of(self.space, batching=self.model.batching, cores=self.cores)
        check_providers(self.space.execution_providers)
        self.study_name = check_name(settings.study_name or self.model.source_path.stem, "study name")
        self.model_name = check_name(_model_name(self.model), "model name")
        self.out_dir = settings.output_dir or studies_dir()
        self.storage_url = settings.storage or default_storage_url(self.out_dir, self.study_name)
        # The int8 recipes the target can serve (a recording's; None: all), and whether the server runs
        # here, so the in-process profile measures its hardware.
        self.int8_recipes = target.int8_recipes() if target is not None else None
        self.same_machine = target is None or target.capabilities.same_machine
        self.warm_start = _warm_start_params(settings, self) if settings.warm_start else ()
        self.settled = self.space  # without the variants that break accuracy, once settle() ran
        self.latency_budget_ms = math.nan  # the study's, once start() settled it

    # --- before the server ------------------------------------------------------------------------------

    def baseline_params(self):
        return baseline_params(self.space)

    def check_same_study(self, study) -> None:
        _check_same_study(study, self.model, self.settings)
        check_same_accuracy(study, self.guard, self.fp32_scores)
        check_same_space(study, self._distributions(self.space), before_settling=True)

    def settle(self, study, reporter: Reporter) -> None:
        record_accuracy(study, self.guard, self.fp32_scores)  # first: what judges the variants
        self.settled = accurate_precisions(
            study, self.model, self.space, self.guard, reporter, self.int8_recipes
        )
        check_same_space(study, self._distributions(self.settled))

    def grid(self):
        if self.settings.sampler != "grid":
            return None
        return grid_of(self.settled, batching=self.model.batching, cores=self.cores)

    def work_after_budget(self, study) -> bool:
        return _unconfirmed(study, self.settings.search) or needs_cross_check(
            study.user_attrs, self.settings.confirm_with, best_trial(study)
        )

    def _distributions(self, space: SearchSpace):
        return space_distributions(space, batching=self.model.batching, cores=self.cores)

    # --- on the server ----------------------------------------------------------------------------------

    def start(self, study, server: ServingTarget, reporter: Reporter, *, created: bool) -> TrialRunner:
        """The trial runner on ``server``, once the profile, the latency budget and the study's records are in.

        Only the worker that created the study enqueues its starting points: two workers joining a new
        study at once would each enqueue them and measure them twice.
        """
        settings = self.settings
        runner = TrialRunner(
            server,
            self.model,
            self.samples,
            self.settled,
            self.model_name,
            settings,
            reporter,
            cores=self.cores,
            int8_recipe=int8_recipe_of(study),
            refused=guard_refusals(study),
        )
        idle = server.resources()  # before any model loads
        runner.check_memory_limit(idle)
        if "gpu_memory_used_mb" in idle and "gpu_memory_idle_mb" not in study.user_attrs:
            study.set_user_attr("gpu_memory_idle_mb", idle["gpu_memory_used_mb"])
        runner.idle_gpu_memory_mb = idle.get("gpu_memory_used_mb")
        # Before any trial loads a model, so the idle server leaves ONNX Runtime this machine's cores.
        profile_in_process(
            study,
            self.model,
            self.settled,
            self.samples,
            self.cores,
            same_machine=self.same_machine,
            reporter=reporter,
        )
        runner.latency_budget_ms = _latency_budget(study, runner, settings, reporter)
        self.latency_budget_ms = runner.latency_budget_ms
        if created:
            self._enqueue_starting_points(study, runner.latency_budget_ms)
        return runner

    def trial_finished(self, study, trial: FrozenTrial, reporter: Reporter) -> None:
        reporter.trial_finished(report_of(trial), best_throughput(study))

    def finish(self, study, objective, reporter: Reporter) -> None:
        _confirm(study, objective, self.settings.search, reporter)
        cross_check_study_step(study, objective.remeasure_with, self.settings.confirm_with, reporter.note)

    def records(self) -> dict[str, Any]:
        model = self.model
        return {
            "model_sha256": model.sha256,
            "model_path": str(model.source_path),
            "model_name": _model_name(model),
            "shapes": {name: list(dims) for name, dims in self.shapes.items()},
            "latency_budget_ms": self.latency_budget_ms,
            "space": self.settled.to_dict(),
            "concurrency_levels": list(self.settings.concurrency),
            "cpu_cores": self.cores,  # what a space that does not oversubscribe derived its threads from
            "output_dir": str(self.out_dir),  # its exports and reports go there (and cross-check's)
        }

    def _enqueue_starting_points(self, study, latency_budget_ms: float) -> None:
        """In a new study: the warm-start study's best configs, the in-process profile's fastest point, then
        the fixed starting points (variants ordered fastest in process first).

        Done once the space is settled (a precision that failed its accuracy check is not in it), and only
        while the study holds nothing but its baseline, so a resumed study or a joining worker adds none.
        """
        if len(study.get_trials(deepcopy=False)) > 1:
            return
        space, batching, search = self.settled, self.model.batching, self.settings.search
        warm = [
            fitted
            for params in self.warm_start
            if (fitted := fit_params(space, params, batching=batching, cores=self.cores))
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

    # --- the end ----------------------------------------------------------------------------------------

    def summarise(self, study) -> StudySummary:
        trials = study.get_trials(deepcopy=False)
        reports = [
            report_of(t)
            for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        ]
        baseline = next(
            (report_of(t) for t in trials if t.user_attrs.get("baseline") and t.state.is_finished()), None
        )
        best = best_trial(study)  # the confirmed finalist when the study confirmed its top configs
        best_dir = self.out_dir / self.study_name / "best"
        repository = export_trial(study, best, best_dir, self.model) if best is not None else None
        return StudySummary(
            study_name=self.study_name,
            storage_url=self.storage_url,
            latency_budget_ms=float(study.user_attrs.get("latency_budget_ms", math.nan)),
            budget=self.settings.budget,
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
            gpu_fit=gpu_fit(study, best),
            precisions=precision_lines(study, baseline.throughput if baseline else None),
        )


# --- set-up --------------------------------------------------------------------------------------------


def _intake(settings: StudySettings) -> tuple[ModelInfo, dict[str, tuple[int, ...]], list[dict]]:
    """The model, the request shapes, and the request samples (the user's data or synthetic)."""
    path = settings.model_path or examples.example_model(cache_dir() / "examples")
    # The bundled example, by default or named by its path, is sent the shapes the README promises.
    shapes = {**examples.example_shapes(path, cache_dir() / "examples"), **settings.shapes}
    return load_requests(path, shapes, settings.input_data, cache=cache_dir())


def _model_name(model: ModelInfo) -> str:
    stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in model.source_path.stem)
    return stem.lstrip("_-.") or "model"


def _cores(settings: StudySettings, target: ServingTarget | None) -> int:
    """The cores this worker's server may use: ``--cpus``, else the target's (a recording's, or ours)."""
    if settings.cpus:
        return len(settings.cpus)
    return target.cpu_cores() if target is not None else available_cores()


def _check_same_study(study, model: ModelInfo, settings: StudySettings) -> None:
    latency_budget_ms = settings.latency_budget_ms
    attrs = study.user_attrs
    if is_joint(attrs):
        raise StudyError(
            f"study {study.study_name!r} tunes several models together: give a new --study-name for one "
            "model's study"
        )
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
    product = median * DEFAULT_BUDGET_FACTOR
    rounding = (
        f"the minimum of {MIN_DEFAULT_BUDGET_MS:g} ms"
        if budget == MIN_DEFAULT_BUDGET_MS and product < MIN_DEFAULT_BUDGET_MS
        else f"{product:.4g} ms rounded up to a whole ms"
    )
    reporter.note(
        f"latency budget: {budget:g} ms ({DEFAULT_BUDGET_FACTOR:g} x the median single-request p99 of the "
        f"untuned config, {median:.4g} ms over {len(probes)} probes ranging {min(probes):.4g}-{max(probes):.4g} "
        f"ms: {rounding}; set --latency-budget-ms to choose)"
    )
    return budget


def _warm_start_params(settings: StudySettings, study: OneModel):
    """The parameters of the best configs of study ``settings.warm_start`` that this space can propose."""
    model, space, out_dir, cores = study.model, study.space, study.out_dir, study.cores
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
