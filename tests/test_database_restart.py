"""The study's PostgreSQL server restarting under running workers (a real cluster, stopped and started).

Workers wait for the database with a bounded backoff and say so in one line; the trial in flight goes
on and its writes land when the server is back; past --storage-wait-s a worker stops with one line and
exit 5, and the same command resumes.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from postgres import postgres_cluster

from optimizer.errors import StorageError
from optimizer.study.storage import count_finished, open_storage
from studies import FAST_CLI

pytestmark = pytest.mark.server

OUTAGE_S = 20


def _worker(model: Path, url: str, name: str, log: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "optimizer", "study", "--model", str(model), "--storage", url]
    command += ["--study-name", name, "--latency-budget-ms", "200", *FAST_CLI, *extra]
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_for_finished(
    storage, name: str, count: int, workers: list[subprocess.Popen], limit_s: float
) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if count_finished(optuna.load_study(study_name=name, storage=storage)) >= count:
                return
        except KeyError:  # not created yet
            pass
        assert all(w.poll() is None for w in workers), "a worker ended before the outage"
        time.sleep(0.5)
    raise AssertionError(f"the study never reached {count} finished trials")


def _left_running(study) -> list[int]:
    return [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # ask/tell here, not optimize
def test_a_storage_call_waits_out_a_restart_says_so_and_gives_up_past_the_limit():
    with postgres_cluster() as pg:
        storage = open_storage(pg.url)
        try:
            _wait_out_and_give_up(pg, storage)
        finally:
            storage.engine.dispose()


def _wait_out_and_give_up(pg, storage) -> None:
    notes: list[str] = []
    storage.set_wait(30, notes.append)
    study = optuna.create_study(storage=storage, study_name="calls")
    trial = study.ask()
    pg.stop()
    threading.Timer(4, pg.start).start()
    trial.set_user_attr("written", "after the restart")
    study.tell(trial, 1.0)
    stored = study.trials[0]
    assert stored.state == optuna.trial.TrialState.COMPLETE
    assert stored.user_attrs == {"written": "after the restart"}
    assert len(notes) == 2 and "cannot be reached" in notes[0] and "waiting up to 30 s" in notes[0]
    assert notes[1].startswith("the study database is back after")

    pg.stop()
    storage.set_wait(2, notes.append)
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"could not be reached for \d+ s") as failure:
        study.set_user_attr("lost", True)
    assert time.monotonic() - started < 10
    assert "\n" not in failure.value.message and "--storage-wait-s" in failure.value.message
    pg.start()
    assert optuna.load_study(study_name="calls", storage=storage).trials[0].value == 1.0


def test_three_workers_ride_out_two_database_restarts_to_exactly_their_budget(models, tmp_path):
    budget = 9
    with postgres_cluster() as pg:
        logs = [tmp_path / f"worker{i}.log" for i in range(3)]
        extra = ("--budget", str(budget), "--allow-shared-host", "--storage-wait-s", "120", "--seed", "2")
        workers = [_worker(models["mlp"], pg.url, "restarts", log, *extra) for log in logs]
        storage = open_storage(pg.url)
        try:
            for finished_before in (2, 5):
                _wait_for_finished(storage, "restarts", finished_before, workers, limit_s=150)
                pg.stop()
                time.sleep(OUTAGE_S)
                pg.start()
            codes = [w.wait(timeout=240) for w in workers]
            texts = [log.read_text() for log in logs]
            assert codes == [0, 0, 0], texts
            study = optuna.load_study(study_name="restarts", storage=storage)
            assert count_finished(study) == budget
            assert not _left_running(study)
            # Each outage was waited out and said so, by the workers that met it.
            assert sum(text.count("cannot be reached") for text in texts) >= 2, texts
            assert sum(text.count("the study database is back after") for text in texts) >= 2, texts
            assert not any("Traceback" in text for text in texts), texts
            # No trial lost or counted twice: every measured trial ended once, with its figures. (A trial
            # created twice over a dropped connection leaves an orphan with no parameters, failed unrun.)
            measured = [
                t
                for t in study.trials
                if t.state.is_finished() and t.params and "same_config_as" not in t.user_attrs
            ]
            unowned = [
                (t.number, t.state.name, t.user_attrs) for t in measured if "worker" not in t.user_attrs
            ]
            assert not unowned, unowned
            assert len({t.user_attrs["worker"] for t in measured}) >= 2
        finally:
            for worker in workers:
                worker.kill() if worker.poll() is None else None
            storage.engine.dispose()


def test_a_worker_stops_with_one_line_past_the_storage_wait_and_the_same_command_resumes(models, tmp_path):
    with postgres_cluster() as pg:
        log = tmp_path / "worker.log"
        extra = ("--budget", "2", "--storage-wait-s", "5")
        worker = _worker(models["mlp"], pg.url, "gives-up", log, *extra)
        storage = open_storage(pg.url)
        try:
            _wait_for_finished(storage, "gives-up", 1, [worker], limit_s=120)
            pg.stop()
            code = worker.wait(timeout=120)
            text = log.read_text()
            assert code == 5, text
            failure = [line for line in text.splitlines() if "could not be reached for" in line]
            assert len(failure) == 1 and "rerun the same command" in failure[0], text
            assert "Traceback" not in text, text
            pg.start()
            rerun = _worker(models["mlp"], pg.url, "gives-up", tmp_path / "rerun.log", *extra)
            assert rerun.wait(timeout=240) == 0, (tmp_path / "rerun.log").read_text()
            study = optuna.load_study(study_name="gives-up", storage=storage)
            assert count_finished(study) == 2
            assert not _left_running(study)
        finally:
            worker.kill() if worker.poll() is None else None
            storage.engine.dispose()


def test_every_call_optunas_cache_makes_on_the_storage_waits_out_an_outage():
    """Optuna wraps an RDB storage in its _CachedStorage, which calls private methods of it too
    (_create_new_trial, _get_trials, ...): each must be one that waits (seen: a worker died in _get_trials)."""
    import inspect
    import re

    from optuna.storages import _cached_storage

    from optimizer.study.reconnect import PatientRDBStorage

    called = set(re.findall(r"_backend\.(\w+)\(", inspect.getsource(_cached_storage)))
    no_database = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
    waiting = {name for name in called if hasattr(getattr(PatientRDBStorage, name), "__wrapped__")}
    overridden = {"set_trial_state_values", "record_heartbeat"}  # wait through their own _call
    assert called - no_database - overridden <= waiting, sorted(called - no_database - overridden - waiting)
