"""Benchmark: the model variants side by side, in process and served through one Triton (issue #17's targets).

    .venv/bin/python bench/variants.py [--models encoder,cnn] [--rounds 3] [--level 8] [--tolerance 0.01]

For each model, every variant a study could serve: fp32, fp32-fused, and int8 by each recipe and by its
fused form (``fused-<recipe>``). Each is checked by the accuracy guard first (1 - cosine against fp32 on 16
synthetic samples); one that fails, or cannot be built, is listed with why and never measured. Then:

1. in process: each accepted variant's best throughput over batch 1/4/16 x threads 1/all cores (the
   study's in-process profile), --rounds rounds, the order reversed every other round; medians, spread.
2. served: each accepted variant under three Triton configs (no batching; 8 with a 2 ms queue delay and
   two single-thread instances; 16 with 5 ms, one instance) at --level concurrent clients, --rounds rounds
   in alternating order; medians. For each round, the best served figure among today's two variants
   (fp32 and the default dynamic int8) and among all of them: their ratio per round, and its median.

Run it with nothing else on the machine; the load averages are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from optimizer.config.render import render_config, to_json
from optimizer.config.space import Candidate
from optimizer.errors import ModelError
from optimizer.measurement.builtin import LoadGenerator
from optimizer.measurement.levels import MeasureSettings
from optimizer.model import examples
from optimizer.model.accuracy import check_variant
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.model.profile import PROFILE_BATCHES, profile_variant
from optimizer.model.quantize import BASE_RECIPES, DEFAULT_INT8_RECIPE, fused_recipe
from optimizer.model.variants import config_files, variant_path
from optimizer.paths import cache_dir
from optimizer.serving.embedded import EmbeddedTriton

MODELS = {
    "encoder": (lambda tmp: examples.example_model(cache_dir() / "examples"), dict(examples.EXAMPLE_SHAPES)),
    "cnn": (lambda tmp: examples.build_cnn(tmp / "cnn.onnx"), {}),
}
TODAY = ("fp32", f"int8:{DEFAULT_INT8_RECIPE}")  # the two variants optimize had before this issue
SERVED_CONFIGS = {
    "mbs=1 inst=1": dict(max_batch_size=1),
    "mbs=8 delay=2ms inst=2 thr=1": dict(
        max_batch_size=8,
        preferred_batch_sizes=(8, 4),
        max_queue_delay_us=2000,
        instance_count=2,
        intra_op_threads=1,
    ),
    "mbs=16 delay=5ms inst=1": dict(
        max_batch_size=16, preferred_batch_sizes=(16, 8), max_queue_delay_us=5000
    ),
}
MEASURE = MeasureSettings(warmup_s=1.0, window_s=2.0, max_window_s=6.0, min_requests=30, rule="ci")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="encoder,cnn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--level", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.01)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="variants-") as tmp, EmbeddedTriton() as server:
        for name in args.models.split(","):
            build, shapes = MODELS[name]
            _bench_model(server, name, build(Path(tmp)), shapes, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores")


def _variants() -> list[tuple[str, str, str]]:
    """(label, precision, int8 recipe) of every variant, today's two first."""
    out = [("fp32", "fp32", DEFAULT_INT8_RECIPE), ("fp32-fused", "fp32-fused", DEFAULT_INT8_RECIPE)]
    for recipe in BASE_RECIPES:
        out += [
            (f"int8:{recipe}", "int8", recipe),
            (f"int8:{fused_recipe(recipe)}", "int8", fused_recipe(recipe)),
        ]
    return out


def _bench_model(server: EmbeddedTriton, name: str, path: Path, shapes: dict, args) -> None:
    info = inspect_model(path, cache=cache_dir())
    resolved = resolve_shapes(info, shapes)
    samples = [synthetic_inputs(info, resolved, 1, seed=seed) for seed in range(16)]
    print(f"\n# {name} ({path.name})  [{_load()}]")
    print("\n## accuracy guard (1 - cosine against fp32, tolerance {:g})".format(args.tolerance))
    print("| variant | 1 - cosine | passes | why not |\n| --- | --- | --- | --- |")
    accepted: dict[str, tuple[str, str, Path]] = {}
    for label, precision, recipe in _variants():
        try:
            file = variant_path(info, precision, cache_dir(), recipe, samples)
        except ModelError as exc:
            print(f"| {label} | - | no | {exc} |")
            continue
        report = check_variant(info.path, file, samples, precision, args.tolerance)
        print(
            f"| {label} | {1 - report.cosine:.2e} | {'yes' if report.ok else 'no'} | {'' if report.ok else report.reason} |"
        )
        if report.ok:
            accepted[label] = (precision, recipe, file)
    _in_process(accepted, samples, args.rounds, info.batching)
    _served(server, info, accepted, samples, args)


def _in_process(accepted: dict, samples, rounds: int, batching: bool) -> None:
    print(f"\n## in process: best over batch x threads, inf/s, {rounds} alternated rounds  [{_load()}]")
    batches = PROFILE_BATCHES if batching else (1,)
    threads = tuple(sorted({1, os.cpu_count() or 1}))
    best: dict[str, list[float]] = {label: [] for label in accepted}
    where: dict[str, str] = {}
    for round_ in range(rounds):
        order = list(accepted) if round_ % 2 == 0 else list(reversed(accepted))
        for label in order:
            precision, _, file = accepted[label]
            points = profile_variant(precision, file, samples, batches=batches, threads=threads, seconds=0.3)
            top = max(points, key=lambda p: p.throughput)
            best[label].append(top.throughput)
            where[label] = f"batch {top.batch}, {top.threads} thr"
    fp32 = statistics.median(best["fp32"])
    print("| variant | median | rounds | vs fp32 | best at (last round) |\n| --- | --- | --- | --- | --- |")
    for label, values in best.items():
        med = statistics.median(values)
        print(f"| {label} | {med:.0f} | {_fmt(values)} | {med / fp32:.2f}x | {where[label]} |", flush=True)


def _served(server: EmbeddedTriton, info, accepted: dict, samples, args) -> None:
    print(
        f"\n## served at concurrency {args.level}: inf/s (p99 ms), {args.rounds} alternated rounds  [{_load()}]"
    )
    pairs = [(label, config) for label in accepted for config in SERVED_CONFIGS]
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {pair: [] for pair in pairs}
    for round_ in range(args.rounds):
        for label, config in pairs if round_ % 2 == 0 else list(reversed(pairs)):
            precision, recipe, _ = accepted[label]
            candidate = Candidate(precision=precision, int8_recipe=recipe, **SERVED_CONFIGS[config])
            rendered = render_config(info, candidate, model_name="variant")
            server.load_model("variant", to_json(rendered), config_files(info, rendered, cache_dir()))
            result = LoadGenerator(server.grpc_url, "variant", samples, MEASURE).measure(args.level)
            figures[(label, config)].append((result.throughput, result.p99_ms))
    print("| variant | config | median inf/s | rounds | median p99 ms |\n| --- | --- | --- | --- | --- |")
    for (label, config), values in figures.items():
        thr = [v[0] for v in values]
        print(
            f"| {label} | {config} | {statistics.median(thr):.1f} | {_fmt(thr)} | "
            f"{statistics.median(v[1] for v in values):.1f} |"
        )
    ratios = []
    for round_ in range(args.rounds):
        today = max(figures[p][round_][0] for p in pairs if p[0] in TODAY)
        every = max(figures[p][round_][0] for p in pairs)
        winner = max(pairs, key=lambda p: figures[p][round_][0])
        ratios.append(every / today)
        print(
            f"round {round_}: best of today's two {today:.1f}, best of all {every:.1f} ({' '.join(winner)})"
        )
    print(
        f"new variants / today's two, best served: median {statistics.median(ratios):.3f}x, rounds {_fmt(ratios, 3)}  [{_load()}]"
    )


def _fmt(values, digits: int = 1) -> str:
    return "/".join(f"{v:.{digits}f}" for v in values)


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
