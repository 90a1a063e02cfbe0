"""The in-process profile: each variant run here per batch size and threads, recorded once per study,
the first trial after the baseline where it found the model fast, and the pipeline figure (HTML and PNG)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from optimizer.cli import main
from optimizer.config.space import baseline_params, load_space, profile_point
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.model.profile import InprocessPoint, best_point, fastest_first, profile_variant
from optimizer.report import build_report_data
from optimizer.report.pipeline import pipeline_data
from optimizer.study.run import run_study
from studies import load_study, study_settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _point(precision: str, batch: int, throughput: float, latency_ms: float, threads: int = 2):
    return InprocessPoint(precision, batch, threads, throughput, latency_ms)


def _space(tmp_path, text="precisions: [fp32, int8]\nmax_batch_size: [1, 8]\ninstance_count: [1, 2]\n"):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


# --- measuring (real ONNX Runtime) -----------------------------------------------------------------------


def test_a_variant_is_measured_at_every_batch_size_and_thread_count(models):
    info = inspect_model(models["mlp"])
    shapes = resolve_shapes(info, {})
    samples = [synthetic_inputs(info, shapes, 1, seed=seed) for seed in range(3)]
    points = profile_variant("fp32", info.path, samples, batches=(1, 4), threads=(1, 2), seconds=0.05)
    assert [(p.batch, p.threads) for p in points] == [(1, 1), (4, 1), (1, 2), (4, 2)]
    for p in points:
        assert p.precision == "fp32" and p.throughput > 0 and p.latency_ms > 0
        # A batch of b every latency_ms: b * 1000 / latency_ms inferences a second (both rounded).
        assert math.isclose(p.throughput, p.batch * 1000.0 / p.latency_ms, rel_tol=0.01)


# --- choosing from it (pure) -----------------------------------------------------------------------------


def test_the_best_point_is_the_fastest_within_the_budget_and_precisions_go_fastest_first():
    points = [_point("fp32", 1, 100, 10), _point("fp32", 16, 400, 40), _point("int8", 16, 900, 90)]
    assert best_point(points) == points[2]
    assert best_point(points, latency_budget_ms=50) == points[1]
    assert best_point(points, latency_budget_ms=5) is None
    assert fastest_first(points, ("fp32", "int8", "fp16")) == ("int8", "fp32", "fp16")


def test_the_profile_point_is_batching_at_the_fast_variant_and_batch_size(tmp_path):
    space = load_space(str(_space(tmp_path)))
    point = profile_point(space, "int8", 16)  # over the space's 8: the largest it allows
    assert point is not None
    assert point["precision"] == "int8" and point["max_batch_size_log2"] == 3
    assert point["instance_count"] == 1 and point["prefer_max_div_1"] is True
    assert profile_point(space, "fp32", 4)["max_batch_size_log2"] == 2
    assert profile_point(space, "fp16", 4) is None  # not a precision of the space
    unbatched = load_space(
        str(_space(tmp_path, "precisions: [fp32]\nmax_batch_size: [1, 1]\nmax_queue_delay_us: [0, 0]\n"))
    )
    assert profile_point(unbatched, "fp32", 16) is None  # it would be the baseline
    assert baseline_params(unbatched)["max_batch_size_log2"] == 0


def test_the_pipeline_figure_has_given_ort_tuned_and_served_bars():
    points = [
        _point("fp32", 1, 100, 10),
        _point("fp32", 1, 60, 16, threads=1),
        _point("int8", 4, 300, 13),
        _point("int8", 16, 900, 90),  # over the 50 ms budget: not ONNX Runtime tuned
    ]
    data = pipeline_data(points, skipped=None, baseline=(80.0, 0), best=(150.0, 7), latency_budget_ms=50)
    assert [(b.label, b.throughput) for b in data.bars] == [
        ("as given, in process", 100),  # ONNX Runtime's default threads, a thread per core
        ("ONNX Runtime tuned, in process", 300),
        ("Triton as given", 80.0),
        ("Triton tuned", 150.0),
    ]
    assert data.bars[1].detail == "int8, batch 4, 2 thread(s)" and data.bars[3].detail == "trial 7"
    assert dict(data.inprocess) == {"fp32": ((1, 100),), "int8": ((4, 300), (16, 900))}
    assert data.note == ""
    skipped = pipeline_data((), skipped="elsewhere", baseline=(80.0, 0), best=None, latency_budget_ms=50)
    assert [b.label for b in skipped.bars] == ["Triton as given"] and "elsewhere" in skipped.note
    assert (
        "no in-process point met"
        in pipeline_data(points, skipped=None, baseline=None, best=None, latency_budget_ms=1).note
    )


# --- in a real study ---------------------------------------------------------------------------------------


@pytest.mark.server
def test_a_study_profiles_each_variant_once_starts_where_it_is_fast_and_draws_it(
    models, triton, tmp_path, capsys
):
    settings = study_settings(models["mlp"], tmp_path, budget=3, space=str(_space(tmp_path)), seed=2)
    run_study(settings, target=triton)
    study = load_study(tmp_path)
    profile = study.user_attrs["inprocess_profile"]
    points = [InprocessPoint.from_dict(p) for p in profile["points"]]
    cores = study.user_attrs["cpu_cores"]
    assert profile["batches"] == [1, 4] and profile["threads"] == sorted({1, cores})
    assert {(p.precision, p.batch, p.threads) for p in points} == {
        (precision, batch, threads)
        for precision in ("fp32", "int8")
        for batch in (1, 4)
        for threads in {1, cores}
    }
    assert all(p.throughput > 0 for p in points)
    # Trial 1, right after the baseline, is batching at the profile's fastest point within the budget.
    fast = best_point(points, study.user_attrs["latency_budget_ms"])
    first = next(t for t in study.trials if t.number == 1)
    assert first.user_attrs["starting_point"] == "profile"
    assert first.params["precision"] == fast.precision
    assert first.params["max_batch_size_log2"] == int(math.log2(fast.batch))
    # A resumed study keeps its profile: measured once, so its figures do not move between restarts.
    run_study(replace(settings, budget=4), target=triton)
    assert load_study(tmp_path).user_attrs["inprocess_profile"] == profile
    data = build_report_data(load_study(tmp_path)).pipeline
    assert [b.label for b in data.bars] == [
        "as given, in process",
        "ONNX Runtime tuned, in process",
        "Triton as given",
        "Triton tuned",
    ]
    assert data.bars[1].throughput == fast.throughput
    code = main(
        [
            "report",
            "--study-name",
            "s",
            "--storage",
            f"sqlite:///{tmp_path}/s.db",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 0 and "figures (PNG and SVG): pipeline, curves, pareto in" in capsys.readouterr().out
    png = (tmp_path / "r" / "pipeline.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    html = (tmp_path / "r" / "report.html").read_text()
    assert 'id="fig-pipeline"' in html and "From the model as given to Triton tuned" in html
