"""Soak benchmark of scale-out: several workers on one PostgreSQL study for hours' worth of trials.

    .venv/bin/python bench/soak_workers.py [--workers 3] [--trials-per-worker 100] [--storage URL]

Each worker is the real command (``optimize study`` on a tiny MLP, its own embedded Triton, short windows)
joining one study on PostgreSQL (a throwaway cluster on loopback unless ``--storage`` names one; Debian's
postgresql package). Every few seconds the benchmark samples each worker, its tritonserver and the
backend stubs: resident memory, open files and threads. At the end it prints, for each kind of
process, the figures after warm-up (the first 20% of the trials) and at the end, and the slope of a
linear fit per 100 trials: a leak shows as a slope that does not round to zero. It also checks the
budget: exactly workers x trials-per-worker measured trials, none left running.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna

from optimizer.model import examples
from optimizer.study.storage import count_finished, open_storage

STUB = "triton_python_b"  # /proc's command name of triton_python_backend_stub, cut at 15 characters
SAMPLE_EVERY_S = 5.0
WARMUP_SHARE = 0.2
# The last trials are the wind-down: workers leave one by one and write the export and the report
# (matplotlib alone adds tens of MiB to a worker), which says nothing of a leak across trials.
WIND_DOWN_SHARE = 0.05


def _status(pid: int) -> dict[str, int]:
    figures = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                figures[key] = int(value.split()[0])
        figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return {}
    return figures


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat.split("(", 1)[1].rsplit(")", 1)[0]
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry.name), name))
    return found


def _sample(workers: list[subprocess.Popen], finished: int) -> list[dict]:
    rows = []
    for index, worker in enumerate(workers):
        processes = [("worker", worker.pid)]
        for pid, name in _children(worker.pid):
            if name == "tritonserver":
                processes.append(("tritonserver", pid))
                processes += [("stub", stub) for stub, stub_name in _children(pid) if stub_name == STUB]
        for kind, pid in processes:
            figures = _status(pid)
            if figures:
                rows.append({"worker": index, "kind": kind, "pid": pid, "finished": finished, **figures})
    return rows


def _fit(points: list[tuple[float, float]]) -> float:
    """Slope of a linear fit, per 100 trials."""
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return 0.0
    xs, ys = zip(*points, strict=True)
    return float(np.polyfit(xs, ys, 1)[0]) * 100


def _report(rows: list[dict], budget: int) -> None:
    warm, wind_down = WARMUP_SHARE * budget, (1 - WIND_DOWN_SHARE) * budget
    print(f"\nfrom trial {warm:.0f} (after warm-up) to {wind_down:.0f} (before the wind-down) of {budget}:")
    print(f"{'process':38}{'figure':>10}{'first':>10}{'last':>10}{'slope /100 trials':>20}")
    for kind in ("worker", "tritonserver", "stub"):
        for figure, unit, scale in (("VmRSS", "MiB", 1 / 1024), ("fds", "", 1), ("Threads", "", 1)):
            # Per sample: the mean over the processes of this kind (stubs come and go with instance counts).
            by_sample: dict[tuple[int, float], list[float]] = {}
            for row in rows:
                if row["kind"] == kind and figure in row and warm <= row["finished"] <= wind_down:
                    by_sample.setdefault((row["sample"], row["finished"]), []).append(row[figure] * scale)
            if not by_sample:
                continue
            points = sorted((finished, statistics.mean(v)) for (_, finished), v in by_sample.items())
            label = f"{figure} {unit}".strip()
            print(
                f"{kind + ' (mean of its processes)':38}{label:>10}{points[0][1]:>10.1f}{points[-1][1]:>10.1f}"
                f"{_fit(points):>+20.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--trials-per-worker", type=int, default=100)
    parser.add_argument("--storage", help="a PostgreSQL URL (default: a throwaway cluster on loopback)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    budget = args.workers * args.trials_per_worker
    args.out.mkdir(parents=True, exist_ok=True)
    model = examples.build_mlp(args.out / "soak_workers_mlp.onnx")
    if args.storage:
        _run(args, model, budget, args.storage)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from postgres import postgres_server  # the tests' throwaway cluster

    with postgres_server() as url:
        _run(args, model, budget, url)


def _run(args, model: Path, budget: int, url: str) -> None:
    name = f"soak-workers-{int(time.time())}"
    command = [sys.executable, "-m", "optimizer", "study", "--model", str(model), "--storage", url]
    command += [
        "--study-name",
        name,
        "--budget",
        str(budget),
        "--allow-shared-host",
        "--latency-budget-ms",
        "200",
    ]
    command += ["--window-s", "0.3", "--warmup-s", "0.1", "--concurrency", "1,2,4", "--stop-rule", "fixed"]
    command += ["--confirm", "0"]
    load = os.getloadavg()
    print(
        f"{args.workers} workers x {args.trials_per_worker} trials on {url.split('@')[-1]}; load {load[0]:.2f}"
    )
    env = {**os.environ, "OPTIMIZE_STUDIES_DIR": str(args.out / "studies")}
    logs = [open(args.out / f"soak_worker{i}.log", "w") for i in range(args.workers)]  # noqa: SIM115
    started = time.monotonic()
    workers = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env) for log in logs]
    storage = open_storage(url)
    rows: list[dict] = []
    sample = 0
    try:
        while any(w.poll() is None for w in workers):
            try:
                finished = count_finished(optuna.load_study(study_name=name, storage=storage))
            except KeyError:
                finished = 0
            for row in _sample(workers, finished):
                rows.append({**row, "sample": sample})
            sample += 1
            if sample % 12 == 0:
                print(f"  {time.monotonic() - started:6.0f} s: {finished}/{budget} trials", flush=True)
            time.sleep(SAMPLE_EVERY_S)
        wall = time.monotonic() - started
        study = optuna.load_study(study_name=name, storage=storage)
        running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        codes = [w.returncode for w in workers]
        print(
            f"\nexit codes {codes}; {len(study.trials)} trials in the database, {count_finished(study)} measured "
            f"(budget {budget}), {len(running)} left running; {wall / 60:.1f} min; load {os.getloadavg()[0]:.2f}"
        )
        restarts = {
            i: len({r["pid"] for r in rows if r["worker"] == i and r["kind"] == "tritonserver"}) - 1
            for i in range(args.workers)
        }
        print(f"server restarts per worker: {restarts}")
        _report(rows, budget)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        for log in logs:
            log.close()
        storage.engine.dispose()


if __name__ == "__main__":
    main()
