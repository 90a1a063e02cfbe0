"""How long a config takes to load into the embedded Triton, with and without Triton's auto-complete.

    .venv/bin/python bench/load_time.py [--rounds 5]

Two embedded servers side by side, one started as optimize starts it (``--disable-auto-complete-config``)
and one with auto-complete on (the flag left out, Triton's default). Each round hot-reloads the same three
configs of a small MLP (max batch 1; 8 with 2 instances; 4) into each server in turn, who goes first
alternating; it prints each load's seconds, then the median and range per server and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from optimizer.config.render import render_config, to_json
from optimizer.config.space import Candidate
from optimizer.model import examples
from optimizer.model.intake import inspect_model
from optimizer.model.variants import config_files
from optimizer.paths import cache_dir
from optimizer.serving import embedded
from optimizer.serving.embedded import EmbeddedTriton

CONFIGS = (
    Candidate(max_batch_size=1),
    Candidate(max_batch_size=8, instance_count=2),
    Candidate(max_batch_size=4),
)


class _AutoCompleteOn(EmbeddedTriton):
    """The embedded server as Triton starts by default: the flag optimize adds is taken out again."""

    def _arguments(self) -> list[str]:
        return [arg for arg in super()._arguments() if arg != embedded.AUTO_COMPLETE_OFF]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="load-time-") as tmp:
        info = inspect_model(examples.build_mlp(Path(tmp) / "mlp.onnx"))
        seconds: dict[str, list[float]] = {"auto-complete off (optimize)": [], "auto-complete on": []}
        with EmbeddedTriton() as off, _AutoCompleteOn() as on:
            servers = dict(zip(seconds, (off, on)))
            for round_ in range(args.rounds):
                order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
                for name in order:
                    for candidate in CONFIGS:
                        config = render_config(info, candidate, model_name="mlp")
                        files = config_files(info, config, cache_dir())
                        seconds[name].append(servers[name].load_model("mlp", to_json(config), files))
                    print(f"round {round_} {name}: " + " ".join(f"{s:.2f}" for s in seconds[name][-3:]))
    print("| server | loads | median s | min-max s |\n| --- | --- | --- | --- |")
    for name, values in seconds.items():
        print(
            f"| {name} | {len(values)} | {statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} |"
        )
    off_median, on_median = (statistics.median(values) for values in seconds.values())
    print(f"on / off: {on_median / off_median:.1f}x; saved per load: {on_median - off_median:.2f} s")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
