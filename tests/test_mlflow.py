"""``optimize study --mlflow-uri``: the study as one MLflow run, its trials as child runs, its outputs as
artifacts, read back from a real local MLflow store (SQLite)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from optimizer.cli import main
from optimizer.output.mlflow_log import EXPERIMENT, STATUS, TRIAL_METRICS
from optimizer.study.storage import stored_study
from studies import FAST_CLI


@pytest.mark.server
def test_a_study_logs_one_run_with_its_trials_and_outputs_and_a_rerun_adds_nothing(models, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    storage = f"sqlite:///{tmp_path / 'm.db'}"
    args = [
        "study",
        "--model",
        str(models["mlp"]),
        "--study-name",
        "ml",
        "--storage",
        storage,
        "--budget",
        "3",
    ]
    assert main([*args, *FAST_CLI, "--mlflow-uri", uri]) == 0
    assert f"at {uri}" in capsys.readouterr().out
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    with stored_study("ml", storage) as study:
        trials = {t.number: t for t in study.trials}
        best = max((t for t in trials.values() if t.user_attrs.get("feasible")), key=lambda t: t.value)
        assert parent.data.tags["optimize.study"] == "ml" and parent.info.status == "FINISHED"
        assert parent.data.params["model_sha256"] == study.user_attrs["model_sha256"]
        assert float(parent.data.params["latency_budget_ms"]) == study.user_attrs["latency_budget_ms"]
        assert parent.data.metrics["best_throughput"] == pytest.approx(best.user_attrs["throughput"])
        # Each finished trial a child run: its config as params, its figures as metrics.
        assert sorted(int(r.data.tags["optimize.trial"]) for r in children) == sorted(trials)
        for child in children:
            trial = trials[int(child.data.tags["optimize.trial"])]
            assert child.data.params["config"] == trial.user_attrs["candidate"]
            assert {k: child.data.params[k] for k in trial.params} == {
                k: str(v) for k, v in trial.params.items()
            }
            # Each figure the trial recorded (a pruned trial may have none): the same value in MLflow.
            figures = {
                k: trial.user_attrs[k]
                for k in TRIAL_METRICS
                if isinstance(trial.user_attrs.get(k), (int, float))
            }
            assert child.data.metrics == pytest.approx(figures)
            assert child.info.status == STATUS[trial.state]
        assert any("throughput" in child.data.metrics for child in children)
    # The best config.pbtxt, the report and the exported repository as artifacts.
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.pbtxt", "report", "best_repository"} <= top
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/trials.csv", "report/pareto.png"} <= report
    # The same command again: the study runs nothing more, and MLflow gains no duplicate run.
    assert main([*args, *FAST_CLI, "--mlflow-uri", uri]) == 0
    again = client.search_runs([experiment.experiment_id])
    assert len(again) == len(runs)
    capsys.readouterr()


def test_an_unreachable_tracking_server_is_a_warning_and_loses_nothing(models, tmp_path, capsys, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'u.db'}"
    args = [
        "study",
        "--model",
        str(models["mlp"]),
        "--study-name",
        "u",
        "--storage",
        storage,
        "--budget",
        "2",
    ]
    uri = "http://127.0.0.1:9"  # the discard port: nothing answers
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main([*args, *FAST_CLI, "--mlflow-uri", uri]) == 0
    err = capsys.readouterr().err
    assert "warning: could not log to MLflow at http://127.0.0.1:9" in err and "rerun the same command" in err
    with stored_study("u", storage) as study:
        assert len([t for t in study.trials if t.state.is_finished()]) == 2
