"""The study end to end: real embedded Triton, real SQLite, small real models, small budgets."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from procs import alive, children, group_members

from optimizer.cli import main
from optimizer.config.render import config_from_pbtxt, to_json
from optimizer.errors import StudyError
from optimizer.measurement.levels import MeasureSettings
from optimizer.measurement.replay import ReplayTarget
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.run import QuietReporter, run_study
from optimizer.study.storage import count_finished
from studies import (
    ENCODER_RECORDING,
    FAST_CLI,
    CrashOnTrial,
    load_study,
    replay_settings,
    study_settings,
    trial_states,
)

pytestmark = pytest.mark.server


def test_study_runs_to_budget_records_everything_and_exports_the_best(mixed_study):
    summary, study = mixed_study.summary, mixed_study.study
    assert summary.finished == count_finished(study) == 5
    assert study.trials[0].user_attrs["baseline"] is True
    assert summary.baseline is not None and summary.baseline.number == 0
    for key in ("model_sha256", "latency_budget_ms", "space", "server_version", "target", "hardware"):
        assert key in study.user_attrs, key
    assert study.user_attrs["server_version"] == "2.51.0"
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    for trial in complete:
        for key in ("config", "throughput", "p99_ms", "p50_ms", "concurrency", "sweep"):
            assert key in trial.user_attrs, key
        assert trial.user_attrs["p99_ms"] <= 200.0
        assert trial.value == trial.user_attrs["throughput"]
        assert trial.constraints["latency_budget"] <= 0
    # The default cpu space never proposes more threads in all than the server's cores.
    cores = len(os.sched_getaffinity(0))
    for trial in (t for t in study.trials if "config" in t.user_attrs):
        config = trial.user_attrs["config"]
        instances = config["instance_group"][0]["count"]
        threads = int(config.get("parameters", {}).get("intra_op_thread_count", {}).get("string_value", 0))
        assert instances * (threads or cores) <= cores, trial.user_attrs["candidate"]
    best = summary.best_repository
    assert best == mixed_study.root / "mixed" / "best" / "mlp"
    config = config_from_pbtxt((best / "config.pbtxt").read_text())
    assert config.name == "mlp" and config.backend == "onnxruntime"
    model_file = config.default_model_filename or "model.onnx"
    assert (best / "1" / model_file).is_file()


def test_exported_repository_loads_in_a_fresh_triton_as_is(mixed_study, tmp_path):
    repository = tmp_path / "repo"
    args = ["export", "--study-name", "mixed", "--out", str(repository), "--storage", mixed_study.url]
    assert main(args) == 0
    with EmbeddedTriton(model_repository=repository) as server:
        config = config_from_pbtxt((repository / "mlp" / "config.pbtxt").read_text())
        server.control.load("mlp", to_json(config))  # files come from the exported repository itself
        assert server.control.is_model_ready("mlp")


def test_rerun_resumes_and_a_larger_budget_extends_without_touching_finished_trials(tmp_path):
    # Bookkeeping, not measurement: a recorded surface stands in for the server (resuming against the
    # real one is proven by the SIGKILL test below).
    settings = replay_settings(ENCODER_RECORDING, tmp_path, budget=3)
    run_study(settings, target=ReplayTarget(ENCODER_RECORDING, seed=0))
    before = {
        t.number: (t.state, t.value, t.user_attrs.get("sweep")) for t in load_study(tmp_path, "replay").trials
    }
    summary = run_study(settings, target=ReplayTarget(ENCODER_RECORDING, seed=1))
    assert (
        summary.finished == count_finished(load_study(tmp_path, "replay")) == 3
    )  # the rerun measured nothing more
    run_study(replace(settings, budget=5), target=ReplayTarget(ENCODER_RECORDING, seed=2))
    study = load_study(tmp_path, "replay")
    assert count_finished(study) == 5
    assert sum(1 for t in study.trials if t.user_attrs.get("baseline")) == 1
    for number, recorded in before.items():
        trial = study.trials[number]
        assert (trial.state, trial.value, trial.user_attrs.get("sweep")) == recorded


def test_resuming_with_another_model_or_latency_budget_is_refused(models, triton, tmp_path):
    pid = triton.pid
    run_study(study_settings(models["mlp"], tmp_path, budget=1), target=triton)
    assert triton.is_alive() and triton.pid == pid  # a server the caller started is the caller's to stop
    with pytest.raises(StudyError, match="different model"):
        run_study(study_settings(models["cnn"], tmp_path, budget=2))
    with pytest.raises(StudyError, match="latency budget of 200 ms"):
        run_study(study_settings(models["mlp"], tmp_path, budget=2, latency_budget_ms=50.0))
    assert count_finished(load_study(tmp_path)) == 1


def test_impossible_latency_budget_ends_with_a_clear_error_and_keeps_the_database(tight_study):
    assert tight_study.exit_code == 6
    assert "no configuration met the 0.001 ms latency budget" in tight_study.stderr
    assert "Traceback" not in tight_study.stderr
    study = tight_study.study
    assert count_finished(study) == 2
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    assert all(
        t.user_attrs["feasible"] is False and t.constraints["latency_budget"] > 0 for t in study.trials
    )


def test_rejected_config_fails_only_its_trial(mixed_study):
    study = mixed_study.study
    states = [t.state for t in study.trials]
    assert mixed_study.summary.finished == 5 and states.count(optuna.trial.TrialState.FAIL) == 1
    failed = next(t for t in study.trials if t.state == optuna.trial.TrialState.FAIL)
    assert failed.user_attrs["reason"].startswith("Triton rejected the config")
    later = [t for t in study.trials if t.number > failed.number]
    assert later and all(t.state != optuna.trial.TrialState.FAIL for t in later)


def test_server_crash_mid_trial_fails_only_that_trial_and_the_study_goes_on(models, tmp_path):
    target = EmbeddedTriton()
    # Long enough windows that trial 1 is still measuring when the server is killed 2.2 s after it starts.
    slow = MeasureSettings(warmup_s=0.3, window_s=1.0, min_requests=10, max_window_s=2.0, rule="fixed")
    summary = run_study(
        study_settings(models["mlp"], tmp_path, budget=3, measure=slow),
        CrashOnTrial(target, 1),
        target=target,
    )
    study = load_study(tmp_path)
    crashed = study.trials[1]
    assert crashed.state == optuna.trial.TrialState.FAIL
    assert "crashed" in crashed.user_attrs["reason"]
    assert summary.finished == 3
    assert all(t.state != optuna.trial.TrialState.FAIL for t in study.trials[2:])
    # The crash came under Triton's stream API: the trials after it were measured with unary calls.
    assert not any("unary_calls" in t.user_attrs for t in study.trials[:2])
    assert all(t.user_attrs.get("unary_calls") for t in study.trials[2:] if "load_s" in t.user_attrs)
    assert any("load_s" in t.user_attrs for t in study.trials[2:])


def test_sigkill_mid_study_then_rerun_finishes_at_exactly_the_budget(models, tmp_path):
    db = tmp_path / "killed.db"
    command = [
        sys.executable,
        "-m",
        "optimizer",
        "study",
        "--model",
        str(models["mlp"]),
        "--budget",
        "4",
        "--latency-budget-ms",
        "200",
        "--study-name",
        "killed",
        "--storage",
        f"sqlite:///{db}",
        *FAST_CLI,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        states = trial_states(db)
        if states.count("COMPLETE") + states.count("PRUNED") >= 2 and "MEASURING" in states:
            break
        time.sleep(0.05)
    else:
        process.kill()
        pytest.fail(f"the study never reached a running third trial: {trial_states(db)}")
    server_pids = children(process.pid, "tritonserver")
    stub_pids = [pid for server in server_pids for pid in group_members(server) if pid != server]
    assert stub_pids  # the backend stubs, children of the server: they outlive it unless reaped
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = {
        t.number: t.value for t in load_study(tmp_path, "killed").trials if t.state.is_finished()
    }
    time.sleep(0.5)
    assert all(
        not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        for pid in server_pids
    )  # the server died with its parent
    assert main(command[3:]) == 0
    assert not [pid for pid in stub_pids if alive(pid)]  # the rerun reaped the orphaned stubs
    study = load_study(tmp_path, "killed")
    assert count_finished(study) == 4
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for number, value in finished_before.items():
        assert study.trials[number].value == value


def test_bad_space_file_and_bad_storage_url_give_one_line_errors(models, tmp_path, capsys):
    space = tmp_path / "bad.yaml"
    space.write_text("max_batch_size: [1, 48]\n")
    common = ["study", "--model", str(models["mlp"]), "--budget", "1"]
    assert main([*common, "--space", str(space)]) == 4
    assert main([*common, "--storage", "notaurl"]) == 5
    assert main([*common, "--storage", "postgresql://nobody@127.0.0.1:1/none"]) == 5
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 3 and all(line.startswith("Error: ") for line in lines)
    assert "max_batch_size" in lines[0] and "48" in lines[0]
    assert "malformed" in lines[1]
    assert "cannot open study storage" in lines[2]


class NoteTaker(QuietReporter):
    def __init__(self):
        self.notes: list[str] = []

    def note(self, message):
        self.notes.append(message)


def test_default_latency_budget_is_ten_times_the_median_of_five_probes_and_says_how(models, triton, tmp_path):
    reporter = NoteTaker()
    summary = run_study(
        study_settings(models["mlp"], tmp_path, budget=1, latency_budget_ms=None), reporter, target=triton
    )
    study = load_study(tmp_path)
    source = study.user_attrs["latency_budget_source"]
    assert len(source["probes_ms"]) == 5 and all(p99 > 0 for p99 in source["probes_ms"])
    assert source["median_ms"] == sorted(source["probes_ms"])[2]
    expected = max(5.0, math.ceil(source["median_ms"] * 10))
    assert (
        summary.latency_budget_ms == study.user_attrs["latency_budget_ms"] == pytest.approx(expected, abs=1)
    )
    (note,) = [n for n in reporter.notes if n.startswith("latency budget:")]
    assert "median single-request p99" in note and "over 5 probes ranging" in note
