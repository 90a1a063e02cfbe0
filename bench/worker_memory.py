"""Where a study worker's memory grows with its trials (issue 35's soak): tracemalloc over one long study.

    .venv/bin/python bench/worker_memory.py [--trials 200] [--warmup 40] [--storage URL]

One worker in this process runs a study of the example encoder's recording (bench/data/encoder: no
server, so the worker's own code and libraries are all that allocates) on a fresh SQLite file, or on
``--storage``. tracemalloc snapshots are taken when trial ``--warmup`` starts and when the last trial
starts; the benchmark prints the growth between them per source file, and the worker's resident
memory at both points, each per 100 trials. A study that keeps every trial in memory (Optuna's
``_CachedStorage`` holds each FrozenTrial of the study in every worker) shows its growth under
``optuna/``; a leak of optimize's own shows under ``optimizer/``.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

import optuna

from optimizer.measurement.replay import ReplayTarget, load_surface
from optimizer.study.driver import QuietReporter
from optimizer.study.run import run_study
from optimizer.study.settings import SearchSettings, StudySettings

RECORDING = Path(__file__).resolve().parent / "data" / "encoder"


class _Snapshots(QuietReporter):
    """Takes a tracemalloc snapshot (and the resident memory) when each trial of ``at`` starts: while the
    study is open, so what it holds counts (after it ends, its storage and cache are freed)."""

    def __init__(self, at: tuple[int, int]) -> None:
        self.at = at
        self.taken: list[tuple[tracemalloc.Snapshot | None, float]] = []

    def trial_started(self, number, summary, done, budget):
        if number in self.at:
            self.taken.append(_snapshot())


def _snapshot() -> tuple[tracemalloc.Snapshot | None, float]:
    gc.collect()
    return (tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None), _rss_mib()


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _by_area(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> dict[str, float]:
    """Growth in bytes per area: the package a source file belongs to (optuna, optimizer, sqlalchemy...)."""
    growth: dict[str, float] = defaultdict(float)
    for stat in after.compare_to(before, "filename"):
        name = stat.traceback[0].filename
        parts = Path(name).parts
        area = next((p for p in parts if p in ("optuna", "optimizer", "sqlalchemy", "numpy")), None)
        growth[area or Path(name).name] += stat.size_diff
    return growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=40, help="the trial at which growth starts to count")
    parser.add_argument("--storage", help="a database URL (default: a fresh SQLite file)")
    parser.add_argument(
        "--rss-only", action="store_true", help="no tracemalloc (its own tables grow with what it traces)"
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    surface = load_surface(RECORDING)
    with tempfile.TemporaryDirectory(prefix="worker-memory-") as tmp:
        settings = StudySettings(
            model_path=surface.model_path(),
            shapes=surface.shapes,
            budget=args.trials,
            space=str(surface.space_path),
            study_name="memory",
            output_dir=Path(tmp),
            storage=args.storage,
            latency_budget_ms=surface.latency_budget_ms,
            search=SearchSettings(confirm_finalists=0, second_load_margin=None),
            seed=0,
        )
        reporter = _Snapshots((args.warmup, args.trials - 1))
        if not args.rss_only:
            tracemalloc.start(1)
        started = time.monotonic()
        run_study(settings, reporter, target=ReplayTarget(RECORDING, seed=0))
        tracemalloc.stop()
    if len(reporter.taken) < 2:
        raise SystemExit(
            f"trials {args.warmup} and {args.trials - 1} did not both start: give --warmup below --trials"
        )
    (before, rss_before), (after, rss_after) = reporter.taken[:2]
    counted = args.trials - 1 - args.warmup
    per_100 = 100 / counted
    print(
        f"{args.trials} trials in {time.monotonic() - started:.0f} s (load {os.getloadavg()[0]:.1f}); growth from "
        f"trial {args.warmup} to trial {args.trials - 1} ({counted} trials), per 100 trials:"
    )
    print(
        f"resident memory: {rss_before:.1f} -> {rss_after:.1f} MiB, {(rss_after - rss_before) * per_100:+.2f} MiB"
    )
    if before is None or after is None:
        return
    growth = _by_area(before, after)
    total = sum(growth.values())
    print(f"traced by Python: {total * per_100 / 2**20:+.2f} MiB")
    print("| where | MiB per 100 trials |\n| --- | --- |")
    for area, size in sorted(growth.items(), key=lambda item: -abs(item[1]))[:8]:
        print(f"| {area} | {size * per_100 / 2**20:+.3f} |")
    print("\nlargest growth by line:")
    for stat in after.compare_to(before, "lineno")[:6]:
        print(f"  {stat.size_diff * per_100 / 1024:+8.1f} KiB per 100 trials  {stat.traceback[0]}")


if __name__ == "__main__":
    main()
