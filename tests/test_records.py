"""Studies made by earlier versions: their records, renamed or split since, read in today's shape.

The database is real SQLite: a study is run on the encoder recording, its records are rewritten to the
earlier names with SQL (as an earlier version left them), and the study is resumed, reported and
exported by today's code.
"""

from __future__ import annotations

import sqlite3

import optuna

from optimizer.study import records
from optimizer.study.results import best_trial
from optimizer.study.run import run_study
from optimizer.study.settings import SearchSettings
from optimizer.study.storage import count_finished
from optimizer.study.targets import make_target
from studies import ENCODER_RECORDING, replay_settings


def test_each_reader_returns_todays_shape_from_an_earlier_versions_record():
    assert records.config_digest_of({"config_key": "abc"}) == "abc"
    assert records.config_digest_of({"config_digest": "new", "config_key": "old"}) == "new"
    assert records.joint_budgets({"latency_budgets_ms": {"a": 5}, "latency_budget_ms:b": 7}) == {
        "a": 5.0,
        "b": 7.0,
    }
    assert set(records.workers_of({"workers": {"h:1": {}}, "worker:h:2": {}})) == {"h:1", "h:2"}
    assert records.not_measured({"oversubscribed": True}) and not records.not_measured({"baseline": True})
    assert records.baseline_rounds({"baseline": {"trial": 0, "throughput": [1.0]}}) == {
        "trial": 0,
        "throughput": [1.0],
    }
    assert records.baseline_rounds({"baseline": {"trial": 0, "builtin": {}}}) is None  # a cross-check's
    assert records.is_joint({"models": {"a": "x"}}) and not records.is_joint({"model_sha256": "x"})


def _rename_trial_attr(database, old: str, new: str) -> int:
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "UPDATE trial_user_attributes SET key = ? WHERE key = ?", (new, old)
        ).rowcount


def test_a_study_whose_trials_hold_config_key_resumes_and_reuses_their_measurements(tmp_path):
    search = SearchSettings(confirm_finalists=0, second_load_margin=None)
    settings = replay_settings(ENCODER_RECORDING, tmp_path, budget=6, search=search)
    run_study(settings, target=make_target(f"replay:{ENCODER_RECORDING}", seed=0))
    database = tmp_path / "replay.db"
    assert _rename_trial_attr(database, "config_digest", "config_key") >= 6  # as earlier versions stored it

    # Resumed far enough that the sampler proposes configs measured before the rename.
    run_study(
        replay_settings(ENCODER_RECORDING, tmp_path, budget=20, search=search),
        target=make_target(f"replay:{ENCODER_RECORDING}", seed=0),
    )
    study = optuna.load_study(study_name="replay", storage=f"sqlite:///{database}")
    assert count_finished(study) == 20
    old = {t.number: t.user_attrs["config_key"] for t in study.trials if "config_key" in t.user_attrs}
    reused = [
        t
        for t in study.trials
        if "config_digest" in t.user_attrs and t.user_attrs.get("same_config_as") in old
    ]
    assert reused  # the resumed study proposed configs the earlier version had measured
    # A repeat of an earlier version's config is a reuse of its measurement, never a second measurement.
    measured_again = [
        t.number
        for t in study.trials
        if "config_digest" in t.user_attrs
        and "same_config_as" not in t.user_attrs
        and t.user_attrs["config_digest"] in old.values()
    ]
    assert measured_again == []
    assert all(t.user_attrs["config_digest"] == old[t.user_attrs["same_config_as"]] for t in reused)
    assert best_trial(study) is not None
