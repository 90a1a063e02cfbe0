"""What a trial records of its measurement (uncertainty, server breakdown, resources, memory) and the
memory constraint, through real studies on the embedded Triton."""

from __future__ import annotations

import optuna
import pytest

from optimizer.measurement.levels import MeasureSettings
from optimizer.study.run import run_study
from studies import load_study, study_settings

pytestmark = pytest.mark.server

CI_FAST = MeasureSettings(warmup_s=0.1, window_s=0.3, min_requests=10, max_window_s=1.0, rule="ci")


def _measured(study) -> list:
    return [t for t in study.trials if "sweep" in t.user_attrs and "same_config_as" not in t.user_attrs]


def test_trials_record_uncertainty_breakdown_resources_and_memory(models, triton, tmp_path):
    settings = study_settings(models["mlp"], tmp_path, budget=2, measure=CI_FAST, max_memory_mb=100_000)
    run_study(settings, target=triton)
    trials = _measured(load_study(tmp_path))
    assert trials
    for trial in trials:
        attrs = trial.user_attrs
        assert attrs["load_generator"] == "builtin"
        assert 0 < attrs["measure_s"] <= len(attrs["sweep"]) * (0.1 + 1.0 + 0.6)
        assert set(attrs["uncertainty"]) == {"throughput_ci", "p99_ci", "settled"}
        assert attrs["server"]["requests"] > 0 and attrs["server"]["compute_infer_ms"] > 0
        assert attrs["resources"]["server_rss_mb"] > 0
        assert attrs["memory_source"] == "server process-tree RSS"
        assert attrs["memory_mb"] >= attrs["resources"]["server_rss_mb"]
        assert trial.constraints["memory"] < 0
        for level in attrs["sweep"]:
            assert {"uncertainty", "server", "resources", "measure_s"} <= set(level)


def test_a_config_over_max_memory_is_infeasible_with_its_reason(models, tmp_path):
    run_study(study_settings(models["mlp"], tmp_path, budget=1, study_name="free", measure=CI_FAST))
    loaded = _measured(load_study(tmp_path, "free"))[0].user_attrs["memory_mb"]
    # Below what the server needs with the model loaded, above what it needs idle (no backend stub).
    limit = loaded - 20
    summary = run_study(
        study_settings(
            models["mlp"], tmp_path, budget=1, study_name="tight", measure=CI_FAST, max_memory_mb=limit
        )
    )
    (trial,) = _measured(load_study(tmp_path, "tight"))
    assert summary.best is None
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["feasible"] is False
    assert f"broke the --max-memory-mb {limit:g} limit" in trial.user_attrs["reason"]
    assert trial.constraints["memory"] > 0


def test_request_rate_study_sweeps_rates_and_records_the_rate(models, triton, tmp_path):
    fixed = MeasureSettings(warmup_s=0.1, window_s=0.5, min_requests=10, max_window_s=1.0, rule="fixed")
    run_study(
        study_settings(models["mlp"], tmp_path, budget=1, measure=fixed, request_rates=(50.0, 100.0)),
        target=triton,
    )
    (trial,) = _measured(load_study(tmp_path))
    assert [level["request_rate"] for level in trial.user_attrs["sweep"]] == [50.0, 100.0][
        : len(trial.user_attrs["sweep"])
    ]
    assert trial.user_attrs["request_rate"] in (50.0, 100.0) and "concurrency" not in trial.user_attrs


def test_a_study_measured_by_perf_analyzer_records_its_engine_and_stability(models, triton, tmp_path):
    fixed = MeasureSettings(warmup_s=0.1, window_s=0.3, min_requests=10, max_window_s=1.0, rule="fixed")
    run_study(
        study_settings(models["mlp"], tmp_path, budget=1, measure=fixed, load_generator="perf_analyzer"),
        target=triton,
    )
    (trial,) = _measured(load_study(tmp_path))
    attrs = trial.user_attrs
    assert attrs["load_generator"] == "perf_analyzer"
    assert attrs["throughput"] > 0 and attrs["uncertainty"]["stability_pct"] in (10.0, 25.0, 50.0)
    assert attrs["server"]["compute_infer_ms"] > 0 and attrs["memory_mb"] > 0
