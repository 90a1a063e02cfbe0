"""Soak benchmark: a long study on a tiny model, watching for leaks across hot reloads.

    .venv/bin/python bench/soak.py [--trials 120] [--out bench/out]

Every trial hot-reloads a new config into the same Triton. This prints, from trial 1 to the last:
the server's memory (tritonserver plus its backend stubs, RSS), the tool's own memory, open file
descriptors of both, and the drift of trial and reload times (median of the first 10 vs the last 10),
so a leak in the reload design shows up as a slope.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from optimizer.measurement.levels import MeasureSettings
from optimizer.model import examples
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.run import QuietReporter, run_study
from optimizer.study.settings import StudySettings


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _group(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    members.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return members


class Sampler(QuietReporter):
    """Samples memory and descriptors after every trial."""

    def __init__(self, target: EmbeddedTriton) -> None:
        self.target = target
        self.rows: list[dict[str, float]] = []

    def trial_finished(self, report, best_throughput):
        server = self.target.pid or 0
        members = _group(server) if server else []
        self.rows.append(
            {
                "trial": report.number,
                "server_pid": server,
                "server_rss_mib": sum(_rss_kib(p) for p in members) / 1024,
                # tritonserver alone: the stubs come and go with each reload's instance count
                "tritonserver_rss_mib": _rss_kib(server) / 1024,
                "server_fds": _fds(server),
                "tool_rss_mib": _rss_kib(os.getpid()) / 1024,
                "tool_fds": _fds(os.getpid()),
                "processes": len(members),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    model = examples.build_mlp(args.out / "soak_mlp.onnx")
    target = EmbeddedTriton()
    sampler = Sampler(target)
    name = f"soak-{int(time.time())}"
    settings = StudySettings(
        model_path=model,
        budget=args.trials,
        latency_budget_ms=100.0,
        study_name=name,
        output_dir=args.out,
        concurrency=(1, 2, 4),
        seed=0,
        measure=MeasureSettings(warmup_s=0.2, window_s=0.5, min_requests=20, max_window_s=2.0, rule="fixed"),
    )
    started = time.perf_counter()
    summary = run_study(settings, sampler, target=target)
    print_figures(summary, sampler.rows, time.perf_counter() - started)


def print_figures(summary, rows, wall_s: float) -> None:
    import optuna

    study = optuna.load_study(study_name=summary.study_name, storage=summary.storage_url)
    measured = [t for t in study.trials if "trial_s" in t.user_attrs and "same_config_as" not in t.user_attrs]
    trial_s = [t.user_attrs["trial_s"] for t in measured]
    load_s = [t.user_attrs["load_s"] for t in measured if "load_s" in t.user_attrs]
    restarts = len({row["server_pid"] for row in rows}) - 1
    first, last = rows[0], rows[-1]
    slope = (
        np.polyfit([r["trial"] for r in rows], [r["tritonserver_rss_mib"] for r in rows], 1)[0]
        if len(rows) > 2
        else 0
    )
    print(
        f"trials: {len(study.trials)} ({summary.finished} measured) in {wall_s / 60:.1f} min; server restarts: {restarts}"
    )
    print(f"{'':24}{'start':>10}{'end':>10}")
    for key in (
        "tritonserver_rss_mib",
        "server_rss_mib",
        "tool_rss_mib",
        "server_fds",
        "tool_fds",
        "processes",
    ):
        print(f"{key:24}{first[key]:>10.1f}{last[key]:>10.1f}")
    print(f"tritonserver RSS slope (linear fit): {slope * 100:+.1f} MiB per 100 trials")
    for label, values in (("trial seconds", trial_s), ("reload seconds", load_s)):
        if len(values) >= 20:
            head, tail = statistics.median(values[:10]), statistics.median(values[-10:])
            print(
                f"{label}: median first 10 {head:.2f}, last 10 {tail:.2f} (drift {100 * (tail / head - 1):+.0f}%)"
            )


if __name__ == "__main__":
    main()
