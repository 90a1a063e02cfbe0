"""A study in MLflow: ``optimize study --mlflow-uri URI``.

One MLflow run per study (experiment ``optimize``, tagged with the study's name): the study's settings as
parameters, its headline figures as metrics, the best ``config.pbtxt``, the report (HTML, CSV, figures)
and the exported model repository as artifacts. Each finished trial is a child run: its parameters and
config summary as params, its throughput, p99, p50 and memory as metrics, its state as the run's status.

Everything is logged from the study database after the study ends, through MLflow's own client, so the
study never depends on the tracking server: a failure to log is a warning, and the same command run again
(a resumed study with nothing left to run) logs what is missing. Runs already logged are found by their
tags and kept, never duplicated. Any tracking URI works: a folder, ``sqlite:///…``, a server.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from optimizer.study.results import best_trial

__all__ = ["EXPERIMENT", "log_study"]

EXPERIMENT = "optimize"
STUDY_TAG, TRIAL_TAG, STORAGE_TAG = "optimize.study", "optimize.trial", "optimize.model_sha256"
TRIAL_METRICS = ("throughput", "p99_ms", "p50_ms", "memory_mb", "gpu_memory_mb", "load_s", "trial_s")
STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


def log_study(
    study, tracking_uri: str, *, report_dir: Path | None = None, repository: Path | None = None
) -> str:
    """Log ``study`` to the MLflow tracking store at ``tracking_uri``; return the study's run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from mlflow.utils.time import get_current_time_millis

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run_id = _study_run(client, experiment_id, study)
    now = get_current_time_millis()
    client.log_batch(run_id, params=[Param(k, v) for k, v in _study_params(study).items()])
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in STATUS]
    client.log_batch(
        run_id, metrics=[Metric(k, v, now, len(finished)) for k, v in _study_metrics(study).items()]
    )
    logged = _logged_trials(client, experiment_id, run_id)
    for trial in finished:
        if trial.number not in logged:
            _log_trial(client, experiment_id, run_id, study.study_name, trial)
    if repository is not None and (repository / "config.pbtxt").is_file():
        client.log_artifact(run_id, str(repository / "config.pbtxt"))
    if repository is not None and repository.is_dir():
        client.log_artifacts(run_id, str(repository), artifact_path="best_repository")
    if report_dir is not None and report_dir.is_dir():
        client.log_artifacts(run_id, str(report_dir), artifact_path="report")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _study_run(client, experiment_id: str, study) -> str:
    """The study's run: the one tagged with its name and model, or a new one."""
    sha = str(study.user_attrs.get("model_sha256", ""))
    query = f"tags.`{STUDY_TAG}` = '{study.study_name}' and tags.`{STORAGE_TAG}` = '{sha}'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"mlflow.runName": f"study {study.study_name}", STUDY_TAG: study.study_name, STORAGE_TAG: sha}
    return client.create_run(experiment_id, tags=tags).info.run_id


def _logged_trials(client, experiment_id: str, parent: str) -> set[int]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {int(run.data.tags[TRIAL_TAG]) for run in runs if TRIAL_TAG in run.data.tags}


def _study_params(study) -> dict[str, str]:
    attrs = study.user_attrs
    space = attrs.get("space") or {}
    hardware = attrs.get("hardware") or {}
    params = {
        "model_name": attrs.get("model_name"),
        "model_sha256": attrs.get("model_sha256"),
        "latency_budget_ms": attrs.get("latency_budget_ms"),
        "space": space.get("name"),
        "target": attrs.get("target"),
        "cores": attrs.get("cpu_cores") or hardware.get("cores"),
        "cpu": hardware.get("cpu"),
        "server_version": attrs.get("server_version"),
    }
    return {k: str(v) for k, v in params.items() if v is not None}


def _study_metrics(study) -> dict[str, float]:
    """The headline: the best and baseline throughputs (each trial's own), and their ratio."""
    best = best_trial(study)
    baseline = next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")), None)
    metrics: dict[str, float] = {}
    if best is not None:
        metrics["best_throughput"] = float(best.user_attrs["throughput"])
        metrics["best_p99_ms"] = float(best.user_attrs["p99_ms"])
        metrics["best_trial"] = float(best.number)
    if baseline is not None and baseline.user_attrs.get("throughput"):
        metrics["baseline_throughput"] = float(baseline.user_attrs["throughput"])
        if best is not None:
            metrics["speed_up"] = metrics["best_throughput"] / metrics["baseline_throughput"]
    return metrics


def _log_trial(client, experiment_id: str, parent: str, study_name: str, trial) -> None:
    from mlflow.entities import Metric, Param

    attrs: Mapping[str, Any] = trial.user_attrs
    tags = {
        "mlflow.parentRunId": parent,
        "mlflow.runName": f"trial {trial.number}",
        TRIAL_TAG: str(trial.number),
        STUDY_TAG: study_name,
    }
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    params = {**{k: str(v) for k, v in trial.params.items()}, "config": str(attrs.get("candidate", ""))}
    if attrs.get("reason"):
        params["reason"] = str(attrs["reason"])[:500]  # MLflow keeps params short
    millis = int(trial.datetime_complete.timestamp() * 1000) if trial.datetime_complete else 0
    metrics = [
        Metric(name, float(attrs[name]), millis, trial.number)
        for name in TRIAL_METRICS
        if isinstance(attrs.get(name), (int, float))
    ]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run_id, STATUS[trial.state])
