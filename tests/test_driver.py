"""One driver for both workloads: a rule of the study run (storage errors, pinning, baseline, the default
budget, which options were given) holds for one model and for several models tuned together.

Both workloads run here without a server, on the repository's recordings (bench/data): one model's
(encoder) and a joint one (encoder + cnn).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from optimizer.cli import AFTER_STUDY_OPTIONS, main, study
from optimizer.errors import StorageError, StudyError
from optimizer.study import driver, joint, joint_trial, run, trial
from optimizer.study.driver import MIN_DEFAULT_BUDGET_MS, default_latency_budget_ms
from optimizer.study.models_file import models_from_flags
from optimizer.study.options import ROUTES, WHAT_IS_TUNED
from optimizer.study.run import QuietReporter, run_study
from optimizer.study.settings import SearchSettings, StudySettings, is_one_model_setting
from optimizer.study.targets import TARGET_OPTIONS, make_target
from studies import ENCODER_RECORDING, replay_settings

JOINT = Path(__file__).resolve().parent.parent / "bench" / "data" / "joint"


def _joint_settings(target, tmp_path: Path, **overrides) -> StudySettings:
    """A joint study of the joint recording's models, in its traffic mix, at its recorded budgets."""
    surface = target.surface
    names = surface.model_names
    shapes = {f"{name}.{tensor}": dims for name in names for tensor, dims in surface.shapes(name).items()}
    mix = ",".join(f"{name}={weight:g}" for name, weight in surface.traffic.items())
    entries = models_from_flags([surface.model_path(name) for name in names], shapes, mix, None)
    budgets = surface.latency_budgets_ms
    entries = tuple(replace(e, latency_budget_ms=budgets[e.name]) for e in entries)
    values = dict(
        models=entries,
        space=str(surface.space_path),
        study_name="joint",
        output_dir=tmp_path,
        seed=0,
    )
    values.update(overrides)
    return StudySettings(**values)


def _run(workload: str, tmp_path: Path, **overrides):
    """Run a short study of ``workload`` ("one" model or "joint") on its recording; its storage URL."""
    if workload == "one":
        target = make_target(f"replay:{ENCODER_RECORDING}", seed=0)
        settings = replay_settings(ENCODER_RECORDING, tmp_path, **{"budget": 2, **overrides})
        run_study(settings, target=target)
        return f"sqlite:///{tmp_path}/replay.db", "replay"
    target = make_target(f"replay:{JOINT}", seed=0)
    run_study(_joint_settings(target, tmp_path, **{"budget": 2, **overrides}), target=target)
    return f"sqlite:///{tmp_path}/joint.db", "joint"


@pytest.mark.parametrize("workload", ["one", "joint"])
def test_pinning_to_gpus_reaches_the_servers_environment_for_both_workloads(workload, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _run(workload, tmp_path, gpus="1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # the server, our child, inherits it


@pytest.mark.parametrize("workload", ["one", "joint"])
def test_both_workloads_start_with_the_baseline_once(workload, tmp_path):
    url, name = _run(workload, tmp_path)
    _run(workload, tmp_path, budget=3)  # resumed: the baseline is not enqueued again
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert [t.number for t in trials if t.user_attrs.get("baseline")] == [0]


# Optuna's heartbeat thread fails on the same immutable file; the CLI's thread hook keeps that quiet
# (tests/test_faults.py runs the CLI in a subprocess for it), here pytest would count it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("workload", ["one", "joint"])
def test_a_database_failing_mid_study_is_the_same_one_line_storage_error_for_both_workloads(
    workload, tmp_path, monkeypatch
):
    # The database file turns immutable (chattr, so root too is refused) as the second trial starts: its
    # writes fail in SQLite for real, whatever the workload.
    objective = trial.TrialRunner if workload == "one" else joint_trial.JointObjective
    real_call = objective.__call__
    database = tmp_path / ("replay.db" if workload == "one" else "joint.db")

    def failing_from_the_second_trial(self, optuna_trial):
        if optuna_trial.number == 1:
            subprocess.run(["chattr", "+i", str(database)], check=True)
        return real_call(self, optuna_trial)

    monkeypatch.setattr(objective, "__call__", failing_from_the_second_trial)
    try:
        with pytest.raises(StorageError) as failure:
            _run(workload, tmp_path, budget=3)
    finally:
        subprocess.run(["chattr", "-i", str(database)], check=False)
    message = failure.value.message
    assert message.startswith("the study database stopped accepting reads or writes") and "\n" not in message
    assert failure.value.exit_code == 5
    study = optuna.load_study(
        study_name="replay" if workload == "one" else "joint", storage=f"sqlite:///{database}"
    )
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE  # the finished trial is kept


def test_the_default_latency_budget_is_one_rule_for_both_workloads():
    assert joint.default_latency_budget_ms is default_latency_budget_ms  # joint.py has no rule of its own
    assert default_latency_budget_ms([3.21, 3.3, 9.0, 3.1, 3.25]) == 33.0  # 10 x the median, rounded up
    assert default_latency_budget_ms([0.05] * 5) == MIN_DEFAULT_BUDGET_MS


def test_every_option_of_the_study_command_reaches_the_settings_the_target_or_the_workload():
    # An option the command declares but nothing reads would be silently ignored.
    options = set(study.__annotations__) - {"ctx", "return"}
    read = set(ROUTES) | set(WHAT_IS_TUNED) | set(TARGET_OPTIONS) - {"headers"} | {"header", "target"}
    read |= set(AFTER_STUDY_OPTIONS)  # read by the command once the study has ended (--mlflow-uri)
    assert options - read == set()
    assert set(ROUTES) - options == set()  # and every route is an option


def test_the_options_a_joint_study_refuses_are_the_settings_only_one_model_reads():
    refused = {option for option, (setting, _) in ROUTES.items() if is_one_model_setting(setting)}
    assert {"concurrency", "sampler", "p99_ci", "confirm", "warm_start", "max_memory_mb"} <= refused
    assert not refused & {"budget", "window_s", "warmup_s", "cpus", "gpus", "seed", "accuracy_tolerance"}


@pytest.mark.parametrize("workload", ["one", "joint"])
def test_both_workloads_run_their_trials_through_the_one_trial_loop(workload, tmp_path, monkeypatch):
    calls = []
    real = driver.run_trials
    monkeypatch.setattr(driver, "run_trials", lambda *args: calls.append(args[1]) or real(*args))
    _run(workload, tmp_path)
    expected = trial.TrialRunner if workload == "one" else joint_trial.JointObjective
    assert len(calls) == 1 and isinstance(calls[0], expected)


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], (3.0, 1.0)),  # the joint study's own window
        (["--window-s", "1", "--warmup-s", "2"], (1.0, 2.0)),  # the one-model defaults, given: applied
        (["--window-s", "0.5"], (0.5, 1.0)),
    ],
)
def test_a_window_given_for_a_joint_study_is_applied_even_when_it_equals_a_default(
    args, expected, tmp_path, monkeypatch
):
    seen = {}

    def capture(settings, reporter=None, *, target=None):
        seen["measure"] = settings.measure
        raise KeyboardInterrupt  # stop here: the settings are what this test is about

    monkeypatch.setattr(run, "run_study", capture)
    url = f"sqlite:///{tmp_path}/r.db"
    code = main(["study", "--target", f"replay:{JOINT}", "--study-name", "r", "--storage", url, *args])
    assert code != 0 and "measure" in seen
    assert (seen["measure"].window_s, seen["measure"].warmup_s) == expected
    assert seen["measure"].max_window_s == 3 * expected[0]


def test_an_option_of_one_models_study_given_at_its_default_is_refused_for_a_joint_study(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/r.db"
    # tpe is --sampler's own default: given, it is still not an option a joint study takes.
    code = main(["study", "--target", f"replay:{JOINT}", "--storage", url, "--sampler", "tpe"])
    assert code == 2
    assert "--sampler is an option of one model's study" in capsys.readouterr().err


class _Recorder(QuietReporter):
    def __init__(self) -> None:
        self.finished: list = []

    def trial_finished(self, report, best_throughput) -> None:
        self.finished.append(report)


def test_each_finished_trial_is_reported_once_as_the_database_holds_it(tmp_path):
    # A new study enqueues its starting points after the baseline: the trial reported after the
    # baseline was once the highest-numbered one, a starting point still waiting ("failed: interrupted").
    reporter = _Recorder()
    target = make_target(f"replay:{ENCODER_RECORDING}", seed=0)
    search = SearchSettings(confirm_finalists=0, second_load_margin=None, starting_points=("variants",))
    run_study(replay_settings(ENCODER_RECORDING, tmp_path, budget=4, search=search), reporter, target=target)
    trials = optuna.load_study(study_name="replay", storage=f"sqlite:///{tmp_path}/replay.db").trials
    states = {t.number: t.state.name.lower().replace("fail", "failed") for t in trials}
    assert [r.number for r in reporter.finished] == sorted(states)[: len(reporter.finished)]
    assert reporter.finished and all(r.state == states[r.number] for r in reporter.finished)
    assert all(r.reason != "interrupted" for r in reporter.finished)


@pytest.mark.parametrize("workload", ["one", "joint"])
def test_resuming_with_another_accuracy_tolerance_is_refused_for_both_workloads(workload, tmp_path):
    url, name = _run(workload, tmp_path)
    before = len(optuna.load_study(study_name=name, storage=url).trials)
    with pytest.raises(StudyError, match="uses an accuracy tolerance of 0.01, not 0.05"):
        _run(workload, tmp_path, budget=3, accuracy_tolerance=0.05)
    assert len(optuna.load_study(study_name=name, storage=url).trials) == before  # nothing run, nothing lost


@pytest.mark.parametrize("workload", ["one", "joint"])
def test_both_workloads_record_the_server_and_the_machine_they_ran_on(workload, tmp_path):
    url, name = _run(workload, tmp_path)
    attrs = optuna.load_study(study_name=name, storage=url).user_attrs
    assert attrs["target"] == "replay" and attrs["server_version"].startswith("replay of")
    assert attrs["hardware"]["cores"] >= 1 and attrs["budget"] == 2 and attrs["cpu_cores"] >= 1


def test_a_study_of_one_model_and_a_joint_study_refuse_each_others_name(tmp_path):
    _run("one", tmp_path)
    _run("joint", tmp_path)
    with pytest.raises(StudyError, match="tunes one model: give a new --study-name"):
        _run("joint", tmp_path, study_name="replay")
    with pytest.raises(StudyError, match="tunes several models together: give a new --study-name"):
        _run("one", tmp_path, study_name="joint")
