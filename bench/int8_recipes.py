"""Each int8 recipe on each model: the accuracy guard's figures and the in-process rate beside fp32's.

    .venv/bin/python bench/int8_recipes.py [--models encoder,cnn,bert] [--tolerance 0.01] [--rounds 3]
        [--goal "pooled_cosine>=0.99" ...]

What a study does before its trials (``choose_int8``) stops at the first recipe that passes; this tries
every recipe on every model, so the order can be judged: for each, 1 - cosine against fp32 on 32
synthetic samples, whether it passes the tolerance, and its in-process rate (one request at a time,
ONNX Runtime's default threads), measured in ``--rounds`` alternating rounds (fp32, then each recipe)
and reported as the median with the spread. With ``--goal`` (as ``optimize study --accuracy-goal``), each
recipe is also judged by the goals on the same samples, beside the cosine rule: which recipes a user's
goal would serve that the default rule refuses. Run it with nothing else on the machine; the load
averages are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from optimizer.model import examples
from optimizer.model.accuracy import AccuracyGuard, check_variant
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.model.quantize import recipe_order
from optimizer.model.variants import inprocess_rate, variant_path
from optimizer.paths import cache_dir
from optimizer.study.precisions import accuracy_guard
from optimizer.study.settings import StudySettings

MODELS = {
    "encoder": (lambda path: examples.example_model(path.parent), examples.EXAMPLE_SHAPES),
    "cnn": (lambda path: examples.build_cnn(path), {}),
    # BERT-like: the shape of a real 6-layer sentence encoder (synthetic weights), sequence 32.
    "bert": (
        lambda path: examples.build_encoder(path, hidden=384, layers=6, heads=6, ffn=1536),
        {"input_ids": (32,), "attention_mask": (32,)},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="encoder,cnn,bert")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--goal", action="append", default=[], help="an accuracy goal, e.g. pooled_cosine>=0.99"
    )
    parser.add_argument(
        "--padding",
        action="store_true",
        help="token requests of random real lengths (a quarter to all of the sequence), padded with id 0 "
        "and masked, as batched text arrives",
    )
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            build, shapes = MODELS[name]
            info = inspect_model(build(Path(work) / f"{name}.onnx"), cache=cache_dir())
            samples = [
                synthetic_inputs(info, resolve_shapes(info, dict(shapes)), 1, seed=s) for s in range(32)
            ]
            if args.padding and "attention_mask" in samples[0]:
                samples = padded(samples)
            report(name, info, samples, args)
    print(f"load average after: {os.getloadavg()}")


def report(name: str, info, samples, args) -> None:
    order = recipe_order(info.path)
    files = {"fp32": info.path}
    guard = {}
    goals = goal_guard(info, samples, args.goal)
    for recipe in order:
        try:
            files[recipe] = variant_path(info, "int8", cache_dir(), recipe, samples)
        except Exception as exc:  # a recipe that cannot be built is a row of the table too
            guard[recipe] = f"not built: {str(exc).splitlines()[0]}"
            continue
        result = check_variant(info.path, files[recipe], samples, "int8", args.tolerance)
        guard[recipe] = f"1 - cos {1 - result.cosine:.2e} ({'pass' if result.ok else 'fail'})"
        if goals is not None:
            judged = goals.check(info.path, files[recipe], "int8")
            verdict = "pass" if judged.ok else "fail"
            guard[recipe] += f"; {judged.metric_figures()} ({', '.join(args.goal)}: {verdict})"
    rates: dict[str, list[float]] = {label: [] for label in files}
    for _ in range(args.rounds):
        for label, path in files.items():  # alternating: drift reaches every file alike
            rates[label].append(inprocess_rate(path, samples, seconds=1.0))
    fp32 = statistics.median(rates["fp32"])
    print(f"\n## {name} (recipes in the order a study tries them: {', '.join(order)})")
    print("| variant | guard at tolerance | in-process req/s, median (min-max) | vs fp32 |")
    print("|---|---|---|---|")
    for label in ("fp32", *order):
        if label not in rates:
            print(f"| int8 {label} | {guard[label]} | - | - |")
            continue
        median = statistics.median(rates[label])
        spread = f"{min(rates[label]):.0f}-{max(rates[label]):.0f}"
        shown = "fp32" if label == "fp32" else f"int8 {label}"
        verdict = guard.get(label, "reference")
        print(f"| {shown} | {verdict} | {median:.0f} ({spread}) | {median / fp32:.2f}x |")


def padded(samples: list[dict], seed: int = 0) -> list[dict]:
    """``samples`` with each request's tokens after a random real length set to 0 and masked out."""
    rng = np.random.default_rng(seed)
    out = []
    for sample in samples:
        ids, mask = sample["input_ids"].copy(), sample["attention_mask"].copy()
        length = int(rng.integers(ids.shape[-1] // 4, ids.shape[-1] + 1))
        ids[..., length:] = 0
        mask[..., length:] = 0
        out.append({**sample, "input_ids": ids, "attention_mask": mask})
    return out


def goal_guard(info, samples, goals: list[str]) -> AccuracyGuard | None:
    """The guard a study with ``--accuracy-goal`` uses, on the same samples (None: no goals)."""
    if not goals:
        return None
    return accuracy_guard(StudySettings(accuracy_goals=tuple(goals)), info, samples)


if __name__ == "__main__":
    main()
