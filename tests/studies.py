"""Helpers the study tests share: fast measurement settings, study settings, reading a study back."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import optuna

from optimizer.measurement.levels import MeasureSettings
from optimizer.measurement.replay import load_surface
from optimizer.serving.base import ServingTarget
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.results import StudySummary
from optimizer.study.run import QuietReporter
from optimizer.study.settings import SearchSettings, StudySettings

# Fixed short windows: tests check behaviour, not figures.
FAST = MeasureSettings(warmup_s=0.1, window_s=0.3, min_requests=10, max_window_s=1.0, rule="fixed")
FAST_CLI = [
    "--window-s",
    "0.3",
    "--warmup-s",
    "0.1",
    "--concurrency",
    "1,2,4",
    "--stop-rule",
    "fixed",
    "--confirm",
    "0",
]
# Tests of other things export the best single measurement; the confirmation has tests of its own.
# Every trial one load and no confirmation: the figures the tests check are single measurements.
NO_CONFIRMATION = SearchSettings(confirm_finalists=0, second_load_margin=None)


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
        search=NO_CONFIRMATION,
    )
    values.update(overrides)
    return StudySettings(**values)


# A recording of the example encoder's grid space (bench/data): a study against it needs no server.
ENCODER_RECORDING = Path(__file__).resolve().parent.parent / "bench" / "data" / "encoder"


def replay_settings(recording: Path, tmp_path: Path, **overrides) -> StudySettings:
    """A study of a recording's own model and space (study "replay"), at its recorded latency budget."""
    surface = load_surface(recording)
    values = dict(
        model_path=surface.model_path(),
        shapes=surface.shapes,
        budget=8,
        space=str(surface.space_path),
        study_name="replay",
        output_dir=tmp_path,
        seed=0,
        latency_budget_ms=surface.latency_budget_ms,
        search=NO_CONFIRMATION,
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


class RejectingTarget(ServingTarget):
    """A real, running server that receives one deliberately invalid config (the third load).

    Everything else goes to the wrapped server as it is, so the study meets a real rejection.
    """

    name = "embedded"

    def __init__(self, server: ServingTarget):
        self.server, self.loads = server, 0
        self.capabilities = server.capabilities

    def load_model(self, name, config_json, files):
        self.loads += 1
        if self.loads == 3:
            config_json = config_json.replace('"max_batch_size"', '"max_batch_size": -5, "ignored"', 1)
        return self.server.load_model(name, config_json, files)

    def start(self):
        self.server.start()

    def stop(self):
        self.server.stop()

    def restart(self):
        self.server.restart()

    def is_alive(self):
        return self.server.is_alive()

    def server_version(self):
        return self.server.server_version()

    @property
    def grpc_url(self):
        return self.server.grpc_url

    @property
    def http_url(self):
        return self.server.http_url

    @property
    def metrics_url(self):
        return self.server.metrics_url

    @property
    def pid(self):
        return self.server.pid


@dataclass(frozen=True)
class FinishedStudy:
    """A study some tests share: where it lives, what ``run_study`` (or the CLI) returned, the study."""

    root: Path
    study: optuna.Study
    summary: StudySummary | None = None  # run_study's answer (None when run through the CLI)
    exit_code: int | None = None  # the CLI's (None when run through run_study)
    stderr: str = ""

    @property
    def url(self) -> str:
        return f"sqlite:///{self.root}/{self.study.study_name}.db"
