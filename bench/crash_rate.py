"""How often the server crashes: many short studies of a tiny MLP, as a new user ran them (issue 35).

    .venv/bin/python bench/crash_rate.py [--studies 20] [--trials 3]

Each study is the real command on a fresh database and a fresh embedded Triton: a 64->128->10 MLP,
``--latency-budget-ms 20``, the default windows. It counts the trials that failed because the server
crashed or hung, prints each with its exit status and the last lines of the server's log (kept with
the trial), and the rate per study and per trial, with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna

from optimizer.model import examples
from optimizer.study.storage import open_storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/out/crash_rate"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = examples.build_mlp(args.out / "tiny_mlp.onnx", in_features=64, hidden=128, out_features=10)
    print(f"{args.studies} studies x {args.trials} trials; load {os.getloadavg()[0]:.2f}")
    env = {**os.environ, "OPTIMIZE_STUDIES_DIR": str(args.out / "studies")}
    crashes, trials, failed_studies = [], 0, 0
    started = time.monotonic()
    for index in range(args.studies):
        db = args.out / f"study{index}.db"
        db.unlink(missing_ok=True)
        url = f"sqlite:///{db}"
        command = [sys.executable, "-m", "optimizer", "study", "--model", str(model), "--storage", url]
        command += ["--study-name", f"c{index}", "--budget", str(args.trials), "--latency-budget-ms", "20"]
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        failed_studies += run.returncode not in (0,)
        storage = open_storage(url)
        try:
            study = optuna.load_study(study_name=f"c{index}", storage=storage)
            for trial in study.trials:
                if "same_config_as" in trial.user_attrs:
                    continue
                trials += 1
                reason = str(trial.user_attrs.get("reason", ""))
                if "crashed" in reason or "hung" in reason or "not healthy" in reason:
                    crashes.append((index, trial.number, reason, trial.user_attrs.get("server_log", "")))
        finally:
            storage.engine.dispose()
        print(f"  study {index}: exit {run.returncode}; crashes so far {len(crashes)}", flush=True)
    wall = time.monotonic() - started
    print(
        f"\n{len(crashes)} crash(es) in {trials} measured trials of {args.studies} studies "
        f"({len(crashes) / max(1, args.studies):.2f} per study, {100 * len(crashes) / max(1, trials):.1f}% of "
        f"trials); {failed_studies} studies exited non-zero; {wall / 60:.1f} min; load {os.getloadavg()[0]:.2f}"
    )
    for index, number, reason, log in crashes:
        print(f"\nstudy {index} trial {number}: {reason}")
        print("\n".join(log.splitlines()[-8:]))


if __name__ == "__main__":
    main()
