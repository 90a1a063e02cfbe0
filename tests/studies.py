"""Helpers the study tests share: fast measurement settings, study settings, reading a study back."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from pathlib import Path

import optuna

from optimizer.measurement.levels import MeasureSettings
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.run import QuietReporter
from optimizer.study.settings import StudySettings

# Fixed short windows: tests check behaviour, not figures.
FAST = MeasureSettings(warmup_s=0.1, window_s=0.3, min_requests=10, max_window_s=1.0, rule="fixed")
FAST_CLI = ["--window-s", "0.3", "--warmup-s", "0.1", "--concurrency", "1,2,4", "--stop-rule", "fixed"]


def study_settings(model: Path, tmp_path: Path, **overrides) -> StudySettings:
    """A small study of ``model`` in ``tmp_path`` (study "s", 4 trials, 200 ms budget, levels 1/2/4)."""
    values = dict(
        model_path=model,
        budget=4,
        latency_budget_ms=200.0,
        study_name="s",
        output_dir=tmp_path,
        concurrency=(1, 2, 4),
        seed=1,
        measure=FAST,
    )
    values.update(overrides)
    return StudySettings(**values)


def load_study(tmp_path: Path, name: str = "s") -> optuna.Study:
    """The study ``name`` written under ``tmp_path`` by :func:`study_settings`."""
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name}.db")


class CrashOnTrial(QuietReporter):
    """Kills the real server with SIGKILL shortly after trial ``number`` starts measuring."""

    def __init__(self, target: EmbeddedTriton, number: int):
        self.target, self.number = target, number

    def trial_started(self, number, summary, done, budget):
        if number == self.number:
            threading.Timer(2.2, lambda: os.kill(self.target.pid, signal.SIGKILL)).start()


def trial_states(db: Path) -> list[str]:
    """Trial states read with plain sqlite3, with MEASURING for a running trial that loaded its config."""
    if not db.exists():
        return []
    query = (
        "select t.state, exists(select 1 from trial_user_attributes a where a.trial_id = t.trial_id and a.key = 'load_s')"
        " from trials t order by t.number"
    )
    with sqlite3.connect(db, timeout=30) as connection:
        try:
            rows = connection.execute(query).fetchall()
        except sqlite3.OperationalError:
            return []
    return ["MEASURING" if state == "RUNNING" and loaded else state for state, loaded in rows]
