"""Replay benchmark: how close each search gets to a recorded surface's optimum within 10, 20, 40 trials.

    .venv/bin/python bench/replay_search.py [--seeds 30] [--surfaces bench/data/encoder,bench/data/cnn]
        [--bad-starts 0.2[:0.6]] [--set second_load_margin=null] [--space bench/data/shared-cores.yaml]

``--bad-starts`` adds a noise model the recordings lack: that fraction of loads (every search's) start
slow and stay slow, throughput times the factor, as fresh servers measured 440-884 inf/s for one config.

Searches compared on every recorded surface (bench/record_surface.py), each over the same recorded
space, each measurement replayed from a recorded repeat drawn at random (real noise):

- ``optimize``: ``run_study`` exactly as ``optimize study`` runs it (default sampler, pruner,
  canonicalisation, baseline first), against ``--target replay:DIR``;
- ``random``: the same study with Optuna's RandomSampler;
- ``grid``: the order of Model Analyzer's brute search (default config first, then the cartesian
  product with max batch size outside instance count, precision and the other fields outermost);
- ``hill``: hill climbing in the spirit of Model Analyzer's quick mode: from the default config, measure
  every one-step neighbour, move to the best if it beats the current point, else restart from a random
  unmeasured point.

A search's pick after k measured trials is the config it measured best so far (what it would export);
its score is that config's *true* throughput (mean of its recorded repeats, 0 if infeasible) as a fraction
of the best true throughput on the surface. The last column shows the best true throughput among all the
configs it measured, picked or not: the gap between the two is what measurement noise costs. The
"confirmed pick" columns score what the search would export after the confirmation ``optimize study``
runs (its 3 best configs measured twice more, the best mean picked), the same for every search.
Printed per surface, search and budget: the median and 10th percentile over seeds, the median number of
trials to reach 95% and 99% of the optimum, and the fraction of measured trials after the 5th that were
infeasible.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BUDGETS = (10, 20, 40)
SEARCHES = ("optimize", "random", "grid", "hill")
STARTUP = 5  # trials after which infeasible proposals count against a search


@dataclass(frozen=True)
class Point:
    """One grid point: its parameters (as the study suggests them) and its recorded config key."""

    params: dict
    key: str


@dataclass(frozen=True)
class Run:
    """One search on one surface with one seed: the key and outcome of each measured trial, in order."""

    keys: tuple[str, ...]
    observed: tuple[float | None, ...]  # best feasible throughput measured; None: infeasible/failed/pruned
    infeasible: tuple[bool, ...]
    seconds: tuple[float, ...]  # what each trial's measurement took when it was recorded


def grid_points(surface) -> list[Point]:
    """Every point of the recording's space, keyed like the recording (the model is rebuilt)."""
    import optuna
    from record_surface import build_model

    from optimizer.config.render import config_digest, render_config
    from optimizer.config.space import grid_of, load_space, suggest_candidate
    from optimizer.model.intake import inspect_model
    from optimizer.paths import cache_dir

    model = inspect_model(build_model(surface.meta["model"]["name"]), cache=cache_dir())
    space = load_space(str(surface.space_path))
    cores = int(surface.meta["hardware"]["cores"])  # the recording machine's
    grid = grid_of(space, batching=model.batching, cores=cores)
    points = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        candidate = suggest_candidate(
            optuna.trial.FixedTrial(params), space, batching=model.batching, cores=cores
        )
        config = render_config(model, candidate, model_name=surface.meta["model_name"])
        points.append(Point(params, config_digest(config)))
    return points


# --- searches ------------------------------------------------------------------------------------------


def run_optuna(
    surface_dir: str,
    sampler: str,
    seed: int,
    budget: int,
    search=None,
    space: str | None = None,
    bad_starts=None,
) -> Run:
    """A real study (run_study) against the replay target."""
    import optuna
    from record_surface import MODELS, build_model

    from optimizer.measurement.replay import ReplayTarget
    from optimizer.study.run import run_study
    from optimizer.study.settings import StudySettings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    target = ReplayTarget(surface_dir, seed=seed, bad_starts=bad_starts)
    meta = target.surface.meta
    storage = optuna.storages.InMemoryStorage()
    with tempfile.TemporaryDirectory() as tmp:  # the exported best repository lands here
        run_study(
            StudySettings(
                model_path=build_model(meta["model"]["name"]),
                shapes=MODELS[meta["model"]["name"]]["shapes"],
                budget=budget,
                space=space or str(target.surface.space_path),
                study_name="replay",
                output_dir=Path(tmp),
                seed=seed,
                sampler=sampler,
                latency_budget_ms=target.surface.latency_budget_ms,
                **({"search": search} if search is not None else {}),
            ),
            target=target,
            storage=storage,
        )
    warmup_s = target.surface.meta["measure"]["warmup_s"]
    return _run_of(optuna.load_study(study_name="replay", storage=storage), warmup_s)


def _run_of(study, warmup_s: float) -> Run:
    from optuna.trial import TrialState

    keys, observed, infeasible, seconds = [], [], [], []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs = trial.user_attrs
        if not trial.state.is_finished() or "same_config_as" in attrs or "config_digest" not in attrs:
            continue
        keys.append(attrs["config_digest"])
        observed.append(trial.value if trial.state == TrialState.COMPLETE else None)
        infeasible.append(
            str(attrs.get("reason", "")).startswith("infeasible") or not attrs.get("feasible", True)
        )
        second_load = attrs.get("second_load", {}).get("seconds", 0.0)
        sweep = attrs.get("sweep", [])
        levels_s = sum(level["duration_s"] + (level.get("warmup_s") or warmup_s) for level in sweep)
        seconds.append(levels_s + second_load)
    return Run(tuple(keys), tuple(observed), tuple(infeasible), tuple(seconds))


def run_grid(surface, points: list[Point], seed: int, budget: int, bad_starts=None) -> Run:
    """Model Analyzer's brute order over the recorded space."""
    order = sorted(points, key=_brute_rank)
    return _measure_in_order(surface, _unique(order), seed, budget, bad_starts)


# Outermost first; max batch size outside instance count as in Model Analyzer's automatic brute search.
BRUTE_ORDER = (
    "precision",
    "preferred_batch_sizes",
    "max_queue_delay_us",
    "intra_op_threads",
    "max_batch_size",
    "instance_count",
)


def _brute_rank(point: Point) -> tuple:
    return tuple(_value_rank(point.params.get(name)) for name in BRUTE_ORDER)


def _value_rank(value) -> tuple:
    # fp32 and "none" (the defaults) sort first; numbers ascend.
    if isinstance(value, str):
        return (0 if value in ("fp32", "none") else 1, value)
    return (0, value if value is not None else 0)


def _unique(points: list[Point]) -> list[Point]:
    seen, unique = set(), []
    for point in points:
        if point.key not in seen:
            seen.add(point.key)
            unique.append(point)
    return unique


def _measure_in_order(surface, points: list[Point], seed: int, budget: int, bad_starts) -> Run:
    rng = random.Random(seed)
    measured = [(p.key, *measure_recorded(surface, p.key, rng, bad_starts)) for p in points[:budget]]
    return Run(
        tuple(k for k, _, _ in measured),
        tuple(v for _, v, _ in measured),
        tuple(v is None for _, v, _ in measured),
        tuple(t for _, _, t in measured),
    )


def measure_recorded(surface, key: str, rng: random.Random, bad_starts=None) -> tuple[float | None, float]:
    """One replayed measurement, stopped by the study's sweep rule (no pruner).

    Returns the best feasible throughput (None: infeasible or failed) and the seconds it was measured.
    """
    from optimizer.errors import ConfigRejected
    from optimizer.measurement.replay import draw_repeat, replay_sweep
    from optimizer.measurement.sweep import DEFAULT_LEVELS, best_feasible, next_step

    config = surface.configs[key]
    budget = surface.latency_budget_ms
    try:
        drawn = draw_repeat(config, rng, bad_starts)
    except ConfigRejected:
        return None, 0.0
    measured = []

    def on_level(index, level):
        measured.append(level)
        return next_step(measured, budget, remaining=len(DEFAULT_LEVELS) - index - 1) is None

    replay_sweep(config, drawn, DEFAULT_LEVELS, on_level, rng)
    best = best_feasible(measured, budget)
    warmup_s = surface.meta["measure"]["warmup_s"]
    seconds = sum(level.duration_s + warmup_s for level in measured)
    return (best.throughput if best is not None else None), seconds


def run_hill(surface, points: list[Point], seed: int, budget: int, bad_starts=None) -> Run:
    """Steepest-ascent hill climbing over the grid, one-step neighbours, random restarts."""
    rng = random.Random(seed)
    names = list(points[0].params)
    values = {name: sorted({p.params[name] for p in points}, key=_value_rank) for name in names}
    by_coords = {tuple(p.params[n] for n in names): p for p in points}
    results: dict[str, float | None] = {}
    seconds: dict[str, float] = {}
    keys: list[str] = []

    def measure(coords) -> float:
        point = by_coords[coords]
        if point.key not in results and len(keys) < budget:
            results[point.key], seconds[point.key] = measure_recorded(surface, point.key, rng, bad_starts)
            keys.append(point.key)
        return results.get(point.key) or 0.0

    default = min(by_coords, key=lambda c: tuple(_value_rank(v) for v in c))
    current = default
    while len(keys) < budget:
        here = measure(current)
        neighbours = [n for n in _neighbours(current, names, values) if by_coords[n].key not in results]
        scored = [(measure(n), n) for n in neighbours]
        best_value, best = max(scored, default=(0.0, current))
        if best_value > here:
            current = best
            continue
        unmeasured = [c for c, p in by_coords.items() if p.key not in results]
        if not unmeasured:
            break
        current = rng.choice(unmeasured)
    observed = tuple(results[k] for k in keys)
    return Run(tuple(keys), observed, tuple(v is None for v in observed), tuple(seconds[k] for k in keys))


def _neighbours(coords, names, values):
    for index, name in enumerate(names):
        ordered = values[name]
        position = ordered.index(coords[index])
        for step in (-1, 1):
            if 0 <= position + step < len(ordered):
                yield coords[:index] + (ordered[position + step],) + coords[index + 1 :]


# --- scoring -------------------------------------------------------------------------------------------


def pick_after(run: Run, k: int) -> str | None:
    """The config a search would export after its first k measured trials."""
    seen = [(v, key) for key, v in zip(run.keys[:k], run.observed[:k]) if v is not None]
    return max(seen)[1] if seen else None


def score(surface, truth: dict[str, float], run: Run, k: int) -> float:
    key = pick_after(run, k)
    return truth[key] / max(truth.values()) if key is not None else 0.0


def confirmed_pick(
    surface, run: Run, k: int, bad_starts=None, finalists: int = 3, rounds: int = 2
) -> str | None:
    """The config a search would export after k trials if it confirmed like ``optimize study`` does.

    The best ``finalists`` distinct configs measured so far are each measured ``rounds`` more times
    (replayed draws); the pick is the best mean of all their measurements (an infeasible repeat counts 0).
    """
    seen: dict[str, list[float]] = {}
    for key, value in zip(run.keys[:k], run.observed[:k]):
        if value is not None:
            seen.setdefault(key, []).append(value)
    if not seen:
        return None
    top = sorted(seen, key=lambda key: max(seen[key]), reverse=True)[:finalists]
    rng = random.Random(f"{k}:{','.join(run.keys[:k])}")  # the same draws for the same history
    for _ in range(rounds):
        for key in top:
            seen[key].append(measure_recorded(surface, key, rng, bad_starts)[0] or 0.0)
    return max(top, key=lambda key: statistics.fmean(seen[key]))


def confirmed_score(surface, truth: dict[str, float], run: Run, k: int, bad_starts=None) -> float:
    key = confirmed_pick(surface, run, k, bad_starts)
    return truth[key] / max(truth.values()) if key is not None else 0.0


def best_measured(truth: dict[str, float], run: Run, k: int) -> float:
    """The best true throughput among the configs measured in the first k trials (picked or not)."""
    return max((truth[key] for key in run.keys[:k]), default=0.0) / max(truth.values())


def trials_to_reach(truth: dict[str, float], run: Run, fraction: float) -> int | None:
    optimum = max(truth.values())
    for k in range(1, len(run.keys) + 1):
        key = pick_after(run, k)
        if key is not None and truth[key] >= fraction * optimum:
            return k
    return None


def search_settings(overrides: list[str]):
    """``tpe_startup_trials=10`` ...: the study's SearchSettings with these fields changed (tuning runs)."""
    import dataclasses
    import json

    from optimizer.study.settings import SearchSettings

    fields = {field.name for field in dataclasses.fields(SearchSettings)}
    changes = {}
    for override in overrides:
        name, _, value = override.partition("=")
        if name not in fields:
            raise SystemExit(
                f"--set {override!r}: SearchSettings has no field {name!r} ({', '.join(sorted(fields))})"
            )
        parsed = json.loads(value)
        changes[name] = tuple(parsed) if isinstance(parsed, list) else parsed
    return SearchSettings(**changes)


def parse_bad_starts(text: str | None):
    from optimizer.measurement.replay import BadStarts

    if not text:
        return None
    rate, _, factor = text.partition(":")
    return BadStarts(float(rate), float(factor)) if factor else BadStarts(float(rate))


def _one(job) -> tuple:
    surface_dir, search, seed, budget, overrides, space, bad_starts = job
    from optimizer.measurement.replay import load_surface

    settings = search_settings(overrides)
    surface = load_surface(surface_dir)
    if search in ("optimize", "random"):
        sampler = "tpe" if search == "optimize" else "random"
        run = run_optuna(surface_dir, sampler, seed, budget, settings, space, bad_starts)
    else:
        points = grid_points(surface)
        run = (run_grid if search == "grid" else run_hill)(surface, points, seed, budget, bad_starts)
    return surface_dir, search, seed, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--surfaces", default="bench/data/encoder,bench/data/cnn")
    parser.add_argument("--searches", default=",".join(SEARCHES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="try other SearchSettings, e.g. tpe_startup_trials=10 or prune_percentile=null (repeatable)",
    )
    parser.add_argument(
        "--space",
        default=None,
        help="a part of the recorded space for optimize and random to search, e.g. bench/data/shared-cores.yaml",
    )
    parser.add_argument(
        "--bad-starts",
        default=None,
        metavar="RATE[:FACTOR]",
        help="noise model: this fraction of loads start slow, throughput x FACTOR (default 0.6), e.g. 0.2",
    )
    args = parser.parse_args()
    bad_starts = parse_bad_starts(args.bad_starts)
    surfaces = args.surfaces.split(",")
    searches = args.searches.split(",")
    search_settings(args.set)  # fail early on a typo
    jobs = [
        (s, search, seed, max(BUDGETS), args.set, args.space, bad_starts)
        for s in surfaces
        for search in searches
        for seed in range(args.seeds)
    ]
    if args.set:
        print("settings: " + "; ".join(args.set))
    if bad_starts:
        print(f"noise model: {bad_starts.rate:.0%} of loads start slow (throughput x {bad_starts.factor:g})")
    if args.space:
        print(f"optimize and random search the space {args.space} (a part of each recording's)")
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_one, jobs))
    print(f"{len(jobs)} searches in {(time.perf_counter() - started) / 60:.1f} min\n")
    print_table(results, surfaces, searches, bad_starts)


def print_table(results, surfaces, searches, bad_starts=None) -> None:
    from optimizer.measurement.replay import load_surface

    for surface_dir in surfaces:
        surface = load_surface(surface_dir)
        truth = {key: surface.true_throughput(key) for key in surface.configs}
        best_key = max(truth, key=truth.get)
        print(
            f"## {surface_dir}: {len(truth)} configs, budget {surface.latency_budget_ms:g} ms, optimum "
            f"{truth[best_key]:.1f} inf/s ({surface.configs[best_key].candidate}), "
            f"{sum(v == 0 for v in truth.values())} infeasible, repeat agreement r = {repeat_agreement(surface):.2f}"
        )
        header = (
            "| search | budget | median % of optimum | p10 % | median trials to 95% | to 99% "
            "| infeasible after 5 | measuring min | optimum measured: median % "
            "| confirmed pick: median % | p10 % |"
        )
        print(header)
        print("|---" * (header.count("|") - 1) + "|")
        for search in searches:
            runs = [r for s, name, _, r in results if s == surface_dir and name == search]
            for budget in BUDGETS:
                scores = [100 * score(surface, truth, run, budget) for run in runs]
                reach95 = [trials_to_reach(truth, run, 0.95) for run in runs]
                reach99 = [trials_to_reach(truth, run, 0.99) for run in runs]
                after = [x for run in runs for x in run.infeasible[STARTUP:budget]]
                minutes = statistics.median(sum(run.seconds[:budget]) / 60 for run in runs)
                measured = statistics.median(100 * best_measured(truth, run, budget) for run in runs)
                confirmed = [100 * confirmed_score(surface, truth, run, budget, bad_starts) for run in runs]
                print(
                    f"| {search} | {budget} | {statistics.median(scores):.1f} | "
                    f"{_percentile(scores, 10):.1f} | {_median_reach(reach95)} | {_median_reach(reach99)} | "
                    f"{100 * sum(after) / max(1, len(after)):.0f}% | {minutes:.1f} | {measured:.1f} | "
                    f"{statistics.median(confirmed):.1f} | {_percentile(confirmed, 10):.1f} |"
                )
        print()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def _median_reach(values: list[int | None]) -> str:
    # A seed that never reached the mark counts as more than 40 trials (the lower median of the seeds).
    median = statistics.median_low([v if v is not None else 10**6 for v in values])
    return f">{max(BUDGETS)}" if median >= 10**6 else str(median)


def repeat_agreement(surface) -> float:
    """Correlation between the scores of a config's first two repeats: 1 means noiseless measurements."""
    import numpy as np

    from optimizer.measurement.replay import _replayed_best

    pairs = [
        [_replayed_best(sweep, surface.latency_budget_ms) for sweep in config.sweeps[:2]]
        for config in surface.configs.values()
        if len(config.sweeps) >= 2
    ]
    return float(np.corrcoef(np.array(pairs).T)[0, 1]) if len(pairs) > 2 else float("nan")


if __name__ == "__main__":
    main()
