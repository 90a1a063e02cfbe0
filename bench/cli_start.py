"""Benchmark: how fast the command line starts, and what its help path imports.

    .venv/bin/python bench/cli_start.py [--repeats 7]

Times ``optimize --help``, ``optimize study --help`` and ``optimize --version`` as a user runs them (a fresh
interpreter each time, the commands alternated), and prints the median and range of each with the load
average. Then ``python -X importtime`` of ``optimizer.cli``: its cumulative import time and the slowest
modules under it, so a heavy import that slips into the help path shows by name.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "optimize --help": ["--help"],
    "optimize study --help": ["study", "--help"],
    "optimize --version": ["--version"],
}


def _time_once(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "optimizer", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def _import_times() -> list[tuple[int, str]]:
    """(cumulative microseconds, module) for every module ``import optimizer.cli`` loads."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import optimizer.cli"],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)", line)
        if match and not match.group(3).startswith(("site", "encodings", "__editable__")):
            rows.append((int(match.group(1)), match.group(3)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            times[name].append(_time_once(command))
    for name, seen in times.items():
        print(
            f"{name:24} median {statistics.median(seen):.3f} s  "
            f"(min {min(seen):.3f}, max {max(seen):.3f}, {len(seen)} runs)"
        )
    rows = _import_times()
    total = next(micros for micros, module in rows if module == "optimizer.cli")
    print(f"import optimizer.cli: {total / 1000:.1f} ms cumulative (python -X importtime)")
    for micros, module in sorted(rows, reverse=True)[1:9]:
        print(f"  {micros / 1000:6.1f} ms  {module}")
    heavy = sorted({m.split(".")[0] for _, m in rows} & {"numpy", "optuna", "onnx", "onnxruntime", "yaml"})
    print(f"heavy modules on the help path: {', '.join(heavy) or 'none'}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
