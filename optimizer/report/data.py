"""The report's data: pure functions from a study (read from its database alone) to small records.

Each figure of the report has its own record (``CurvesData``, ``ScatterData``, ``HistoryData``,
``ImportanceData``), built here and rendered by :mod:`optimizer.report.html`, so every number is tested
without drawing anything. Only attributes stored in the study database are read: trial user attributes
(``config``, ``throughput``, ``p99_ms``, ``sweep``, ``feasible``, ``reason``, ...) and study user
attributes (``model_name``, ``latency_budget_ms``, ``hardware``, optional ``variants``, ...).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from optimizer.config.render import config_from_json, to_pbtxt
from optimizer.model.metrics import figure_text
from optimizer.model.variants import precision_of_file
from optimizer.output.plan import REFERENCE_RPS, Plan, make_plan
from optimizer.paths import studies_dir
from optimizer.report.pipeline import PipelineData, study_pipeline_data
from optimizer.study.confirm import CONFIRMATION, Finalist
from optimizer.study.crosscheck import CrossCheckRow, cross_check_rows, stored_cross_check
from optimizer.study.results import confirmed_baseline

__all__ = [
    "Curve",
    "CurvesData",
    "FailureRow",
    "Headline",
    "HistoryData",
    "ImportanceData",
    "Level",
    "PrecisionRow",
    "ReportData",
    "ScatterData",
    "ScatterPoint",
    "StudyInfo",
    "TrialRecord",
    "build_report_data",
    "changes_only_runtime",
    "curves_data",
    "failure_rows",
    "headline",
    "history_data",
    "importance_data",
    "pareto_front",
    "precision_of",
    "precision_rows",
    "provider_of",
    "scatter_data",
    "study_info",
    "top_trials",
    "trial_records",
]

TOP_N = 10
# PED-ANOVA compares the top trials with the rest: below this many completed trials it says nothing.
MIN_IMPORTANCE_TRIALS = 4
ORT_TUNED = "ONNX Runtime tuned"


# --- records -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One concurrency level of a trial's sweep."""

    concurrency: int
    throughput: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the report shows it.

    ``status`` is ``feasible`` (completed within the latency budget), ``infeasible`` (no level met the
    budget), ``pruned`` (stopped behind earlier trials), ``failed``, ``running`` or ``waiting``.
    """

    number: int
    state: str
    status: str
    baseline: bool
    candidate: str
    precision: str
    provider: str
    throughput: float | None
    p99_ms: float | None
    p50_ms: float | None
    concurrency: int | None
    reason: str | None
    sweep: tuple[Level, ...]
    config: Mapping[str, Any]
    load_s: float | None
    trial_s: float | None
    server_log: str = ""  # the server's log tail, kept when the server crashed or hung in the trial

    @property
    def finished(self) -> bool:
        return self.status not in ("running", "waiting")


@dataclass(frozen=True)
class StudyInfo:
    name: str
    model_name: str
    model_sha256: str
    latency_budget_ms: float | None
    server_version: str
    target: str
    hardware: tuple[tuple[str, str], ...]
    space: tuple[tuple[str, str], ...]
    counts: tuple[tuple[str, int], ...]  # status -> number of trials, in a fixed order


@dataclass(frozen=True)
class Headline:
    baseline: TrialRecord | None
    best: TrialRecord | None
    ratio: float | None  # best / baseline throughput
    best_config: str  # config.pbtxt of the best trial, "" without one
    repository: str  # where the best trial's model repository is exported
    ratio_basis: str = "single measurements"  # or "confirmed means" (both re-measured, interleaved)
    # With confirmed means: the baseline's and the best's, each over as many fresh loads (the ratio's terms).
    baseline_confirmed: Finalist | None = None
    best_confirmed: Finalist | None = None


@dataclass(frozen=True)
class Curve:
    label: str
    trial: int
    candidate: str
    levels: tuple[Level, ...]


@dataclass(frozen=True)
class CurvesData:
    curves: tuple[Curve, ...]
    latency_budget_ms: float | None
    missing: tuple[str, ...]  # labels that have no trial, with why


@dataclass(frozen=True)
class ScatterPoint:
    trial: int
    throughput: float
    p99_ms: float
    status: str
    candidate: str


@dataclass(frozen=True)
class ScatterData:
    points: tuple[ScatterPoint, ...]
    pareto: tuple[int, ...]  # trial numbers on the front, by ascending p99
    latency_budget_ms: float | None
    unmeasured: tuple[int, ...]  # finished trials with no measurement (e.g. failed to load)


@dataclass(frozen=True)
class HistoryData:
    trials: tuple[int, ...]
    statuses: tuple[str, ...]
    values: tuple[float | None, ...]  # throughput of feasible trials, None otherwise
    best_so_far: tuple[float | None, ...]


@dataclass(frozen=True)
class ImportanceData:
    params: tuple[str, ...]  # most important first
    importances: tuple[float, ...]
    note: str  # why there are none, or how to read them


@dataclass(frozen=True)
class PrecisionRow:
    precision: str
    trials: int
    best_trial: int | None
    best_throughput: float | None
    p99_ms: float | None
    accuracy: tuple[tuple[str, str], ...]
    accuracy_ok: bool | None  # None: no accuracy figures recorded
    accuracy_note: str  # the accuracy check's own verdict, "" without one


@dataclass(frozen=True)
class FailureRow:
    trial: int
    status: str
    candidate: str
    reason: str
    server_log: str = ""  # the server's log tail when it crashed or hung during the trial


@dataclass(frozen=True)
class ReportData:
    info: StudyInfo
    headline: Headline
    trials: tuple[TrialRecord, ...]
    curves: CurvesData
    scatter: ScatterData
    history: HistoryData
    importances: ImportanceData
    top: tuple[TrialRecord, ...]
    precisions: tuple[PrecisionRow, ...]
    failures: tuple[FailureRow, ...]
    finalists: tuple[Finalist, ...] = ()  # the top configs re-measured before export, when confirmed
    confirmed_baseline: Finalist | None = None  # the baseline, re-measured in the same rounds
    chosen: int | None = None  # the confirmed finalist (the exported trial)
    cross_check: tuple[CrossCheckRow, ...] = ()  # the baseline and best measured by perf_analyzer too
    cross_check_engine: str | None = None
    pipeline: PipelineData | None = None  # as given / ONNX Runtime tuned in process / Triton as given / tuned
    plan: Plan | None = None  # the servers a reference traffic needs (optimize plan sizes for the user's)


# --- the whole report ----------------------------------------------------------------------------------


def build_report_data(study: Any, *, repository: Path | None = None) -> ReportData:
    """Turn a study into the records of its report.

    Args:
        study: An ``optuna.Study`` written by ``optimize study`` (any state, even without trials).
        repository: Where the best trial's model repository was exported; default
            ``studies/<study>/best/<model>``.

    Returns:
        The report's records; figures without data hold empty tuples.
    """
    trials = trial_records(study.get_trials(deepcopy=False))
    attrs = dict(study.user_attrs)
    budget = _float_or_none(attrs.get("latency_budget_ms"))
    info = study_info(study.study_name, attrs, trials)
    if repository is None:
        repository = studies_dir() / study.study_name / "best" / info.model_name
    confirmation = attrs.get(CONFIRMATION) or {}
    chosen = confirmation.get("chosen")
    finalists = tuple(Finalist.from_dict(f) for f in confirmation.get("finalists", []))
    baseline = confirmed_baseline(study)
    checked = stored_cross_check(attrs)
    head = _confirmed(headline(trials, str(repository), chosen=chosen), finalists, baseline)
    return ReportData(
        info=info,
        headline=head,
        trials=trials,
        curves=curves_data(trials, budget, chosen=chosen),
        scatter=scatter_data(trials, budget),
        history=history_data(trials),
        importances=importance_data(study),
        top=top_trials(trials),
        precisions=precision_rows(trials, attrs.get("variants"), _space_precisions(attrs)),
        failures=failure_rows(trials),
        finalists=finalists,
        chosen=chosen,
        confirmed_baseline=baseline,
        cross_check=tuple(cross_check_rows(checked)) if checked else (),
        cross_check_engine=checked["engine"] if checked else None,
        pipeline=study_pipeline_data(attrs, *_served(head, finalists, baseline)),
        plan=_reference_plan(study),
    )


def _reference_plan(study: Any) -> Plan | None:
    """The plan for the reference traffic, of the exported trial (None: nothing feasible to plan from)."""
    from optimizer.errors import StudyError, UsageError

    try:
        return make_plan(study, REFERENCE_RPS)
    except (StudyError, UsageError):
        return None


def _served(
    head: Headline, finalists: Sequence[Finalist], baseline: Finalist | None
) -> tuple[tuple[float, int] | None, tuple[float, int] | None]:
    """(throughput, trial) of the served baseline and best: confirmed means where the study has them."""
    means = {f.trial: f.mean for f in finalists}
    if baseline is not None:
        means[baseline.trial] = baseline.mean

    def served(trial: TrialRecord | None) -> tuple[float, int] | None:
        if trial is None or trial.throughput is None:
            return None
        return means.get(trial.number, trial.throughput), trial.number

    return served(head.baseline), served(head.best)


# --- trials --------------------------------------------------------------------------------------------


def trial_records(trials: Iterable[Any]) -> tuple[TrialRecord, ...]:
    """One record per trial (``optuna.trial.FrozenTrial``), by trial number."""
    return tuple(_record(trial) for trial in sorted(trials, key=lambda t: t.number))


def _record(trial: Any) -> TrialRecord:
    attrs = trial.user_attrs
    config = attrs.get("config") or {}
    state = trial.state.name.lower()
    return TrialRecord(
        number=trial.number,
        state=state,
        status=_status(state, attrs),
        baseline=bool(attrs.get("baseline", False)),
        candidate=str(attrs.get("candidate", "")),
        precision=precision_of(config),
        provider=provider_of(config),
        throughput=_float_or_none(attrs.get("throughput")),
        p99_ms=_float_or_none(attrs.get("p99_ms")),
        p50_ms=_float_or_none(attrs.get("p50_ms")),
        concurrency=attrs.get("concurrency"),
        reason=attrs.get("reason"),
        sweep=tuple(_level(level) for level in attrs.get("sweep") or ()),
        config=config,
        load_s=_float_or_none(attrs.get("load_s")),
        trial_s=_float_or_none(attrs.get("trial_s")),
        server_log=str(attrs.get("server_log") or ""),
    )


def _status(state: str, attrs: Mapping[str, Any]) -> str:
    if state == "fail":
        return "failed"
    if state in ("running", "waiting"):
        return state
    if not attrs.get("feasible", False):
        return "infeasible"
    return "feasible" if state == "complete" else "pruned"


def _level(data: Mapping[str, Any]) -> Level:
    return Level(
        concurrency=int(data["concurrency"]),
        throughput=float(data["throughput"]),
        p50_ms=_float_or_none(data.get("p50_ms")),
        p95_ms=_float_or_none(data.get("p95_ms")),
        p99_ms=float(data["p99_ms"]),
    )


def _float_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def precision_of(config: Mapping[str, Any]) -> str:
    """The precision a rendered config serves: from its model file, or TensorRT's precision mode."""
    precision = precision_of_file(config.get("default_model_filename"))
    for accelerator in _accelerators(config, "gpu_execution_accelerator"):
        if (
            accelerator.get("name") == "tensorrt"
            and accelerator.get("parameters", {}).get("precision_mode") == "FP16"
        ):
            return "fp16"
    return precision


def provider_of(config: Mapping[str, Any]) -> str:
    """The execution provider a rendered config asks for: an accelerator's name, else cpu."""
    for kind in ("gpu_execution_accelerator", "cpu_execution_accelerator"):
        for accelerator in _accelerators(config, kind):
            return str(accelerator.get("name", "cpu"))
    return "cpu"


def _accelerators(config: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    return list(config.get("optimization", {}).get("execution_accelerators", {}).get(kind, []))


def changes_only_runtime(config: Mapping[str, Any]) -> bool:
    """True when a config leaves every Triton knob at the baseline (only ONNX Runtime's changed).

    That is: max batch size at most 1, no dynamic batching, one instance, no thread count parameter.
    """
    instances = sum(int(group.get("count", 1)) for group in config.get("instance_group") or [{}])
    return (
        int(config.get("max_batch_size", 0)) <= 1
        and "dynamic_batching" not in config
        and instances == 1
        and "intra_op_thread_count" not in (config.get("parameters") or {})
    )


# --- headline and study --------------------------------------------------------------------------------


def _feasible(trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    return [t for t in trials if t.status == "feasible" and t.throughput is not None]


def _best(trials: Sequence[TrialRecord], chosen: int | None = None) -> TrialRecord | None:
    # The exported trial, as optimizer.study.results.best_trial picks it: the confirmed finalist, else the
    # highest throughput (the first of equals).
    feasible = _feasible(trials)
    confirmed = [t for t in feasible if t.number == chosen]
    if confirmed:
        return confirmed[0]
    return max(feasible, key=lambda t: t.throughput or 0.0, default=None)


def headline(trials: Sequence[TrialRecord], repository: str, *, chosen: int | None = None) -> Headline:
    """Baseline vs the exported trial, their ratio and its config in readable form."""
    baseline = next((t for t in trials if t.baseline), None)
    best = _best(trials, chosen)
    ratio = None
    if best is not None and baseline is not None and baseline.throughput:
        ratio = (best.throughput or 0.0) / baseline.throughput
    return Headline(baseline, best, ratio, _pbtxt(best.config) if best else "", repository if best else "")


def _confirmed(head: Headline, finalists: Sequence[Finalist], baseline: Finalist | None) -> Headline:
    """The headline's ratio as the study prints it: of confirmed means when best and baseline have them."""
    best = next((f for f in finalists if head.best is not None and f.trial == head.best.number), None)
    if best is None or baseline is None or baseline.mean <= 0:
        return head
    return replace(
        head,
        ratio=best.mean / baseline.mean,
        ratio_basis="confirmed means",
        baseline_confirmed=baseline,
        best_confirmed=best,
    )


def _pbtxt(config: Mapping[str, Any]) -> str:

    from google.protobuf.json_format import ParseError

    try:
        return to_pbtxt(config_from_json(dict(config)))
    except ParseError:  # a config this version cannot parse: show the stored JSON instead
        return json.dumps(config, indent=2, sort_keys=True)


STATUS_ORDER = ("feasible", "infeasible", "pruned", "failed", "running", "waiting")


def study_info(name: str, attrs: Mapping[str, Any], trials: Sequence[TrialRecord]) -> StudyInfo:
    """The study's identity and environment, with trial counts by status."""
    return StudyInfo(
        name=name,
        model_name=str(attrs.get("model_name", "model")),
        model_sha256=str(attrs.get("model_sha256", "")),
        latency_budget_ms=_float_or_none(attrs.get("latency_budget_ms")),
        server_version=str(attrs.get("server_version", "")),
        target=str(attrs.get("target", "")),
        hardware=_pairs(attrs.get("hardware")),
        space=_pairs(attrs.get("space")),
        counts=tuple((status, sum(t.status == status for t in trials)) for status in STATUS_ORDER),
    )


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        return ()
    return tuple((str(key), _text(item)) for key, item in value.items())


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(item) for item in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


# --- figures -------------------------------------------------------------------------------------------


def curves_data(
    trials: Sequence[TrialRecord], latency_budget_ms: float | None, *, chosen: int | None = None
) -> CurvesData:
    """Throughput vs concurrency of the baseline, the ONNX-Runtime-tuned and the best trial."""
    baseline = next((t for t in trials if t.baseline and t.sweep), None)
    runtime_only = [t for t in _feasible(trials) if not t.baseline and changes_only_runtime(t.config)]
    picked = [
        ("baseline", baseline, "the baseline has no measured sweep"),
        (
            ORT_TUNED,
            _best(runtime_only),
            "no feasible trial changed only the provider or precision",
        ),
        ("best overall", _best(trials, chosen), "no trial met the latency budget"),
    ]
    curves = tuple(Curve(label, t.number, t.candidate, t.sweep) for label, t, _ in picked if t is not None)
    missing = tuple(f"{label}: {why}" for label, t, why in picked if t is None)
    return CurvesData(curves, latency_budget_ms, missing)


def _scatter_point(trial: TrialRecord) -> ScatterPoint | None:
    if trial.throughput is not None and trial.p99_ms is not None:
        return ScatterPoint(trial.number, trial.throughput, trial.p99_ms, trial.status, trial.candidate)
    if not trial.sweep:
        return None
    # No level met the budget: show the level closest to meeting it.
    level = min(trial.sweep, key=lambda lv: lv.p99_ms)
    return ScatterPoint(trial.number, level.throughput, level.p99_ms, trial.status, trial.candidate)


def scatter_data(trials: Sequence[TrialRecord], latency_budget_ms: float | None) -> ScatterData:
    """Throughput vs p99 of every measured trial, with the Pareto front (high throughput, low p99)."""
    finished = [t for t in trials if t.finished]
    points = tuple(p for p in (_scatter_point(t) for t in finished) if p is not None)
    measured = {p.trial for p in points}
    unmeasured = tuple(t.number for t in finished if t.number not in measured)
    return ScatterData(points, pareto_front(points), latency_budget_ms, unmeasured)


def pareto_front(points: Sequence[ScatterPoint]) -> tuple[int, ...]:
    """Trials no other trial beats on both throughput (higher) and p99 (lower), by ascending p99."""
    front: list[int] = []
    best = -math.inf
    for point in sorted(points, key=lambda p: (p.p99_ms, -p.throughput, p.trial)):
        if point.throughput > best:
            front.append(point.trial)
            best = point.throughput
    return tuple(front)


def history_data(trials: Sequence[TrialRecord]) -> HistoryData:
    """Each finished trial's feasible throughput and the best so far, by trial number."""
    finished = [t for t in trials if t.finished]
    values = [t.throughput if t.status == "feasible" else None for t in finished]
    best: list[float | None] = []
    for value in values:
        previous = best[-1] if best else None
        best.append(value if previous is None or (value is not None and value > previous) else previous)
    return HistoryData(
        tuple(t.number for t in finished),
        tuple(t.status for t in finished),
        tuple(values),
        tuple(best),
    )


def importance_data(study: Any) -> ImportanceData:
    """Parameter importances for reaching the highest throughput (PED-ANOVA over completed trials).

    The study maximises throughput and the evaluator gets no ``target``, so it follows the study's
    direction: a high importance means the parameter matters for reaching the top throughputs.
    With too few completed trials, or when the evaluator fails, the record holds a note and no values.
    """

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return ImportanceData(
            (), (), f"needs at least {MIN_IMPORTANCE_TRIALS} completed trials, has {len(complete)}"
        )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        return ImportanceData((), (), "the study does not maximise throughput")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "too few trials" and experimental-feature warnings
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as exc:  # optuna refuses some studies (e.g. no parameters): report, do not fail
        return ImportanceData((), (), f"not available: {exc}")
    ranked = sorted(found.items(), key=lambda item: (-item[1], item[0]))
    if not ranked or all(value == 0 for _, value in ranked):
        return ImportanceData((), (), f"no parameter stands out yet in {len(complete)} completed trials")
    note = f"PED-ANOVA over {len(complete)} completed trials: share of what sets the top throughputs apart"
    return ImportanceData(tuple(k for k, _ in ranked), tuple(float(v) for _, v in ranked), note)


# --- tables --------------------------------------------------------------------------------------------


def top_trials(trials: Sequence[TrialRecord], n: int = TOP_N) -> tuple[TrialRecord, ...]:
    """The ``n`` feasible trials with the highest throughput, best first (ties: lower number first)."""
    return tuple(sorted(_feasible(trials), key=lambda t: (-(t.throughput or 0.0), t.number))[:n])


def _space_precisions(attrs: Mapping[str, Any]) -> tuple[str, ...]:
    space = attrs.get("space")
    if isinstance(space, Mapping) and isinstance(space.get("precisions"), list):
        return tuple(str(p) for p in space["precisions"])
    return ()


# Keys of a variant's accuracy record that are not figures: the verdict, its sentence, the precision again.
_NOT_FIGURES = ("ok", "reason", "precision", "attempts", "providers", "metrics", "goals", "data")


def precision_rows(
    trials: Sequence[TrialRecord], variants: Any, space_precisions: Sequence[str] = ()
) -> tuple[PrecisionRow, ...]:
    """Best feasible throughput of each precision, with its accuracy figures when the study has them.

    Args:
        trials: The study's trial records.
        variants: The study attribute ``variants`` ({precision: {figure: value, ..., "ok": bool}}), or None.
        space_precisions: Precisions of the search space, listed even when no trial used them.
    """
    variants = variants if isinstance(variants, Mapping) else {}
    names = list(dict.fromkeys([*space_precisions, *(t.precision for t in trials if t.finished), *variants]))
    rows = []
    for precision in names:
        measured = [t for t in trials if t.finished and t.precision == precision]
        best = _best(measured)
        figures = variants.get(precision)
        figures = figures if isinstance(figures, Mapping) else {}
        ok = figures.get("ok")
        shown = {k: _text(v) for k, v in figures.items() if k not in _NOT_FIGURES}
        shown = {**metric_figures(figures), **shown}  # the user's metrics first: what they report
        rows.append(
            PrecisionRow(
                precision=precision,
                trials=len(measured),
                best_trial=best.number if best else None,
                best_throughput=best.throughput if best else None,
                p99_ms=best.p99_ms if best else None,
                accuracy=tuple((str(k), v) for k, v in shown.items()),
                accuracy_ok=ok if isinstance(ok, bool) else None,
                accuracy_note=_accuracy_note(figures),
            )
        )
    return tuple(rows)


def metric_figures(figures: Mapping) -> dict[str, str]:
    """A variant's scores on the user's metrics: ``{"squad_f1": "86.3 (fp32 86.7, -0.4)"}``."""
    metrics = figures.get("metrics")
    if not isinstance(metrics, Mapping):
        return {}
    return {
        str(name): figure_text(pair)
        for name, pair in metrics.items()
        if isinstance(pair, Mapping) and isinstance(pair.get("variant"), (int, float)) and "fp32" in pair
    }


def _accuracy_note(figures: Mapping) -> str:
    """The guard's verdict; for int8 served by a later recipe, why the recipes before it were refused."""
    note = str(figures.get("reason", ""))
    attempts = figures.get("attempts")
    if figures.get("ok") and isinstance(attempts, list):
        refused = [a for a in attempts if isinstance(a, Mapping) and not a.get("ok")]
        if refused:
            note += (
                " (refused first: "
                + "; ".join(f"{a.get('recipe')}: {a.get('reason')}" for a in refused)
                + ")"
            )
    providers = figures.get("providers")
    if figures.get("ok") and isinstance(providers, Mapping):  # a GPU space's CUDA and TensorRT
        elsewhere = {p: r for p, r in providers.items() if isinstance(r, Mapping) and not r.get("ok")}
        if elsewhere:
            note += (
                " (not served on " + "; ".join(f"{p}: {r.get('reason')}" for p, r in elsewhere.items()) + ")"
            )
    return note


def failure_rows(trials: Sequence[TrialRecord]) -> tuple[FailureRow, ...]:
    """Every finished trial that did not complete within the budget, with its reason."""
    return tuple(
        FailureRow(
            t.number,
            t.status,
            t.candidate,
            t.reason or ("interrupted" if t.status == "failed" else "-"),
            t.server_log,
        )
        for t in trials
        if t.finished and t.status != "feasible"
    )
