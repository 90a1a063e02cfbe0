"""Benchmark: how repeatable one trial's score is across fresh loads of the same config.

    .venv/bin/python bench/repeatability.py [--repeats 5]

Runs the study's trial procedure (reload, screening windows, full windows, adaptive warm-up) on the
bundled example, alternating the untuned baseline and a tuned config, ``--repeats`` times each, on one
embedded Triton: each repeat is a fresh load, so the spread seen is the start-to-start spread a study
meets. The latency budget is the study's default (10 x the median of 5 single-request p99 probes).
Prints every repeat's score and level, and per config the median, the CV and max/min, with the load
average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics

import optuna

from optimizer.config.render import render_config
from optimizer.config.space import Candidate, load_space
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.driver import QuietReporter
from optimizer.study.one_model import _intake, _model_name
from optimizer.study.settings import StudySettings
from optimizer.study.trial import TrialRunner

CONFIGS = {
    "baseline": Candidate(max_batch_size=1),
    # The baseline with its two threads given: ONNX Runtime pins its pool to cores only when left at 0.
    "baseline-thr2": Candidate(max_batch_size=1, intra_op_threads=2),
    "tuned": Candidate(
        precision="int8", max_batch_size=4, max_queue_delay_us=380, instance_count=2, intra_op_threads=1
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default="baseline,tuned", help=f"some of {','.join(CONFIGS)}")
    args = parser.parse_args()
    configs = {label: CONFIGS[label] for label in args.configs.split(",")}
    print(f"load average before: {_load_average()}", flush=True)
    settings = StudySettings()
    model, _, samples = _intake(settings)
    name = _model_name(model)
    target = EmbeddedTriton()
    target.start()
    try:
        runner = TrialRunner(
            target, model, samples, load_space("cpu"), name, settings, QuietReporter(), cores=2
        )
        runner.latency_budget_ms = float(max(5, round(10 * statistics.median(runner.probe_baseline_p99s(5)))))
        print(f"latency budget: {runner.latency_budget_ms:g} ms")
        study = optuna.create_study(
            direction="maximize", pruner=optuna.pruners.NopPruner()
        )  # every sweep runs to its end
        scores: dict[str, list[float]] = {label: [] for label in configs}
        for repeat in range(args.repeats):
            for label, candidate in configs.items():
                trial = study.ask()
                outcome = runner.measure(trial, render_config(model, candidate, model_name=name))
                score = outcome.best.throughput if outcome.best else 0.0
                scores[label].append(score)
                seconds = sum(level.measure_s for level in outcome.levels) + trial.user_attrs["load_s"]
                where = outcome.best.load if outcome.best else outcome.stop_reason
                print(
                    f"repeat {repeat} {label:<8} {score:7.1f} inf/s at {where} ({seconds:.1f} s)", flush=True
                )
                study.tell(trial, score)
    finally:
        target.stop()
    for label, values in scores.items():
        median = statistics.median(values)
        cv = (
            statistics.stdev(values) / statistics.mean(values)
            if len(values) > 1 and min(values) > 0
            else float("nan")
        )
        print(
            f"{label:<8} {CONFIGS[label].summary()}: median {median:.1f} inf/s, CV {cv:.1%}, "
            f"max/min {max(values) / min(values) if min(values) else float('inf'):.2f} over {len(values)} loads"
        )
    print(f"load average after: {_load_average()}")


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
