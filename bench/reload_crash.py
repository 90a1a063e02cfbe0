"""The server crash of issue 35 on its two configs alone: how often a study's first reload crashes Triton.

    .venv/bin/python bench/reload_crash.py [--cycles 20] [--unary]

Each cycle is how the crashing studies began: a fresh embedded Triton, the 64->128->10 MLP of
``crash_rate.py`` measured as a trial with the untuned baseline, then reloaded with the config of
their trial #1 (int8, max batch 16, preferred [16], queue delay 1000 us, 1 instance) and measured
again. ``--unary`` sends tritonclient's unary calls instead of Triton's gRPC stream API. Prints the
crashes per cycle with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import optuna

from optimizer.config.render import render_config
from optimizer.config.space import Candidate, load_space
from optimizer.measurement import streams
from optimizer.measurement.builtin import LoadGenerator
from optimizer.model import examples
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.driver import QuietReporter
from optimizer.study.one_model import _intake, _model_name
from optimizer.study.settings import StudySettings
from optimizer.study.trial import TrialFailed, TrialRunner
from optimizer.study.trial_rules import first_line

CONFIGS = {
    "baseline": Candidate(max_batch_size=1),
    "batched": Candidate(
        precision="int8", max_batch_size=16, preferred_batch_sizes=(16,), max_queue_delay_us=1000
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--unary", action="store_true", help="tritonclient's unary calls, not the stream API")
    parser.add_argument(
        "--slots", type=int, default=streams.STREAM_SLOTS, help="closed-loop clients per stream"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/reload_crash"))
    args = parser.parse_args()
    if args.unary:
        LoadGenerator.__init__.__kwdefaults__["streaming"] = False
    streams.STREAM_SLOTS = args.slots
    api = "unary calls" if args.unary else f"stream API, {args.slots} clients per stream"
    args.out.mkdir(parents=True, exist_ok=True)
    path = examples.build_mlp(args.out / "tiny_mlp.onnx", in_features=64, hidden=128, out_features=10)
    settings = StudySettings(model_path=path, latency_budget_ms=20)
    model, _, samples = _intake(settings)
    name = _model_name(model)
    configs = {
        label: render_config(model, candidate, model_name=name) for label, candidate in CONFIGS.items()
    }
    target = EmbeddedTriton()
    target.start()
    runner = TrialRunner(target, model, samples, load_space("cpu"), name, settings, QuietReporter(), cores=2)
    runner.latency_budget_ms = 20.0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    print(f"{args.cycles} fresh servers, {api}; load {os.getloadavg()[0]:.2f}", flush=True)
    crashes = 0
    started = time.monotonic()
    try:
        for cycle in range(args.cycles):
            if cycle:
                target.restart()  # each cycle begins as a study does: a fresh server, the baseline, the reload
            for label, config in configs.items():
                trial = study.ask()
                try:
                    outcome = runner.measure(trial, config)
                    study.tell(trial, outcome.best.throughput if outcome.best else 0.0)
                except TrialFailed as exc:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    crashes += "crashed" in str(exc) or "hung" in str(exc)
                    print(f"  cycle {cycle} {label}: {first_line(str(exc))[:150]}", flush=True)
            print(f"cycle {cycle}: crashes so far {crashes}", flush=True)
    finally:
        target.stop()
    print(
        f"\n{api}: {crashes} crash(es) in {args.cycles} fresh servers; "
        f"{(time.monotonic() - started) / 60:.1f} min; load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
