"""Fault injection against the real embedded Triton and real SQLite: hangs, broken variants, read-only
storage, an export cut short. Each fault fails only what it touches and a rerun completes the study."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from procs import children

from optimizer.config import repository as repository_module
from optimizer.config.render import render_config, to_json
from optimizer.config.space import Candidate
from optimizer.errors import InferenceError
from optimizer.measurement.builtin import LoadGenerator, measurement_deadline_s
from optimizer.measurement.levels import MeasureSettings
from optimizer.measurement.mixed import measure_mix
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.model.variants import variant_path
from optimizer.paths import cache_dir
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.serving.process import STUB_NAME
from optimizer.study.precisions import int8_recipe_of
from optimizer.study.run import QuietReporter, run_study
from optimizer.study.storage import count_finished
from studies import FAST_CLI, load_study, study_settings, trial_states

pytestmark = pytest.mark.server


class HangOnTrial(QuietReporter):
    """Stops the real server with SIGSTOP shortly after trial ``number`` starts: requests hang."""

    def __init__(self, target: EmbeddedTriton, number: int):
        self.target, self.number, self.stopped_pid = target, number, None

    def trial_started(self, number, summary, done, budget):
        if number == self.number:
            self.stopped_pid = self.target.pid
            threading.Timer(2.0, os.kill, (self.stopped_pid, signal.SIGSTOP)).start()


def test_hung_server_fails_its_trial_by_timeout_and_a_fresh_server_takes_over(models, tmp_path):
    target = EmbeddedTriton()
    measure = MeasureSettings(
        warmup_s=0.3, window_s=1.0, min_requests=10, max_window_s=2.0, request_timeout_s=2.0, rule="fixed"
    )
    reporter = HangOnTrial(target, 1)
    summary = run_study(
        study_settings(models["mlp"], tmp_path, budget=3, measure=measure), reporter, target=target
    )
    study = load_study(tmp_path)
    hung = study.trials[1]
    assert hung.state == optuna.trial.TrialState.FAIL
    assert "hung" in hung.user_attrs["reason"]
    assert summary.finished == 3  # the trial after the hang ran on the fresh server
    assert [t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL] == [1]
    assert hung.user_attrs["transient_fault"] is True  # a repeat of its config is measured, not inherited
    assert (
        not Path(f"/proc/{reporter.stopped_pid}").exists()
        or "Z" in Path(f"/proc/{reporter.stopped_pid}/stat").read_text().split()[2]
    )


class KillTheStubsOnTrial(QuietReporter):
    """SIGKILLs the server's backend stubs (its model instances) in the middle of trial ``number``'s
    measurement, as the kernel's out-of-memory killer would."""

    def __init__(self, target: EmbeddedTriton, number: int):
        self.target, self.number = target, number
        self.killed: list[int] = []

    def trial_started(self, number, summary, done, budget):
        if number == self.number:
            threading.Timer(4.0, self._kill_the_stubs).start()

    def _kill_the_stubs(self):
        for stub in children(self.target.pid, STUB_NAME[:15]):  # /proc cuts a command name at 15 characters
            os.kill(stub, signal.SIGKILL)
            self.killed.append(stub)


def test_a_killed_backend_stub_fails_its_trial_and_the_server_is_restarted_whole(models, tmp_path):
    target = EmbeddedTriton()
    reporter = KillTheStubsOnTrial(target, 1)
    measure = MeasureSettings(
        warmup_s=0.3, window_s=2.0, min_requests=10, request_timeout_s=2.0, rule="fixed"
    )
    summary = run_study(
        study_settings(models["mlp"], tmp_path, budget=3, measure=measure), reporter, target=target
    )
    assert reporter.killed, "no backend stub to kill"
    study = load_study(tmp_path)
    failed = study.trials[1]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "is not healthy" in failed.user_attrs["reason"], failed.user_attrs["reason"]
    assert failed.user_attrs["transient_fault"] is True
    assert summary.finished == 3  # the trial after it ran on the restarted server, every instance whole
    assert study.trials[2].state == optuna.trial.TrialState.COMPLETE


@pytest.fixture(scope="module")
def stoppable(models):
    """A server of its own serving the mlp, which a test may stop (SIGSTOP) and must resume; its samples."""
    info = inspect_model(models["mlp"])
    with EmbeddedTriton() as server:
        config = render_config(info, Candidate(max_batch_size=4), model_name="mlp")
        server.load_model("mlp", to_json(config), {"1/model.onnx": info.path})
        yield server, [synthetic_inputs(info, resolve_shapes(info, {}), 1, seed=seed) for seed in range(4)]


HANG_TIMEOUT_S = 2.0
HANG_MEASURE = MeasureSettings(
    warmup_s=0.3,
    window_s=1.0,
    min_requests=10,
    max_window_s=2.0,
    request_timeout_s=HANG_TIMEOUT_S,
    rule="fixed",
)


@contextmanager
def _stopped(server: EmbeddedTriton, after_s: float):
    """The server SIGSTOPped now (``after_s`` 0) or ``after_s`` into the block; resumed after it."""
    pid = server.pid
    timer = threading.Timer(after_s, os.kill, (pid, signal.SIGSTOP))
    if after_s:
        timer.start()
    else:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        timer.cancel()
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("stop_after_s", [0.0, 0.5], ids=["stopped-before", "stopped-during"])
@pytest.mark.parametrize(
    "protocol, mode, streaming",
    [
        ("grpc", "concurrency", True),
        ("grpc", "concurrency", False),
        ("grpc", "request_rate", True),
        ("http", "concurrency", True),
        ("http", "request_rate", True),
    ],
    ids=["grpc-stream", "grpc-unary", "grpc-open-loop", "http", "http-open-loop"],
)
def test_a_hung_server_fails_every_load_path_in_about_the_request_timeout(
    stoppable, protocol, mode, streaming, stop_after_s
):
    server, samples = stoppable
    url = server.grpc_url if protocol == "grpc" else server.http_url.split("://", 1)[1]
    generator = LoadGenerator(
        url, "mlp", samples, HANG_MEASURE, protocol=protocol, mode=mode, streaming=streaming
    )
    levels = [2, 4, 8] if mode == "concurrency" else [50, 100, 200]
    started = time.monotonic()
    with _stopped(server, stop_after_s), pytest.raises(InferenceError, match="timed out") as failure:
        generator.run_levels(levels, lambda index, level: True)
    seconds = time.monotonic() - started
    assert "server hung" in failure.value.message
    # The hang is noticed by the request timeout (a stream's watchdog checks every second), not the
    # measurement's last-resort deadline.
    assert seconds < stop_after_s + 3 * HANG_TIMEOUT_S + 2.0
    assert seconds < measurement_deadline_s(HANG_MEASURE, len(levels))


def test_a_hung_server_fails_a_mixed_load_in_about_the_request_timeout(stoppable):
    server, samples = stoppable
    started = time.monotonic()
    with _stopped(server, 0.0), pytest.raises(InferenceError, match="timed out"):
        measure_mix(server.grpc_url, {"mlp": samples}, 4, {"mlp": 1.0}, {"mlp": 1000.0}, HANG_MEASURE)
    assert time.monotonic() - started < 3 * HANG_TIMEOUT_S + 2.0


def test_variant_that_fails_to_initialise_fails_only_its_trials(models, triton, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("precisions: [fp32, int8]\nmax_batch_size: [1, 4]\ninstance_count: [1, 2]\n")
    settings = study_settings(models["cnn"], tmp_path, budget=1, space=str(space), seed=11)
    run_study(settings, target=triton)  # the accuracy check passes and is recorded
    served = int8_recipe_of(load_study(tmp_path))  # the recipe whose file the study serves
    broken = variant_path(inspect_model(models["cnn"]), "int8", cache_dir(), served)
    original = broken.read_bytes()
    broken.write_bytes(original[: len(original) // 4])  # the cached int8 file no longer loads
    try:
        # 6 of the space's 8 configs (4 int8, 4 fp32): at least two of each precision get measured.
        run_study(settings.__class__(**{**settings.__dict__, "budget": 6}), target=triton)
    finally:
        broken.write_bytes(original)
    study = load_study(tmp_path)
    int8 = [t for t in study.trials if t.params.get("precision") == "int8"]
    fp32 = [t for t in study.trials[1:] if t.params.get("precision") == "fp32"]
    assert int8 and fp32, [t.params for t in study.trials]
    for trial in int8:
        assert trial.state == optuna.trial.TrialState.FAIL
        assert trial.user_attrs["reason"].startswith("Triton rejected the config")
    assert all(t.state != optuna.trial.TrialState.FAIL for t in fp32)
    assert count_finished(study) == 6


@contextmanager
def _immutable(directory: Path):
    subprocess.run(["chattr", "+i", str(directory)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_read_only_study_directory_is_a_clear_error_before_any_trial(models, tmp_path, capsys):
    from optimizer.cli import main

    frozen = tmp_path / "frozen"
    frozen.mkdir()
    with _immutable(frozen):
        code = main(
            ["study", "--model", str(models["mlp"]), "--budget", "1", "--storage", f"sqlite:///{frozen}/s.db"]
        )
    err = capsys.readouterr().err.strip()
    assert code == 5 and err.startswith("Error: cannot open study storage") and "\n" not in err


def test_storage_turning_read_only_mid_study_stops_cleanly_and_a_rerun_completes(models, tmp_path):
    directory = tmp_path / "db"
    directory.mkdir()
    db = directory / "ro.db"
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
        "ro",
        "--storage",
        f"sqlite:///{db}",
        *FAST_CLI,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = trial_states(db)  # plain sqlite3: optuna would race the worker creating its tables
        if states.count("COMPLETE") + states.count("PRUNED") >= 2:
            break
        time.sleep(0.2)
    servers = children(process.pid, "tritonserver")
    with _immutable(directory):
        _, err = process.communicate(timeout=120)
    assert process.returncode == 5, err
    assert "the study database stopped accepting reads or writes" in err and "Traceback" not in err
    time.sleep(0.5)
    assert all(not Path(f"/proc/{pid}").exists() for pid in servers)
    kept = {
        t.number: t.value
        for t in optuna.load_study(study_name="ro", storage=f"sqlite:///{db}").trials
        if t.state == optuna.trial.TrialState.COMPLETE
    }
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    study = optuna.load_study(study_name="ro", storage=f"sqlite:///{db}")
    assert count_finished(study) == 4
    assert all(study.trials[n].value == v for n, v in kept.items())


def test_export_cut_short_leaves_the_previous_repository_intact(models, tmp_path, monkeypatch):
    info = inspect_model(models["mlp"])
    config = render_config(info, Candidate(), model_name="mlp")
    first = repository_module.write_repository(tmp_path, config, {"1/model.onnx": info.path})
    before = (first / "config.pbtxt").read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were interrupted halfway through the copy

    monkeypatch.setattr(repository_module.shutil, "copy2", crash)
    changed = render_config(info, Candidate(max_batch_size=8, instance_count=2), model_name="mlp")
    with pytest.raises(KeyboardInterrupt):
        repository_module.write_repository(tmp_path, changed, {"1/model.onnx": info.path})
    assert (first / "config.pbtxt").read_text() == before
    assert (first / "1" / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp"]  # no half-written staging directory left


def test_a_trial_that_never_recorded_its_worker_is_recovered_once_no_other_worker_may_run_it(tmp_path):
    from optimizer.study.storage import open_storage, recover_dead_local_trials

    storage = open_storage(f"sqlite:///{tmp_path}/orphan.db")
    study = optuna.create_study(storage=storage, study_name="orphan", direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    study.set_user_attr("workers", {f"{host}:{dead.pid}": {"host": host, "pid": dead.pid}})
    with pytest.warns(
        UserWarning, match="Heartbeat"
    ):  # ask() outside optimize(): this trial has no heartbeat
        orphan = study.ask()  # RUNNING, and its worker stopped before it could say who it was
    assert recover_dead_local_trials(study) == [orphan.number]
    assert study.trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert [t.state for t in study.trials[1:]] == [optuna.trial.TrialState.WAITING]  # its retry

    study.set_user_attr("workers", {"elsewhere:1": {"host": "elsewhere", "pid": 1}})
    with pytest.warns(UserWarning, match="Heartbeat"):
        another = study.ask()  # a worker on another machine may still be running this one
    assert recover_dead_local_trials(study) == []
    assert study.trials[another.number].state == optuna.trial.TrialState.RUNNING
    storage.engine.dispose()
