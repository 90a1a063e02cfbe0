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
from dataclasses import replace
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from optimizer.config.space import Candidate, SearchSpace, baseline_params, load_space
from optimizer.errors import StudyError, UsageError
from optimizer.measurement.mixed import measure_mix, shares_of
from optimizer.model.accuracy import AccuracyGuard
from optimizer.model.ensemble import (
    ensemble_requests,
    load_ensemble,
)
from optimizer.model.intake import inspect_model, load_requests
from optimizer.paths import cache_dir, check_name, studies_dir
from optimizer.serving.base import ServingTarget
from optimizer.serving.environment import available_cores
from optimizer.study.checks import check_same_space, check_settings, space_distributions
from optimizer.study.driver import BUDGET_PROBES, DEFAULT_BUDGET_FACTOR, default_latency_budget_ms
from optimizer.study.joint_trial import (
    Destination,
    JointObjective,
    JointTrials,
    Member,
    load_ensemble_config,
    load_member,
)
from optimizer.study.models_file import ModelEntry
from optimizer.study.precisions import accurate_precisions, guard_refusals, int8_recipe_of
from optimizer.study.records import BUDGET_ATTR, joint_budgets
from optimizer.study.results import JointSummary, write_joint_repository
from optimizer.study.settings import StudySettings
from optimizer.study.storage import count_finished, default_storage_url
from optimizer.study.trial_rules import config_gpus

__all__ = ["JointSummary", "SeveralModels"]


class SeveralModels:
    """Several models' study (see the module docstring), settled before the database is touched."""

    def __init__(self, settings: StudySettings, target: ServingTarget | None) -> None:
        check_settings(settings)
        self.settings = settings
        self.note = lambda message: None  # the reporter's, once the driver hands it over
        space = settings.space if isinstance(settings.space, SearchSpace) else load_space(settings.space)
        self.destinations, self.members = _intake_all(settings.models, space)
        _check_target_serves(target, self.destinations)
        if target is not None:  # a recording refuses models and mixes it did not record, before any work
            for member in self.members:
                target.check_model(member.info.sha256)
            target.check_traffic(shares_of({d.name: d.entry.traffic for d in self.destinations}))
        names = "-".join(d.name for d in self.destinations)
        self.study_name = check_name(settings.study_name or "joint-" + names, "study name")
        self.out_dir = settings.output_dir or studies_dir()
        self.storage_url = settings.storage or default_storage_url(self.out_dir, self.study_name)
        # The cores the server's models share (a replay: the recording machine's).
        self.cores = len(settings.cpus) or (target.cpu_cores() if target is not None else available_cores())

    def baseline_params(self) -> dict[str, Any]:
        return {f"{m.name}.{k}": v for m in self.members for k, v in baseline_params(m.space).items()}

    def check_same_study(self, study) -> None:
        _check_same_study(study, self.records(), self.destinations)
        _check_same_space(study, self.members, self.cores, before_settling=True)  # before the accuracy checks

    def settle(self, study, reporter) -> None:
        self.note = reporter.note
        self.members = [_settle_variants(study, m, self.settings, reporter.note) for m in self.members]
        _check_same_space(study, self.members, self.cores)

    def grid(self) -> None:
        return None  # several models are sampled (checks.check_settings refuses --sampler grid)

    def work_after_budget(self, study) -> bool:
        return False

    def start(self, study, server: ServingTarget, reporter, *, created: bool) -> JointObjective:
        """The objective on ``server``, once every destination's budget is settled."""
        by_name = {m.name: m for m in self.members}
        self.destinations = [
            replace(d, budget_ms=_budget(study, d, by_name, server, self.settings, reporter.note))
            for d in self.destinations
        ]
        trials = JointTrials(self.settings.budget, self.settings.concurrency, self.settings.measure)
        gpus = config_gpus(self.settings.gpus, server)
        objective = JointObjective(
            server, self.destinations, self.members, trials, self.cores, reporter.note, gpus
        )
        objective.idle_gpu_memory_mb = server.resources().get("gpu_memory_used_mb")  # before any load
        return objective

    def records(self) -> dict[str, Any]:
        destinations, members = self.destinations, self.members
        models = {m.name: m.info.sha256 for m in members}
        models.update({d.name: d.ensemble.sha256 for d in destinations if d.ensemble is not None})
        return {
            "models": models,
            "model_paths": {m.name: str(m.info.source_path) for m in members},
            "traffic": {d.name: d.entry.traffic for d in destinations},
            "ensembles": {d.name: list(d.members) for d in destinations if d.ensemble is not None},
            "cpu_cores": self.cores,
            "output_dir": str(self.out_dir),
        }

    def trial_finished(self, study, trial, reporter) -> None:
        pass  # the objective notes each trial's figures as it ends

    def finish(self, study, objective, reporter) -> None:
        pass

    def summarise(self, study) -> JointSummary:
        return _summarise(study, self.destinations, self.members, self.storage_url, self.out_dir)


# --- settling the models -----------------------------------------------------------------------------


def _check_target_serves(target: ServingTarget | None, destinations: list[Destination]) -> None:
    """Refuse an ensemble on a server whose repository the steps cannot be placed in (before any work).

    Triton reads an ensemble's steps again from its model repository when it loads the ensemble; steps
    sent in the load request (a remote server's) are in none, and the load fails although it serves.
    """
    ensembles = [t.name for t in destinations if t.ensemble is not None]
    if ensembles and target is not None and not target.capabilities.shared_filesystem:
        raise UsageError(
            f"ensemble {ensembles[0]!r} needs its steps in the server's model repository, which the "
            f"{target.name} target cannot write to: tune it on the embedded or a local Triton"
        )


def _intake_all(
    entries: tuple[ModelEntry, ...], space: SearchSpace
) -> tuple[list[Destination], list[Member]]:
    """What the traffic goes to and the models the study tunes; every name on the server used once."""
    destinations: list[Destination] = []
    members: list[Member] = []
    for entry in entries:
        destination, tuned = _intake(entry, space)
        destinations.append(destination)
        members.extend(tuned)
    steps = [(t.name, step) for t in destinations if t.ensemble is not None for step in t.members]
    shared = next((s for s in steps if [step for _, step in steps].count(s[1]) > 1), None)
    if shared:
        raise UsageError(
            f"ensembles share the step {shared[1]!r}: optimize tunes each step as one model of one ensemble; "
            "give each ensemble its own copy of the step under another name"
        )
    names = [t.name for t in destinations if t.ensemble is not None] + [m.name for m in members]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice:
        raise UsageError(
            f"{twice!r} names two models on the server (models of the file, ensembles and their steps): "
            "each needs its own name"
        )
    return destinations, members


def _intake(entry: ModelEntry, space: SearchSpace) -> tuple[Destination, list[Member]]:
    if not entry.is_ensemble:
        info, _, samples = load_requests(entry.path, entry.shapes, entry.input_data, cache=cache_dir())
        return Destination(entry, samples, (entry.name,)), [Member(entry.name, info, samples, space)]
    ensemble = load_ensemble(entry.path)
    infos = {step.model_name: inspect_model(step.path, cache=cache_dir()) for step in ensemble.steps}
    requests, per_step = ensemble_requests(ensemble, infos, entry.shapes, entry.input_data)
    members = [Member(name, info, per_step[name], space) for name, info in infos.items()]
    return Destination(entry, requests, tuple(infos), ensemble), members


def _check_same_study(study, records: Mapping[str, Any], destinations: list[Destination]) -> None:
    """Refuse other models, another traffic mix or other budgets for a stored study, before any work."""
    models, traffic = records["models"], records["traffic"]
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
    if "traffic" in attrs and shares_of(attrs["traffic"]) != shares_of(traffic):
        mix = ", ".join(f"{name}={weight:g}" for name, weight in attrs["traffic"].items())
        raise StudyError(
            f"study {study.study_name!r} was run with the traffic mix {mix}: resume with the same mix, "
            "or give a new --study-name"
        )
    budgets = joint_budgets(attrs)
    for destination in destinations:
        given, kept = destination.entry.latency_budget_ms, budgets.get(destination.name)
        if given is not None and kept is not None and given != kept:
            raise StudyError(
                f"study {study.study_name!r} was run with a {kept:g} ms budget for {destination.name!r}: "
                "resume with the same budgets, or give a new --study-name"
            )


def _check_same_space(study, members: list[Member], cores: int, *, before_settling: bool = False) -> None:
    for m in members:
        prefixed = space_distributions(m.space, batching=m.info.batching, cores=cores, prefix=f"{m.name}.")
        check_same_space(study, prefixed, before_settling=before_settling)


def _settle_variants(study, member: Member, settings: StudySettings, note) -> Member:
    """The model's space without the variants that break accuracy (recorded per model, kept on resume)."""
    attr = f"variants:{member.name}"
    settled = accurate_precisions(
        study,
        member.info,
        member.space,
        AccuracyGuard(member.samples, settings.accuracy_tolerance, batching=member.info.batching),
        _Prefixed(note, member.name),
        attr=attr,
    )
    return replace(
        member, space=settled, int8_recipe=int8_recipe_of(study, attr), refused=guard_refusals(study, attr)
    )


class _Prefixed:
    """A reporter whose notes name the model they are about."""

    def __init__(self, note, name: str) -> None:
        self._note, self._name = note, name

    def note(self, message: str) -> None:
        self._note(f"{self._name}: {message}")


def _budget(
    study,
    destination: Destination,
    members: Mapping[str, Member],
    server: ServingTarget,
    settings: StudySettings,
    note,
) -> float:
    """The destination's p99 budget: the file's, or 10x the median single-request p99 of its untuned config."""
    budgets = joint_budgets(study.user_attrs)
    name = destination.name
    given = destination.entry.latency_budget_ms
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
        configs = {
            m: load_member(server, members[m], Candidate(max_batch_size=1)) for m in destination.members
        }
        if destination.ensemble is not None:
            load_ensemble_config(server, destination, configs)
        probe = replace(settings.measure, rule="fixed")
        probes = [
            measure_mix(
                server.grpc_url,
                {name: destination.samples},
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


def _summarise(
    study, destinations: list[Destination], members: list[Member], url: str, out_dir: Path
) -> JointSummary:
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
            "candidate": _destination_candidate(t, candidates),
        }
        for t in destinations
    }
    repository = export_joint(best, members, out_dir / study.study_name / "best")
    return replace(
        summary, per_model=per_model, bound_by=best.user_attrs.get("reason", ""), best_repository=repository
    )


def _destination_candidate(destination: Destination, candidates: Mapping[str, str]) -> str:
    """A destination's config in one line: its own, or each step's for an ensemble."""
    if destination.ensemble is None:
        return candidates[destination.name]
    return "; ".join(f"{step}: {candidates[step]}" for step in destination.members)


def export_joint(trial, members: list[Member], out_dir: Path) -> Path:
    """Write every model's (and ensemble's) config and files of ``trial`` into one repository ``out_dir``."""
    return write_joint_repository(trial.user_attrs["configs"], {m.name: m.info for m in members}, out_dir)
