"""The load generator: the stopping rule on synthetic streams, the server-side breakdown and resources,
and real measurements (closed loop, open loop, HTTP) against the embedded Triton."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from optimizer.config.render import render_config, to_json
from optimizer.config.space import Candidate
from optimizer.measurement.builtin import LoadGenerator
from optimizer.measurement.levels import MeasureSettings
from optimizer.measurement.stopping import (
    StoppingRule,
    estimate_uncertainty,
    quantile_half_width,
    should_stop,
    t_quantile,
)
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.serving.metrics import (
    _rss_kib,
    fetch_metrics,
    memory_figure,
    process_tree_rss_mb,
    resource_usage,
)
from optimizer.serving.statistics import breakdown

RULE = StoppingRule(throughput_ci=0.05, p99_ci=0.10, min_window_s=1.0, max_window_s=8.0, min_requests=30)


def _stream(rate: float, seconds: float, *, seed: int = 0, burst: bool = False):
    """Finish times at ``rate``/s over ``seconds`` (alternating 2x / 0.1x slices when ``burst``), lognormal latencies."""
    rng = np.random.default_rng(seed)
    times: list[float] = []
    now = 0.0
    while now < seconds:
        slice_rate = rate * (2.0 if int(now / 0.2) % 2 == 0 else 0.1) if burst else rate
        now += rng.exponential(1.0 / slice_rate)
        times.append(now)
    times = [t for t in times if t <= seconds]
    latencies = rng.lognormal(mean=math.log(0.005), sigma=0.3, size=len(times))
    return times, list(latencies)


# --- the stopping rule (pure) ----------------------------------------------------------------------


def test_t_quantile_matches_the_student_table():
    assert t_quantile(0.975, 9) == pytest.approx(2.2622, abs=0.005)
    assert t_quantile(0.975, 30) == pytest.approx(2.0423, abs=0.002)


def test_a_steady_stream_of_thousands_settles_and_stops():
    times, latencies = _stream(rate=2000, seconds=2.0)
    reached = estimate_uncertainty(times, latencies, 0.0, 2.0)
    assert reached.throughput_ci < 0.05 and reached.p99_ci < 0.10
    assert should_stop(reached, RULE)


def test_p99_is_unbounded_below_about_four_hundred_requests_so_the_window_goes_on():
    times, latencies = _stream(rate=100, seconds=2.0)  # ~200 requests: no upper rank for p99
    reached = estimate_uncertainty(times, latencies, 0.0, 2.0)
    assert math.isinf(reached.p99_ci)
    assert not should_stop(reached, RULE)
    assert reached.to_dict()["p99_ci"] is None


def test_a_bursty_stream_keeps_throughput_uncertain_where_a_steady_one_of_the_same_size_settles():
    bursty = estimate_uncertainty(*_stream(rate=2000, seconds=2.0, burst=True), 0.0, 2.0)
    steady = estimate_uncertainty(*_stream(rate=2000, seconds=2.0), 0.0, 2.0)
    assert bursty.throughput_ci > 0.2 > 0.05 > steady.throughput_ci
    assert not should_stop(bursty, RULE)


def test_the_time_cap_stops_an_unsettled_window():
    times, latencies = _stream(rate=20, seconds=8.0)
    reached = estimate_uncertainty(times, latencies, 0.0, 8.0)
    assert math.isinf(reached.p99_ci)
    assert should_stop(reached, RULE)


def test_nothing_stops_before_the_minimum_window_even_when_settled():
    times, latencies = _stream(rate=5000, seconds=0.9)
    reached = estimate_uncertainty(times, latencies, 0.0, 0.9)
    assert reached.within(RULE)
    assert not should_stop(reached, RULE)


def test_the_p99_interval_narrows_as_requests_accumulate():
    rng = np.random.default_rng(1)
    widths = [quantile_half_width(list(rng.lognormal(0, 0.5, n)), 0.99) for n in (1_000, 10_000, 100_000)]
    assert widths[0] > widths[1] > widths[2]


def test_a_fixed_window_ignores_the_targets_and_a_ci_window_follows_them():
    fixed = MeasureSettings(window_s=3.0, max_window_s=6.0, min_requests=10, rule="fixed").stopping_rule()
    times, latencies = _stream(rate=50, seconds=3.0)  # unsettled p99
    assert should_stop(estimate_uncertainty(times, latencies, 0.0, 3.0), fixed)
    ci = MeasureSettings(rule="ci", window_s=1.0, max_window_s=6.0).stopping_rule()
    assert not should_stop(estimate_uncertainty(times, latencies, 0.0, 3.0), ci)
    assert math.isinf(MeasureSettings(rule="ci").stopping_rule("request_rate").throughput_ci)


# --- the server's side (pure parts) ------------------------------------------------------------------


def _stats(success: int, ns: int, execs: int, *, as_text: bool) -> dict:
    def value(number: int):
        return str(number) if as_text else number

    phases = {
        phase: {"count": value(success), "ns": value(ns * share)}
        for phase, share in (("success", 10), ("queue", 2), ("compute_input", 1), ("compute_infer", 5))
    }
    return {
        "model_stats": [
            {"name": "m", "version": "1", "execution_count": value(execs), "inference_stats": phases}
        ]
    }


@pytest.mark.parametrize("as_text", [True, False], ids=["grpc-json", "http-json"])
def test_breakdown_averages_each_phase_over_the_requests_of_the_window(as_text):
    before = _stats(100, 1_000_000, 50, as_text=as_text)
    after = _stats(300, 3_000_000, 100, as_text=as_text)
    # 200 requests; success grew by 20 ms in total: 0.1 ms each
    result = breakdown(before, after, "m")
    assert result is not None
    assert (result.requests, result.executions, result.average_batch) == (200, 50, 4.0)
    assert result.request_ms == pytest.approx(0.1)
    assert result.queue_ms == pytest.approx(0.02)
    assert result.compute_input_ms == pytest.approx(0.01)
    assert result.compute_infer_ms == pytest.approx(0.05)
    assert result.compute_output_ms == 0.0  # absent phase: nothing spent


def test_breakdown_is_none_without_requests_or_without_the_model():
    same = _stats(100, 1_000, 10, as_text=True)
    assert breakdown(same, same, "m") is None
    assert breakdown(same, _stats(200, 2_000, 20, as_text=True), "other") is None


GPU_METRICS = """# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-a"} 0.5
nv_gpu_utilization{gpu_uuid="GPU-b"} 0.25
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-a"} 1073741824
nv_gpu_memory_used_bytes{gpu_uuid="GPU-b"} 536870912
"""


def test_gpu_memory_is_summed_and_utilisation_averaged_over_the_servers_gpus():
    assert resource_usage(GPU_METRICS) == {"gpu_utilization": 0.375, "gpu_memory_used_mb": 1536.0}


def test_memory_figure_prefers_the_servers_own_rss_over_the_machine_wide_figure():
    assert memory_figure({"server_rss_mb": 120.0, "cpu_memory_used_mb": 900.0}) == (
        120.0,
        "server process-tree RSS",
    )
    assert memory_figure({"cpu_memory_used_mb": 900.0})[1].startswith("machine CPU memory")
    assert memory_figure({}) is None


# --- against the real server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp(triton, models):
    """The mlp served with dynamic batching, and its request samples."""
    info = inspect_model(models["mlp"])
    config = render_config(info, Candidate(max_batch_size=8, max_queue_delay_us=100), model_name="lg_mlp")
    triton.load_model("lg_mlp", to_json(config), {"1/model.onnx": info.path})
    shapes = resolve_shapes(info, {})
    return [synthetic_inputs(info, shapes, 1, seed=seed) for seed in range(8)]


@pytest.mark.server
def test_real_metrics_text_parses_into_cpu_memory_and_utilisation(triton):
    deadline = time.monotonic() + 10
    usage = resource_usage(fetch_metrics(triton.metrics_url))
    while "cpu_memory_total_mb" not in usage and time.monotonic() < deadline:  # before its first poll
        time.sleep(0.5)
        usage = resource_usage(fetch_metrics(triton.metrics_url))
    assert 0 < usage["cpu_memory_used_mb"] < usage["cpu_memory_total_mb"]
    assert 0.0 <= usage["cpu_utilization"] <= 1.0
    assert not any(key.startswith("gpu_") for key in usage)  # this machine has no GPU


@pytest.mark.server
def test_server_rss_counts_the_backend_stubs_of_loaded_models(triton, mlp):
    alone = process_tree_rss_mb(triton.pid)
    server_only = _rss_kib(Path(f"/proc/{triton.pid}")) / 1024  # tritonserver by itself
    assert alone is not None and alone > server_only + 10  # the stub of lg_mlp holds its own memory
    assert triton.resources()["server_rss_mb"] == pytest.approx(alone, rel=0.2)


@pytest.mark.server
def test_ci_rule_measures_a_closed_loop_with_its_uncertainty_breakdown_and_resources(triton, mlp):
    settings = MeasureSettings(warmup_s=0.3, window_s=0.5, max_window_s=4.0, rule="ci", min_requests=30)
    generator = LoadGenerator(triton.grpc_url, "lg_mlp", mlp, settings, resources=triton.resources)
    result = generator.measure(4)
    assert 0.5 <= result.duration_s <= 4.0 + 0.5
    assert result.requests > 30 and result.throughput == pytest.approx(result.requests / result.duration_s)
    assert set(result.uncertainty) == {"throughput_ci", "p99_ci", "settled"}
    assert result.uncertainty["throughput_ci"] is not None and result.uncertainty["throughput_ci"] > 0
    server = result.server
    assert server is not None and server.requests >= result.requests * 0.9
    assert 0 < server.compute_infer_ms < server.request_ms < result.p50_ms + 5
    assert result.resources["server_rss_mb"] > 0
    # measure_s holds the warm-up (adaptive: it may end before its 0.3 s cap) and the window.
    assert result.warmup_s is not None and 0 < result.warmup_s <= 0.3 + 0.1
    assert result.measure_s >= result.duration_s + result.warmup_s - 0.01
    record = result.to_dict()
    assert record["server"]["requests"] == server.requests and "resources" in record


@pytest.mark.server
def test_the_warm_up_ends_once_the_completion_rate_settles(triton, mlp):
    settings = MeasureSettings(warmup_s=3.0, window_s=0.3, max_window_s=1.0, rule="fixed", min_requests=10)
    closed = LoadGenerator(triton.grpc_url, "lg_mlp", mlp, settings).measure(2)
    opened = LoadGenerator(triton.grpc_url, "lg_mlp", mlp, settings, mode="request_rate").measure(200)
    # A warm, fast model settles within a few 0.1 s slices, far below the 3 s cap.
    for result in (closed, opened):
        assert result.warmup_s is not None and 0.2 <= result.warmup_s < 1.5
        assert result.measure_s == pytest.approx(result.warmup_s + result.duration_s, abs=0.3)


@pytest.mark.server
def test_each_level_records_the_clients_own_cpu_per_request(triton, mlp):
    settings = MeasureSettings(warmup_s=0.2, window_s=0.5, max_window_s=1.0, rule="fixed", min_requests=10)
    result = LoadGenerator(triton.grpc_url, "lg_mlp", mlp, settings).measure(4)
    # Every request costs the client some CPU, and no client spends more than a second of CPU on one.
    assert result.client_cpu_ms is not None and 0 < result.client_cpu_ms < 1000
    assert result.to_dict()["client_cpu_ms"] == pytest.approx(result.client_cpu_ms, abs=1e-4)


@pytest.mark.server
def test_open_loop_follows_the_request_rate_and_counts_latency_from_the_due_time(triton, mlp):
    settings = MeasureSettings(warmup_s=0.3, window_s=2.0, max_window_s=2.0, rule="fixed", min_requests=10)
    result = LoadGenerator(triton.grpc_url, "lg_mlp", mlp, settings, mode="request_rate").measure(100)
    assert result.request_rate == 100.0 and result.concurrency == 0
    assert result.load == "request rate 100/s"
    assert result.throughput == pytest.approx(100, rel=0.3)  # Poisson: ~200 arrivals in 2 s
    assert result.p99_ms >= result.p50_ms > 0


@pytest.mark.server
def test_http_measures_the_same_server(triton, mlp):
    settings = MeasureSettings(warmup_s=0.2, window_s=0.5, max_window_s=1.0, min_requests=10, rule="fixed")
    url = triton.http_url.split("://", 1)[1]
    result = LoadGenerator(url, "lg_mlp", mlp, settings, protocol="http").measure(2)
    assert result.requests >= 10 and result.server is not None and result.server.requests > 0


@pytest.mark.server
def test_a_failing_request_ends_the_level_with_an_inference_error(triton, mlp):
    from optimizer.errors import InferenceError

    wrong = [{name: array.astype(np.float64) for name, array in sample.items()} for sample in mlp]
    settings = MeasureSettings(warmup_s=0.2, window_s=0.5, max_window_s=1.0, rule="fixed")
    for mode in ("concurrency", "request_rate"):
        with pytest.raises(InferenceError, match="a request failed"):
            LoadGenerator(triton.grpc_url, "lg_mlp", wrong, settings, mode=mode).measure(2)


@pytest.mark.server
def test_a_low_request_rate_ends_its_level_at_the_window_not_at_the_next_arrival(triton, mlp):
    # One request a second with a 0.5 s request timeout: the next arrival is often due after the window
    # ends; the level must end with its window, not sleep until then (or mistake the wait for a hang).
    settings = MeasureSettings(
        warmup_s=0.2, window_s=2.0, max_window_s=3.0, min_requests=1, request_timeout_s=0.5, rule="fixed"
    )
    for _ in range(3):
        result = LoadGenerator(triton.grpc_url, "lg_mlp", mlp, settings, mode="request_rate").measure(1)
        assert result.requests >= 1
        assert result.measure_s < result.warmup_s + result.duration_s + 0.5 + 0.3
