"""Results read back from the study database: trial summaries, the best trial, exported repositories."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from optimizer.config.render import config_from_json, portable
from optimizer.config.repository import write_repository
from optimizer.errors import StudyError
from optimizer.model.ensemble import ensemble_files
from optimizer.model.intake import ModelInfo, inspect_model
from optimizer.model.metrics import figure_text
from optimizer.model.variants import config_files
from optimizer.paths import cache_dir
from optimizer.study.confirm import CONFIRMATION, Finalist
from optimizer.study.records import baseline_rounds, is_joint

__all__ = [
    "GpuFit",
    "JointSummary",
    "StudySummary",
    "TrialReport",
    "best_throughput",
    "best_trial",
    "export_trial",
    "finalists",
    "gpu_fit",
    "precision_lines",
    "report_of",
    "write_joint_repository",
]


@dataclass(frozen=True)
class TrialReport:
    """One finished trial, as shown to the user."""

    number: int
    state: str  # "complete", "pruned", "failed"
    summary: str
    throughput: float | None = None
    p99_ms: float | None = None
    concurrency: int | None = None
    reason: str | None = None
    request_rate: float | None = None  # open-loop studies: the rate the trial was best at
    load_s: float | None = None  # where the trial's time went: the reload, the measuring, in all
    measure_s: float | None = None
    trial_s: float | None = None
    screen_s: float | None = None  # of measure_s: the screening windows, and the full ones
    precise_s: float | None = None
    second_load_s: float | None = None  # a score near the best is measured again on a second load

    @property
    def timing(self) -> str:
        """``load 1.4 s + screen 2.0 s + precise 3.1 s + second load 3.5 s of 10.2 s``; empty for a trial that measured nothing."""
        if self.trial_s is None:
            return ""
        split = self.screen_s is not None or self.precise_s is not None
        measured = (
            (("screen", self.screen_s), ("precise", self.precise_s))
            if split
            else (("measure", self.measure_s),)
        )
        steps = (("load", self.load_s), *measured, ("second load", self.second_load_s))
        parts = [f"{name} {value:.1f} s" for name, value in steps if value]
        return f"{' + '.join(parts)} of {self.trial_s:.1f} s" if parts else f"{self.trial_s:.1f} s"

    @property
    def load(self) -> str:
        """Where the trial was best: ``concurrency 4`` or ``request rate 50/s``."""
        if self.request_rate is not None:
            return f"request rate {self.request_rate:g}/s"
        return f"concurrency {self.concurrency}"


@dataclass(frozen=True)
class GpuFit:
    """What the best config takes of the server's GPUs, and how many copies of it they hold."""

    used_mb: float  # the GPUs' memory in use under the best config's load
    idle_mb: float  # in use before the study loaded any model (other processes, the server itself)
    total_mb: float

    @property
    def per_copy_mb(self) -> float:
        return max(self.used_mb - self.idle_mb, 0.0)

    @property
    def copies(self) -> int | None:
        """Copies of the best config that fit beside what was already there (None: it took nothing)."""
        if self.per_copy_mb <= 0:
            return None
        return int((self.total_mb - self.idle_mb) // self.per_copy_mb)


def gpu_fit(study, best) -> GpuFit | None:
    """The best trial's GPU memory against the GPUs' size and what they held idle (None: no GPU figures)."""
    attrs = best.user_attrs if best is not None else {}
    idle = study.user_attrs.get("gpu_memory_idle_mb")
    if "gpu_memory_mb" not in attrs or not attrs.get("gpu_memory_total_mb") or idle is None:
        return None
    return GpuFit(attrs["gpu_memory_mb"], idle, attrs["gpu_memory_total_mb"])


def precision_lines(study, baseline_throughput: float | None) -> tuple[str, ...]:
    """Each precision the accuracy guard judged on the user's metrics, its speed beside its accuracy:
    ``int8: 1.71x the baseline, squad_f1 -0.4`` (none for a study without metrics)."""
    variants = study.user_attrs.get("variants") or {}
    if not study.user_attrs.get("accuracy") or not variants:
        return ()
    complete = _feasible_complete(study)
    lines = []
    for precision in ("fp32", *variants):
        record = variants.get(precision, {"ok": True})
        served = [t.value for t in complete if t.params.get("precision") == precision]
        if not record.get("ok"):
            speed = "refused by the accuracy guard"
        elif served and baseline_throughput:
            speed = f"{max(served) / baseline_throughput:.2f}x the baseline"
        else:
            speed = "no feasible trial"
        if precision == "fp32":  # the reference: its own scores
            deltas = ", ".join(
                f"{n} {v:.4g}" for n, v in study.user_attrs["accuracy"].get("fp32", {}).items()
            )
        else:
            deltas = ", ".join(
                f"{name} {figure_text(pair)}" for name, pair in (record.get("metrics") or {}).items()
            )
        lines.append(f"{precision}: {speed}" + (f", {deltas}" if deltas else ""))
    return tuple(lines)


@dataclass(frozen=True)
class StudySummary:
    study_name: str
    storage_url: str
    latency_budget_ms: float
    budget: int
    finished: int
    baseline: TrialReport | None
    best: TrialReport | None
    pruned: int
    failed: int
    reasons: tuple[str, ...]
    best_repository: Path | None
    finalists: tuple[Finalist, ...] = ()  # the top configs re-measured before export (see confirm.py)
    confirmed_baseline: Finalist | None = None  # the baseline, re-measured in the same rounds
    cross_check: dict[str, Any] | None = None  # the baseline and best measured by perf_analyzer too
    gpu_fit: GpuFit | None = None  # how many copies of the best config the GPUs hold (GPU servers only)
    precisions: tuple[str, ...] = ()  # each precision's speed and accuracy on the user's metrics

    @property
    def confirmed_best(self) -> Finalist | None:
        """The exported trial as the confirmation re-measured it (None when it was not confirmed)."""
        return next((f for f in self.finalists if self.best and f.trial == self.best.number), None)

    @property
    def speed_up_terms(self) -> tuple[float, float, str] | None:
        """The best and baseline throughputs the headline speed-up divides, and what they are: confirmed
        means when both were confirmed, else each trial's own measurement."""
        chosen, baseline = self.confirmed_best, self.confirmed_baseline
        if chosen is not None and baseline is not None and baseline.mean > 0:
            return chosen.mean, baseline.mean, "confirmed means"
        if self.baseline and self.best and self.baseline.throughput and self.best.throughput:
            return self.best.throughput, self.baseline.throughput, "single measurements"
        return None

    @property
    def speed_up(self) -> tuple[float, str] | None:
        """Best over baseline, and what it compares: confirmed means when both were confirmed."""
        if self.speed_up_terms is None:
            return None
        best, baseline, basis = self.speed_up_terms
        return best / baseline, basis

    @property
    def nothing_feasible(self) -> str | None:
        """What to do when no config met the latency budget (None: one did)."""
        if self.best is not None:
            return None
        return (
            f"no configuration met the {self.latency_budget_ms:g} ms latency budget in {self.finished} "
            "trials: raise --latency-budget-ms (with a new --study-name) or widen the space"
        )


@dataclass(frozen=True)
class JointSummary:
    """How a study of several models ended: the mix's throughput, baseline and best, per model."""

    study_name: str
    storage_url: str
    finished: int
    baseline_throughput: float | None  # requests/s in the mix, within every budget
    best_trial: int | None
    best_throughput: float | None
    per_model: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # at the best trial's level
    bound_by: str = ""  # why the best trial's sweep stopped: whose budget, or a plateau
    best_repository: Path | None = None

    @property
    def nothing_feasible(self) -> str | None:
        """What to do when no trial kept every model within its budget (None: one did)."""
        if self.best_trial is not None:
            return None
        return (
            f"no joint configuration kept every model within its budget in {self.finished} trials: "
            "raise the budgets (--latency-budget-ms, or the models file) with a new --study-name, or widen "
            "the space"
        )


def report_of(trial) -> TrialReport:
    state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(trial.state, "failed")
    attrs = trial.user_attrs
    return TrialReport(
        number=trial.number,
        state=state,
        summary=str(attrs.get("candidate", "")),
        throughput=attrs.get("throughput"),
        p99_ms=attrs.get("p99_ms"),
        concurrency=attrs.get("concurrency"),
        reason=attrs.get("reason") or (None if state == "complete" else "interrupted"),
        request_rate=attrs.get("request_rate"),
        load_s=attrs.get("load_s"),
        measure_s=attrs.get("measure_s"),
        screen_s=attrs.get("screen_s"),
        precise_s=attrs.get("precise_s"),
        second_load_s=(attrs.get("second_load") or {}).get("seconds"),
        trial_s=None if "same_config_as" in attrs else attrs.get("trial_s"),
    )


def _feasible_complete(study) -> list:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("feasible")
    ]


def best_throughput(study) -> float | None:
    trials = _feasible_complete(study)
    return max((t.value for t in trials), default=None)


def best_trial(study):
    """The trial the study exports: the confirmed finalist when the study confirmed its top configs, else
    the best feasible completed trial; None when no trial is feasible."""
    trials = _feasible_complete(study)
    chosen = (study.user_attrs.get(CONFIRMATION) or {}).get("chosen")
    confirmed = [t for t in trials if t.number == chosen]
    if confirmed:
        return confirmed[0]
    return max(trials, key=lambda t: t.value, default=None)


def finalists(study) -> tuple[Finalist, ...]:
    """The confirmation's finalists with all their measurements, best-ranked first (none if not confirmed)."""
    record = study.user_attrs.get(CONFIRMATION) or {}
    return tuple(Finalist.from_dict(f) for f in record.get("finalists", []))


def confirmed_baseline(study) -> Finalist | None:
    """The baseline as the confirmation re-measured it (with the finalists, or as one of them)."""
    record = study.user_attrs.get(CONFIRMATION) or {}
    rounds = baseline_rounds(record)
    if rounds is not None:
        return Finalist.from_dict(rounds)
    baseline = next(
        (t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")), None
    )
    return next((f for f in finalists(study) if f.trial == baseline), None)


def export_trial(study, trial, out_dir: Path, model: ModelInfo | None = None) -> Path:
    """Write ``trial``'s config and model file as a Triton model repository under ``out_dir``.

    Returns:
        The model's directory; for a joint study, the repository holding every model.
    """
    if is_joint(study.user_attrs):
        return write_joint_repository(trial.user_attrs["configs"], _stored_models(study), out_dir)
    if model is None:
        model = _stored_model(study)
    config = portable(config_from_json(trial.user_attrs["config"]))
    return write_repository(out_dir, config, config_files(model, config, cache_dir()))


def _stored_model(study) -> ModelInfo:
    path = study.user_attrs.get("model_path")
    if not path:
        raise StudyError(f"study {study.study_name!r} records no model: it has no trials to export")
    model = inspect_model(Path(path), cache=cache_dir())
    if model.sha256 != study.user_attrs.get("model_sha256"):
        raise StudyError(
            f"the model file {path!r} changed since study {study.study_name!r} ran: it cannot be exported"
        )
    return model


def _stored_models(study) -> dict[str, ModelInfo]:
    """A joint study's tuned models, each checked against the file it was tuned on."""
    if "model_paths" not in study.user_attrs:
        raise StudyError(
            f"study {study.study_name!r} does not record its models' files (made by an older optimize): "
            "rerun its optimize study command once to record them, then export"
        )
    models = {}
    for name, path in study.user_attrs["model_paths"].items():
        models[name] = inspect_model(Path(path), cache=cache_dir())
        if models[name].sha256 != study.user_attrs["models"].get(name):
            raise StudyError(
                f"the model file {path!r} of {name!r} changed since study {study.study_name!r} ran: "
                "it cannot be exported"
            )
    return models


def write_joint_repository(
    configs: Mapping[str, dict[str, Any]], models: Mapping[str, ModelInfo], out_dir: Path
) -> Path:
    """One repository with every model of a joint trial (``configs`` as stored) and its ensembles."""
    for name, stored in configs.items():
        config = portable(config_from_json(stored))
        if config.platform == "ensemble":
            files = ensemble_files(cache_dir())
        else:
            files = config_files(models[name], config, cache_dir())
        write_repository(out_dir, config, files)
    return out_dir
