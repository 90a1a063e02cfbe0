"""perf_analyzer: reading its CSV, finding (or installing) the tritonclient 2.51.0 binary, a real run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from optimizer.config.render import render_config, to_json
from optimizer.config.repository import write_repository
from optimizer.config.space import Candidate
from optimizer.errors import PerfAnalyzerError
from optimizer.measurement import perf_analyzer
from optimizer.measurement.levels import LevelResult
from optimizer.measurement.perf_analyzer import (
    parse_csv,
    perf_analyzer_args,
    run_perf_analyzer,
    write_input_data,
)
from optimizer.model.intake import inspect_model, synthetic_inputs
from optimizer.output.serve import serving
from optimizer.serving.statistics import ServerBreakdown

# What perf_analyzer 2.51.0 wrote here with -f (latencies in microseconds).
CSV = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
2,2858.25,2,314,118,12,142,103,0,586,912,1028,2966
4,3100.5,2,400,300,12,150,103,0,1200,1500,1800,4100
"""


def _server(queue: float, compute_input: float, infer: float, output: float) -> ServerBreakdown:
    return ServerBreakdown(0, 0, queue + compute_input + infer + output, queue, compute_input, infer, output)


def test_parse_csv_reads_throughput_percentiles_and_server_columns_in_milliseconds():
    results = parse_csv(CSV)
    assert results == [
        LevelResult(
            concurrency=2,
            requests=0,
            duration_s=0.0,
            throughput=2858.25,
            p50_ms=0.586,
            p95_ms=1.028,
            p99_ms=2.966,
            server=_server(0.118, 0.012, 0.142, 0.103),
        ),
        LevelResult(
            concurrency=4,
            requests=0,
            duration_s=0.0,
            throughput=3100.5,
            p50_ms=1.2,
            p95_ms=1.8,
            p99_ms=4.1,
            server=_server(0.3, 0.012, 0.15, 0.103),
        ),
    ]


# What it wrote with --request-rate-range 200 --request-distribution poisson.
RATE_CSV = """Request Rate,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
200,193.137,12,487,85,39,443,191,2,1296,1787,1998,2744
"""


def test_parse_csv_of_a_request_rate_run_keeps_the_rate_and_no_concurrency():
    (result,) = parse_csv(RATE_CSV)
    assert (result.request_rate, result.concurrency, result.throughput) == (200.0, 0, 193.137)
    assert result.p99_ms == pytest.approx(2.744)


def test_request_rate_arguments_ask_for_poisson_arrivals_over_http():
    args = perf_analyzer_args("m", "127.0.0.1:8000", request_rate=50, protocol="http")
    assert args == [
        "-m",
        "m",
        "-u",
        "127.0.0.1:8000",
        "-i",
        "http",
        "--request-rate-range",
        "50",
        "--request-distribution",
        "poisson",
    ]


def test_parse_csv_without_the_percentile_columns_names_them():
    with pytest.raises(PerfAnalyzerError, match="p99 latency"):
        parse_csv("Concurrency,Inferences/Second\n1,10\n")


def test_arguments_are_a_list_with_concurrency_and_shapes():
    assert perf_analyzer_args(
        "enc", "127.0.0.1:8001", concurrency=8, shapes={"ids": (128,), "img": [3, 32, 32]}
    ) == [
        "-m",
        "enc",
        "-u",
        "127.0.0.1:8001",
        "-i",
        "grpc",
        "--concurrency-range",
        "8",
        "--shape",
        "ids:128",
        "--shape",
        "img:3,32,32",
    ]


def test_input_data_json_holds_one_request_per_sample_without_the_batch_dim(tmp_path):
    samples = [{"ids": np.array([[1, 2, 3]], np.int64), "x": np.zeros((1, 2, 2), np.float32)}]
    write_input_data(tmp_path / "d.json", samples, batched=True)
    assert json.loads((tmp_path / "d.json").read_text()) == {
        "data": [
            {
                "ids": {"content": [1, 2, 3], "shape": [3]},
                "x": {"content": [0.0] * 4, "shape": [2, 2]},
            }
        ]
    }


def test_missing_binary_error_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(perf_analyzer.sysconfig, "get_path", lambda name: str(tmp_path))
    with pytest.raises(
        PerfAnalyzerError, match=r"pip install --quiet --no-deps --target .* tritonclient==2\.51\.0"
    ):
        perf_analyzer.find_perf_analyzer()


def test_environment_puts_libcudart_12_and_libb64_first(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(tmp_path))
    env = perf_analyzer.perf_analyzer_environment({"LD_LIBRARY_PATH": "/elsewhere"})
    dirs = env["LD_LIBRARY_PATH"].split(":")
    assert dirs[-1] == "/elsewhere"
    for soname in ("libcudart.so.12", "libb64.so.0d"):
        assert any((Path(d) / soname).exists() for d in dirs[:-1]), soname


@pytest.mark.parametrize(
    ("output", "code", "fragment"),
    [
        (
            (
                "perf_analyzer: error while loading shared libraries: libcudart.so.12: cannot open "
                "shared object file"
            ),
            127,
            "libcudart.so.12 is missing (install nvidia-cuda-runtime-cu12",
        ),
        (
            "perf_analyzer: /lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.38' not found",
            1,
            "needs a newer glibc",
        ),
        (
            "Failed to obtain stable measurement within 10 measurement windows",
            2,
            "no stable measurement",
        ),
        (
            "error: failed to get model metadata",
            99,
            "failed (exit 99): error: failed to get model metadata",
        ),
    ],
)
def test_perf_analyzer_failures_say_what_to_do(tmp_path, monkeypatch, output, code, fragment):
    fake = tmp_path / "perf_analyzer"
    (tmp_path / "said").write_text(output + "\n")
    fake.write_text(f"#!/bin/sh\ncat '{tmp_path / 'said'}' >&2\nexit {code}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")  # the fake comes first
    with pytest.raises(PerfAnalyzerError, match=re.escape(fragment)):
        run_perf_analyzer("m", "127.0.0.1:1", concurrency=1)


@pytest.fixture(scope="module")
def binary():
    """The tritonclient 2.51.0 binary: already there, or installed (no dependencies) into the test cache."""
    try:
        return perf_analyzer.find_perf_analyzer()
    except PerfAnalyzerError:
        return perf_analyzer.install_perf_analyzer()


@pytest.mark.server
def test_perf_analyzer_measures_a_served_repository_with_the_studys_requests(binary, models, tmp_path):
    info = inspect_model(models["encoder"])
    config = render_config(info, Candidate(max_batch_size=8, max_queue_delay_us=500), model_name="enc")
    write_repository(tmp_path / "repo", config, {"1/model.onnx": info.path})
    shapes = {"input_ids": (16,), "attention_mask": (16,)}
    samples = [
        synthetic_inputs(info, shapes, 1, seed=seed) for seed in range(4)
    ]  # token ids in the vocabulary
    data = write_input_data(tmp_path / "data.json", samples, batched=True)
    with serving(tmp_path / "repo") as served:
        result = run_perf_analyzer(
            "enc",
            served.server.grpc_url,
            concurrency=2,
            shapes=shapes,
            input_data=data,
            measurement_interval_ms=1000,
            stability_percentage=50,
            max_trials=10,
        )
        assert result.concurrency == 2 and result.throughput > 0
        assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms
        with pytest.raises(PerfAnalyzerError, match="perf_analyzer failed"):
            run_perf_analyzer(
                "no_such_model", served.server.grpc_url, concurrency=1, measurement_interval_ms=500
            )


@pytest.mark.server
def test_perf_analyzer_engine_sweeps_levels_like_the_builtin_generator(binary, triton, models, tmp_path):
    from optimizer.measurement.engines import make_load_generator
    from optimizer.measurement.levels import MeasureSettings

    info = inspect_model(models["mlp"])
    config = render_config(info, Candidate(max_batch_size=4), model_name="pa_mlp")
    triton.load_model("pa_mlp", to_json(config), {"1/model.onnx": info.path})
    samples = [synthetic_inputs(info, {"x": (64,)}, 1, seed=seed) for seed in range(4)]
    generator = make_load_generator(
        triton,
        "pa_mlp",
        samples,
        MeasureSettings(window_s=0.5, rule="fixed"),
        engine="perf_analyzer",
        batched=True,
        resources=triton.resources,
    )
    seen = []
    results = generator.run_levels([1, 2, 4], lambda index, result: seen.append(index) or index < 1)
    assert seen == [0, 1] and [r.concurrency for r in results] == [1, 2]
    for result in results:
        assert result.throughput > 0 and 0 < result.p50_ms <= result.p99_ms
        assert result.uncertainty["stability_pct"] in (10.0, 25.0, 50.0)
        assert result.server is not None and result.server.compute_infer_ms > 0
        assert result.resources["server_rss_mb"] > 0
    rate = make_load_generator(
        triton,
        "pa_mlp",
        samples,
        MeasureSettings(window_s=0.5, rule="fixed"),
        engine="perf_analyzer",
        mode="request_rate",
    ).measure(100)
    assert rate.request_rate == 100.0 and rate.throughput == pytest.approx(100, rel=0.3)
