"""Confirmation before export: the finalists re-measured side by side, the export chosen by their means."""

from __future__ import annotations

import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from optimizer.config.render import config_from_pbtxt, to_dict
from optimizer.measurement.replay import ReplayTarget
from optimizer.report.csv import trials_frame
from optimizer.report.data import build_report_data
from optimizer.report.html import render_html
from optimizer.study.confirm import (
    CONFIRMATION,
    Finalist,
    RemeasureFailed,
    choose,
    confirm,
    finalists_of,
    stored_confirmation,
)
from optimizer.study.progress import print_summary
from optimizer.study.results import best_trial
from optimizer.study.run import run_study
from optimizer.study.settings import SearchSettings
from studies import ENCODER_RECORDING, load_study, replay_settings


def _trial(number: int, value: float, key: str, *, p99: float = 10.0, feasible: bool = True, **attrs):
    trial = create_trial(
        state=TrialState.COMPLETE,
        value=value,
        params={"x": number},
        distributions={"x": IntDistribution(0, 100)},
        user_attrs={
            "throughput": value,
            "p99_ms": p99,
            "feasible": feasible,
            "config_digest": key,
            "concurrency": 4,
            **attrs,
        },
    )
    trial.number = number
    return trial


# --- the rule, without a server ---------------------------------------------------------------------


def test_finalists_are_the_best_distinct_feasible_configs():
    trials = [
        _trial(0, 100.0, "a"),
        _trial(1, 300.0, "b"),
        _trial(2, 300.0, "b", same_config_as=1),  # a proposal that reused trial 1's measurement
        _trial(3, 250.0, "c"),
        _trial(4, 400.0, "d", feasible=False),
        _trial(5, 200.0, "b"),  # the same config measured again (a transient fault's retry)
    ]
    assert [t.number for t in finalists_of(trials, 3)] == [1, 3, 0]
    assert finalists_of(trials, 0) == []  # --confirm 0: nothing to confirm


def test_finalists_are_measured_in_alternating_order_and_a_failure_drops_one():
    finalists = [_trial(1, 300.0, "b"), _trial(3, 250.0, "c"), _trial(0, 100.0, "a")]
    calls: list[int] = []

    def remeasure(trial):
        calls.append(trial.number)
        if trial.number == 0 and len(calls) > 3:
            raise RemeasureFailed("the server crashed while confirming")
        return {1: 200.0, 3: 290.0, 0: 120.0}[trial.number], 12.0

    results = confirm(finalists, remeasure, rounds=2)
    assert calls == [1, 3, 0, 0, 3, 1]  # A B C, then C B A: drift reaches every finalist alike
    assert [f.throughput for f in results] == [(300.0, 200.0, 200.0), (250.0, 290.0, 290.0), (100.0, 120.0)]
    assert results[2].failure == "the server crashed while confirming"
    # Trial 1 was the best single window (300) but trial 3 has the best mean: the export follows the mean.
    assert choose(results, budget_ms=50.0).trial == 3
    assert choose(results, budget_ms=11.0) is None  # every median p99 is over this budget


def test_a_finalist_round_trips_through_the_study_record():
    finalist = Finalist(3, "cpu fp32", "concurrency 4", (250.0, 290.0, 280.0), (11.0, 12.0, 13.0))
    record = finalist.to_dict()
    assert Finalist.from_dict(record) == finalist
    assert record["mean"] == pytest.approx(273.333, abs=1e-3) and record["half_width"] > 0


def test_a_stored_confirmation_counts_only_for_the_same_finalists():
    finalists = [_trial(1, 300.0, "b"), _trial(3, 250.0, "c")]
    attrs = {CONFIRMATION: {"finalists": [{"trial": 1}, {"trial": 3}], "chosen": 3}}
    assert stored_confirmation(attrs, finalists) is attrs[CONFIRMATION]
    assert stored_confirmation(attrs, [finalists[0], _trial(5, 260.0, "e")]) is None
    assert stored_confirmation({}, finalists) is None


# --- whole studies ---------------------------------------------------------------------------------------


def test_a_replayed_study_confirms_its_finalists_exports_the_best_mean_and_a_rerun_keeps_it(tmp_path):
    search = SearchSettings(confirm_finalists=3, confirm_rounds=2)
    settings = replay_settings(ENCODER_RECORDING, tmp_path, budget=12, search=search)
    summary = run_study(settings, target=ReplayTarget(ENCODER_RECORDING, seed=4))
    study = load_study(tmp_path, "replay")
    record = study.user_attrs[CONFIRMATION]
    assert len(record["finalists"]) == 3 and record["rounds"] == 2
    assert all(len(f["throughput"]) == 3 for f in record["finalists"])  # its trial's, then two more
    finalists = [Finalist.from_dict(f) for f in record["finalists"]]
    chosen = choose(finalists, study.user_attrs["latency_budget_ms"])
    assert record["chosen"] == chosen.trial == best_trial(study).number == summary.best.number
    assert [f.trial for f in summary.finalists] == [f["trial"] for f in record["finalists"]]
    exported = config_from_pbtxt((summary.best_repository / "config.pbtxt").read_text())
    assert to_dict(exported) == study.trials[chosen.trial].user_attrs["config"]

    run_study(settings, target=ReplayTarget(ENCODER_RECORDING, seed=5))  # the same budget: nothing new on top
    assert load_study(tmp_path, "replay").user_attrs[CONFIRMATION] == record


@pytest.mark.server
def test_a_study_on_the_real_server_re_measures_its_finalists_before_export(mixed_study):
    study, summary = mixed_study.study, mixed_study.summary
    record = study.user_attrs[CONFIRMATION]
    assert [len(f["throughput"]) for f in record["finalists"]] == [2, 2]  # its trial's window, then one more
    assert all(v > 0 for f in record["finalists"] for v in f["throughput"] + f["p99_ms"])
    first = [study.trials[f["trial"]].user_attrs["throughput"] for f in record["finalists"]]
    assert [f["throughput"][0] for f in record["finalists"]] == first
    assert summary.best is not None and summary.best.number == record["chosen"] == best_trial(study).number
    exported = config_from_pbtxt((summary.best_repository / "config.pbtxt").read_text())
    assert to_dict(exported) == study.trials[record["chosen"]].user_attrs["config"]
    # The baseline is measured in the same rounds (unless it is a finalist itself): the speed-up is of means.
    baseline = next(t for t in study.trials if t.user_attrs.get("baseline"))
    if baseline.number not in [f["trial"] for f in record["finalists"]]:
        rounds = record["baseline_rounds"]
        assert rounds["trial"] == baseline.number and len(rounds["throughput"]) == 2
    assert summary.confirmed_baseline is not None and summary.confirmed_baseline.trial == baseline.number
    ratio, basis = summary.speed_up
    chosen = next(f for f in summary.finalists if f.trial == record["chosen"])
    assert basis == "confirmed means" and ratio == pytest.approx(
        chosen.mean / summary.confirmed_baseline.mean
    )


def test_the_report_shows_each_finalists_measurements_and_follows_the_export(mixed_study):
    data = build_report_data(mixed_study.study)
    record = mixed_study.study.user_attrs[CONFIRMATION]
    assert [f.trial for f in data.finalists] == [f["trial"] for f in record["finalists"]]
    assert data.chosen == record["chosen"] == data.headline.best.number
    page = render_html(data)
    assert "Confirmed before export" in page and f"#{record['chosen']} (exported)" in page
    assert data.confirmed_baseline is not None and "(baseline)" in page
    chosen = next(f for f in data.finalists if f.trial == record["chosen"])
    assert data.headline.ratio_basis == "confirmed means" and "(confirmed means)" in page
    assert data.headline.ratio == pytest.approx(chosen.mean / data.confirmed_baseline.mean)


def test_the_headline_figures_are_named_one_way_in_the_summary_the_report_and_the_csv(mixed_study):
    """The speed-up divides the confirmed means; the summary, the report's cards and the CSV show those
    means as "confirmed", beside each trial's own single measurement."""
    study, summary = mixed_study.study, mixed_study.summary
    best, baseline, basis = summary.speed_up_terms
    assert basis == "confirmed means"
    console = Console(width=400, record=True)
    print_summary(summary, console)
    text = console.export_text()
    assert (
        f"speed-up over baseline: {best / baseline:.2f}x (confirmed means: {best:.1f} / {baseline:.1f} inf/s)"
        in text
    )
    header = next(line for line in text.splitlines() if "its trial" in line)
    assert "confirmed mean (inf/s)" in header
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert f"{baseline:.1f}" in rows["baseline"] and f"{best:.1f}" in rows["best"]
    page = render_html(build_report_data(study))
    assert f"{best:,.1f} inf/s" in page and f"{baseline:,.1f} inf/s" in page and "confirmed mean of" in page
    frame = trials_frame(study)
    chosen = study.user_attrs[CONFIRMATION]["chosen"]
    row = frame[frame["number"] == chosen].iloc[0]
    assert row["confirmed_mean"] == pytest.approx(best, abs=1e-3)
    assert float(str(row["confirmed_throughputs"]).split(";")[0]) == pytest.approx(
        row["throughput"], rel=1e-3
    )
    unconfirmed = set(frame["number"]) - {f.trial for f in (*summary.finalists, summary.confirmed_baseline)}
    assert frame[frame["number"].isin(unconfirmed)]["confirmed_mean"].isna().all()


def test_confirmation_off_exports_the_best_single_measurement(models, tmp_path):
    settings = replay_settings(
        ENCODER_RECORDING, tmp_path, budget=8, search=SearchSettings(confirm_finalists=0)
    )
    run_study(settings, target=ReplayTarget(ENCODER_RECORDING, seed=2))
    study = load_study(tmp_path, "replay")
    assert CONFIRMATION not in study.user_attrs
    feasible = [t for t in study.trials if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible")]
    assert best_trial(study).value == max(t.value for t in feasible)
    head = build_report_data(study).headline
    assert head.ratio_basis == "single measurements"
    assert head.ratio == pytest.approx(head.best.throughput / head.baseline.throughput)
