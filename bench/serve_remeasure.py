"""Benchmark: serve a study's best config and re-measure it with perf_analyzer, Triton's own load generator.

    .venv/bin/python bench/serve_remeasure.py [--study-name NAME [--storage URL] [--trial N]]
        [--budget 8] [--seed 0] [--out bench/out] [--measurement-interval-ms 5000] [--stability 10,25,50]

Without --study-name it first runs a small study (--budget trials) on the bundled example model. Then it
exports the chosen trial, serves it with `optimize serve`'s code (the same embedded Triton), and runs
perf_analyzer (the tritonclient 2.51.0 wheel's binary, installed into the cache when missing) at the
concurrency the study chose, sending the very requests the study sent. It prints the study's throughput and p99,
perf_analyzer's, and their ratios. The machine is shared and its load drifts between the study and now, so
the study's own load generator measures the same served config right before and after perf_analyzer, and
perf_analyzer is also compared with that (same moment, same server: the difference between the tools).

perf_analyzer only reports once 3 windows in a row agree within --stability-percentage; on 2 shared,
noisy cores the default 10% often never settles, so the script retries with each wider percentage given
to --stability and prints the one that settled.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from optimizer.errors import PerfAnalyzerError
from optimizer.measurement import perf_analyzer
from optimizer.measurement.builtin import LoadGenerator
from optimizer.measurement.levels import LevelResult, MeasureSettings
from optimizer.model.intake import inspect_model, synthetic_inputs
from optimizer.output.export import choose_trial
from optimizer.output.serve import dynamic_shapes, serving
from optimizer.paths import cache_dir
from optimizer.study.results import export_trial
from optimizer.study.run import run_study
from optimizer.study.settings import StudySettings
from optimizer.study.storage import load_stored_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study-name")
    parser.add_argument("--storage")
    parser.add_argument("--trial", type=int)
    parser.add_argument("--budget", type=int, default=8, help="trials of the study run when no --study-name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--measurement-interval-ms", type=int, default=5000)
    parser.add_argument("--stability", default="10,25,50", help="stability percentages to try in turn")
    args = parser.parse_args()

    name, storage = args.study_name, args.storage
    if name is None:
        name = f"remeasure-b{args.budget}-s{args.seed}-{int(time.time())}"
        measure = MeasureSettings(warmup_s=0.5, window_s=2.0, min_requests=30, max_window_s=8.0, rule="fixed")
        summary = run_study(
            StudySettings(
                budget=args.budget,
                seed=args.seed,
                study_name=name,
                output_dir=args.out,
                measure=measure,
            )
        )
        storage = summary.storage_url
    study = load_stored_study(name, storage)
    trial = choose_trial(study, args.trial)
    try:
        binary = perf_analyzer.find_perf_analyzer()
    except PerfAnalyzerError:
        print(f"perf_analyzer missing: installing {perf_analyzer.TRITONCLIENT_WITH_BINARY} into the cache")
        binary = perf_analyzer.install_perf_analyzer()

    with tempfile.TemporaryDirectory(prefix="remeasure-") as tmp:
        export_trial(study, trial, Path(tmp) / "repo")
        samples, batched = _study_requests(study)
        data = perf_analyzer.write_input_data(Path(tmp) / "requests.json", samples, batched=batched)
        load_before = os.getloadavg()[0]
        with serving(Path(tmp) / "repo") as served:
            (model,) = served.models
            url = served.server.grpc_url
            shapes, _ = dynamic_shapes(model.config, study.user_attrs.get("shapes") or {})
            concurrency = int(trial.user_attrs["concurrency"])
            ours = LoadGenerator(url, model.name, samples, MEASURE_NOW)
            before = ours.measure(concurrency)
            result, stability = _measure(model.name, url, concurrency, shapes, data, args)
            after = ours.measure(concurrency)
        load_after = os.getloadavg()[0]
    now = _mean(before, after)

    attrs = trial.user_attrs
    rows = [
        ("study", f"{name} ({storage})"),
        ("trial", f"{trial.number}: {attrs.get('candidate', '')}"),
        ("concurrency", str(concurrency)),
        (
            "request shapes",
            ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in shapes.items()) or "static",
        ),
        (
            "perf_analyzer",
            (
                f"{binary} (--measurement-interval {args.measurement_interval_ms} ms, "
                f"settled at --stability-percentage {stability:g})"
            ),
        ),
        ("study throughput (inf/s)", f"{attrs['throughput']:.1f}"),
        ("perf_analyzer throughput (inf/s)", f"{result.throughput:.1f}"),
        (
            "throughput ratio (perf_analyzer / study)",
            f"{result.throughput / attrs['throughput']:.2f}",
        ),
        ("study p50 / p99 (ms)", f"{attrs['p50_ms']:.2f} / {attrs['p99_ms']:.2f}"),
        ("perf_analyzer p50 / p99 (ms)", f"{result.p50_ms:.2f} / {result.p99_ms:.2f}"),
        ("p99 ratio (perf_analyzer / study)", f"{result.p99_ms / attrs['p99_ms']:.2f}"),
        (
            "our load generator now (inf/s)",
            f"{now.throughput:.1f} (before {before.throughput:.1f}, after {after.throughput:.1f})",
        ),
        ("our p50 / p99 now (ms)", f"{now.p50_ms:.2f} / {now.p99_ms:.2f}"),
        (
            "throughput ratio (perf_analyzer / ours now)",
            f"{result.throughput / now.throughput:.2f}",
        ),
        ("p99 ratio (perf_analyzer / ours now)", f"{result.p99_ms / now.p99_ms:.2f}"),
        (
            "machine load average (1 min)",
            f"{load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} cores",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


MEASURE_NOW = MeasureSettings(warmup_s=1.0, window_s=5.0, min_requests=60, max_window_s=15.0, rule="fixed")


def _study_requests(study):
    """The 16 requests every trial of the study sent, and whether the model has a batch dimension."""
    info = inspect_model(Path(study.user_attrs["model_path"]), cache=cache_dir())
    shapes = {name: tuple(dims) for name, dims in study.user_attrs["shapes"].items()}
    return [synthetic_inputs(info, shapes, 1, seed=seed) for seed in range(16)], info.batching


def _mean(*levels: LevelResult) -> LevelResult:
    return LevelResult(
        concurrency=levels[0].concurrency,
        throughput=statistics.fmean(level.throughput for level in levels),
        p50_ms=statistics.fmean(level.p50_ms for level in levels),
        p95_ms=statistics.fmean(level.p95_ms for level in levels),
        p99_ms=statistics.fmean(level.p99_ms for level in levels),
        requests=sum(level.requests for level in levels),
        duration_s=sum(level.duration_s for level in levels),
    )


def _measure(model: str, grpc_url: str, concurrency: int, shapes, data: Path, args):
    """perf_analyzer at the first stability percentage that settles; the result and that percentage."""
    percentages = [float(p) for p in args.stability.split(",")]
    for percentage in percentages:
        try:
            result = perf_analyzer.run_perf_analyzer(
                model,
                grpc_url,
                concurrency=concurrency,
                shapes=shapes,
                input_data=data,
                measurement_interval_ms=args.measurement_interval_ms,
                stability_percentage=percentage,
            )
            return result, percentage
        except PerfAnalyzerError as exc:
            if "no stable measurement" not in exc.message or percentage == percentages[-1]:
                raise
            print(f"perf_analyzer did not settle within {percentage:g}%: retrying with a wider percentage")
    raise AssertionError("unreachable")


if __name__ == "__main__":
    main()
