"""What ``optimize study`` was given, as one :class:`StudySettings` and the server to tune on.

The command (cli.py) declares each option once and hands over only the options the user set, whatever
their value: an option left out takes the settings' own default, so a value equal to a default is still
applied. Here each option's text is read, routed to the setting it fills (:data:`ROUTES`), and refused
where the study does not take it: a study of several models refuses every option whose setting only one
model's study reads (``is_one_model_setting``), never ignores it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any

from optimizer.config.space import load_space, parse_starting_points
from optimizer.errors import UsageError
from optimizer.measurement.levels import MeasureSettings
from optimizer.measurement.sweep import parse_levels, parse_rates
from optimizer.model.ensemble import is_ensemble_path
from optimizer.model.intake import parse_shape_args
from optimizer.serving.base import RecordedStudy, ServingTarget
from optimizer.study.models_file import ModelEntry, load_models_file, models_from_flags
from optimizer.study.settings import (
    JOINT_MEASURE,
    SearchSettings,
    StudySettings,
    is_one_model_setting,
)
from optimizer.study.storage import parse_cpus
from optimizer.study.targets import TARGET_OPTIONS, make_target, parse_headers

__all__ = ["ROUTES", "study_request"]


def _as_is(value: Any) -> Any:
    return value


def _choice(value: Enum) -> Any:
    return value.value


def _one_budget(text: str) -> float:
    """One model's ``--latency-budget-ms`` (checked for being positive with the other settings)."""
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            f"--latency-budget-ms must be a positive number of milliseconds, got {text!r}"
        ) from None


# Each option that sets one setting: the StudySettings field it fills ("measure.window_s": a field of its
# MeasureSettings, "search.…": of its SearchSettings) and how its value is read.
ROUTES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "budget": ("budget", _as_is),
    "space": ("space", _as_is),
    "study_name": ("study_name", _as_is),
    "storage": ("storage", _as_is),
    "seed": ("seed", _as_is),
    "accuracy_tolerance": ("accuracy_tolerance", _as_is),
    "accuracy_data": ("accuracy_data", _as_is),
    "accuracy_metric": ("accuracy_metrics", tuple),
    "accuracy_goal": ("accuracy_goals", tuple),
    "allow_shared_host": ("allow_shared_host", _as_is),
    "storage_wait_s": ("storage_wait_s", _as_is),
    "cpus": ("cpus", parse_cpus),
    "gpus": ("gpus", _as_is),
    "shape": ("shapes", parse_shape_args),
    "input_data": ("input_data", _as_is),
    "latency_budget_ms": ("latency_budget_ms", _one_budget),
    "concurrency": ("concurrency", parse_levels),
    "request_rate": ("request_rates", parse_rates),
    "sampler": ("sampler", _choice),
    "warm_start": ("warm_start", _as_is),
    "load_generator": ("load_generator", _choice),
    "confirm_with": ("confirm_with", _choice),
    "protocol": ("protocol", _choice),
    "max_memory_mb": ("max_memory_mb", _as_is),
    "max_gpu_memory_mb": ("max_gpu_memory_mb", _as_is),
    "confirm": ("search.confirm_finalists", _as_is),
    "starting_points": ("search.starting_points", parse_starting_points),
    "window_s": ("measure.window_s", _as_is),
    "warmup_s": ("measure.warmup_s", _as_is),
    "screen_s": ("measure.screen_s", _as_is),
    "max_window_s": ("measure.max_window_s", _as_is),
    "stop_rule": ("measure.rule", _choice),
    "throughput_ci": ("measure.throughput_ci", _as_is),
    "p99_ci": ("measure.p99_ci", _as_is),
}
# The options that say what is tuned (a models file, several --model, their traffic): read by the workload.
WHAT_IS_TUNED = ("model", "models_file", "traffic")
# Several models take these from each model (its file entry), not from the command line's one value.
PER_MODEL = ("shape", "input_data", "latency_budget_ms")


def study_request(given: Mapping[str, Any]) -> tuple[StudySettings, ServingTarget | None]:
    """The settings and the server (None: the embedded Triton) of the options the user set.

    Raises:
        UsageError: an option the study does not take, a malformed value, a target option given to
            another target; each in one line saying what to do.
    """
    if "request_rate" in given and "concurrency" in given:
        raise UsageError("give --concurrency (closed loop) or --request-rate (open loop), not both")
    server = _server(given)
    recorded = server.recorded_study() if server is not None else None
    models = given.get("model") or []
    several = "models_file" in given or len(models) > 1 or (recorded is not None and recorded.joint)
    if "traffic" in given and not several:
        raise UsageError("--traffic splits the load between several models: give --model twice or more")
    if several or _one_ensemble(models):
        return _several_models(given, recorded), server
    return _one_model(given, recorded), server


def _server(given: Mapping[str, Any]) -> ServingTarget | None:
    """The ``--target`` with its options, checked before any work (a stray --url is an error)."""
    kind = given.get("target", "embedded")
    options = {name: given.get(name) for name in TARGET_OPTIONS if name != "headers"}
    options["headers"] = parse_headers(given.get("header") or [])
    if kind == "embedded" and not any(options.values()):
        return None  # the driver starts (and stops) a new embedded Triton
    gpu_space = kind == "docker" and load_space(given.get("space", "cpu")).device == "gpu"
    return make_target(
        kind,
        gpu_space=gpu_space,
        gpu_devices=given.get("gpus") if kind == "docker" else None,
        seed=given.get("seed"),
        **options,
    )


def _one_ensemble(models: list[Path]) -> bool:
    """One --model that is an ensemble: tuned as its steps, by a study of several models."""
    return len(models) == 1 and is_ensemble_path(models[0])


def _one_model(given: Mapping[str, Any], recorded: RecordedStudy | None) -> StudySettings:
    """One model's settings; a recording answers for its own model, shapes and space."""
    routed = _routed(given)
    if recorded is not None and "model" not in given:
        (path, shapes), *_ = recorded.models.values()
        routed["model_path"] = path
        routed.setdefault("shapes", dict(shapes))
    elif given.get("model"):
        routed["model_path"] = given["model"][0]
    if recorded is not None:
        routed.setdefault("space", str(recorded.space_path))
    measure = routed.pop("measure")
    window_s = measure.pop("window_s", MeasureSettings.window_s)
    routed["measure"] = MeasureSettings.with_window(window_s, measure.pop("max_window_s", None), **measure)
    return _settings(routed)


def _several_models(given: Mapping[str, Any], recorded: RecordedStudy | None) -> StudySettings:
    """Several models' settings: every option whose setting only one model's study reads is refused."""
    for option, (setting, _) in ROUTES.items():
        if option in given and option not in PER_MODEL and is_one_model_setting(setting):
            raise UsageError(
                f"--{option.replace('_', '-')} is an option of one model's study: several models are "
                "measured in shared fixed windows (--window-s, --warmup-s) at 1, 2, 4, 8 clients per "
                "model; drop it"
            )
    if recorded is not None and not recorded.joint:
        raise UsageError(
            "this recording (--target replay:) is of one model: tune several models on a server, or "
            "replay a joint recording (bench/record_joint_surface.py)"
        )
    routed = _routed({k: v for k, v in given.items() if k not in PER_MODEL})
    routed["models"] = _replayed_models(given, recorded) if recorded else _models_of(given)
    if recorded is not None:
        routed.setdefault("space", str(recorded.space_path))
    measure = routed.pop("measure")
    if "window_s" in measure:  # the window extends to 3x while a model has too few requests
        measure["max_window_s"] = 3 * measure["window_s"]
    routed["measure"] = replace(JOINT_MEASURE, **measure)
    return _settings(routed)


def _routed(given: Mapping[str, Any]) -> dict[str, Any]:
    """The given options' values, read and placed under their settings (``measure`` and ``search``:
    dicts of the fields given)."""
    routed: dict[str, Any] = {"measure": {}, "search": {}}
    for option, value in given.items():
        if option not in ROUTES:
            continue
        setting, read = ROUTES[option]
        record, _, field_name = setting.rpartition(".")
        (routed[record] if record else routed)[field_name] = read(value)
    return routed


def _settings(routed: dict[str, Any]) -> StudySettings:
    search = replace(SearchSettings(), **routed.pop("search"))
    return StudySettings(**routed, search=search)


def _models_of(given: Mapping[str, Any]) -> tuple[ModelEntry, ...]:
    """The models: from ``--models FILE``, or from ``--model`` given twice or more."""
    if "models_file" not in given:
        if "input_data" in given:
            raise UsageError("give each model's --input-data in a models file (--models FILE)")
        shapes = parse_shape_args(given.get("shape") or [])
        return models_from_flags(given["model"], shapes, given.get("traffic"), given.get("latency_budget_ms"))
    stray = next((flag for flag in ("model", "traffic", *PER_MODEL) if flag in given), None)
    if stray:
        raise UsageError(
            "--models takes each model's path, shapes, input data and budget from the file: drop "
            + _flag(stray)
        )
    return load_models_file(given["models_file"])


def _replayed_models(given: Mapping[str, Any], recorded: RecordedStudy) -> tuple[ModelEntry, ...]:
    """The models of a joint recording, in its traffic mix, each with its recorded budget unless given."""
    names = list(recorded.models)
    stray = next((flag for flag in ("model", "models_file", "shape", "input_data") if flag in given), None)
    if stray:
        raise UsageError(
            f"a joint recording replays the models it recorded ({', '.join(names)}): drop {_flag(stray)}"
        )
    shapes = {
        f"{name}.{tensor}": dims
        for name, (_, model_shapes) in recorded.models.items()
        for tensor, dims in model_shapes.items()
    }
    recorded_mix = ",".join(f"{name}={weight:g}" for name, weight in recorded.traffic.items())
    entries = models_from_flags(
        [path for path, _ in recorded.models.values()],
        shapes,
        given.get("traffic", recorded_mix),
        given.get("latency_budget_ms"),
    )
    budgets = recorded.latency_budgets_ms
    return tuple(
        replace(entry, latency_budget_ms=budgets[entry.name]) if entry.latency_budget_ms is None else entry
        for entry in entries
    )


def _flag(option: str) -> str:
    """The command-line flag of an option (``models_file`` is ``--models``)."""
    return {"models_file": "--models", "model": "--model"}.get(option, "--" + option.replace("_", "-"))
