"""Record a joint surface: every joint config of two models measured together on the real embedded Triton.

    .venv/bin/python bench/record_joint_surface.py [--repeats 3] [--space bench/data/joint-grid.yaml]
        [--traffic encoder=1,cnn=1] [--latency-budget-ms encoder=..,cnn=..] [--out bench/data/joint]
        [--work bench/out/joint-surface] [--dump-only]

The models are the pair of bench/joint.py: the bundled example encoder and the tests' small CNN
(3x32x32). Each repeat is one joint study (``run_study`` of several models) into which every distinct joint config of
the space (each model's grid point, all combinations) is enqueued in a shuffled order, so each gets the
very sweep a joint study gives it: the mixed load at 1, 2, 4, 8 clients per model until a model breaks
its budget or the mix stops gaining. Repeats follow each other in time, each in its own order, so a slow
stretch of the machine falls on different configs in each. The first repeat settles each model's
budget (the study default, 10 x its untuned single-request p99) unless given; later repeats reuse it.

Writes ``--out``: ``outcomes.csv`` (one row per joint config per repeat), ``levels.csv`` (one row per
model per level per repeat), ``space.yaml`` and ``meta.json`` (``"kind": "joint"``: the models and
their builders, traffic, budgets, the measurement, the machine). ``optimize study --target
replay:bench/data/joint`` replays it (:mod:`optimizer.measurement.joint_replay`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import os
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

import optuna
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from optimizer.config.render import config_digest, render_config
from optimizer.config.space import grid_of, load_space, suggest_candidate
from optimizer.measurement.joint_replay import LEVEL_FIELDS, OUTCOME_FIELDS, joint_key
from optimizer.measurement.replay import build_recorded_model
from optimizer.model import examples
from optimizer.model.intake import inspect_model
from optimizer.paths import cache_dir
from optimizer.serving.environment import available_cores
from optimizer.study.models_file import ModelEntry, parse_named_numbers
from optimizer.study.records import joint_budgets
from optimizer.study.run import run_study
from optimizer.study.settings import JOINT_MEASURE, StudySettings
from optimizer.study.storage import create_or_join, default_storage_url, open_storage

# How each recorded model is built (deterministic: the same seed writes the same bytes), under the name
# it is recorded with (every recorded config holds it).
MODELS = {
    "encoder": {"builder": "build_encoder", "args": {}, "shapes": dict(examples.EXAMPLE_SHAPES)},
    "cnn": {"builder": "build_cnn", "args": {}, "shapes": {}},
}
CORES = available_cores()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--space", default="bench/data/joint-grid.yaml")
    parser.add_argument("--traffic", default="encoder=1,cnn=1")
    parser.add_argument("--latency-budget-ms", default=None, help="NAME=MS,... (default: probed)")
    parser.add_argument("--window-s", type=float, default=JOINT_MEASURE.window_s)
    parser.add_argument("--warmup-s", type=float, default=JOINT_MEASURE.warmup_s)
    parser.add_argument("--levels", default="1,2,4,8", help="clients per model at each level")
    parser.add_argument("--out", type=Path, default=Path("bench/data/joint"))
    parser.add_argument("--work", type=Path, default=Path("bench/out/joint-surface"))
    parser.add_argument("--dump-only", action="store_true", help="rewrite --out from --work only")
    args = parser.parse_args()
    traffic = parse_named_numbers(args.traffic, "--traffic", "encoder=1,cnn=1")
    budgets = (
        parse_named_numbers(args.latency_budget_ms, "--latency-budget-ms", "encoder=20,cnn=10")
        if (args.latency_budget_ms)
        else {}
    )
    measure = replace(JOINT_MEASURE, window_s=args.window_s, warmup_s=args.warmup_s)
    levels = tuple(int(level) for level in args.levels.split(","))
    if not args.dump_only:
        record(args, traffic, budgets, measure, levels)
    dump(args, traffic, measure)


def entries(traffic: dict[str, float], budgets: dict[str, float]) -> tuple[ModelEntry, ...]:
    return tuple(
        ModelEntry(
            name=name,
            path=build_recorded_model(name, spec["builder"], spec["args"]),
            shapes=spec["shapes"],
            traffic=traffic[name],
            latency_budget_ms=budgets.get(name),
        )
        for name, spec in MODELS.items()
    )


def joint_points(space_path: str) -> list[dict]:
    """Every distinct joint config of the space, as the joint study's parameters (``<model>.<param>``)."""
    space = load_space(space_path)
    per_model = []
    for name, spec in MODELS.items():
        info = inspect_model(build_recorded_model(name, spec["builder"], spec["args"]), cache=cache_dir())
        grid = grid_of(space, batching=info.batching, cores=CORES)
        distinct: dict[str, dict] = {}
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid, values))
            candidate = suggest_candidate(
                optuna.trial.FixedTrial(params), space, batching=info.batching, cores=CORES
            )
            key = config_digest(render_config(info, candidate, model_name=name))
            distinct.setdefault(key, {f"{name}.{param}": value for param, value in params.items()})
        per_model.append(list(distinct.values()))
    return [
        {k: v for point in combination for k, v in point.items()}
        for combination in itertools.product(*per_model)
    ]


def record(args, traffic, budgets, measure, levels) -> None:
    points = joint_points(args.space)
    args.work.mkdir(parents=True, exist_ok=True)
    for repeat in range(args.repeats):
        name = f"joint-surface-r{repeat}"
        study, created = create_or_join(open_storage(default_storage_url(args.work, name)), name)
        if created:  # every joint config once, in this repeat's own order
            order = list(points)
            random.Random(repeat).shuffle(order)
            for params in order:
                study.enqueue_trial(params)
        started, load_before = time.perf_counter(), os.getloadavg()
        print(f"recording {name}: {len(points)} joint configs  [load {load_before[0]:.2f}]", flush=True)
        summary = run_study(
            StudySettings(
                models=entries(traffic, budgets),
                budget=len(points),
                space=args.space,
                study_name=name,
                output_dir=args.work,
                seed=repeat,
                measure=measure,
                concurrency=levels,
            )
        )
        budgets = dict(
            joint_budgets(optuna.load_study(study_name=name, storage=summary.storage_url).user_attrs)
        )
        study.set_user_attr(
            "recording",
            {
                "minutes": round((time.perf_counter() - started) / 60, 1),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            },
        )
        print(
            f"  {summary.finished} joint configs in {(time.perf_counter() - started) / 60:.1f} min, budgets {budgets}",
            flush=True,
        )


def dump(args, traffic, measure) -> None:
    """Write ``--out`` from the recording studies found in ``--work``."""
    studies = [
        optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}")
        for db in sorted(args.work.glob("joint-surface-r*.db"))
    ]
    outcomes, levels, unkeyed = [], [], 0
    for repeat, study in enumerate(studies):
        for trial in study.get_trials(deepcopy=False):
            attrs = trial.user_attrs
            if not trial.state.is_finished() or attrs.get("surplus"):
                continue
            if "configs" not in attrs:  # failed before every model was loaded: no joint config to key
                unkeyed += 1
                continue
            key = joint_key(
                {
                    name: config_digest(json_format.ParseDict(config, model_config_pb2.ModelConfig()))
                    for name, config in attrs["configs"].items()
                }
            )
            state = {"COMPLETE": "complete", "PRUNED": "infeasible"}.get(trial.state.name, "failed")
            outcomes.append(
                {
                    "joint_key": key,
                    "repeat": repeat,
                    "state": state,
                    "reason": attrs.get("reason", ""),
                    "candidates": json.dumps(attrs["candidates"], sort_keys=True),
                    "trial_s": attrs.get("trial_s", ""),
                    "configs": json.dumps(attrs["configs"], sort_keys=True),
                }
            )
            for level in attrs.get("levels", []):
                for model, figures in level["models"].items():
                    levels.append(
                        {
                            "joint_key": key,
                            "repeat": repeat,
                            "clients": level["clients"],
                            "model": model,
                            **figures,
                        }
                    )
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / "outcomes.csv", OUTCOME_FIELDS, outcomes)
    _write_csv(args.out / "levels.csv", LEVEL_FIELDS, levels)
    shutil.copyfile(load_space(args.space).source, args.out / "space.yaml")
    first = studies[0].user_attrs
    meta = {
        "kind": "joint",
        "models": {name: {**spec, "sha256": first["models"][name]} for name, spec in MODELS.items()},
        "traffic": first["traffic"],
        "latency_budgets_ms": joint_budgets(first),
        "levels": [int(level) for level in args.levels.split(",")],
        "measure": dataclasses.asdict(measure),
        "server_version": first["server_version"],
        "hardware": {**first["hardware"], "cores": CORES},
        "repeats": len(studies),
        "unkeyed_failures": unkeyed,
        "repeat_conditions": [study.user_attrs.get("recording", {}) for study in studies],
        "recorded": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "bench/record_joint_surface.py",
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    print(f"wrote {args.out}: {len(outcomes)} outcomes, {len(levels)} model levels", flush=True)


def _write_csv(path: Path, fields, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
