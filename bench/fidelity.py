"""Benchmark: does the built-in load generator agree with perf_analyzer, how repeatable is it, how fast?

    .venv/bin/python bench/fidelity.py [--levels 1,4,16] [--rounds 2] [--repeats 5]
        [--fixed-window-s 10] [--pa-interval-ms 2000] [--parts fidelity,repeat,ceiling]

One embedded Triton, the bundled example encoder (sequence 128), the same 16 requests for both tools
(perf_analyzer gets them as --input-data). Parts, each printing a table:

1. fidelity: 3 configs x the --levels, each measured by the built-in generator (ci rule) and by
   perf_analyzer, alternately (who goes first swaps every round), --rounds times. Prints the ratios
   built-in / perf_analyzer of throughput and p99 per round, and their median.
   open: the same for two configs at Poisson request rates 20, 40, 80/s (perf_analyzer --request-rate-range).
   cnn: the same for a small CNN (3x32x32, about 1 ms per inference) at the --levels, two configs.
2. repeat: one config at one level (the middle of --levels), --repeats times each, interleaved:
   the ci rule, a fixed --fixed-window-s window, and perf_analyzer. Prints the coefficient of variation
   (stdev / mean) of throughput and p99 and the median seconds each measurement took (warm-up included).
3. sweep: the same config swept over --levels the way a trial sweeps them (stopping at a plateau),
   --sweep-repeats times with each rule, interleaved: the seconds a trial spends measuring, and the
   coefficient of variation of the trial's score (its best throughput).
4. api: the stream API against tritonclient's unary calls on real models (the encoder's three configs and
   the small CNN's two) at the --levels, with perf_analyzer as the reference, alternated, --rounds rounds:
   what the study's figures would lose if its generator used unary calls (they avoid a server crash seen
   with streams; bench/reload_crash.py).
5. ceiling: a trivial model (Identity, 4 floats) at rising concurrency, one client process: the
   requests/s the built-in generator sustains over gRPC streams (its default) and over unary calls
   (tritonclient's, as before), with the client's CPU per request, beside perf_analyzer's (a C++
   client) on the same server; two alternated rounds, medians.

The machine is shared and noisy: the load average is printed beside each part.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from optimizer.config.render import render_config, to_json
from optimizer.config.space import Candidate
from optimizer.measurement import perf_analyzer
from optimizer.measurement.builtin import LoadGenerator
from optimizer.measurement.levels import LevelResult, MeasureSettings
from optimizer.measurement.sweep import next_step
from optimizer.model import examples
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.model.variants import config_files
from optimizer.paths import cache_dir
from optimizer.serving.embedded import EmbeddedTriton

CONFIGS = {
    "fp32 mbs=1 inst=1": Candidate(max_batch_size=1),
    "fp32 mbs=8 delay=2ms inst=2": Candidate(
        max_batch_size=8, preferred_batch_sizes=(8, 4), max_queue_delay_us=2000, instance_count=2
    ),
    "int8 mbs=16 delay=5ms inst=1": Candidate(
        precision="int8", max_batch_size=16, preferred_batch_sizes=(16, 8), max_queue_delay_us=5000
    ),
}
REPEAT_CONFIG = "fp32 mbs=8 delay=2ms inst=2"
OPEN_CONFIGS = {name: CONFIGS[name] for name in ("fp32 mbs=1 inst=1", "fp32 mbs=8 delay=2ms inst=2")}
CNN_CONFIGS = {
    "cnn fp32 mbs=1 inst=1": Candidate(max_batch_size=1),
    "cnn fp32 mbs=8 delay=1ms inst=2": Candidate(
        max_batch_size=8, preferred_batch_sizes=(8, 4), max_queue_delay_us=1000, instance_count=2
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window-s", type=float, default=1.0, help="ci rule: the shortest window")
    parser.add_argument("--max-window-s", type=float, default=8.0, help="ci rule: the cap")
    parser.add_argument("--fixed-window-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--pa-interval-ms", type=int, default=2000)
    parser.add_argument("--sweep-repeats", type=int, default=3)
    parser.add_argument("--parts", default="fidelity,open,cnn,repeat,sweep,api,ceiling")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    parts = args.parts.split(",")
    ci = MeasureSettings(
        warmup_s=args.warmup_s,
        window_s=args.window_s,
        max_window_s=args.max_window_s,
        min_requests=30,
        rule="ci",
    )
    fixed = MeasureSettings(
        warmup_s=args.warmup_s,
        window_s=args.fixed_window_s,
        max_window_s=args.fixed_window_s,
        min_requests=30,
        rule="fixed",
    )
    perf_analyzer.ensure_perf_analyzer()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp, EmbeddedTriton() as server:
        bench = _Bench(server, Path(tmp), args.pa_interval_ms)
        if "fidelity" in parts:
            _fidelity(bench, levels, args.rounds, ci)
        if "open" in parts:  # open loop: Poisson arrivals at rates the encoder configs sustain
            _fidelity(bench, [20, 40, 80], args.rounds, ci, OPEN_CONFIGS, mode="request_rate")
        if "cnn" in parts:  # a small fast CNN (~1 ms per inference): where the client's own cost shows
            bench.use(examples.build_cnn(Path(tmp) / "cnn.onnx"), {}, "cnn")
            _fidelity(bench, levels, args.rounds, ci, CNN_CONFIGS, title="a small CNN (3x32x32)")
            bench.use(examples.example_model(cache_dir() / "examples"), dict(examples.EXAMPLE_SHAPES), "enc")
        if "repeat" in parts:
            _repeatability(bench, levels[len(levels) // 2], args.repeats, ci, fixed)
        if "sweep" in parts:
            _sweeps(bench, levels, args.sweep_repeats, ci, fixed)
        if "api" in parts:
            _api(bench, levels, args.rounds, ci)
        if "ceiling" in parts:
            _ceiling(bench, ci)
    print(f"\ntotal {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores")


class _Bench:
    """The server, the example model's requests, and both tools aimed at one loaded model."""

    def __init__(self, server: EmbeddedTriton, tmp: Path, pa_interval_ms: int) -> None:
        self.server = server
        self.tmp = tmp
        self.pa_interval_ms = pa_interval_ms
        self.use(examples.example_model(cache_dir() / "examples"), dict(examples.EXAMPLE_SHAPES), "enc")

    def use(self, path: Path, shapes: dict, name: str) -> None:
        """Aim both tools at another model (its 16 requests, its name on the server)."""
        self.info = inspect_model(path, cache=cache_dir())
        resolved = resolve_shapes(self.info, shapes)
        self.samples = [synthetic_inputs(self.info, resolved, 1, seed=seed) for seed in range(16)]
        self.data = perf_analyzer.write_input_data(self.tmp / f"{name}.json", self.samples, batched=True)
        self.model = name

    def load(self, name: str, candidate: Candidate) -> None:
        config = render_config(self.info, candidate, model_name=self.model)
        self.server.load_model(self.model, to_json(config), config_files(self.info, config, cache_dir()))

    def ours(
        self,
        settings: MeasureSettings,
        concurrency: float,
        model: str | None = None,
        samples=None,
        streaming: bool = True,
        mode: str = "concurrency",
    ) -> LevelResult:
        """The built-in generator at ``concurrency`` clients (or, with mode request_rate, that rate/s)."""
        generator = LoadGenerator(
            self.server.grpc_url,
            model or self.model,
            samples or self.samples,
            settings,
            streaming=streaming,
            mode=mode,
        )
        return generator.measure(concurrency)

    def theirs(
        self,
        concurrency: int,
        model: str | None = None,
        data: Path | None = None,
        request_rate: float | None = None,
    ):
        """perf_analyzer's figures, the stability percentage that settled, and the seconds it took.

        The figures are None when not even 50% settled (its run then took the seconds given).
        """
        started = time.perf_counter()
        for stability in (10.0, 25.0, 50.0):
            try:
                result = perf_analyzer.run_perf_analyzer(
                    model or self.model,
                    self.server.grpc_url,
                    concurrency=concurrency,
                    request_rate=request_rate,
                    input_data=data or self.data,
                    measurement_interval_ms=self.pa_interval_ms,
                    stability_percentage=stability,
                )
                return result, stability, time.perf_counter() - started
            except perf_analyzer.PerfAnalyzerError as exc:
                if "no stable measurement" not in exc.message:
                    raise
        return None, math.nan, time.perf_counter() - started


def _fidelity(
    bench: _Bench,
    levels: list[int],
    rounds: int,
    ci: MeasureSettings,
    configs: dict[str, Candidate] = CONFIGS,
    title: str = "the example encoder",
    mode: str = "concurrency",
) -> None:
    load = "request rate/s" if mode == "request_rate" else "concurrency"
    print(
        f"\n## fidelity on {title}: built-in (ci rule) / perf_analyzer by {load}, alternated, {rounds} rounds  [{_load()}]"
    )
    columns = [
        "config",
        load,
        "ours inf/s",
        "pa inf/s",
        "thr ratio (rounds)",
        "thr median",
        "ours p99 ms",
        "pa p99 ms",
        "p99 ratio (rounds)",
        "p99 median",
        "pa stability %",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    rate = mode == "request_rate"

    def measure_ours(level):
        return bench.ours(ci, level, mode=mode)

    def measure_theirs(level):
        return bench.theirs(1 if rate else int(level), request_rate=level if rate else None)

    for name, candidate in configs.items():
        bench.load(name, candidate)
        for level in levels:
            pairs = []
            for round_ in range(rounds):
                if round_ % 2 == 0:
                    ours = measure_ours(level)
                    theirs, stability, _ = measure_theirs(level)
                else:
                    theirs, stability, _ = measure_theirs(level)
                    ours = measure_ours(level)
                if theirs is None:
                    print(f"| {name} | {level} | perf_analyzer did not settle even at 50% (round {round_}) |")
                    continue
                pairs.append((ours, theirs, stability))
            if not pairs:
                continue
            thr = [o.throughput / t.throughput for o, t, _ in pairs]
            p99 = [o.p99_ms / t.p99_ms for o, t, _ in pairs]
            print(
                f"| {name} | {level} | {_fmt(o.throughput for o, _, _ in pairs)} | "
                f"{_fmt(t.throughput for _, t, _ in pairs)} | {_fmt(thr, 3)} | {statistics.median(thr):.3f} | "
                f"{_fmt((o.p99_ms for o, _, _ in pairs), 1)} | {_fmt((t.p99_ms for _, t, _ in pairs), 1)} | "
                f"{_fmt(p99, 3)} | {statistics.median(p99):.3f} | {_fmt((s for _, _, s in pairs), 0)} |",
                flush=True,
            )


def _repeatability(
    bench: _Bench, level: int, repeats: int, ci: MeasureSettings, fixed: MeasureSettings
) -> None:
    print(
        f"\n## repeatability: {REPEAT_CONFIG} at concurrency {level}, {repeats} repeats interleaved  [{_load()}]"
    )
    bench.load(REPEAT_CONFIG, CONFIGS[REPEAT_CONFIG])
    runs: dict[str, list[tuple[float, float, float]]] = {"ci": [], "fixed": [], "perf_analyzer": []}
    settled, unsettled = [], 0
    for _ in range(repeats):
        for label, settings in (("ci", ci), ("fixed", fixed)):
            result = bench.ours(settings, level)
            runs[label].append((result.throughput, result.p99_ms, result.measure_s))
            if label == "ci" and result.uncertainty:
                settled.append(bool(result.uncertainty.get("settled")))
        theirs, _, seconds = bench.theirs(level)
        if theirs is None:
            unsettled += 1
        else:
            runs["perf_analyzer"].append((theirs.throughput, theirs.p99_ms, seconds))
    names = {
        "ci": f"built-in, ci rule ({ci.window_s:g}-{ci.max_window_s:g} s window)",
        "fixed": f"built-in, fixed {fixed.window_s:g} s window",
        "perf_analyzer": f"perf_analyzer ({bench.pa_interval_ms} ms windows, 10% stability)",
    }
    print(
        "| measurement | throughput median | throughput CV | p99 median (ms) | p99 CV | seconds per measurement (median, min-max) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for label, values in runs.items():
        if len(values) < 2:
            print(f"| {names[label]} | fewer than 2 results |  |  |  |  |")
            continue
        thr, p99, seconds = zip(*values)
        print(
            f"| {names[label]} | {statistics.median(thr):.1f} | {_cv(thr):.3f} | {statistics.median(p99):.1f} | "
            f"{_cv(p99):.3f} | {statistics.median(seconds):.1f} ({min(seconds):.1f}-{max(seconds):.1f}) |"
        )
    print(f"ci windows that met both targets before the cap: {sum(settled)} of {len(settled)}")
    print(f"perf_analyzer runs that did not settle even at 50% (left out above): {unsettled} of {repeats}")


def _sweeps(
    bench: _Bench, levels: list[int], repeats: int, ci: MeasureSettings, fixed: MeasureSettings
) -> None:
    print(
        f"\n## trial sweeps: {REPEAT_CONFIG} over concurrency {levels}, {repeats} repeats interleaved  [{_load()}]"
    )
    bench.load(REPEAT_CONFIG, CONFIGS[REPEAT_CONFIG])
    runs: dict[str, list[tuple[float, float]]] = {"ci": [], "fixed": []}
    for _ in range(repeats):
        for label, settings in (("ci", ci), ("fixed", fixed)):
            runs[label].append(_sweep_once(bench, levels, settings))
    print(
        "| rule | best throughput median | best throughput CV | seconds measuring per trial (median, min-max) |"
    )
    print("| --- | --- | --- | --- |")
    for label, values in runs.items():
        best, seconds = zip(*values)
        name = (
            f"ci ({ci.window_s:g}-{ci.max_window_s:g} s)" if label == "ci" else f"fixed {fixed.window_s:g} s"
        )
        print(
            f"| {name} | {statistics.median(best):.1f} | {_cv(best):.3f} | "
            f"{statistics.median(seconds):.1f} ({min(seconds):.1f}-{max(seconds):.1f}) |"
        )


def _sweep_once(bench: _Bench, levels: list[int], settings: MeasureSettings) -> tuple[float, float]:
    """One trial's sweep (no latency budget): its best throughput and the seconds it spent measuring."""
    measured: list[LevelResult] = []

    def on_level(index: int, level: LevelResult) -> bool:
        measured.append(level)
        return next_step(measured, math.inf, remaining=len(levels) - index - 1) is None

    LoadGenerator(bench.server.grpc_url, "enc", bench.samples, settings).run_levels(levels, on_level)
    return max(level.throughput for level in measured), sum(level.measure_s for level in measured)


def _api(bench: _Bench, levels: list[int], rounds: int, ci: MeasureSettings) -> None:
    print(
        f"\n## stream vs unary calls on real models, perf_analyzer as reference, {rounds} rounds  [{_load()}]"
    )
    print(
        "| model | config | concurrency | stream inf/s | unary inf/s | pa inf/s | unary / stream (rounds) "
        "| unary / stream median | stream / pa | unary / pa | stream p99 ms | unary p99 ms |"
    )
    print("|" + " --- |" * 12)
    models = [
        ("encoder", examples.example_model(cache_dir() / "examples"), dict(examples.EXAMPLE_SHAPES), CONFIGS),
        ("cnn", examples.build_cnn(bench.tmp / "cnn.onnx"), {}, CNN_CONFIGS),
    ]
    for model_name, path, shapes, configs in models:
        bench.use(path, shapes, model_name)
        for name, candidate in configs.items():
            bench.load(name, candidate)
            for level in levels:
                runs: dict[str, list] = {"stream": [], "unary": [], "pa": []}
                for round_ in range(rounds):  # who goes first rotates every round
                    order = ["stream", "unary", "pa"]
                    order = order[round_ % 3 :] + order[: round_ % 3]
                    for engine in order:
                        if engine == "pa":
                            theirs, _, _ = bench.theirs(level)
                            if theirs is not None:
                                runs["pa"].append(theirs.throughput)
                        else:
                            result = bench.ours(ci, level, streaming=engine == "stream")
                            runs[engine].append((result.throughput, result.p99_ms))
                ratios = [u[0] / s[0] for s, u in zip(runs["stream"], runs["unary"])]
                stream, unary = (statistics.median(r[0] for r in runs[k]) for k in ("stream", "unary"))
                stream_p99, unary_p99 = (
                    statistics.median(r[1] for r in runs[k]) for k in ("stream", "unary")
                )
                pa = statistics.median(runs["pa"]) if runs["pa"] else math.nan
                print(
                    f"| {model_name} | {name} | {level} | {stream:.1f} | {unary:.1f} | {pa:.1f} | {_fmt(ratios, 3)} "
                    f"| {statistics.median(ratios):.3f} | {stream / pa:.2f} | {unary / pa:.2f} "
                    f"| {stream_p99:.1f} | {unary_p99:.1f} |",
                    flush=True,
                )
    bench.use(examples.example_model(cache_dir() / "examples"), dict(examples.EXAMPLE_SHAPES), "enc")
    print(f"[{_load()}]")


def _ceiling(bench: _Bench, ci: MeasureSettings) -> None:
    print(f"\n## generator ceiling: Identity model (4 floats), one client process  [{_load()}]")
    path = bench.tmp / "identity.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", examples.OPSET)], ir_version=examples.IR_VERSION
    )
    onnx.save(model, path)
    info = inspect_model(path)
    config = render_config(info, Candidate(max_batch_size=8, instance_count=1), model_name="identity")
    bench.server.load_model("identity", to_json(config), {"1/model.onnx": info.path})
    samples = [synthetic_inputs(info, resolve_shapes(info, {}), 1, seed=seed) for seed in range(4)]
    data = perf_analyzer.write_input_data(bench.tmp / "identity.json", samples, batched=True)
    print(
        "| concurrency | stream req/s | stream client CPU ms/req | unary req/s | unary client CPU ms/req "
        "| perf_analyzer req/s | stream / pa | unary / pa |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for level in (1, 8, 32, 128):
        runs: dict[str, list] = {"stream": [], "unary": [], "pa": []}
        for round_ in range(2):  # alternated: stream, unary, pa, then the reverse
            order = ["stream", "unary", "pa"] if round_ == 0 else ["pa", "unary", "stream"]
            for engine in order:
                if engine == "pa":
                    theirs, _, _ = bench.theirs(level, "identity", data)
                    if theirs is not None:
                        runs["pa"].append(theirs.throughput)
                else:
                    result = bench.ours(ci, level, "identity", samples, streaming=engine == "stream")
                    runs[engine].append((result.throughput, result.client_cpu_ms))
        stream, unary = (statistics.median(r[0] for r in runs[k]) for k in ("stream", "unary"))
        stream_cpu, unary_cpu = (statistics.median(r[1] for r in runs[k]) for k in ("stream", "unary"))
        pa = statistics.median(runs["pa"]) if runs["pa"] else math.nan
        print(
            f"| {level} | {stream:.0f} | {stream_cpu:.3f} | {unary:.0f} | {unary_cpu:.3f} | {pa:.0f} "
            f"| {stream / pa:.2f} | {unary / pa:.2f} |",
            flush=True,
        )
    print(f"[{_load()}]")


def _cv(values) -> float:
    values = list(values)
    return statistics.stdev(values) / statistics.fmean(values)


def _fmt(values, digits: int = 1) -> str:
    return " / ".join(f"{value:.{digits}f}" for value in values)


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min)"


if __name__ == "__main__":
    main()
