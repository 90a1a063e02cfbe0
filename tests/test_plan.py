"""``optimize plan``: the servers a traffic target needs, from the study's own measured figures, and the
deployment files that carry them (``optimize export --rps``)."""

from __future__ import annotations

import json
import math
import statistics

import optuna
import pytest
import yaml

from optimizer.cli import main
from optimizer.model import examples
from optimizer.output.plan import Capacity, capacity_line, make_plan
from optimizer.paths import cache_dir
from optimizer.study.confirm import CONFIRMATION
from optimizer.study.results import best_trial
from optimizer.study.run import run_study
from optimizer.study.settings import SearchSettings, StudySettings
from studies import FAST, FinishedStudy

RPS, AVERAGE, PRICE = 2000.0, 800.0, 0.17


@pytest.fixture(scope="module")
def encoder_study(triton, tmp_path_factory) -> FinishedStudy:
    """A real study of the bundled example: five trials, the top two and the baseline confirmed."""
    root = tmp_path_factory.mktemp("plan")
    settings = StudySettings(
        model_path=examples.example_model(cache_dir() / "examples"),
        budget=5,
        study_name="plan",
        output_dir=root,
        concurrency=(1, 2, 4),
        seed=2,
        measure=FAST,
        search=SearchSettings(confirm_finalists=2, confirm_rounds=1, second_load_margin=None),
    )
    summary = run_study(settings, target=triton)
    study = optuna.load_study(study_name="plan", storage=f"sqlite:///{root}/plan.db")
    return FinishedStudy(root, study, summary=summary)


def _measured(study, number: int) -> tuple[float, float]:
    """A trial's throughput and p99 as the study recorded them: the confirmation's mean and median p99
    where it re-measured the trial at its own load, else the trial's own figures."""
    attrs = next(t for t in study.trials if t.number == number).user_attrs
    record = study.user_attrs.get(CONFIRMATION) or {}
    for finalist in [*record.get("finalists", []), record.get("baseline_rounds") or {}]:
        if finalist.get("trial") == number and finalist.get("load") == f"concurrency {attrs['concurrency']}":
            return statistics.fmean(finalist["throughput"]), statistics.median(finalist["p99_ms"])
    return attrs["throughput"], attrs["p99_ms"]


def _plan_json(capsys, url: str, *args: str) -> dict:
    assert main(["plan", "--study-name", "plan", "--storage", url, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.server
def test_the_plan_sizes_best_pareto_and_baseline_from_the_studys_measured_figures(encoder_study, capsys):
    study, budget = encoder_study.study, encoder_study.study.user_attrs["latency_budget_ms"]
    plan = _plan_json(
        capsys,
        encoder_study.url,
        "--rps",
        f"{RPS:g}",
        "--average-rps",
        f"{AVERAGE:g}",
        "--price-per-hour",
        "0.17",
    )
    assert plan["rps"] == RPS and plan["latency_budget_ms"] == budget and plan["headroom"] == 0.3
    roles = [c["role"] for c in plan["candidates"]]
    assert roles[0] == "best" and roles[-1] == "baseline" and set(roles[1:-1]) <= {"pareto"}
    assert plan["candidates"][0]["trial"] == best_trial(study).number
    baseline = next(t for t in study.trials if t.user_attrs.get("baseline"))
    assert plan["candidates"][-1]["trial"] == baseline.number
    for candidate in plan["candidates"]:
        throughput, p99 = _measured(study, candidate["trial"])
        assert candidate["throughput_per_server"] == pytest.approx(throughput, abs=1e-3)
        assert candidate["p99_ms"] == pytest.approx(p99, abs=1e-3) and p99 <= budget
        assert candidate["servers"] == math.ceil(RPS / (throughput * 0.7))
        assert candidate["servers_at_average"] == math.ceil(AVERAGE / (throughput * 0.7))
        assert candidate["cost_per_hour"] == pytest.approx(PRICE * candidate["servers"], abs=1e-3)
        per_million = PRICE * candidate["servers_at_average"] / (AVERAGE * 3600) * 1e6
        assert candidate["cost_per_million"] == pytest.approx(per_million, abs=1e-3)
    # The Pareto alternatives: none is beaten on both throughput and p99 by another candidate.
    for alternative in plan["candidates"][1:-1]:
        assert not any(
            other["throughput_per_server"] >= alternative["throughput_per_server"]
            and other["p99_ms"] <= alternative["p99_ms"]
            and other is not alternative
            and other["role"] != "baseline"
            for other in plan["candidates"]
        )
    memory = plan["memory_fit"]
    best_memory = best_trial(study).user_attrs["memory_mb"]
    assert memory["memory_mb"] == best_memory and memory["copies"] == int(
        memory["server_memory_mb"] // best_memory
    )
    # The table says the same for a reader, tuned against untuned.
    assert main(["plan", "--study-name", "plan", "--storage", encoder_study.url, "--rps", f"{RPS:g}"]) == 0
    out = capsys.readouterr().out
    best, untuned = plan["candidates"][0]["servers"], plan["candidates"][-1]["servers"]
    assert f"the untuned config would need {untuned} server(s), the tuned one {best}" in out
    assert "servers needed, from the study's measured figures" in out


@pytest.mark.server
def test_a_tighter_budget_plans_from_the_loads_that_met_it(encoder_study, capsys):
    study = encoder_study.study
    tight = min(t.user_attrs["sweep"][0]["p99_ms"] for t in study.trials if t.user_attrs.get("sweep")) * 1.01
    plan = _plan_json(capsys, encoder_study.url, "--rps", "500", "--latency-budget-ms", f"{tight:.4f}")
    for candidate in plan["candidates"]:
        assert candidate["p99_ms"] <= tight
        trial = next(t for t in study.trials if t.number == candidate["trial"])
        measured = [(lv["throughput"], lv["p99_ms"]) for lv in trial.user_attrs["sweep"]]
        measured += [
            (trial.user_attrs["throughput"], trial.user_attrs["p99_ms"]),
            _measured(study, trial.number),
        ]
        assert any(candidate["throughput_per_server"] == pytest.approx(t, abs=1e-3) for t, _ in measured)


@pytest.mark.server
def test_the_summary_and_the_report_carry_the_capacity(encoder_study):
    line = capacity_line(encoder_study.study)
    plan = make_plan(encoder_study.study, 1000)
    best = plan.sizings[0]
    assert (
        line is not None
        and f"tuned {best.capacity.throughput_per_server:,.1f} inf/s: {best.servers} server(s)" in line
    )
    assert "optimize plan --study-name plan --rps N" in line


@pytest.mark.server
def test_the_exported_manifests_carry_the_plan(encoder_study, tmp_path, capsys):
    url = encoder_study.url
    plan = _plan_json(capsys, url, "--rps", f"{RPS:g}", "--average-rps", f"{AVERAGE:g}")
    best = plan["candidates"][0]
    args = ["export", "--study-name", "plan", "--storage", url, "--rps", f"{RPS:g}"]
    assert (
        main([*args, "--average-rps", f"{AVERAGE:g}", "--format", "kserve", "--out", str(tmp_path / "k")])
        == 0
    )
    text = (tmp_path / "k" / "inferenceservice.yaml").read_text()
    predictor = yaml.safe_load(text)["spec"]["predictor"]
    assert (
        predictor["maxReplicas"] == best["servers"] and predictor["minReplicas"] == best["servers_at_average"]
    )
    assert predictor["scaleMetric"] == "concurrency"
    assert predictor["scaleTarget"] == max(1, int(best["concurrency"] * 0.7))
    assert f"maxReplicas {best['servers']}: 2,000 inf/s at the peak" in text
    assert main([*args, "--format", "azureml", "--out", str(tmp_path / "a")]) == 0
    deployment = yaml.safe_load((tmp_path / "a" / "deployment.yml").read_text())
    assert deployment["instance_count"] == best["servers"]
    assert deployment["request_settings"]["max_concurrent_requests_per_instance"] == best["concurrency"]
    capsys.readouterr()


@pytest.mark.server
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--rps", "0"], 2, "--rps must be above 0 (inferences per second at the peak), got 0"),
        (["--rps", "-5"], 2, "--rps must be above 0"),
        (["--rps", "100", "--average-rps", "200"], 2, "--average-rps must be above 0 and at most --rps"),
        (["--rps", "100", "--headroom", "1"], 2, "--headroom must be at least 0 and below 1"),
        (
            ["--rps", "100", "--latency-budget-ms", "0.001"],
            6,
            "no feasible trial within a 0.001 ms latency budget",
        ),
    ],
)
def test_a_plan_that_cannot_be_made_is_one_line(encoder_study, capsys, args, code, message):
    assert main(["plan", "--study-name", "plan", "--storage", encoder_study.url, *args]) == code
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.server
def test_an_unknown_study_and_one_with_nothing_feasible_are_one_line(encoder_study, tight_study, capsys):
    assert main(["plan", "--study-name", "nope", "--storage", encoder_study.url, "--rps", "10"]) != 0
    assert "no study named 'nope'" in capsys.readouterr().err
    assert main(["plan", "--study-name", "tight", "--storage", tight_study.url, "--rps", "10"]) != 0
    err = capsys.readouterr().err
    assert (
        "has no feasible trial within a 0.001 ms latency budget" in err and len(err.strip().splitlines()) == 1
    )


def test_servers_keep_the_headroom_and_never_round_down():
    capacity = Capacity(1, "best", "c", 100.0, 5.0, "concurrency 4", 4, "its trial's measurement", None)
    assert capacity.servers(70.0, 0.3) == 1  # exactly the planned 70 inf/s
    assert capacity.servers(70.1, 0.3) == 2
    assert capacity.servers(1.0, 0.0) == 1 and capacity.servers(1000.0, 0.0) == 10
