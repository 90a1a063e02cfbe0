"""The cross-check: the baseline and the best measured by perf_analyzer beside the built-in generator,
recorded in the study attribute ``confirmation``, shown in the summary and the report."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from optimizer.cli import main
from optimizer.errors import UsageError
from optimizer.measurement.levels import LevelResult
from optimizer.measurement.replay import ReplayTarget
from optimizer.report.data import build_report_data
from optimizer.report.html import render_html
from optimizer.study.confirm import CONFIRMATION, RemeasureFailed
from optimizer.study.crosscheck import cross_check, cross_check_rows, needs_cross_check
from optimizer.study.run import run_study
from studies import ENCODER_RECORDING, load_study, replay_settings, study_settings


def _trial(number: int, concurrency: int = 4) -> optuna.trial.FrozenTrial:
    trial = create_trial(value=100.0, user_attrs={"concurrency": concurrency, "config": {}})
    trial.number = number
    return trial


def _level(throughput: float, p99_ms: float) -> LevelResult:
    return LevelResult(
        concurrency=4,
        requests=100,
        duration_s=1.0,
        throughput=throughput,
        p50_ms=1.0,
        p95_ms=1.0,
        p99_ms=p99_ms,
    )


def test_each_trial_is_measured_by_both_engines_alternating_and_disagreements_are_flagged():
    calls = []
    figures = {(0, "builtin"): (100, 10), (0, "perf_analyzer"): (104, 10.5), (7, "builtin"): (200, 20)}
    figures[(7, "perf_analyzer")] = (170, 20.5)  # ours 18% above: a disagreement

    def measure(trial, engines):
        calls.append((trial.number, engines))
        return [_level(*figures[(trial.number, engine)]) for engine in engines]

    record = cross_check([("baseline", _trial(0)), ("best", _trial(7))], measure, "perf_analyzer")
    assert calls == [(0, ("builtin", "perf_analyzer")), (7, ("perf_analyzer", "builtin"))]
    assert record["engine"] == "perf_analyzer"
    assert record["baseline"] == {
        "trial": 0,
        "load": "concurrency 4",
        "builtin": {"throughput": 100.0, "p99_ms": 10.0},
        "perf_analyzer": {"throughput": 104.0, "p99_ms": 10.5},
    }
    assert record["best"]["perf_analyzer"] == {"throughput": 170.0, "p99_ms": 20.5}
    assert record["disagreements"] == [
        "best: throughput differs by +18% (builtin 200.0, perf_analyzer 170.0 inf/s)"
    ]
    rows = cross_check_rows(record)
    assert [(r.role, r.disagrees) for r in rows] == [("baseline", False), ("best", True)]
    assert rows[1].throughput_difference == pytest.approx(30 / 170)


def test_a_best_that_is_the_baseline_is_measured_once_and_a_failure_is_recorded():
    calls = []

    def measure(trial, engines):
        calls.append(trial.number)
        raise RemeasureFailed("Triton rejected the config")

    baseline = _trial(0)
    record = cross_check([("baseline", baseline), ("best", baseline)], measure, "perf_analyzer")
    assert calls == [0]
    assert (
        record["best"]
        == record["baseline"]
        == {
            "trial": 0,
            "load": "concurrency 4",
            "failure": "Triton rejected the config",
        }
    )
    assert record["disagreements"] == []


def test_a_cross_check_is_redone_for_a_new_best_or_another_engine_only():
    best = _trial(5)
    checked = {CONFIRMATION: {"engine": "perf_analyzer", "best": {"trial": 5}, "finalists": []}}
    assert not needs_cross_check(checked, "perf_analyzer", best)
    assert needs_cross_check(checked, "perf_analyzer", _trial(6))
    assert needs_cross_check({CONFIRMATION: {"finalists": []}}, "perf_analyzer", best)
    assert not needs_cross_check({}, None, best)
    assert not needs_cross_check({}, "perf_analyzer", None)


def test_a_replay_cannot_be_cross_checked(tmp_path):
    settings = replay_settings(ENCODER_RECORDING, tmp_path, confirm_with="perf_analyzer")
    with pytest.raises(UsageError, match="answers from a recording"):
        run_study(settings, target=ReplayTarget(ENCODER_RECORDING, seed=0))
    assert not (tmp_path / "replay.db").exists()


@pytest.fixture(scope="module")
def checked_study(models, triton, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("crosscheck")
    summary = run_study(
        study_settings(models["mlp"], tmp_path, budget=3, confirm_with="perf_analyzer"), target=triton
    )
    return summary, load_study(tmp_path)


@pytest.mark.server
def test_a_study_confirmed_with_perf_analyzer_stores_both_engines_figures(checked_study):
    summary, study = checked_study
    record = study.user_attrs[CONFIRMATION]
    assert record["engine"] == "perf_analyzer"
    baseline = next(t for t in study.trials if t.user_attrs.get("baseline"))
    assert record["baseline"]["trial"] == baseline.number
    assert record["best"]["trial"] == summary.best.number
    for role in ("baseline", "best"):
        for engine in ("builtin", "perf_analyzer"):
            figures = record[role][engine]
            assert figures["throughput"] > 0 and figures["p99_ms"] > 0, (role, engine, figures)
    assert summary.cross_check == record
    assert isinstance(record["disagreements"], list)


@pytest.mark.server
def test_the_report_shows_both_engines_side_by_side(checked_study):
    _, study = checked_study
    data = build_report_data(study)
    assert [row.role for row in data.cross_check] == ["baseline", "best"]
    page = render_html(data)
    assert "Cross-checked with perf_analyzer" in page and "inf/s perf_analyzer" in page
    best = study.user_attrs[CONFIRMATION]["best"]["perf_analyzer"]
    assert f"{best['throughput']:.1f}" in page


@pytest.mark.server
def test_optimize_cross_check_cross_checks_a_finished_study(models, triton, tmp_path, capsys):
    run_study(study_settings(models["mlp"], tmp_path, budget=2), target=triton)
    db = tmp_path / "s.db"
    finished = [t.number for t in load_study(tmp_path).trials if t.state == TrialState.COMPLETE]
    assert main(["cross-check", "--study-name", "s", "--storage", f"sqlite:///{db}"]) == 0
    out = capsys.readouterr().out
    assert "cross-check: the built-in generator and perf_analyzer" in out, out
    study = load_study(tmp_path)
    record = study.user_attrs[CONFIRMATION]
    assert record["engine"] == "perf_analyzer" and record["best"]["perf_analyzer"]["throughput"] > 0
    assert [t.number for t in study.trials if t.state == TrialState.COMPLETE] == finished  # no new trial
    report = next(line.split()[1] for line in out.splitlines() if line.startswith("report: "))
    assert "Cross-checked with perf_analyzer" in Path(report).read_text()


@pytest.mark.parametrize("command", ["cross-check", "confirm"])  # confirm: its earlier name, an alias
def test_optimize_cross_check_of_a_missing_study_is_one_line(command, tmp_path, capsys):
    code = main([command, "--study-name", "nosuch", "--storage", f"sqlite:///{tmp_path / 'nosuch.db'}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "no study 'nosuch'" in lines[0], err
    assert "Traceback" not in err
