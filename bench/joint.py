"""Benchmark: two models tuned together vs each tuned alone and put together, on one server (issue #19).

    .venv/bin/python bench/joint.py [--budget 15] [--joint-budget 15] [--rounds 3] [--seed 0]

The bundled example encoder and the tests' small CNN (3x32x32), traffic 1:1:

1. each model tuned alone by ``optimize study`` (--budget trials, its own default latency budget);
2. one joint study of both (--joint-budget trials, each model with the budget its own study chose);
3. side by side on one server, --rounds alternated rounds: the two separately tuned best configs loaded
   together, then the joint study's best, each swept in the 1:1 mix (1, 2, 4, 8 clients per model, the
   best level that keeps both within their budgets). Prints the requests/s each sustains in the mix per
   round, their medians and the ratio joint / separate per round.

Run it with nothing else on the machine; the load averages are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from optimizer.config.render import config_from_json, to_json
from optimizer.measurement.mixed import measure_mix, shares_of
from optimizer.model import examples
from optimizer.model.intake import inspect_model, load_requests
from optimizer.model.variants import config_files
from optimizer.paths import cache_dir
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.models_file import ModelEntry
from optimizer.study.run import run_study
from optimizer.study.settings import JOINT_MEASURE, StudySettings

LEVELS = (1, 2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=15)
    parser.add_argument("--joint-budget", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="joint-") as tmp:
        out = Path(tmp)
        paths = {
            "encoder": (examples.example_model(cache_dir() / "examples"), dict(examples.EXAMPLE_SHAPES)),
            "cnn": (examples.build_cnn(out / "cnn.onnx"), {"image": (3, 32, 32)}),
        }
        alone, budgets = {}, {}
        for name, (path, shapes) in paths.items():
            print(f"\n# {name} tuned alone, {args.budget} trials  [{_load()}]", flush=True)
            summary = run_study(
                StudySettings(
                    model_path=path,
                    shapes=shapes,
                    budget=args.budget,
                    seed=args.seed,
                    study_name=name,
                    output_dir=out,
                )
            )
            study = optuna.load_study(study_name=name, storage=summary.storage_url)
            best = summary.best
            assert best is not None, f"{name}: nothing met its budget"
            budgets[name] = float(study.user_attrs["latency_budget_ms"])
            trial = next(t for t in study.trials if t.number == best.number)
            alone[name] = trial.user_attrs["config"]
            print(
                f"{name}: best {best.throughput:.1f} inf/s alone ({best.summary}), budget {budgets[name]:g} ms"
            )
        entries = tuple(
            ModelEntry(name=name, path=path, shapes=shapes, traffic=1.0, latency_budget_ms=budgets[name])
            for name, (path, shapes) in paths.items()
        )
        print(f"\n# joint study, {args.joint_budget} trials  [{_load()}]", flush=True)
        joint = run_study(
            StudySettings(
                models=entries, budget=args.joint_budget, study_name="joint", output_dir=out, seed=args.seed
            )
        )
        assert joint.best_trial is not None, "the joint study found nothing within both budgets"
        study = optuna.load_study(study_name="joint", storage=joint.storage_url)
        together = next(t for t in study.trials if t.number == joint.best_trial).user_attrs["configs"]
        print(
            f"joint best: {joint.best_throughput:.1f} req/s in the mix; "
            + "; ".join(f"{n}: {f['candidate']}" for n, f in joint.per_model.items())
        )
        _side_by_side(entries, {"separate": alone, "joint": together}, budgets, args.rounds)
    print(f"\ntotal {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores  [{_load()}]")


def _side_by_side(entries, arrangements: dict, budgets: dict, rounds: int) -> None:
    print(f"\n# side by side, 1:1 mix, {rounds} alternated rounds  [{_load()}]")
    requests = {e.name: load_requests(e.path, e.shapes, None, cache=cache_dir()) for e in entries}
    shares = shares_of({e.name: 1.0 for e in entries})
    figures: dict[str, list[float]] = {name: [] for name in arrangements}
    with EmbeddedTriton() as server:
        for round_ in range(rounds):
            order = list(arrangements) if round_ % 2 == 0 else list(reversed(arrangements))
            for arrangement in order:
                for entry in entries:
                    config = config_from_json(arrangements[arrangement][entry.name])
                    config.name = entry.name
                    info = inspect_model(entry.path, cache=cache_dir())
                    server.load_model(entry.name, to_json(config), config_files(info, config, cache_dir()))
                samples = {name: r[2] for name, r in requests.items()}
                best = 0.0
                for per_model in LEVELS:
                    level = measure_mix(
                        server.grpc_url,
                        samples,
                        per_model * 2,
                        shares,
                        budgets,
                        JOINT_MEASURE,
                    )
                    if not level.feasible:
                        break
                    best = max(best, level.mix_throughput)
                figures[arrangement].append(best)
                print(f"round {round_} {arrangement}: {best:.1f} req/s in the mix", flush=True)
    ratios = [j / s for j, s in zip(figures["joint"], figures["separate"]) if s]
    for name, values in figures.items():
        print(
            f"{name}: median {statistics.median(values):.1f} req/s, rounds "
            + "/".join(f"{v:.1f}" for v in values)
        )
    print(
        f"joint / separate: median {statistics.median(ratios):.3f}x, rounds "
        + "/".join(f"{r:.3f}" for r in ratios)
    )


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
