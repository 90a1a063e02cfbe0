"""Benchmark: one study on the bundled example model, with its figures side by side from that one run.

    .venv/bin/python bench/study_example.py [--budget 40] [--seed 0] [--out bench/out]

Measures as the README's command does (the library's defaults are the command line's: screening
windows, full ci windows where the answer is, adaptive warm-up, confirmation of the finalists). Prints the
load average before and after, baseline and best throughput (both within the latency budget), their
ratio, trials pruned and failed, the median seconds per trial and where they went (reload, screening,
full windows, warm-up), and the best throughput of each precision. The study database stays in --out for
anyone to inspect or report on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import optuna

from optimizer.measurement.levels import MeasureSettings
from optimizer.study.run import run_study
from optimizer.study.settings import StudySettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument(
        "--study-name", help="print the figures of (or resume) this study instead of a new one"
    )
    args = parser.parse_args()
    name = args.study_name or f"example-b{args.budget}-s{args.seed}-{int(time.time())}"
    measure = MeasureSettings()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    started = time.perf_counter()
    summary = run_study(
        StudySettings(
            budget=args.budget, seed=args.seed, study_name=name, output_dir=args.out, measure=measure
        )
    )
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name=name, storage=summary.storage_url)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_figures(study, summary, wall)


def _median_of(trials, key: str) -> str:
    values = [
        t.user_attrs[key] for t in trials if key in t.user_attrs and "same_config_as" not in t.user_attrs
    ]
    return f"{statistics.median(values):.2f}" if values else "-"


def _median_warmup(trials) -> str:
    values = [
        sum(level.get("warmup_s", 0.0) for level in t.user_attrs["sweep"])
        for t in trials
        if "sweep" in t.user_attrs and "same_config_as" not in t.user_attrs
    ]
    return f"{statistics.median(values):.2f}" if values else "-"


def print_figures(study, summary, wall_s: float) -> None:
    trials = [t for t in study.trials if t.state.is_finished()]
    trial_seconds = [t.user_attrs["trial_s"] for t in trials if "trial_s" in t.user_attrs]
    baseline, best = summary.baseline, summary.best
    rows = [
        ("study", summary.study_name),
        ("latency budget (ms)", f"{summary.latency_budget_ms:g}"),
        ("trials finished", f"{summary.finished} in {wall_s / 60:.1f} min"),
        ("baseline throughput (inf/s)", _throughput(baseline)),
        ("best throughput (inf/s)", _throughput(best)),
        (
            "best / baseline",
            f"{best.throughput / baseline.throughput:.2f}x" if _both(baseline, best) else "-",
        ),
        ("best config", best.summary if best else "-"),
        ("trials pruned", str(summary.pruned)),
        ("trials failed", str(summary.failed)),
        ("median seconds per trial", f"{statistics.median(trial_seconds):.1f}" if trial_seconds else "-"),
        (
            "median seconds: reload / screening / full windows / warm-ups (within both)",
            " / ".join(_median_of(trials, key) for key in ("load_s", "screen_s", "precise_s"))
            + f" / {_median_warmup(trials)}",
        ),
    ]
    confirmation = study.user_attrs.get("confirmation")
    if confirmation:
        for finalist in confirmation.get("finalists", []):
            rows.append(
                (
                    f"finalist #{finalist['trial']} (inf/s per repeat)",
                    f"{finalist['throughput']} mean {finalist['mean']} ± {finalist['half_width']}",
                )
            )
        baseline_record = confirmation.get("baseline_rounds")
        if baseline_record:
            rows.append(
                (
                    f"baseline #{baseline_record['trial']} (inf/s per repeat)",
                    f"{baseline_record['throughput']} mean {baseline_record['mean']} ± {baseline_record['half_width']}",
                )
            )
        rows.append(("confirmed pick", f"#{confirmation.get('chosen')}"))
    if summary.speed_up is not None:
        ratio, basis = summary.speed_up
        rows.append(("speed-up the study prints", f"{ratio:.2f}x ({basis})"))
    for precision, figure in _best_per_precision(study).items():
        rows.append((f"best {precision} throughput (inf/s)", figure))
    for precision, record in study.user_attrs.get("variants", {}).items():
        verdict = "kept" if record["ok"] else "rejected"
        recipe = f" [{record['recipe']}]" if record.get("recipe") else ""
        if "cosine" not in record:  # it could not be built
            rows.append((f"{precision} variant", f"{record['reason']} ({verdict})"))
            continue
        top1 = f", top-1 {record['top1']:.3f}" if record.get("top1") is not None else ""
        rows.append(
            (
                f"{precision}{recipe} accuracy vs fp32",
                f"cosine {record['cosine']:.5f}, max abs {record['max_abs']:.3g}, "
                f"max rel {record['max_rel']:.3g}{top1} ({verdict})",
            )
        )
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def _both(baseline, best) -> bool:
    return bool(baseline and best and baseline.throughput and best.throughput)


def _throughput(report) -> str:
    if report is None or report.throughput is None:
        return "-"
    return f"{report.throughput:.1f} (p99 {report.p99_ms:.1f} ms at concurrency {report.concurrency})"


def _best_per_precision(study) -> dict[str, str]:
    best: dict[str, float] = {}
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs.get("feasible"):
            filename = trial.user_attrs["config"].get("default_model_filename", "model.onnx")
            precision = {"model.int8.onnx": "int8", "model.fp16.onnx": "fp16"}.get(filename, "fp32")
            best[precision] = max(best.get(precision, 0.0), trial.value)
    return {precision: f"{value:.1f}" for precision, value in sorted(best.items())}


if __name__ == "__main__":
    main()
