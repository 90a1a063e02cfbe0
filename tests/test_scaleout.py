"""Several workers on one study through a real PostgreSQL, and crash recovery.

The workers here share this 2-core machine (with --allow-shared-host): these tests prove correctness
(budget, baseline once, retries, refusals), not speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from postgres import postgres_server

from optimizer.errors import StudyError
from optimizer.study import trial as trial_module
from optimizer.study.records import workers_of
from optimizer.study.run import run_study
from optimizer.study.storage import count_finished, worker_id
from studies import FAST_CLI, study_settings

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def pg(postgres_url):
    """One storage for the test's own reads, closed at the end (unclosed connections warn)."""
    from optimizer.study.storage import open_storage

    storage = open_storage(postgres_url)
    yield storage
    storage.engine.dispose()


def _worker(model, url, name, *extra):
    command = [
        sys.executable,
        "-m",
        "optimizer",
        "study",
        "--model",
        str(model),
        "--storage",
        url,
        "--study-name",
        name,
        "--latency-budget-ms",
        "200",
        *FAST_CLI,
        *extra,
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _measured(study):
    return [
        t
        for t in study.trials
        if t.state.is_finished()
        and "same_config_as" not in t.user_attrs
        and "surplus" not in t.user_attrs
        and (t.state != optuna.trial.TrialState.FAIL or "reason" in t.user_attrs)
    ]


def test_two_workers_share_one_study_to_exactly_its_budget(models, postgres_url, pg):
    workers = [
        _worker(models["mlp"], postgres_url, "shared", "--budget", "6", "--seed", "1", "--allow-shared-host")
        for _ in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=pg)
    measured = _measured(study)
    assert count_finished(study) == len(measured) == 6
    assert sum(1 for t in study.trials if t.user_attrs.get("baseline")) == 1
    # No config measured twice by two workers at once. A trial failed by a fault of the moment (a crash, a
    # hang) is by design measured again when its config comes up (it is not inherited), so it is not a twin.
    kept = [t for t in measured if not t.user_attrs.get("transient_fault")]
    keys = Counter(t.user_attrs["config_digest"] for t in kept)
    assert max(keys.values()) == 1, [(t.number, t.state.name, t.user_attrs.get("reason")) for t in measured]
    assert len({t.user_attrs["worker"] for t in measured}) == 2  # both workers ran trials
    assert all(t.user_attrs["host"] for t in measured)
    assert len(workers_of(study.user_attrs)) == 2


def test_two_workers_share_one_joint_study_to_exactly_its_budget(models, postgres_url, pg):
    command = [sys.executable, "-m", "optimizer", "study", "--model", str(models["mlp"]), "--model"]
    command += [str(models["cnn"]), "--shape", "cnn.image:3,32,32", "--latency-budget-ms", "300"]
    command += ["--storage", postgres_url, "--study-name", "joint-shared", "--budget", "6", "--seed", "1"]
    command += ["--allow-shared-host", "--window-s", "0.3", "--warmup-s", "0.1"]
    workers = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    study = optuna.load_study(study_name="joint-shared", storage=pg)
    counted = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("surplus")]
    assert len(counted) == 6  # the study's budget, not each worker's
    assert sum(1 for t in study.trials if t.user_attrs.get("baseline")) == 1
    assert all(set(t.user_attrs["configs"]) == {"mlp", "cnn"} for t in counted if "configs" in t.user_attrs)
    assert len({t.user_attrs["worker"] for t in counted}) == 2  # both workers ran trials
    assert len(workers_of(study.user_attrs)) == 2


def test_a_second_worker_on_the_same_host_is_refused_without_pinning(models, postgres_url, pg):
    first = _worker(models["mlp"], postgres_url, "lonely", "--budget", "30")
    try:
        deadline = time.monotonic() + 60
        study = None
        while time.monotonic() < deadline:
            try:
                study = optuna.load_study(study_name="lonely", storage=pg)
                if workers_of(study.user_attrs):
                    break
            except KeyError:
                pass
            time.sleep(0.2)
        second = _worker(models["mlp"], postgres_url, "lonely", "--budget", "30")
        _, err = second.communicate(timeout=120)
        assert second.returncode != 0
        assert "another worker of study 'lonely' runs on this host" in err and "--cpus" in err
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)


def test_a_second_study_on_the_same_sqlite_file_while_one_runs_is_refused_and_loses_nothing(models, tmp_path):
    """SQLite: the second command is refused in one line; the first runs on and ends with its budget."""
    url = f"sqlite:///{tmp_path / 'one.db'}"
    first = _worker(models["mlp"], url, "one", "--budget", "3")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if workers_of(optuna.load_study(study_name="one", storage=url).user_attrs):
                    break
            except KeyError:
                pass
            time.sleep(0.2)
        second = _worker(models["mlp"], url, "one", "--budget", "3")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 6, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "another worker of study 'one' runs on this host" in lines[0]
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGINT)
            first.communicate(timeout=60)
    study = optuna.load_study(study_name="one", storage=url)
    assert len(_measured(study)) == 3
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_worker_killed_mid_trial_has_its_trial_retried_by_the_other(models, postgres_url, pg):
    # Windows of 0.6 s at three levels: a trial measures long enough to be killed in the middle of it.
    slow = ["--budget", "4", "--allow-shared-host", "--window-s", "0.6", "--stop-rule", "fixed"]
    victim = _worker(models["mlp"], postgres_url, "retry", *slow)
    deadline = time.monotonic() + 120
    killed = None
    while time.monotonic() < deadline and killed is None:
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="retry", storage=pg)
        except KeyError:
            continue
        for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            if "load_s" in trial.user_attrs and trial.number >= 1:
                victim.send_signal(signal.SIGKILL)
                victim.communicate()
                killed = trial
                break
    assert killed is not None, "the victim never got to measure a trial"
    survivor = _worker(models["mlp"], postgres_url, "retry", *slow)
    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err
    study = optuna.load_study(study_name="retry", storage=pg)
    assert study.trials[killed.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state.is_finished() and retries[0].params == killed.params
    assert count_finished(study) == 4
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def test_a_worker_with_another_model_or_latency_budget_is_refused(models, triton, postgres_url, tmp_path):
    run_study(
        study_settings(models["mlp"], tmp_path, budget=1, storage=postgres_url, study_name="strict"),
        target=triton,
    )
    with pytest.raises(StudyError, match="different model"):
        run_study(
            study_settings(models["cnn"], tmp_path, budget=2, storage=postgres_url, study_name="strict")
        )
    with pytest.raises(StudyError, match="latency budget"):
        run_study(
            study_settings(
                models["mlp"],
                tmp_path,
                budget=2,
                storage=postgres_url,
                study_name="strict",
                latency_budget_ms=10.0,
            )
        )


def test_migrate_copies_a_sqlite_study_into_postgresql(models, triton, postgres_url, pg, tmp_path, capsys):
    from optimizer.cli import main

    run_study(study_settings(models["mlp"], tmp_path, budget=2, study_name="laptop"), target=triton)
    source = f"sqlite:///{tmp_path}/laptop.db"
    assert main(["migrate", "--from", source, "--to", postgres_url]) == 0
    copied = optuna.load_study(study_name="laptop", storage=pg)
    original = optuna.load_study(study_name="laptop", storage=source)
    assert [t.value for t in copied.trials] == [t.value for t in original.trials]
    assert copied.user_attrs["model_sha256"] == original.user_attrs["model_sha256"]
    assert main(["migrate", "--from", source, "--to", postgres_url]) == 5
    assert "already has a study named 'laptop'" in capsys.readouterr().err


def _running_trial_with_config(study, key: str, claimed: bool):
    trial = study.ask()
    trial.set_user_attr("worker", worker_id())  # a live worker: nobody recovers its trial
    trial.set_user_attr("config_digest", key)
    if claimed:
        trial.set_user_attr("measured_here", True)
    return trial


def test_a_config_another_worker_is_measuring_is_waited_for_and_reused(monkeypatch):
    monkeypatch.setattr(trial_module, "CLAIM_POLL_S", 0.05)
    study = optuna.create_study(direction="maximize")
    first = _running_trial_with_config(study, "same", claimed=True)
    second = _running_trial_with_config(study, "same", claimed=False)
    reused = []
    waiter = threading.Thread(target=lambda: reused.append(trial_module._claim_config(second, "same")))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # it waits while the other measures
    study.tell(first, 123.0)
    waiter.join(timeout=10)
    assert [t.number for t in reused] == [first.number]
    assert "measured_here" not in study.trials[second.number].user_attrs


def test_between_two_undecided_trials_of_one_config_the_lower_numbered_measures():
    study = optuna.create_study(direction="maximize")
    lower = _running_trial_with_config(study, "same", claimed=False)
    _running_trial_with_config(study, "same", claimed=False)
    _running_trial_with_config(study, "other", claimed=True)
    assert trial_module._claim_config(lower, "same") is None  # returns at once: it measures
    assert study.trials[lower.number].user_attrs["measured_here"] is True


def _postmaster_pid(url: str) -> int:
    """The PostgreSQL server listening on ``url``'s port (its command line names the port)."""
    port = url.rsplit(":", 1)[1].split("/", 1)[0]
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"postgres") and b"-p" in argv and port.encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no PostgreSQL server on port {port}")


def test_a_postgresql_server_that_never_answers_is_a_one_line_storage_error_within_the_connect_timeout():
    from optimizer.errors import StorageError
    from optimizer.study.storage import POSTGRES_CONNECT_ARGS, open_storage

    with postgres_server() as url:
        pid = _postmaster_pid(url)
        os.kill(pid, signal.SIGSTOP)  # connections are accepted by the kernel and never answered
        started = time.monotonic()
        try:
            with pytest.raises(StorageError, match="cannot open study storage") as failure:
                open_storage(url)
        finally:
            os.kill(pid, signal.SIGCONT)
    assert "\n" not in failure.value.message
    assert time.monotonic() - started < 2 * POSTGRES_CONNECT_ARGS["connect_timeout"] + 5
