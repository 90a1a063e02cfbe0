"""Record response surfaces: every config of a finite space measured on the real embedded Triton.

    .venv/bin/python bench/record_surface.py [--models encoder,cnn] [--repeats 2] [--space grid-small]
        [--procedure study|fixed] [--suffix -quiet] [--work bench/out/surfaces-quiet]

Each repeat of each model is one study with Optuna's GridSampler and no pruner, so every config gets the
very sweep a study gives it (same load generator, same stopping rule, same latency budget). Repeats of
the models are interleaved in time (encoder r0, cnn r0, encoder r1, ...) so a slow stretch of this
shared machine does not fall on one model or one repeat only. The first repeat of a model settles its
latency budget (the study default: 10 x the baseline's single-request p99); later repeats reuse it.
``--procedure study`` (the default) measures as ``optimize study`` does (screening windows, the ci rule
for the level that can be the answer, the adaptive warm-up), each trial on one load and nothing
confirmed; ``fixed`` is the 1 s fixed windows the first two recordings used.

Writes ``bench/data/<model>/``: ``levels.csv`` (one row per measured concurrency level per repeat),
``outcomes.csv`` (one row per config per repeat: complete, infeasible or failed, with the reason),
``space.yaml`` (the space recorded) and ``meta.json`` (model, budget, measure settings, environment).
``optimize study --target replay:bench/data/<model>`` replays them. The study databases stay in
``--work`` so a recording can be inspected or re-dumped (``--dump-only``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import optuna

from optimizer.config.render import config_key, render_config
from optimizer.config.space import load_space, suggest_candidate
from optimizer.measurement.levels import MeasureSettings
from optimizer.measurement.replay import build_recorded_model
from optimizer.model import examples
from optimizer.model.intake import inspect_model
from optimizer.paths import cache_dir
from optimizer.serving.environment import available_cores
from optimizer.study.records import CONFIG_DIGEST
from optimizer.study.run import run_study
from optimizer.study.settings import SearchSettings, StudySettings

# How each recorded model is built (deterministic: the same seed writes the same bytes).
MODELS = {
    "encoder": {"builder": "build_encoder", "args": {}, "shapes": examples.EXAMPLE_SHAPES},
    "cnn": {"builder": "build_cnn", "args": {"size": 96}, "shapes": {}},
}
# Shorter windows than the CLI default keep a recording of 2 x 2 x 72 sweeps under an hour.
CORES = available_cores()  # what the recorded server's instances shared
PROCEDURES = {
    "fixed": MeasureSettings(warmup_s=0.5, window_s=1.0, min_requests=20, max_window_s=4.0, rule="fixed"),
    "study": MeasureSettings(),  # what optimize study measures with
}
# A recording measures each config as it is, once per repeat: no second loads, no confirmation.
RECORD_SEARCH = SearchSettings(confirm_finalists=0, second_load_margin=None)
LEVEL_FIELDS = (
    "concurrency",
    "throughput",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "requests",
    "duration_s",
    "phase",
    "warmup_s",
)


def build_model(name: str) -> Path:
    """The recorded model ``name``, built into the cache (the encoder is the bundled example's file)."""
    spec = MODELS[name]
    file_stem = "example_encoder" if name == "encoder" else f"surface_{name}"
    return build_recorded_model(file_stem, spec["builder"], spec["args"])


def distinct_configs(model_path: Path, space_name: str, model_name: str) -> int:
    """How many distinct rendered configs the grid holds (points that render alike count once)."""
    model = inspect_model(model_path, cache=cache_dir())
    space = load_space(space_name)
    grid = _grid(space, model.batching)
    keys = set()
    for values in itertools.product(*grid.values()):
        trial = optuna.trial.FixedTrial(dict(zip(grid, values)))
        candidate = suggest_candidate(trial, space, batching=model.batching, cores=CORES)
        keys.add(config_key(render_config(model, candidate, model_name=model_name)))
    return len(keys)


def _grid(space, batching: bool):
    from optimizer.config.space import grid_of

    return grid_of(space, batching=batching, cores=CORES)


def record(args) -> None:
    _raise_priority(args.nice)
    budgets: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name in args.models:
            path = build_model(name)
            study_name = f"surface-{name}-r{repeat}"
            configs = distinct_configs(path, args.space, path.stem)
            started, load_before = time.perf_counter(), os.getloadavg()
            print(f"recording {study_name}: {configs} configs", flush=True)
            summary = run_study(
                StudySettings(
                    model_path=path,
                    shapes=MODELS[name]["shapes"],
                    budget=configs,
                    space=args.space,
                    study_name=study_name,
                    output_dir=args.work,
                    seed=repeat,
                    sampler="grid",
                    pruning=False,
                    measure=PROCEDURES[args.procedure],
                    search=RECORD_SEARCH,
                    latency_budget_ms=budgets.get(name),
                )
            )
            budgets[name] = summary.latency_budget_ms
            minutes = (time.perf_counter() - started) / 60
            # What else ran on the machine: the 1/5/15-minute load averages around the repeat.
            study = optuna.load_study(study_name=study_name, storage=summary.storage_url)
            study.set_user_attr(
                "recording",
                {
                    "minutes": round(minutes, 1),
                    "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(),
                },
            )
            print(
                f"  {summary.finished} configs in {minutes:.1f} min, load {os.getloadavg()[1]:.1f}, "
                f"budget {summary.latency_budget_ms:g} ms",
                flush=True,
            )
            dump(name, args)


def dump(name: str, args) -> None:
    """Write bench/data/<name>/ from the recording studies of ``name`` found in ``--work``."""
    out = args.out / f"{name}{args.suffix}"
    out.mkdir(parents=True, exist_ok=True)
    studies = _recorded_studies(name, args.work)
    level_rows, outcome_rows = [], []
    for repeat, study in enumerate(studies):
        for trial in study.get_trials(deepcopy=False):
            attrs = trial.user_attrs
            if not trial.state.is_finished() or "same_config_as" in attrs or CONFIG_DIGEST not in attrs:
                continue
            outcome_rows.append(_outcome_row(repeat, trial))
            for level in attrs.get("sweep", []):
                level_rows.append({"config_key": attrs[CONFIG_DIGEST], "repeat": repeat, **level})
    _write_csv(out / "levels.csv", ["config_key", "repeat", *LEVEL_FIELDS], level_rows)
    _write_csv(out / "outcomes.csv", list(outcome_rows[0]), outcome_rows)
    shutil.copyfile(load_space(args.space).source, out / "space.yaml")
    first = studies[0]
    meta = {
        "model": {"name": name, **MODELS[name], "sha256": first.user_attrs["model_sha256"]},
        "model_name": first.user_attrs["model_name"],
        "shapes": first.user_attrs["shapes"],
        "latency_budget_ms": first.user_attrs["latency_budget_ms"],
        "concurrency_levels": first.user_attrs["concurrency_levels"],
        "measure": {**PROCEDURES[args.procedure].__dict__, "procedure": args.procedure},
        "variants": first.user_attrs.get("variants", {}),
        "server_version": first.user_attrs["server_version"],
        "hardware": first.user_attrs["hardware"],
        "repeats": len(studies),
        "repeat_conditions": [study.user_attrs.get("recording", {}) for study in studies],
        "priority": f"nice {args.nice} (other processes on the machine kept running)",
        "recorded": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "bench/record_surface.py",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  wrote {out}: {len(outcome_rows)} outcomes, {len(level_rows)} levels", flush=True)


def _raise_priority(nice: int) -> None:
    """Run the recording (and the Triton it starts, which inherits it) ahead of other work on the machine."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        print(f"note: cannot set priority {nice} (needs root); recording at normal priority", flush=True)


def _outcome_row(repeat: int, trial) -> dict:
    attrs = trial.user_attrs
    if trial.state == optuna.trial.TrialState.COMPLETE:
        state = "complete"
    elif trial.state == optuna.trial.TrialState.PRUNED:
        state = "infeasible"
    else:
        state = "failed"
    return {
        "config_key": attrs[CONFIG_DIGEST],
        "repeat": repeat,
        "candidate": attrs.get("candidate", ""),
        "state": state,
        "throughput": attrs.get("throughput", ""),
        "p99_ms": attrs.get("p99_ms", ""),
        "concurrency": attrs.get("concurrency", ""),
        "reason": attrs.get("reason", attrs.get("stop_reason", "")),
        "load_s": attrs.get("load_s", ""),
        "trial_s": attrs.get("trial_s", ""),
        "config": json.dumps(attrs["config"], sort_keys=True),
    }


def _recorded_studies(name: str, work: Path) -> list:
    studies = []
    for db in sorted(work.glob(f"surface-{name}-r*.db")):
        studies.append(optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}"))
    return studies


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="encoder,cnn", type=lambda text: text.split(","))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--space", default="grid-small")
    parser.add_argument("--out", type=Path, default=Path("bench/data"))
    parser.add_argument("--work", type=Path, default=Path("bench/out/surfaces"))
    parser.add_argument("--dump-only", action="store_true", help="rewrite bench/data from --work only")
    parser.add_argument("--nice", type=int, default=-15, help="scheduling priority of the recording")
    parser.add_argument("--procedure", choices=sorted(PROCEDURES), default="study")
    parser.add_argument("--suffix", default="", help="written to bench/data/<model><suffix>/")
    args = parser.parse_args()
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}: choose from {', '.join(MODELS)}")
    if args.dump_only:
        for name in args.models:
            dump(name, args)
    else:
        record(args)


if __name__ == "__main__":
    main()
