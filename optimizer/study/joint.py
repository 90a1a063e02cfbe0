"""Several models tuned together on one server: one study whose trial is a joint config.

Tuning each model alone on an empty machine overstates what it gets when it shares the cores with the
others. Here a trial proposes every model's config at once (variant, max batch, preferred sizes, queue
delay, instances; parameters named ``<model>.<param>``), loads them all into one server, and measures them
under a mixed load in the models file's traffic mix (:mod:`optimizer.measurement.mixed`). Its score is
the requests a second the server sustains in the mix with every model within its own p99 budget; a level
where any model breaks its budget is infeasible, and the trial records which model's budget bound it.

An ensemble of ONNX models is tuned as its steps: each step is a tuned model of the trial (its own
variant, batching and instances), the ensemble's own config follows them (its max batch size lowered to
what every step accepts), and the traffic goes to the ensemble, so its figures are end to end.

The CPU guard of one model's space holds for each model: its instances at most the cores, each with
cores / (its instances) threads, so no model alone oversubscribes the machine, and the models share the
cores as their load asks. Partitioning the cores between the models instead (all instances together at
most the cores, cores / all instances threads each) left a slow model one core while the fast one's
instance idled: 0.66x the separately tuned pair in bench/joint.py. The untuned baseline is every model's
untuned config (one instance, ONNX Runtime's default threads), as a user would deploy them side by side.

Run by ``optimize study --models FILE``; the best trial is exported as one repository holding every
model (``studies/<study>/best/``), which ``optimize serve`` and the deployment manifests take as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from optimizer.config.space import Candidate, SearchSpace, baseline_params, load_space
from optimizer.errors import StudyError, UsageError
from optimizer.measurement.levels import MeasureSettings
from optimizer.measurement.mixed import measure_mix, shares_of
from optimizer.model.accuracy import DEFAULT_TOLERANCE
from optimizer.model.ensemble import (
    ensemble_requests,
    load_ensemble,
)
from optimizer.model.intake import inspect_model, load_requests
from optimizer.paths import cache_dir, check_name, studies_dir
from optimizer.serving.base import ServingTarget
from optimizer.serving.environment import available_cores
from optimizer.study.checks import check_same_space, space_distributions
from optimizer.study.driver import (
    BUDGET_PROBES,
    DEFAULT_BUDGET_FACTOR,
    default_latency_budget_ms,
    enqueue_baseline,
    open_study,
    pin_worker,
    sampler_for,
    serving,
    study_storage,
)
from optimizer.study.joint_trial import (
    JointObjective,
    JointTrials,
    Member,
    Target,
    load_ensemble_config,
    load_member,
)
from optimizer.study.mix import ModelEntry
from optimizer.study.precisions import accurate_precisions, int8_recipe_of
from optimizer.study.results import BUDGET_ATTR, joint_budgets, write_joint_repository
from optimizer.study.settings import SearchSettings
from optimizer.study.storage import (
    count_finished,
    count_running,
    default_storage_url,
    recover_dead_local_trials,
    register_worker,
)
from optimizer.study.trial import TrialFailed

__all__ = ["JointSettings", "JointSummary", "run_joint_study"]

# One fixed window for every model at once, extended (up to max_window_s) until each model has min_requests:
# a model with a small share of the traffic needs longer to show its p99.
JOINT_MEASURE = MeasureSettings(warmup_s=1.0, window_s=3.0, max_window_s=9.0, min_requests=20, rule="fixed")
MAX_DRAWS_PER_TRIAL = 5  # surplus proposals (not measured, not counted) at most this many per trial


@dataclass(frozen=True)
class JointSettings:
    """What ``optimize study --models FILE`` was asked to do."""

    models: tuple[ModelEntry, ...]
    budget: int = 20
    space: str | SearchSpace = "cpu"
    study_name: str | None = None  # default: joint-<model names>
    storage: str | None = None
    output_dir: Path | None = None  # default: studies/
    seed: int | None = None
    measure: MeasureSettings = JOINT_MEASURE
    levels: tuple[int, ...] = (1, 2, 4, 8)  # clients per model at each level (shared, in the traffic mix)
    accuracy_tolerance: float = DEFAULT_TOLERANCE
    search: SearchSettings = SearchSettings()  # the sampler's settings, as for one model
    # Several workers on one study (a shared storage): as for one model, a second live worker on this
    # host is refused unless the workers are pinned to disjoint CPU sets or allow_shared_host is set.
    allow_shared_host: bool = False
    cpus: frozenset[int] = frozenset()
    gpus: str | None = None


@dataclass(frozen=True)
class JointSummary:
    study_name: str
    storage_url: str
    finished: int
    baseline_throughput: float | None  # requests/s in the mix, within every budget
    best_trial: int | None
    best_throughput: float | None
    per_model: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # at the best trial's level
    bound_by: str = ""  # why the best trial's sweep stopped: whose budget, or a plateau
    repository: Path | None = None


def run_joint_study(
    settings: JointSettings, reporter=None, *, target: ServingTarget | None = None
) -> JointSummary:
    """Run (or resume) a joint study to its budget and export the best joint config."""
    note = reporter.note if reporter is not None else (lambda message: None)
    space = settings.space if isinstance(settings.space, SearchSpace) else load_space(settings.space)
    targets, members = _intake_all(settings.models, space)
    _check_target_serves(target, targets)
    if target is not None:  # a recording refuses models it does not hold, before any work
        for member in members:
            target.check_model(member.info.sha256)
    study_name = check_name(settings.study_name or "joint-" + "-".join(t.name for t in targets), "study name")
    out_dir = settings.output_dir or studies_dir()
    url = settings.storage or default_storage_url(out_dir, study_name)
    with study_storage(url) as storage:
        study, created = open_study(storage, study_name, settings.search)
        if created:  # first thing, so workers joining a moment later find it and do not enqueue another
            enqueue_baseline(study, _baseline_params(members))
        _check_same_study(study, targets, members)
        joined = register_worker(study, settings)
        study.sampler = sampler_for("tpe", settings.search, seed=settings.seed, per_worker=joined)
        for number in recover_dead_local_trials(study):
            note(f"trial {number} was left running by a worker that died: it will be retried")
        # The cores the server's models share (a replay: the recording machine's).
        cores = len(settings.cpus) or (target.cpu_cores() if target is not None else available_cores())
        _check_same_space(study, members, cores, before_settling=True)  # before the accuracy checks' work
        members = [_settle_variants(study, m, settings, note) for m in members]
        _check_same_space(study, members, cores)
        pin_worker(settings.cpus, settings.gpus)
        with serving(target) as server:
            targets = _run_trials(study, server, targets, members, settings, cores, note)
        return _summarise(study, targets, members, url, out_dir)


def _run_trials(
    study,
    server: ServingTarget,
    targets: list[Target],
    members: list[Member],
    settings: JointSettings,
    cores: int,
    note,
) -> list[Target]:
    """Settle each target's budget on the running server, then run trials to the study's budget."""
    for key, value in (("server_version", server.server_version()), ("hardware", server.hardware())):
        if key not in study.user_attrs:  # a replay: the recording's server and machine
            study.set_user_attr(key, value)
    by_name = {m.name: m for m in members}
    targets = [replace(t, budget_ms=_budget(study, t, by_name, server, settings, note)) for t in targets]
    if not study.get_trials(deepcopy=False):  # a crash between creating the study and enqueuing
        enqueue_baseline(study, _baseline_params(members))
    trials = JointTrials(settings.budget, settings.levels, settings.measure)
    objective = JointObjective(server, targets, members, trials, cores, note)
    draws = 0
    # Other workers' running trials count too: they will finish, and the budget is the study's.
    while count_finished(study) + count_running(study) < settings.budget:
        if draws >= settings.budget * MAX_DRAWS_PER_TRIAL:
            break
        study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        draws += 1
    return targets


# --- settling the models -----------------------------------------------------------------------------


def _check_target_serves(target: ServingTarget | None, targets: list[Target]) -> None:
    """Refuse an ensemble on a server whose repository the steps cannot be placed in (before any work).

    Triton reads an ensemble's steps again from its model repository when it loads the ensemble; steps
    sent in the load request (a remote server's) are in none, and the load fails although it serves.
    """
    ensembles = [t.name for t in targets if t.ensemble is not None]
    if ensembles and target is not None and not target.capabilities.shared_filesystem:
        raise UsageError(
            f"ensemble {ensembles[0]!r} needs its steps in the server's model repository, which the "
            f"{target.name} target cannot write to: tune it on the embedded or a local Triton"
        )


def _intake_all(entries: tuple[ModelEntry, ...], space: SearchSpace) -> tuple[list[Target], list[Member]]:
    """What the traffic goes to and the models the study tunes; every name on the server used once."""
    targets: list[Target] = []
    members: list[Member] = []
    for entry in entries:
        target, tuned = _intake(entry, space)
        targets.append(target)
        members.extend(tuned)
    steps = [(t.name, step) for t in targets if t.ensemble is not None for step in t.members]
    shared = next((s for s in steps if [step for _, step in steps].count(s[1]) > 1), None)
    if shared:
        raise UsageError(
            f"ensembles share the step {shared[1]!r}: optimize tunes each step as one model of one ensemble; "
            "give each ensemble its own copy of the step under another name"
        )
    names = [t.name for t in targets if t.ensemble is not None] + [m.name for m in members]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice:
        raise UsageError(
            f"{twice!r} names two models on the server (models of the file, ensembles and their steps): "
            "each needs its own name"
        )
    return targets, members


def _intake(entry: ModelEntry, space: SearchSpace) -> tuple[Target, list[Member]]:
    if not entry.is_ensemble:
        info, _, samples = load_requests(entry.path, entry.shapes, entry.input_data, cache=cache_dir())
        return Target(entry, samples, (entry.name,)), [Member(entry.name, info, samples, space)]
    ensemble = load_ensemble(entry.path)
    infos = {step.model_name: inspect_model(step.path, cache=cache_dir()) for step in ensemble.steps}
    requests, per_step = ensemble_requests(ensemble, infos, entry.shapes, entry.input_data)
    members = [Member(name, info, per_step[name], space) for name, info in infos.items()]
    return Target(entry, requests, tuple(infos), ensemble), members


def _check_same_study(study, targets: list[Target], members: list[Member]) -> None:
    """Refuse other models, another traffic mix or other budgets for a stored study, before any work."""
    models = {m.name: m.info.sha256 for m in members}
    models.update({t.name: t.ensemble.sha256 for t in targets if t.ensemble is not None})
    attrs = study.user_attrs
    stored = attrs.get("models")
    if "model_sha256" in attrs:
        raise StudyError(
            f"study {study.study_name!r} tunes one model: give a new --study-name for the joint study"
        )
    if stored is not None and stored != models:
        raise StudyError(
            f"study {study.study_name!r} was made for other models ({', '.join(sorted(stored))}): "
            "give a new --study-name, or the same models file"
        )
    traffic = {t.name: t.entry.traffic for t in targets}
    if "traffic" in attrs and shares_of(attrs["traffic"]) != shares_of(traffic):
        mix = ", ".join(f"{name}={weight:g}" for name, weight in attrs["traffic"].items())
        raise StudyError(
            f"study {study.study_name!r} was run with the traffic mix {mix}: resume with the same mix, "
            "or give a new --study-name"
        )
    budgets = joint_budgets(attrs)
    for target in targets:
        given, kept = target.entry.latency_budget_ms, budgets.get(target.name)
        if given is not None and kept is not None and given != kept:
            raise StudyError(
                f"study {study.study_name!r} was run with a {kept:g} ms budget for {target.name!r}: "
                "resume with the same budgets, or give a new --study-name"
            )
    # Every record a joint study keeps (a study of an older version lacks the later ones: added on resume).
    records = {
        "models": models,
        "model_paths": {m.name: str(m.info.source_path) for m in members},
        "traffic": traffic,
        "ensembles": {t.name: list(t.members) for t in targets if t.ensemble is not None},
    }
    for key, value in records.items():
        if key not in attrs:
            study.set_user_attr(key, value)


def _check_same_space(study, members: list[Member], cores: int, *, before_settling: bool = False) -> None:
    for m in members:
        prefixed = space_distributions(m.space, batching=m.info.batching, cores=cores, prefix=f"{m.name}.")
        check_same_space(study, prefixed, before_settling=before_settling)


def _settle_variants(study, member: Member, settings: JointSettings, note) -> Member:
    """The model's space without the variants that break accuracy (recorded per model, kept on resume)."""
    attr = f"variants:{member.name}"
    settled = accurate_precisions(
        study,
        member.info,
        member.space,
        member.samples,
        settings.accuracy_tolerance,
        _Prefixed(note, member.name),
        attr=attr,
    )
    return replace(member, space=settled, int8_recipe=int8_recipe_of(study, attr))


class _Prefixed:
    """A reporter whose notes name the model they are about."""

    def __init__(self, note, name: str) -> None:
        self._note, self._name = note, name

    def note(self, message: str) -> None:
        self._note(f"{self._name}: {message}")


def _budget(
    study,
    target: Target,
    members: Mapping[str, Member],
    server: ServingTarget,
    settings: JointSettings,
    note,
) -> float:
    """The target's p99 budget: the file's, or 10x the median single-request p99 of its untuned config."""
    budgets = joint_budgets(study.user_attrs)
    name = target.name
    given = target.entry.latency_budget_ms
    if name in budgets:
        if given is not None and given != budgets[name]:
            raise StudyError(
                f"study {study.study_name!r} was run with a {budgets[name]:g} ms budget for {name!r}: "
                "resume with the same budgets, or give a new --study-name"
            )
        return float(budgets[name])
    if given is None and not server.capabilities.serves_requests:
        raise UsageError(
            f"{name!r} has no latency budget and a recording cannot probe one: give --latency-budget-ms"
        )
    if given is None:
        configs = {m: load_member(server, members[m], Candidate(max_batch_size=1)) for m in target.members}
        if target.ensemble is not None:
            load_ensemble_config(server, target, configs)
        probe = replace(settings.measure, rule="fixed")
        probes = [
            measure_mix(
                server.grpc_url,
                {name: target.samples},
                1,
                {name: 1.0},
                {name: float("inf")},
                probe,
                client_options=server.client_options(),
                headers=server.request_headers(),
            )
            .results[name]
            .p99_ms
            for _ in range(BUDGET_PROBES)
        ]
        given = default_latency_budget_ms(probes)
        budgets = joint_budgets(study.user_attrs)
        if name in budgets:  # another worker probed it first: every worker keeps one budget
            return budgets[name]
        note(
            f"{name}: latency budget {given:g} ms ({DEFAULT_BUDGET_FACTOR:g} x its median single-request p99)"
        )
    study.set_user_attr(BUDGET_ATTR + name, given)
    return given


def _baseline_params(members: list[Member]) -> dict[str, Any]:
    return {f"{m.name}.{key}": value for m in members for key, value in baseline_params(m.space).items()}


# --- the end -------------------------------------------------------------------------------------------


def _summarise(study, targets: list[Target], members: list[Member], url: str, out_dir: Path) -> JointSummary:
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("feasible")
    ]
    baseline = next((t for t in done if t.user_attrs.get("baseline")), None)
    best = max(done, key=lambda t: t.value or 0.0, default=None)
    summary = JointSummary(
        study_name=study.study_name,
        storage_url=url,
        finished=count_finished(study),
        baseline_throughput=baseline.value if baseline else None,
        best_trial=best.number if best else None,
        best_throughput=best.value if best else None,
    )
    if best is None:
        return summary
    level = best.user_attrs["best_level"]
    budgets = joint_budgets(study.user_attrs)
    candidates = best.user_attrs["candidates"]
    per_model = {
        t.name: {
            **level["models"][t.name],
            "budget_ms": budgets.get(t.name),
            "candidate": _target_candidate(t, candidates),
        }
        for t in targets
    }
    repository = export_joint(best, members, out_dir / study.study_name / "best")
    return replace(
        summary, per_model=per_model, bound_by=best.user_attrs.get("reason", ""), repository=repository
    )


def _target_candidate(target: Target, candidates: Mapping[str, str]) -> str:
    """A target's config in one line: its own, or each step's for an ensemble."""
    if target.ensemble is None:
        return candidates[target.name]
    return "; ".join(f"{step}: {candidates[step]}" for step in target.members)


def export_joint(trial, members: list[Member], out_dir: Path) -> Path:
    """Write every model's (and ensemble's) config and files of ``trial`` into one repository ``out_dir``."""
    return write_joint_repository(trial.user_attrs["configs"], {m.name: m.info for m in members}, out_dir)
