"""The report: records built from real study databases, the CSV, the HTML page in a real headless Chromium."""

from __future__ import annotations

import math
from pathlib import Path
from xml.etree import ElementTree

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image
from playwright.sync_api import sync_playwright

from optimizer.cli import main
from optimizer.config.render import config_from_json, config_from_pbtxt
from optimizer.paths import studies_dir
from optimizer.report import build_report_data, write_report
from optimizer.report.data import (
    ORT_TUNED,
    ScatterPoint,
    changes_only_runtime,
    importance_data,
    pareto_front,
    precision_rows,
    trial_records,
)
from optimizer.report.html import render_html
from optimizer.report.static import FIGURE_NAMES
from optimizer.study.results import best_trial

pytestmark = pytest.mark.server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOSTILE = '</script><script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture(scope="module")
def root(mixed_study) -> Path:
    return mixed_study.root


@pytest.fixture(scope="module")
def studies(mixed_study, tight_study) -> dict[str, optuna.Study]:
    """Two real studies of the MLP: ``mixed`` (complete + one failed trial) and ``tight`` (all infeasible).

    ``tight`` ran through the ``optimize study`` command, which must write its report at the end.
    """
    assert tight_study.exit_code == 6  # no feasible configuration, yet the report is written
    return {"mixed": mixed_study.study, "tight": tight_study.study}


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.is_file(), (
        "Debian's chromium is needed: apt-get install -y chromium (.ci/run installs it)"
    )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _attrs(study: optuna.Study, number: int) -> dict:
    return next(t for t in study.trials if t.number == number).user_attrs


# --- records from a real study -------------------------------------------------------------------------


def test_trial_records_match_the_stored_trials_exactly(studies):
    study = studies["mixed"]
    records = trial_records(study.trials)
    assert [r.number for r in records] == [t.number for t in study.trials]  # repeats of a config included
    for record, trial in zip(records, study.trials):
        attrs = trial.user_attrs
        assert record.state == trial.state.name.lower()
        assert record.candidate == attrs["candidate"] and record.config == attrs["config"]
        assert record.throughput == attrs.get("throughput") and record.p99_ms == attrs.get("p99_ms")
        assert record.p50_ms == attrs.get("p50_ms") and record.concurrency == attrs.get("concurrency")
        assert record.reason == attrs.get("reason")
        assert [level.throughput for level in record.sweep] == [
            lv["throughput"] for lv in attrs.get("sweep", [])
        ]
        assert [level.p99_ms for level in record.sweep] == [lv["p99_ms"] for lv in attrs.get("sweep", [])]
    statuses = [r.status for r in records]
    assert statuses[2] == "failed" and records[2].reason.startswith("Triton rejected the config")
    assert records[0].baseline and not any(r.baseline for r in records[1:])


def test_headline_compares_the_baseline_with_the_exported_best_trial(studies):
    study = studies["mixed"]
    data = build_report_data(study)
    best = best_trial(study)
    head = data.headline
    assert head.baseline.number == 0 and head.baseline.throughput == _attrs(study, 0)["throughput"]
    assert head.best.number == best.number and head.best.throughput == best.value
    assert head.best.p99_ms == best.user_attrs["p99_ms"]
    # The study confirmed its finalists and the baseline: the ratio is of their means, as the study prints.
    means = {f.trial: f.mean for f in (*data.finalists, data.confirmed_baseline)}
    assert head.ratio_basis == "confirmed means"
    assert math.isclose(head.ratio, means[best.number] / means[0])
    assert config_from_pbtxt(head.best_config) == config_from_json(best.user_attrs["config"])
    assert head.repository == str(studies_dir() / "mixed" / "best" / "mlp")


def test_curves_are_the_measured_sweeps_of_baseline_runtime_tuned_and_best(studies):
    study = studies["mixed"]
    curves = build_report_data(study).curves
    by_label = {curve.label: curve for curve in curves.curves}
    assert curves.latency_budget_ms == 200.0
    assert [lv.throughput for lv in by_label["baseline"].levels] == [
        lv["throughput"] for lv in _attrs(study, 0)["sweep"]
    ]
    best = best_trial(study)
    assert by_label["best overall"].trial == best.number
    assert [lv.p99_ms for lv in by_label["best overall"].levels] == [
        lv["p99_ms"] for lv in best.user_attrs["sweep"]
    ]
    runtime_only = [
        t
        for t in study.trials
        if t.state == TrialState.COMPLETE
        and t.user_attrs.get("feasible")
        and not t.user_attrs.get("baseline")
        and changes_only_runtime(t.user_attrs["config"])
    ]
    if runtime_only:
        assert by_label[ORT_TUNED].trial == max(runtime_only, key=lambda t: t.value).number
    else:
        assert ORT_TUNED not in by_label and any(m.startswith(ORT_TUNED) for m in curves.missing)


def test_scatter_has_every_measured_trial_and_a_true_pareto_front(studies):
    study = studies["mixed"]
    scatter = build_report_data(study).scatter
    assert scatter.unmeasured == (2,)  # the rejected config was never measured
    assert sorted(p.trial for p in scatter.points) == [
        t.number for t in study.trials if "sweep" in t.user_attrs
    ]
    for point in scatter.points:
        attrs = _attrs(study, point.trial)
        if "throughput" in attrs:
            assert (point.throughput, point.p99_ms) == (attrs["throughput"], attrs["p99_ms"])
        else:  # no level met the budget (a noisy moment): the level closest to it
            closest = min(attrs["sweep"], key=lambda level: level["p99_ms"])
            assert (point.throughput, point.p99_ms) == (closest["throughput"], closest["p99_ms"])
    for point in scatter.points:
        dominated = any(
            o.throughput >= point.throughput
            and o.p99_ms <= point.p99_ms
            and (o.throughput, o.p99_ms) != (point.throughput, point.p99_ms)
            for o in scatter.points
        )
        # A repeat of a config (the same measurement reused) is on the front through its first trial.
        same = [
            o.trial for o in scatter.points if (o.throughput, o.p99_ms) == (point.throughput, point.p99_ms)
        ]
        assert any(trial in scatter.pareto for trial in same) == (not dominated)


def test_history_is_each_feasible_throughput_and_the_running_best(studies):
    study = studies["mixed"]
    history = build_report_data(study).history
    assert history.trials == tuple(t.number for t in study.trials)
    expected_best, running = [], None
    for trial in study.trials:
        value = trial.value if trial.state == TrialState.COMPLETE else None
        running = value if running is None or (value is not None and value > running) else running
        expected_best.append(running)
    assert history.values[2] is None and history.statuses[2] == "failed"
    assert list(history.best_so_far) == expected_best
    feasible = [t.value for t in study.trials if t.state == TrialState.COMPLETE]
    assert history.best_so_far[-1] == max(feasible)  # the best single window (the export may be another)


def test_top_table_precisions_and_failures(studies):
    study = studies["mixed"]
    data = build_report_data(study)
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    assert [t.number for t in data.top] == [t.number for t in complete]
    assert [f.trial for f in data.failures] == [
        t.number for t in study.trials if t.state != TrialState.COMPLETE
    ]
    assert any(f.status == "failed" and "rejected" in f.reason for f in data.failures)
    precisions = {row.precision: row for row in data.precisions}
    assert set(precisions) >= {
        "fp32",
        "int8",
    }  # the cpu space's precisions, even when a trial never used one
    assert sum(row.trials for row in precisions.values()) == len(study.trials)
    variants = study.user_attrs.get("variants", {})  # absent in studies written before the accuracy guard
    for precision, row in precisions.items():
        recorded = variants.get(precision)
        assert row.accuracy_ok == (recorded["ok"] if recorded else None)
        assert dict(row.accuracy).keys() == (
            {k for k in recorded if k not in ("ok", "reason", "precision", "attempts", "providers")}
            if recorded
            else set()
        )
    fp32 = precisions["fp32"]
    fp32_complete = [t for t in complete if "default_model_filename" not in t.user_attrs["config"]]
    assert fp32.best_trial == (fp32_complete[0].number if fp32_complete else None)


def test_study_where_nothing_met_the_budget_reports_infeasible_trials(studies):
    data = build_report_data(studies["tight"])
    assert data.headline.best is None and data.headline.ratio is None and data.headline.best_config == ""
    assert [p.status for p in data.scatter.points] == ["infeasible", "infeasible"]
    assert all(f.reason.startswith("infeasible") for f in data.failures) and len(data.failures) == 2
    assert data.top == () and data.history.best_so_far == (None, None)
    assert [c.label for c in data.curves.curves] == ["baseline"]


def test_importances_are_computed_or_explained(studies):
    data = build_report_data(studies["mixed"]).importances
    if data.params:
        assert math.isclose(sum(data.importances), 1.0) and list(data.importances) == sorted(
            data.importances, reverse=True
        )
    else:
        assert data.note


# --- records from synthetic studies (pure) -------------------------------------------------------------


def test_pareto_front_keeps_only_undominated_points():
    points = [
        ScatterPoint(n, t, p, "feasible", "")
        for n, t, p in [
            (0, 100, 5),
            (1, 150, 4),
            (2, 300, 9),
            (3, 200, 9),
            (4, 300, 12),
            (5, 50, 1),
        ]
    ]
    assert pareto_front(points) == (5, 1, 2)


def test_changes_only_runtime_means_triton_knobs_at_the_baseline():
    base = {"max_batch_size": 1, "instance_group": [{"count": 1, "kind": "KIND_CPU"}]}
    assert changes_only_runtime(base)
    assert changes_only_runtime({**base, "default_model_filename": "model.int8.onnx"})
    assert changes_only_runtime({**base, "max_batch_size": 0})
    assert not changes_only_runtime({**base, "max_batch_size": 8})
    assert not changes_only_runtime({**base, "dynamic_batching": {}})
    assert not changes_only_runtime({**base, "instance_group": [{"count": 2}]})
    assert not changes_only_runtime({**base, "parameters": {"intra_op_thread_count": {"string_value": "2"}}})


def test_a_failed_trials_server_log_is_in_the_report():
    data = build_report_data(_synthetic_study())
    (failed,) = [f for f in data.failures if f.status == "failed"]
    assert failed.server_log.endswith("Signal (11) received.")
    page = render_html(data)
    assert "<summary>server log</summary>" in page and "Signal (11) received." in page


def test_precision_rows_carry_accuracy_figures_when_the_study_has_them():
    study = _synthetic_study()
    records = trial_records(study.trials)
    variants = {
        "fp32": {"max_abs_diff": 0.0, "ok": True},
        "int8": {"max_abs_diff": 0.4, "top1_agreement": 0.9, "ok": False, "reason": "int8 is off"},
    }
    rows = {row.precision: row for row in precision_rows(records, variants, ("fp32", "int8", "fp16"))}
    assert (
        rows["int8"].accuracy == (("max_abs_diff", "0.4"), ("top1_agreement", "0.9"))
        and rows["int8"].accuracy_ok is False
    )
    assert rows["int8"].accuracy_note == "int8 is off"
    assert rows["fp32"].accuracy_ok is True and rows["fp16"].trials == 0 and rows["fp16"].best_trial is None
    assert rows["int8"].best_trial == 1 and rows["fp32"].best_trial == 2


def test_importance_rewards_what_reaches_high_throughput_not_low():
    # `good` decides who reaches the top; `x` only decides how low the bottom goes.
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        good = trial.suggest_categorical("good", [True, False])
        x = trial.suggest_float("x", 0.0, 1.0)
        return 100.0 + trial.number * 1e-6 if good else -100.0 * x

    study.optimize(objective, n_trials=60)
    data = importance_data(study)
    assert data.params[0] == "good", data


def test_importance_needs_a_few_completed_trials():
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: t.suggest_int("a", 0, 3), n_trials=2)
    data = importance_data(study)
    assert data.params == () and "at least" in data.note


def test_empty_study_gives_a_report_that_says_so(tmp_path):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path}/empty.db", study_name="empty", direction="maximize"
    )
    data = build_report_data(study)
    assert data.trials == () and data.headline.best is None and data.scatter.points == ()
    paths = write_report(study, tmp_path / "report")
    assert "No trial has finished yet" in paths.html.read_text()
    assert len(pd.read_csv(paths.csv)) == 0


# --- CSV -----------------------------------------------------------------------------------------------


def test_csv_loads_back_with_one_row_per_trial_and_config_columns(studies, tmp_path):
    study = studies["mixed"]
    paths = write_report(study, tmp_path)
    frame = pd.read_csv(paths.csv)
    assert list(frame["number"]) == [t.number for t in study.trials]
    assert list(frame["state"]) == [t.state.name.lower() for t in study.trials]
    for (_, row), trial in zip(frame.iterrows(), study.trials):
        assert row["config.max_batch_size"] == trial.user_attrs["config"]["max_batch_size"]
        throughput = trial.user_attrs.get("throughput")
        assert (pd.isna(row["throughput"]) and throughput is None) or row["throughput"] == throughput
    assert "config.instance_group.0.count" in frame.columns and "constraint.latency_budget" in frame.columns
    assert not any(column.startswith("config.input") for column in frame.columns)
    assert frame.loc[2, "reason"].startswith("Triton rejected the config")
    complete = frame[frame["state"] == "complete"]
    assert (complete["measure_s"] > 0).all() and (complete["memory_mb"] > 0).all()
    assert (complete["server.compute_infer_ms"] > 0).all() and (complete["resources.server_rss_mb"] > 0).all()
    assert "uncertainty.p99_ci" in frame.columns


# --- the HTML page in a real browser -------------------------------------------------------------------


def _open_in_chromium(browser, page_path: Path, screenshot: Path) -> dict:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on(
        "console",
        lambda message: problems.append(message.text) if message.type == "error" else None,
    )
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.on(
        "request",
        lambda request: None if request.url.startswith(("file:", "data:")) else problems.append(request.url),
    )
    page.goto(page_path.as_uri())
    page.wait_for_function(
        "document.querySelectorAll('.plotly-graph-div').length > 0 && [...document.querySelectorAll('.plotly-graph-div')]"
        ".every(d => d.querySelector('svg.main-svg'))",
        timeout=30_000,
    )
    graphs = page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.plotly-graph-div')].map(d => [d.id, d.querySelectorAll('svg').length]))"
    )
    page.screenshot(path=str(screenshot), full_page=True)
    title = page.title()
    page.close()
    assert problems == []
    return {"graphs": graphs, "title": title}


def test_report_opens_offline_in_chromium_with_every_plot_drawn(studies, browser, tmp_path):
    paths = write_report(studies["mixed"], tmp_path / "report")
    seen = _open_in_chromium(browser, paths.html, tmp_path / "report.png")
    figures = {"fig-curves", "fig-scatter", "fig-history", "fig-importances", "fig-pipeline"}
    assert set(seen["graphs"]) == figures
    assert all(count > 0 for count in seen["graphs"].values())
    assert "mlp" in seen["title"]
    assert (tmp_path / "report.png").stat().st_size > 10_000
    text = paths.html.read_text()
    assert text.count("Plotly.newPlot") == 5 and "<script src" not in text and "<script charset" not in text
    # The pipeline figure also as a PNG beside the page, and the page links each static figure.
    assert paths.png == tmp_path / "report" / "pipeline.png" and paths.png_note is None
    assert all(f'href="{name}.png"' in text for name in FIGURE_NAMES)


def test_the_static_figures_need_no_browser_and_show_the_studys_figures(studies, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no chromium, nor anything else, to find
    paths = write_report(studies["mixed"], tmp_path / "report")
    assert [p.name for p in paths.figures] == [f"{n}.{s}" for n in FIGURE_NAMES for s in ("png", "svg")]
    data = build_report_data(studies["mixed"])
    served = {bar.label: bar.throughput for bar in data.pipeline.bars}
    baseline, best = served["Triton as given"], served["Triton tuned"]
    # The headline's terms: the confirmed means where the study confirmed them, else each trial's own.
    assert baseline == pytest.approx(data.headline.baseline_confirmed.mean, abs=0.05)
    assert best == pytest.approx(data.headline.best_confirmed.mean, abs=0.05)
    for path in paths.figures:
        if path.suffix == ".png":
            with Image.open(path) as image:  # a real PNG that opens as an image, of the figure's size
                image.load()
                assert image.format == "PNG" and image.size == (1100, 520)
                description = image.info["Description"]
        else:
            description = ElementTree.parse(path).getroot().findtext(".//{*}metadata//{*}description") or ""
            assert "<text" in path.read_text()  # the labels stay text in the SVG
        if path.stem == "pipeline":
            assert f"Triton as given: {baseline:.1f} inf/s" in description
            assert f"Triton tuned: {best:.1f} inf/s" in description
        elif path.stem == "pareto":
            front = [p for p in data.scatter.points if p.trial in data.scatter.pareto]
            assert all(f"#{p.trial} {p.throughput:.1f} inf/s" in description for p in front)
        else:
            assert all(f"(#{curve.trial})" in description for curve in data.curves.curves)
    svg = (tmp_path / "report" / "pipeline.svg").read_text()
    assert f"{best:,.1f}" in svg and f"{baseline:,.1f}" in svg  # drawn on the bars, as text


@pytest.mark.parametrize("which", ["tight", "empty", "hostile"])
def test_infeasible_empty_and_hostile_studies_render_cleanly(studies, browser, tmp_path, which):
    if which == "tight":
        study = studies["tight"]
    elif which == "empty":
        study = optuna.create_study(
            storage=f"sqlite:///{tmp_path}/e.db", study_name="e", direction="maximize"
        )
    else:
        study = _synthetic_study(hostile=True)
    paths = write_report(study, tmp_path / "report")
    seen = _open_in_chromium(browser, paths.html, tmp_path / f"{which}.png")
    # The pipeline figure is drawn when there is anything to put in it (served or in-process figures).
    pipeline = build_report_data(study).pipeline
    assert len(seen["graphs"]) == (5 if pipeline is not None and pipeline.bars else 4)
    assert (which == "empty") == (len(seen["graphs"]) == 4)
    if which == "hostile":
        text = paths.html.read_text()
        assert HOSTILE not in text and "<img src=x" not in text
        assert "&lt;img src=x onerror=alert(1)&gt;" in text


def test_study_command_wrote_its_report_at_the_end(studies):
    report = studies_dir() / "tight" / "report"
    assert "No configuration met the 0.001 ms budget yet" in (report / "report.html").read_text()
    assert len(pd.read_csv(report / "trials.csv")) == 2


# --- the report command ----------------------------------------------------------------------------------


def test_report_command_writes_both_files(studies, root, tmp_path, capsys):
    url = f"sqlite:///{root}/mixed.db"
    code = main(["report", "--study-name", "mixed", "--storage", url, "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert (
        code == 0 and (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "trials.csv").is_file()
    )
    assert "report.html" in out


def test_report_command_on_an_empty_or_missing_study_gives_one_clear_line(tmp_path, capsys):
    optuna.create_study(storage=f"sqlite:///{tmp_path}/empty.db", study_name="empty")
    cases = [
        (
            ["report", "--study-name", "empty", "--storage", f"sqlite:///{tmp_path}/empty.db"],
            "has no finished trial",
        ),
        (
            ["report", "--study-name", "other", "--storage", f"sqlite:///{tmp_path}/empty.db"],
            "no study named 'other'",
        ),
        (["report", "--study-name", "absent"], "no study 'absent'"),
        (
            ["report", "--study-name", "x", "--storage", f"sqlite:///{tmp_path}/none.db"],
            "does not exist",
        ),
    ]
    for args, fragment in cases:
        assert main(args) == 6
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], lines
    assert not (tmp_path / "none.db").exists()


# --- helpers -------------------------------------------------------------------------------------------


def _config(mbs: int = 1, instances: int = 1, precision: str = "fp32") -> dict:
    config = {
        "name": "mlp",
        "backend": "onnxruntime",
        "max_batch_size": mbs,
        "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
    }
    if mbs > 1:
        config["dynamic_batching"] = {
            "preferred_batch_size": [mbs],
            "max_queue_delay_microseconds": "100",
        }
    if precision != "fp32":
        config["default_model_filename"] = f"model.{precision}.onnx"
    return config


def _synthetic_study(hostile: bool = False) -> optuna.Study:
    """A study written the way ``optimize study`` writes one, without a server (for pure checks)."""
    name = HOSTILE if hostile else "mlp"
    study = optuna.create_study(direction="maximize")
    for key, value in {
        "model_name": name,
        "model_sha256": "ab" * 32,
        "latency_budget_ms": 50.0,
        "server_version": "2.51.0",
        "target": "embedded",
        "hardware": {"cpu": name},
    }.items():
        study.set_user_attr(key, value)
    distributions = {
        "max_batch_size_log2": IntDistribution(0, 5),
        "precision": CategoricalDistribution(["fp32", "int8"]),
    }
    specs = [  # state, params, config, throughput, p99, reason
        (TrialState.COMPLETE, (0, "fp32"), _config(), 100.0, 5.0, None),
        (TrialState.COMPLETE, (0, "int8"), _config(precision="int8"), 150.0, 4.0, None),
        (TrialState.COMPLETE, (3, "fp32"), _config(8, 2), 300.0, 9.0, None),
        (TrialState.PRUNED, (4, "fp32"), _config(16), None, None, f"infeasible: {name}"),
        (
            TrialState.FAIL,
            (1, "int8"),
            _config(2, precision="int8"),
            None,
            None,
            f"Triton rejected {name}",
        ),
    ]
    for number, (state, (mbs_log2, precision), config, throughput, p99, reason) in enumerate(specs):
        attrs = {"config": config, "candidate": f"{name} #{number}", "baseline": number == 0}
        if throughput is not None:
            sweep = [
                {
                    "concurrency": c,
                    "throughput": throughput * c / 4,
                    "p50_ms": p99 / 2,
                    "p95_ms": p99,
                    "p99_ms": p99,
                }
                for c in (1, 2, 4)
            ]
            attrs.update(
                sweep=sweep,
                feasible=True,
                throughput=throughput,
                p99_ms=p99,
                p50_ms=p99 / 2,
                concurrency=4,
            )
        elif state == TrialState.PRUNED:
            attrs.update(sweep=[{"concurrency": 1, "throughput": 10.0, "p99_ms": 80.0}], feasible=False)
        if reason:
            attrs["reason"] = reason
        if state == TrialState.FAIL:
            attrs["server_log"] = f"I1207 model_lifecycle.cc:473] loading: {name}\nSignal (11) received."
        study.add_trial(
            create_trial(
                state=state,
                value=throughput if state == TrialState.COMPLETE else None,
                params={"max_batch_size_log2": mbs_log2, "precision": precision},
                distributions=distributions,
                user_attrs=attrs,
            )
        )
    return study
