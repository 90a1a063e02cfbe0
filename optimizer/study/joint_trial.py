"""One trial of a joint study: the models it tunes and measures, the objective, and how configs are loaded.

A trial proposes every tuned model's config (a model of the file, or an ensemble's step), loads them and
the ensembles over them into one server, and sweeps the mixed load (:mod:`optimizer.measurement.mixed`)
until a model breaks its budget or the mix stops gaining. :mod:`optimizer.study.joint` runs the study
around it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna

from optimizer.config.render import render_ensemble, to_dict, to_json
from optimizer.config.space import Candidate, SearchSpace, suggest_candidate
from optimizer.errors import ConfigRejected, InferenceError, ServerDiedError
from optimizer.measurement.engines import make_mix_source
from optimizer.measurement.levels import MeasureSettings
from optimizer.measurement.mixed import MixLevel, shares_of
from optimizer.model.ensemble import Ensemble, ensemble_files
from optimizer.model.intake import ModelInfo
from optimizer.model.quantize import DEFAULT_INT8_RECIPE
from optimizer.model.variants import config_files
from optimizer.paths import cache_dir
from optimizer.serving.base import ServingTarget
from optimizer.serving.metrics import memory_figure
from optimizer.study.models_file import ModelEntry
from optimizer.study.storage import is_surplus, worker_id
from optimizer.study.trial_rules import (
    MemoryExhausted,
    TrialFailed,
    gpu_memory_returned,
    infeasible_for_memory,
    memory_exhausted,
    record_failure,
    refuse_unserved,
    render_trial_config,
    server_fault,
)

__all__ = [
    "JointObjective",
    "JointTrials",
    "Member",
    "Destination",
    "load_ensemble_config",
    "load_member",
    "sweep_stop",
]

PLATEAU = 1.05  # a level that does not beat the best so far by 5% ends the sweep


@dataclass(frozen=True)
class JointTrials:
    """How each trial is measured, and the study's budget of trials."""

    budget: int
    levels: tuple[int, ...]  # clients per model at each level (shared, in the traffic mix)
    measure: MeasureSettings


@dataclass(frozen=True)
class Member:
    """A model whose config the study tunes (a model of the file, or a step of an ensemble), settled:
    its file, requests, space (accurate variants only) and int8 recipe."""

    name: str
    info: ModelInfo
    samples: list
    space: SearchSpace
    int8_recipe: str = DEFAULT_INT8_RECIPE
    # (precision, provider) pairs its accuracy guard refused on that provider only: never served.
    refused: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Destination:
    """What the traffic goes to: a model of the file, or an ensemble (measured through it)."""

    entry: ModelEntry
    samples: list
    members: tuple[str, ...]  # the tuned models it runs on
    ensemble: Ensemble | None = None
    budget_ms: float = 0.0

    @property
    def name(self) -> str:
        return self.entry.name


class _Surplus(optuna.TrialPruned):
    """A proposal past the study's budget (another worker took the last trial): not measured, not counted."""


class JointObjective:
    """The objective of a joint study: one trial's configs loaded together, swept under the mixed load,
    scored by what the mix sustains within every budget (a trial past the study's budget is surplus)."""

    def __init__(
        self,
        server: ServingTarget,
        destinations: list[Destination],
        members: list[Member],
        trials: JointTrials,
        cores: int,
        note,
        gpus: tuple[int, ...] = (),
    ):
        self.server = server
        self.gpus = gpus  # the GPUs each config names (trial.config_gpus)
        self.destinations = destinations
        self.members = members
        self.trials = trials
        self.cores = cores
        self.note = note
        self.progress = (0, trials.budget)  # (finished trials, the study's budget), set by the trial loop
        self.shares = shares_of({t.name: t.entry.traffic for t in destinations})
        self.measure = make_mix_source(server, {t.name: t.samples for t in destinations}, trials.measure)
        # The GPU memory the server used before any model loaded (None: it shows none): each trial
        # checks the last trial's memory came back before it loads its own (gpu_memory_returned).
        self.idle_gpu_memory_mb: float | None = None
        self._loaded = False

    def __call__(self, trial) -> float:
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("host", socket.gethostname())
        if is_surplus(trial, self.trials.budget):
            trial.set_user_attr("surplus", True)
            raise _Surplus("the study's budget is taken by finished and running trials: not measured")
        candidates = self._candidates(trial)
        trial.set_user_attr("candidates", {name: c.summary() for name, c in candidates.items()})
        for member in self.members:
            refuse_unserved(trial, candidates[member.name], member.refused, f"{member.name}: ")
        if self._loaded and self.idle_gpu_memory_mb is not None:
            ensembles = [d.name for d in self.destinations if d.ensemble is not None]
            names = [*ensembles, *(m.name for m in self.members)]  # an ensemble before its steps
            gpu_memory_returned(self.server, names, self.idle_gpu_memory_mb, self.note)
        self._loaded = True
        configs = {}
        for member in self.members:
            configs[member.name] = self._load(
                trial, member.name, load_member, member, candidates[member.name], self.gpus
            )
        for destination in self.destinations:
            if destination.ensemble is not None:
                configs[destination.name] = self._load(
                    trial, destination.name, load_ensemble_config, destination, configs
                )
        trial.set_user_attr("configs", {name: to_dict(config) for name, config in configs.items()})
        started = time.perf_counter()
        levels = self._sweep(trial)
        trial.set_user_attr("trial_s", round(time.perf_counter() - started, 3))
        self._record_memory(trial)
        feasible = [level for level in levels if level.feasible]
        if not feasible:
            trial.set_user_attr("feasible", False)
            raise optuna.TrialPruned(trial.user_attrs["reason"])
        best = max(feasible, key=lambda level: level.mix_throughput)
        trial.set_user_attr("feasible", True)
        trial.set_user_attr("throughput", round(best.mix_throughput, 3))
        trial.set_user_attr("best_level", best.to_dict())
        self.note(
            f"trial {trial.number}: {best.mix_throughput:.1f} req/s in the mix ("
            + ", ".join(f"{n} {r.throughput:.1f}/s p99 {r.p99_ms:.1f} ms" for n, r in best.results.items())
            + f"); {trial.user_attrs['reason']}"
        )
        return round(best.mix_throughput, 3)

    def _record_memory(self, trial) -> None:
        """The server's memory with every model loaded, read after the sweep (resident pages stay after
        the load that touched them): the joint repository's memory fit in ``optimize plan``."""
        figure = memory_figure(self.server.resources())
        if figure is not None:
            trial.set_user_attr("memory_mb", round(figure[0], 3))
            trial.set_user_attr("memory_source", figure[1])

    def _candidates(self, trial) -> dict[str, Candidate]:
        """Every tuned model's candidate, each under the CPU guard of one model's space (see
        :mod:`optimizer.study.joint`)."""
        return {
            m.name: replace(
                suggest_candidate(
                    _PrefixedTrial(trial, f"{m.name}."), m.space, batching=m.info.batching, cores=self.cores
                ),
                int8_recipe=m.int8_recipe,
            )
            for m in self.members
        }

    def _load(self, trial, name: str, load, *args):
        """``load(self.server, *args)``; a refused config or a dead server fails the trial, not the study."""
        try:
            return load(self.server, *args)
        except ConfigRejected as exc:
            exhausted = memory_exhausted(self.server, f"loading {name}", exc, self.note)
            self._loaded = self._loaded and exhausted is None  # a restarted server holds no model
            if exhausted is not None:
                raise infeasible_for_memory(trial, exhausted) from exc
            raise self._fail(
                trial, TrialFailed(f"Triton rejected the config of {name}: {exc.message}")
            ) from exc
        except ServerDiedError as exc:
            self._loaded = False
            raise self._fail(
                trial, server_fault(self.server, f"while loading {name}", exc, self.note)
            ) from exc

    @staticmethod
    def _fail(trial, failure: TrialFailed | MemoryExhausted) -> Exception:
        """``failure`` recorded on the trial (its reason; a server fault is transient: retried on resume);
        a server killed at its memory limit makes the joint config infeasible instead."""
        if isinstance(failure, MemoryExhausted):
            return infeasible_for_memory(trial, failure)
        record_failure(trial, failure)
        return failure

    def _sweep(self, trial) -> list[MixLevel]:
        """Rising levels until a model breaks its budget or the mix stops gaining (PLATEAU)."""
        budgets = {t.name: t.budget_ms for t in self.destinations}
        levels: list[MixLevel] = []
        reason = "the sweep reached its top level"
        for per_model in self.trials.levels:
            try:
                level = self.measure(per_model * len(self.destinations), self.shares, budgets)
            except (InferenceError, ServerDiedError) as exc:
                self._loaded = False
                fault = server_fault(self.server, "under the mixed load", exc, self.note)
                raise self._fail(trial, fault) from exc
            except ConfigRejected as exc:  # a replayed failure: the recorded server refused the configs
                trial.set_user_attr("reason", exc.message)
                raise TrialFailed(trial.user_attrs["reason"]) from exc
            if level is None:  # a recording whose sweeps of this joint config all stopped earlier
                reason = "the recorded sweeps end here"
                break
            levels.append(level)
            stop = sweep_stop(levels, budgets)
            if stop is not None:
                reason = stop
                break
        trial.set_user_attr("levels", [level.to_dict() for level in levels])
        trial.set_user_attr(
            "reason", reason if any(lv.feasible for lv in levels) else f"infeasible: {reason}"
        )
        if levels and not levels[0].feasible:
            trial.set_user_attr("bound_by", list(levels[0].over_budget))
        elif levels and not levels[-1].feasible:
            trial.set_user_attr("bound_by", list(levels[-1].over_budget))
        return levels


def sweep_stop(levels: Sequence[MixLevel], budgets_ms: Mapping[str, float]) -> str | None:
    """Why a joint sweep ends at its last level, or None to go on: a model broke its budget, or the mix
    did not beat the best level so far by PLATEAU."""
    level = levels[-1]
    if not level.feasible:
        return "bound by the budget of " + ", ".join(
            f"{n} (p99 {level.results[n].p99_ms:.1f} ms > {budgets_ms[n]:g} ms)" for n in level.over_budget
        )
    earlier = [lv.mix_throughput for lv in levels[:-1] if lv.feasible]
    if earlier and level.mix_throughput < max(earlier) * PLATEAU:
        return "the mix stopped gaining (plateau)"
    return None


class _PrefixedTrial:
    """An Optuna trial whose parameter names carry the model's prefix (``encoder.max_batch_size_log2``)."""

    def __init__(self, trial, prefix: str) -> None:
        self._trial, self._prefix = trial, prefix

    def suggest_categorical(self, name: str, choices):
        return self._trial.suggest_categorical(self._prefix + name, choices)

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> int:
        return self._trial.suggest_int(self._prefix + name, low, high, log=log)


def load_member(server: ServingTarget, member: Member, candidate: Candidate, gpus: tuple[int, ...] = ()):
    config = render_trial_config(member.info, candidate, member.name, member.samples, gpus)
    server.load_model(member.name, to_json(config), config_files(member.info, config, cache_dir()))
    return config


def load_ensemble_config(server: ServingTarget, destination: Destination, configs: Mapping[str, Any]):
    """The ensemble's config over its steps' configs just loaded (``configs`` by step name)."""
    assert destination.ensemble is not None
    steps = {name: configs[name].max_batch_size for name in destination.members}
    config = render_ensemble(destination.name, destination.ensemble.config_text, steps)
    server.load_model(destination.name, to_json(config), ensemble_files(cache_dir()))
    return config
