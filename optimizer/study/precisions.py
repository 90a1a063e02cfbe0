"""The precisions a study may propose: each variant behind the accuracy guard, decided once per study.

A variant (fp16, or int8 by the first recipe that keeps the outputs close) that breaks accuracy or
cannot be made is recorded in the study (``variants``) with its reason and left out of the space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from optimizer.config.space import SearchSpace
from optimizer.errors import DiskFullError, ModelError, StudyError, UsageError
from optimizer.model.accuracy import AccuracyGuard
from optimizer.model.fusion import NOTHING_TO_FUSE
from optimizer.model.intake import ModelInfo, check_input_array
from optimizer.model.metrics import (
    BUILTIN_METRICS,
    Metric,
    goal_metric,
    load_accuracy_data,
    parse_goal,
    resolve_metric,
)
from optimizer.model.profile import PROFILE_BATCHES, InprocessPoint, profile_variant
from optimizer.model.providers import runnable_providers
from optimizer.model.quantize import DEFAULT_INT8_RECIPE, recipes_for
from optimizer.model.variants import Int8Choice, choose_int8, served_recipe, variant_path
from optimizer.paths import cache_dir

__all__ = [
    "accurate_precisions",
    "check_same_accuracy",
    "guard_refusals",
    "inprocess_points",
    "int8_recipe_of",
    "profile_in_process",
    "refused_providers",
    "serving_providers",
]

PROFILE_ATTR = "inprocess_profile"


def accuracy_guard(settings, model: ModelInfo, samples) -> AccuracyGuard:
    """The study's accuracy guard: the cosine rule on its requests, the user's metrics on their data, and
    their goals deciding when given (``settings``: the StudySettings).

    Raises:
        UsageError: accuracy data, a metric or a goal that cannot be used (before any trial).
    """
    inputs = [spec.name for spec in model.inputs]
    if settings.accuracy_data is not None and not (settings.accuracy_metrics or settings.accuracy_goals):
        raise UsageError(
            "--accuracy-data is read by the accuracy metrics: add --accuracy-goal (e.g. squad_f1>=-1%) or "
            "--accuracy-metric, or drop --accuracy-data"
        )
    data = None
    if settings.accuracy_data is not None:
        data = load_accuracy_data(settings.accuracy_data, inputs, lambda n, a: check_input_array(model, n, a))
    # A goal's built-in metric is computed without being named twice; the metrics keep the order given.
    from_goals = [goal_metric(goal) for goal in settings.accuracy_goals]
    specs = list(
        dict.fromkeys([*settings.accuracy_metrics, *(n for n in from_goals if n in BUILTIN_METRICS)])
    )
    metrics: dict[str, Metric] = {}
    for spec in specs:
        metric = resolve_metric(spec, inputs)
        if metric.name in metrics:  # e.g. a function named like a built-in, or two files' score()
            raise UsageError(
                f"--accuracy-metric {spec!r} is named {metric.name!r} like another metric of the study: "
                "rename the function"
            )
        metrics[metric.name] = metric
    goals = tuple(parse_goal(text, metrics) for text in settings.accuracy_goals)
    return AccuracyGuard(
        samples, settings.accuracy_tolerance, tuple(metrics.values()), goals, data, batching=model.batching
    )


def accuracy_record(guard: AccuracyGuard, fp32_scores: Mapping[str, float]) -> dict:
    """What judges a study's variants, as the study records it (and a resume must match)."""
    return {
        "metrics": [m.name for m in guard.metrics],
        "metric_specs": [m.description if ":" in m.description else m.name for m in guard.metrics],
        "goals": sorted(g.text.replace(" ", "") for g in guard.goals),
        "data": guard.data.source if guard.data else "the study's requests",
        "data_sha256": guard.data.sha256 if guard.data else None,
        "samples": guard.metric_data.count,
        "fp32": dict(fp32_scores),
    }


def check_same_accuracy(study, guard: AccuracyGuard, fp32_scores: Mapping[str, float]) -> None:
    """Refuse to resume a study whose variants were judged by other goals, metrics or data (before
    anything is written to it).

    Raises:
        StudyError: the stored judgement differs from this command's.
    """
    record = accuracy_record(guard, fp32_scores) if guard.metrics else None
    stored = study.user_attrs.get("accuracy")
    if "variants" in study.user_attrs and _judged_by(stored) != _judged_by(record):
        was = ", ".join((stored or {}).get("goals", [])) or "the cosine rule"
        raise StudyError(
            f"study {study.study_name!r} judged its variants by {was} (with its metrics and data): resume "
            "it with the same --accuracy-goal, --accuracy-metric and --accuracy-data, or use another --study-name"
        )


def record_accuracy(study, guard: AccuracyGuard, fp32_scores: Mapping[str, float]) -> None:
    """The guard's settings and fp32's own scores, in the study (the summary and report show them)."""
    if guard.metrics and study.user_attrs.get("accuracy") != (record := accuracy_record(guard, fp32_scores)):
        study.set_user_attr("accuracy", record)


def _judged_by(record: Mapping | None) -> tuple:
    if not record:
        return ()
    return (
        tuple(record.get("goals", ())),
        tuple(record.get("metric_specs", record.get("metrics", ()))),
        record.get("data_sha256"),
    )


def accurate_precisions(
    study,
    model: ModelInfo,
    space: SearchSpace,
    guard: AccuracyGuard,
    reporter,
    int8_recipes: tuple[str, ...] | None = None,
    *,
    attr: str = "variants",
) -> SearchSpace:
    """The space without the precisions whose variant breaks accuracy or cannot be made: never proposed.

    Each variant's figures are recorded in the study (``variants``) once and reused on resume, so the
    space, and with it every trial's parameter distributions, stays the same across restarts. int8 is
    the first recipe (optimizer.model.quantize) that passes the guard; its record says which, and why
    the recipes before it were refused. ``guard``: the cosine rule on the study's requests, or the user's
    goals on their data. ``attr``: the study attribute that holds them (a joint study of several models
    keeps one per model).
    """
    # A GPU provider serves int8 from symmetric QDQ only; a target that can serve only some recipes (a
    # recording) says which.
    int8_recipes = int8_recipes or recipes_for(space.execution_providers)
    variants = dict(study.user_attrs.get(attr, {}))
    providers = serving_providers(space.execution_providers)
    kept = []
    for precision in space.precisions:
        if precision == "fp32":
            kept.append(precision)
            continue
        if precision not in variants:
            variants[precision] = _variant_record(model, precision, guard, int8_recipes, providers)
        record = variants[precision]
        _note_where_checked(precision, record, reporter)
        if record["ok"]:
            kept.append(precision)
            _note_int8_recipe(record, reporter)
            for provider in refused_providers(record):
                reporter.note(f"{record['providers'][provider]['reason']}: not served on {provider}")
        else:
            reporter.note(f"{record['reason']}: it will not be tried")
    study.set_user_attr(attr, variants)
    study.set_user_attr("accuracy_tolerance", guard.tolerance)
    return replace(space, precisions=tuple(kept))


def _note_where_checked(precision: str, record: dict, reporter) -> None:
    for checked in record.get("providers", {"": record}).values():
        if checked.get("wanted", "cpu") != checked.get("provider", "cpu"):
            reporter.note(
                f"{precision}: accuracy checked on the {checked['provider']} provider; {checked['wanted']}, "
                "which serves it, does not load here (what only the GPU shows, such as fp16 overflow, is not seen)"
            )


def _note_int8_recipe(record: dict, reporter) -> None:
    refused = [a for a in record.get("attempts", []) if not a.get("ok")]
    if refused:  # the default recipe was not enough: say what is served and why
        reasons = "; ".join(f"{a['recipe']}: {a['reason']}" for a in refused)
        reporter.note(f"int8 serves the {record['recipe']} recipe ({reasons})")
    fusion = record.get("fusion", "")
    if fusion and NOTHING_TO_FUSE not in fusion:
        reporter.note(f"int8 serves the {record['recipe']} recipe: {fusion}")


def _variant_record(
    model: ModelInfo,
    precision: str,
    guard: AccuracyGuard,
    int8_recipes: tuple[str, ...] | None,
    providers: tuple[str, ...] = ("cpu",),
) -> dict:
    """What the accuracy guard found for one precision's variant (int8: over its recipes), on each
    provider that would serve it. With several (a GPU space's CUDA and TensorRT, which serve fp16 and int8
    differently), each one's record is under ``providers``; the precision stays in the space while one
    of them passes, and the trial never serves it on a provider that failed (:func:`refused_providers`)."""
    records = {p: _provider_record(model, precision, guard, int8_recipes, p) for p in providers}
    if len(records) == 1:
        return next(iter(records.values()))
    passed = [r for r in records.values() if r["ok"]]
    record = dict(passed[0] if passed else next(iter(records.values())))
    record["providers"] = records
    if not passed:
        record["reason"] = "; ".join(f"{p}: {r['reason']}" for p, r in records.items())
    return record


def _provider_record(
    model: ModelInfo,
    precision: str,
    guard: AccuracyGuard,
    int8_recipes: tuple[str, ...] | None,
    provider: str,
) -> dict:
    if precision == "int8":
        choice = choose_int8(model, guard.samples, guard, cache_dir(), int8_recipes, provider)
        return _int8_record(choice)
    try:
        if precision == "fp16" and provider == "tensorrt" and "tensorrt" in runnable_providers():
            # TensorRT makes fp16 itself from the fp32 file (its FP16 mode): checked as that where
            # TensorRT loads; elsewhere the converted file on the CPU is the nearest check.
            report = guard.check(model.path, model.path, precision, provider)
            if report.provider == "tensorrt":
                return report.to_dict()
        path = variant_path(model, precision, cache_dir(), served_recipe(precision, provider))
        return guard.check(model.path, path, precision, provider).to_dict()
    except ModelError as exc:  # e.g. a converter that does not handle one of the model's ops
        return {"precision": precision, "ok": False, "reason": str(exc), "wanted": provider}
    except (UsageError, DiskFullError):  # the user's metric, or a full disk: theirs to fix, never recorded
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a fused fp16 kernel the CPU fallback does not have
        reason = (
            f"the {precision} variant for {provider} could not be run to check it: {str(exc).splitlines()[0]}"
        )
        return {"precision": precision, "ok": False, "reason": reason[:400], "wanted": provider}


def serving_providers(providers: Sequence[str]) -> tuple[str, ...]:
    """The providers the accuracy guard checks a variant for: a GPU space's GPU providers (each serves
    fp16 and int8 its own way), else the CPU."""
    return tuple(p for p in ("cuda", "tensorrt") if p in providers) or ("cpu",)


def refused_providers(record: Mapping) -> tuple[str, ...]:
    """The providers a variant that passed the guard on another provider must not be served on."""
    return tuple(p for p, r in record.get("providers", {}).items() if not r.get("ok"))


def guard_refusals(study, attr: str = "variants") -> frozenset[tuple[str, str]]:
    """The (precision, provider) pairs the study's accuracy guard refused while keeping the precision
    for another provider: a trial that draws one is not served (see TrialRunner)."""
    return frozenset(
        (precision, provider)
        for precision, record in study.user_attrs.get(attr, {}).items()
        for provider in refused_providers(record)
    )


def _int8_record(choice: Int8Choice) -> dict:
    attempts = [dict(attempt) for attempt in choice.attempts]
    if choice.recipe is not None:
        passed = next(a for a in attempts if a["recipe"] == choice.recipe)
        return {**passed, "attempts": attempts, "fusion": choice.fusion}
    measured = [a for a in attempts if "cosine" in a]
    closest = max(measured, key=lambda a: a["cosine"], default={})
    return {
        **closest,
        "precision": "int8",
        "ok": False,
        "recipe": None,
        "reason": f"no int8 recipe passed the accuracy guard ({choice.reasons()})",
        "attempts": attempts,
    }


def int8_recipe_of(study, attr: str = "variants") -> str:
    """The int8 recipe a study serves (the default for a study from before recipes, or without int8)."""
    record = study.user_attrs.get(attr, {}).get("int8") or {}
    return record.get("recipe") or DEFAULT_INT8_RECIPE


def profile_in_process(
    study, model: ModelInfo, space: SearchSpace, samples, cores: int, *, same_machine: bool, reporter
) -> tuple[InprocessPoint, ...]:
    """Measure every precision of the settled space in this process, once per study (kept on resume).

    Recorded as the study attribute ``inprocess_profile``: the points, or why there are none (a server on
    another machine, or a space without the CPU provider: this process runs ONNX Runtime on CPU only).
    """
    recorded = study.user_attrs.get(PROFILE_ATTR)
    if recorded is not None:
        return inprocess_points(study)
    skipped = None
    if not same_machine:
        skipped = (
            "the server runs on another machine (or is a recording): this machine's figures would not compare"
        )
    elif "cpu" not in space.execution_providers:
        skipped = "the space has no CPU provider: the in-process profile runs ONNX Runtime on CPU"
    if skipped:
        study.set_user_attr(PROFILE_ATTR, {"skipped": skipped})
        return ()
    batches = tuple(b for b in PROFILE_BATCHES if b <= space.max_batch_size.high) if model.batching else (1,)
    threads = tuple(sorted({1, cores}))
    recipe = int8_recipe_of(study)
    points: list[InprocessPoint] = []
    for precision in space.precisions:
        path = variant_path(model, precision, cache_dir(), recipe, samples)
        points += profile_variant(precision, path, samples, batches=batches, threads=threads)
    study.set_user_attr(
        PROFILE_ATTR,
        {"points": [p.to_dict() for p in points], "batches": list(batches), "threads": list(threads)},
    )
    best = max(points, key=lambda p: p.throughput)
    reporter.note(
        f"in process: {best.precision} at batch {best.batch}, {best.threads} thread(s) runs "
        f"{best.throughput:.0f} inf/s ({best.latency_ms:.3g} ms a batch), the fastest of {len(points)} points"
    )
    return tuple(points)


def inprocess_points(study) -> tuple[InprocessPoint, ...]:
    """The in-process profile a study recorded (none for a study from before it, or one that skipped it)."""
    recorded = study.user_attrs.get(PROFILE_ATTR) or {}
    return tuple(InprocessPoint.from_dict(p) for p in recorded.get("points", ()))
