"""Benchmark: how close a joint study gets to the best joint config, replayed on a joint recording.

    .venv/bin/python bench/joint_replay_search.py [--recording bench/data/joint] [--seeds 20]
        [--budgets 4,6,8,12]

Each joint config's true score is the mean over its recorded repeats of what a joint study's sweep
makes of the repeat (the mixed load's levels until a model breaks its budget or the mix stops
gaining; a failed repeat scores 0). For each trial budget and seed, one joint study runs against the
replay target (``optimize study --target replay:…`` as a library call, each measurement a recorded
repeat drawn at random) and its best trial's joint config is scored by its true score, as a fraction of
the best true score. Random search is simulated on the same draws: the baseline, then distinct joint
configs at random, each measured by one drawn repeat, the best measured one kept. Prints the median and
10th percentile of the fraction per budget, and how often each found the best config.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from optimizer.config.render import config_digest
from optimizer.measurement.joint_replay import JointRecordedConfig, JointReplayTarget, joint_key
from optimizer.measurement.mixed import MixLevel, mix_throughput, shares_of
from optimizer.study.joint_trial import sweep_stop
from optimizer.study.models_file import ModelEntry
from optimizer.study.run import run_study
from optimizer.study.settings import JOINT_MEASURE, StudySettings


def sweep_score(sweep, budgets: dict[str, float], shares: dict[str, float]) -> float:
    """What a joint study's sweep makes of one recorded repeat (its stopping rule, ``sweep_stop``)."""
    levels: list[MixLevel] = []
    for clients, results in sweep:
        over = tuple(name for name in shares if results[name].p99_ms > budgets[name])
        levels.append(MixLevel(clients, results, mix_throughput(results, shares), over))
        if sweep_stop(levels, budgets) is not None:
            break
    return max((level.mix_throughput for level in levels if level.feasible), default=0.0)


def true_score(config: JointRecordedConfig, budgets, shares) -> float:
    scores = [sweep_score(sweep, budgets, shares) for sweep in config.sweeps] + [0.0] * len(config.failures)
    return sum(scores) / len(scores)


def study_pick(recording: Path, budget: int, seed: int, out: Path) -> str:
    """The joint key of the best trial of one replayed joint study."""
    target = JointReplayTarget(recording, seed=seed)
    surface = target.surface
    entries = tuple(
        ModelEntry(
            name=name,
            path=surface.model_path(name),
            shapes=surface.shapes(name),
            traffic=surface.traffic[name],
            latency_budget_ms=surface.latency_budgets_ms[name],
        )
        for name in surface.model_names
    )
    name = f"s{budget}-{seed}"
    summary = run_study(
        StudySettings(
            models=entries,
            budget=budget,
            space=str(surface.space_path),
            study_name=name,
            output_dir=out,
            seed=seed,
            measure=JOINT_MEASURE,
        ),
        target=target,
    )
    if summary.best_trial is None:
        return ""
    study = optuna.load_study(study_name=name, storage=summary.storage_url)
    configs = study.trials[summary.best_trial].user_attrs["configs"]
    return joint_key(
        {
            n: config_digest(json_format.ParseDict(c, model_config_pb2.ModelConfig()))
            for n, c in configs.items()
        }
    )


def random_pick(configs: list[JointRecordedConfig], baseline: str, budget: int, rng, budgets, shares) -> str:
    """Random search on the same noise: the baseline, then distinct configs, each measured once."""
    others = [c for c in configs if c.key != baseline]
    chosen = [
        next(c for c in configs if c.key == baseline),
        *rng.sample(others, min(budget - 1, len(others))),
    ]
    measured = {}
    for config in chosen:
        index = rng.randrange(len(config.sweeps) + len(config.failures))
        sweep = config.sweeps[index] if index < len(config.sweeps) else ()
        measured[config.key] = sweep_score(sweep, budgets, shares)
    return max(measured, key=measured.get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recording", type=Path, default=Path("bench/data/joint"))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budgets", default="4,6,8,12")
    args = parser.parse_args()
    started = time.perf_counter()
    surface = JointReplayTarget(args.recording).surface
    budgets, shares = surface.latency_budgets_ms, shares_of(surface.traffic)
    truth = {key: true_score(config, budgets, shares) for key, config in surface.configs.items()}
    top = max(truth.values())
    best_key = max(truth, key=truth.get)
    print(
        f"{len(truth)} joint configs, {surface.meta['repeats']} repeats; best true score {top:.1f} req/s in the "
        f"mix ({json.dumps(surface.configs[best_key].candidates)}); median config {statistics.median(truth.values()):.1f}"
    )
    baseline = _baseline_key(surface)
    print(f"baseline (untuned pair): {truth[baseline]:.1f} req/s ({truth[baseline] / top:.2f} of the best)")
    rng = random.Random(0)
    configs = list(surface.configs.values())
    print(
        "\n| trials | optimize: median / p10 of best | found the best | random: median / p10 | found the best |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="joint-replay-") as tmp:
        for budget in [int(b) for b in args.budgets.split(",")]:
            ours = [
                truth.get(study_pick(args.recording, budget, seed, Path(tmp)), 0.0) / top
                for seed in range(args.seeds)
            ]
            theirs = [
                truth[random_pick(configs, baseline, budget, rng, budgets, shares)] / top
                for _ in range(args.seeds)
            ]
            print(
                f"| {budget} | {statistics.median(ours):.3f} / {_p10(ours):.3f} | {sum(v == 1.0 for v in ours)}/{len(ours)} "
                f"| {statistics.median(theirs):.3f} / {_p10(theirs):.3f} | {sum(v == 1.0 for v in theirs)}/{len(theirs)} |",
                flush=True,
            )
    print(f"\n{time.perf_counter() - started:.0f} s")


def _baseline_key(surface) -> str:
    """The untuned pair: max batch 1, one instance per model."""
    return next(
        key
        for key, config in surface.configs.items()
        if all("mbs=1 " in line and "inst=1 " in line for line in config.candidates.values())
    )


def _p10(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.1) - 1)] if values else 0.0


if __name__ == "__main__":
    main()
