"""One trial: render the candidate, hot-reload it, sweep the concurrency levels, score it.

The sweep screens every level with a short window (bracketing the latency budget and the plateau),
then measures with the full stopping rule only the level that can be the answer, stepping down while
its precise p99 breaks the budget. The score is always a full window's throughput.

``TrialRunner`` is the Optuna objective. A config Triton rejects, a crash or a hang becomes
``TrialFailed`` (recorded on the trial with its reason; the server is restarted); a proposal whose config
was already measured reuses that measurement (canonicalisation); a trial that would overshoot a budget
other workers already fill steps back.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import replace

import optuna
from optuna.trial import TrialState

from optimizer import interrupts
from optimizer.config.render import (
    config_digest,
    config_from_json,
    render_config,
    to_dict,
    to_json,
)
from optimizer.config.space import Candidate, SearchSpace, suggest_candidate
from optimizer.errors import ConfigRejected, InferenceError, ServerDiedError, StudyError
from optimizer.measurement.engines import LevelSource, make_load_generator
from optimizer.measurement.levels import LevelResult, MeasureSettings
from optimizer.measurement.sweep import (
    SweepOutcome,
    best_feasible,
    load_of,
    merge_precise,
    next_step,
    pin_down,
)
from optimizer.model.intake import ModelInfo
from optimizer.model.quantize import DEFAULT_INT8_RECIPE
from optimizer.model.variants import config_files
from optimizer.paths import cache_dir
from optimizer.serving.base import ServingTarget
from optimizer.serving.metrics import memory_figure
from optimizer.study.confirm import RemeasureFailed
from optimizer.study.records import CONFIG_DIGEST, config_digest_of
from optimizer.study.settings import StudySettings
from optimizer.study.storage import (
    fail_stale,
    is_surplus,
    recover_dead_local_trials,
    worker_id,
)
from optimizer.study.trial_rules import (
    LATENCY_CONSTRAINT,
    MemoryExhausted,
    TrialFailed,
    config_gpus,
    first_line,
    gpu_memory_returned,
    infeasible_for_memory,
    memory_exhausted,
    record_failure,
    refuse_unserved,
    render_trial_config,
    server_fault,
    tensorrt_engines,
)

__all__ = [
    "CONSTRAINT",
    "GPU_MEMORY_CONSTRAINT",
    "MEMORY_CONSTRAINT",
    "MemoryExhausted",
    "TrialFailed",
    "TrialRunner",
    "first_line",
]

CONSTRAINT = LATENCY_CONSTRAINT
MEMORY_CONSTRAINT = "memory"
GPU_MEMORY_CONSTRAINT = "gpu_memory"


class TrialRunner:
    """The objective: render, hot-reload, sweep, score one trial."""

    def __init__(
        self,
        target: ServingTarget,
        model: ModelInfo,
        samples,
        space: SearchSpace,
        model_name: str,
        settings: StudySettings,
        reporter,
        *,
        cores: int,
        int8_recipe: str = DEFAULT_INT8_RECIPE,
        refused: frozenset[tuple[str, str]] = frozenset(),
    ):
        self.target = target
        self.int8_recipe = int8_recipe  # how the study's int8 file is made (chosen before trials)
        # (precision, provider) pairs the accuracy guard refused on that provider only (a GPU space's
        # fp16 may pass on CUDA and fail in TensorRT's FP16 mode): never served.
        self.refused = refused
        # The GPU memory the server used before any model loaded (None: it shows none): each trial
        # checks the last config's memory came back before it loads its own (gpu_memory_returned).
        self.idle_gpu_memory_mb: float | None = None
        self._loaded = False
        self.model = model
        self.space = space
        self.model_name = model_name
        self.settings = settings
        self.reporter = reporter
        self.samples = samples
        self.cores = cores  # the space's threads are derived from them (see suggest_candidate)
        self.latency_budget_ms = math.inf
        self.progress = (0, settings.budget)
        # Triton's gRPC stream API: the lighter client (bench/fidelity.py), until the server crashes
        # under it (see _server_fault).
        self.streaming = True

    def probe_baseline_p99s(self, probes: int) -> list[float]:
        """Single-request p99 of the untuned config, ``probes`` times: the base of the default latency budget.

        Each probe is one fixed window (at least ``min_requests`` requests), so a moment of other work on
        the machine spoils one probe, not the budget: the caller takes their median.
        """
        config = render_config(self.model, Candidate(max_batch_size=1), model_name=self.model_name)
        self._load(config)
        probe = replace(self.settings.measure, rule="fixed")
        generator = self._load_generator(mode="concurrency", measure=probe)
        return [generator.measure(1).p99_ms for _ in range(probes)]

    def remeasure(self, trial: optuna.trial.FrozenTrial) -> tuple[float, float]:
        """Load ``trial``'s config again and measure it at the load it was best at: (inf/s, p99 ms).

        Raises:
            RemeasureFailed: the config was rejected, or the server crashed or hung (then restarted).
        """
        level = self.remeasure_with(trial, (self.settings.load_generator,))[0]
        return level.throughput, level.p99_ms

    def remeasure_with(self, trial: optuna.trial.FrozenTrial, engines: tuple[str, ...]) -> list[LevelResult]:
        """Load ``trial``'s config once and measure it at its load with each engine in turn.

        Raises:
            RemeasureFailed: the config was rejected, or the server crashed or hung (then restarted).
        """
        config = config_from_json(trial.user_attrs["config"])
        rate = trial.user_attrs.get("request_rate")
        mode = "request_rate" if rate is not None else "concurrency"
        load = rate if rate is not None else trial.user_attrs.get("concurrency") or 1
        try:
            self._load(config)
            return [self._load_generator(mode=mode, engine=engine).measure(load) for engine in engines]
        except (TrialFailed, MemoryExhausted) as exc:
            raise RemeasureFailed(str(exc)) from exc
        except (InferenceError, ServerDiedError) as exc:
            raise RemeasureFailed(str(self._server_fault("while confirming", exc))) from exc

    def __call__(self, trial) -> float:
        if is_surplus(trial, self.settings.budget):
            trial.set_user_attr("surplus", True)
            raise TrialFailed("surplus: other workers' trials already fill the budget")
        candidate = suggest_candidate(trial, self.space, batching=self.model.batching, cores=self.cores)
        if candidate.precision == "int8":
            candidate = replace(candidate, int8_recipe=self.int8_recipe)
        gpus = config_gpus(self.settings.gpus, self.target)
        config = render_trial_config(self.model, candidate, self.model_name, self.samples, gpus)
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("candidate", candidate.summary())
        trial.set_user_attr("config", to_dict(config))
        key = config_digest(config)
        trial.set_user_attr(CONFIG_DIGEST, key)
        self.reporter.trial_started(trial.number, candidate.summary(), *self.progress)
        refuse_unserved(trial, candidate, self.refused)
        earlier = _claim_config(trial, key)
        if earlier is not None:
            return _reuse_measurement(trial, earlier)
        started = time.perf_counter()
        try:
            outcome = self.measure(trial, config)
        except TrialFailed as exc:
            self._fail(trial, exc)
            raise
        except MemoryExhausted as exc:
            raise _infeasible_for_memory(trial, exc) from exc
        finally:
            trial.set_user_attr("trial_s", round(time.perf_counter() - started, 3))
        self._record(trial, outcome)
        over_memory = self._record_memory(trial, outcome)
        if over_memory or not outcome.feasible or outcome.stop_reason.startswith("pruned"):
            self._constrain(trial, outcome.best.p99_ms if outcome.best else outcome.lowest_p99_ms)
            if over_memory:
                trial.set_user_attr("feasible", False)
                trial.set_user_attr("reason", f"infeasible: {over_memory}")
                raise optuna.TrialPruned(over_memory)
            reason = outcome.stop_reason if outcome.feasible else f"infeasible: {outcome.stop_reason}"
            trial.set_user_attr("reason", reason)
            raise optuna.TrialPruned(outcome.stop_reason)
        assert outcome.best is not None  # feasible, checked above
        if not self._worth_a_second_load(trial, outcome.best.throughput):
            self._constrain(trial, outcome.best.p99_ms)
            return round(outcome.best.throughput, 3)  # the same figure as the "throughput" attribute
        return round(self._second_load(trial, config, outcome.best), 3)

    def _constrain(self, trial, p99_ms: float) -> None:
        """The latency constraint (feasible iff <= 0); Optuna keeps the first value set, so set it once."""
        trial.set_constraint(CONSTRAINT, (p99_ms - self.latency_budget_ms) / self.latency_budget_ms)

    @staticmethod
    def _fail(trial, exc: TrialFailed) -> None:
        record_failure(trial, exc)
        trial.set_constraint(CONSTRAINT, 1.0)

    def _worth_a_second_load(self, trial, throughput: float) -> bool:
        """Whether one load's draw would decide too much: a score above the best so far (within
        ``second_load_margin`` of it), or the first feasible score of its execution provider x precision
        (which tells the sampler whether to come back to that variant at all).

        Each load starts new backend processes and thread pools, and one config measured 440-884 inf/s
        on fresh loads: such a score is measured on a second load before it counts.
        """
        margin = self.settings.search.second_load_margin
        if margin is None or self.settings.load_generator != "builtin":
            return False
        earlier = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.number != trial.number and t.value is not None
        ]
        if not earlier:
            return False
        if throughput >= (1 - margin) * max(t.value for t in earlier):
            return True
        variant = _variant_of(trial.params)
        return all(_variant_of(t.params) != variant for t in earlier)

    def _second_load(self, trial, config, first: LevelResult) -> float:
        """Load the config again and measure the level it was best at: the score is the mean of both loads.

        The p99 recorded is the worse of the two; a second load over the budget makes the trial infeasible.
        """
        started = time.perf_counter()
        try:
            self._load(config)
            second = self._load_generator().measure(load_of(first))
        except (InferenceError, ServerDiedError) as exc:
            fault = self._server_fault("while measuring a second load", exc)
            if isinstance(fault, MemoryExhausted):
                raise _infeasible_for_memory(trial, fault) from exc
            self._fail(trial, fault)
            raise fault from exc
        except TrialFailed as exc:
            self._fail(trial, exc)
            raise
        seconds = time.perf_counter() - started
        trial.set_user_attr(
            "second_load",
            {
                "throughput": round(second.throughput, 3),
                "p99_ms": round(second.p99_ms, 3),
                "seconds": round(seconds, 3),
            },
        )
        trial.set_user_attr("trial_s", round(trial.user_attrs.get("trial_s", 0.0) + seconds, 3))
        p99 = max(first.p99_ms, second.p99_ms)
        trial.set_user_attr("p99_ms", round(p99, 3))
        self._constrain(trial, p99)
        if second.p99_ms > self.latency_budget_ms:
            reason = f"p99 {second.p99_ms:.1f} ms broke the budget on a second load"
            trial.set_user_attr("feasible", False)
            trial.set_user_attr("reason", f"infeasible: {reason}")
            raise optuna.TrialPruned(reason)
        mean = (first.throughput + second.throughput) / 2
        trial.set_user_attr("throughput", round(mean, 3))
        return mean

    def measure(self, trial, config) -> SweepOutcome:
        """Load ``config`` (and the model file it serves) and sweep it: the trial's measurement.

        ``trial`` (an Optuna trial) receives the reload time and each screened level (for the pruner).
        """
        if self._loaded and self.idle_gpu_memory_mb is not None:
            gpu_memory_returned(self.target, (self.model_name,), self.idle_gpu_memory_mb, self.reporter.note)
        engines = tensorrt_engines(config)
        load_s = self._load(config)
        self._loaded = True
        trial.set_user_attr("load_s", round(load_s, 3))
        if not self.streaming:
            trial.set_user_attr("unary_calls", True)  # measured after a crash under the stream API
        if tensorrt_engines(config) - engines:  # the load built an engine: what a first load costs
            trial.set_user_attr("engine_build_s", round(load_s, 3))
            self.reporter.note(
                f"trial {trial.number}: TensorRT built its engine in {load_s:.1f} s (now cached)"
            )
        return self._sweep(trial)

    def _load(self, config) -> float:
        files = config_files(self.model, config, cache_dir())
        try:
            return self.target.load_model(self.model_name, to_json(config), files)
        except ConfigRejected as exc:
            exhausted = memory_exhausted(self.target, "loading the config", exc, self.reporter.note)
            if exhausted is not None:
                self._loaded = False  # a restarted server holds no model to unload
                raise exhausted from exc
            raise TrialFailed(f"Triton rejected the config: {first_line(exc.message)}") from exc
        except ServerDiedError as exc:
            raise self._server_fault(LOADING_THE_CONFIG, exc) from exc

    def _sweep(self, trial) -> SweepOutcome:
        """Measure the levels; with screening, short windows first and full ones only where the answer is."""
        loads = self.settings.request_rates or self.settings.concurrency
        measure = self.settings.measure
        screening = measure.screens and self.settings.load_generator == "builtin"
        try:
            if not screening:
                levels, stop = self._walk(trial, loads, measure, phase=None)
                return SweepOutcome(tuple(levels), best_feasible(levels, self.latency_budget_ms), stop)
            screened, stop = self._walk(trial, loads, measure.screening(), phase="screen")
            if stop.startswith("pruned"):
                best = best_feasible(screened, self.latency_budget_ms)
                return SweepOutcome(tuple(screened), best, stop, screen_s=_seconds(screened))
            precise = self._pin_down(screened)
        except (InferenceError, ServerDiedError) as exc:
            raise self._server_fault("during measurement", exc) from exc
        best = best_feasible(precise, self.latency_budget_ms)
        if best is None and precise:
            stop = f"p99 {min(level.p99_ms for level in precise):.1f} ms broke the budget in full windows"
        return SweepOutcome(merge_precise(screened, precise), best, stop, screen_s=_seconds(screened))

    def _walk(
        self, trial, loads, measure: MeasureSettings, phase: str | None
    ) -> tuple[list[LevelResult], str]:
        """Measure ``loads`` in order until the sweep's rule (or the pruner) stops: the levels and why."""
        levels: list[LevelResult] = []
        stop: list[str] = []
        budget = self.latency_budget_ms

        def on_level(index: int, level: LevelResult) -> bool:
            interrupts.raise_if_requested()
            levels.append(replace(level, phase=phase))
            best = best_feasible(levels, budget)
            if best is not None:
                trial.report(best.throughput, step=index)
                if trial.should_prune():
                    stop.append(f"pruned at {level.load}: behind the median of earlier trials")
                    return False
            reason = next_step(levels, budget, remaining=len(loads) - index - 1)
            if reason:
                stop.append(reason)
            return reason is None

        self._load_generator(measure=measure).run_levels(loads, on_level)
        return levels, stop[0] if stop else ""

    def _pin_down(self, screened: list[LevelResult]) -> list[LevelResult]:
        """Full windows where the answer is (sweep.pin_down); far from the budget, throughput only."""

        def measure(level: LevelResult, far: bool) -> LevelResult:
            settings = self.settings.measure.throughput_only() if far else self.settings.measure
            return replace(self._load_generator(measure=settings).measure(load_of(level)), phase="precise")

        return pin_down(screened, self.latency_budget_ms, measure)

    def _load_generator(
        self, mode: str | None = None, measure: MeasureSettings | None = None, engine: str | None = None
    ) -> LevelSource:
        """The engine, protocol and mode the study asked for (closed loop unless it gave request rates)."""
        settings = self.settings
        return make_load_generator(
            self.target,
            self.model_name,
            self.samples,
            measure or settings.measure,
            engine=engine or settings.load_generator,
            protocol=settings.protocol,
            mode=mode or ("request_rate" if settings.request_rates else "concurrency"),
            batched=self.model.batching,
            # A remote target may need TLS and auth headers for inference too, not only for model control.
            client_options=self.target.client_options(),
            headers=self.target.request_headers() or None,
            resources=self.target.resources,
            streaming=self.streaming,
        )

    def check_memory_limit(self, idle: dict[str, float]) -> None:
        """Stop before any trial when ``--max-memory-mb`` or ``--max-gpu-memory-mb`` cannot be judged or
        cannot be met (``idle``: the server's resources before any model loads).

        Raises:
            StudyError: the server's memory is unreadable, or the server alone already uses more.
        """
        self._check_gpu_memory_limit(idle)
        limit = self.settings.max_memory_mb
        if limit is None:
            return
        figure = memory_figure(idle)
        if figure is None:
            raise StudyError(
                f"--max-memory-mb needs the server's memory, which the {self.target.name} target does not "
                "show (no process of ours, no readable /metrics): give --metrics-url or drop --max-memory-mb"
            )
        used, source = figure
        if used >= limit:
            raise StudyError(
                f"--max-memory-mb {limit:g} is impossible: before any model is loaded the {source} is "
                f"already {used:.0f} MiB; raise the limit"
            )

    def _check_gpu_memory_limit(self, idle: dict[str, float]) -> None:
        limit = self.settings.max_gpu_memory_mb
        if limit is None:
            return
        used = idle.get("gpu_memory_used_mb")
        if used is None:
            raise StudyError(
                f"--max-gpu-memory-mb needs the GPU memory the server reports (/metrics "
                f"nv_gpu_memory_used_bytes), which the {self.target.name} target does not show: run on a GPU "
                "server (remote: give --metrics-url) or drop --max-gpu-memory-mb"
            )
        if used >= limit:
            raise StudyError(
                f"--max-gpu-memory-mb {limit:g} is impossible: before any model is loaded the server's GPUs "
                f"already hold {used:.0f} MiB; raise the limit"
            )

    def _server_fault(self, when: str, exc: Exception) -> TrialFailed | MemoryExhausted:
        self._loaded = False  # a restarted server holds no model to unload
        fault = server_fault(self.target, when, exc, self.reporter.note)
        under_load = when != LOADING_THE_CONFIG
        if isinstance(fault, TrialFailed) and fault.crashed and under_load and self._streams_in_use():
            self._stop_streaming()
        return fault

    def _streams_in_use(self) -> bool:
        """Whether this run's measurements go over Triton's stream API: the built-in generator's
        closed-loop gRPC levels without TLS (open loop, HTTP, TLS and perf_analyzer never stream)."""
        settings = self.settings
        return (
            self.streaming
            and settings.load_generator == "builtin"
            and settings.protocol == "grpc"
            and not settings.request_rates
            and not self.target.client_options()
        )

    def _stop_streaming(self) -> None:
        """Measure with unary calls from now on: the bundled server (nvidia-pytriton 0.7.0) crashes now
        and then under the stream API with the dynamic batcher, never seen with unary calls (23 crashes
        in 100 reloads against 0 in 20, bench/reload_crash.py). Streams' lighter client is worth one
        crash, which costs a trial that a later proposal re-measures; after it, the run risks no other."""
        self.streaming = False
        self.reporter.note(
            "the server crashed under Triton's gRPC stream API: the rest of this run measures with unary "
            "gRPC calls (no crash seen with them; their client costs a few % more CPU per request)"
        )

    def _record(self, trial, outcome: SweepOutcome) -> None:
        trial.set_user_attr("sweep", [level.to_dict() for level in outcome.levels])
        trial.set_user_attr("stop_reason", outcome.stop_reason)
        trial.set_user_attr("feasible", outcome.feasible)
        trial.set_user_attr("load_generator", self.settings.load_generator)
        trial.set_user_attr("measure_s", round(sum(level.measure_s for level in outcome.levels), 3))
        if (
            outcome.screen_s is not None
        ):  # a screened level replaced by its precise window still took its time
            trial.set_user_attr("screen_s", round(outcome.screen_s, 3))
        precise = [level for level in outcome.levels if level.phase == "precise"]
        if precise:
            trial.set_user_attr("precise_s", round(_seconds(precise), 3))
        if outcome.best is not None:
            best = outcome.best
            trial.set_user_attr("throughput", round(best.throughput, 3))
            trial.set_user_attr("p99_ms", round(best.p99_ms, 3))
            trial.set_user_attr("p50_ms", round(best.p50_ms, 3))
            if best.request_rate is None:
                trial.set_user_attr("concurrency", best.concurrency)
            else:
                trial.set_user_attr("request_rate", best.request_rate)
            for key in ("uncertainty", "server", "resources", "client_cpu_ms"):
                if key in (record := best.to_dict()):
                    trial.set_user_attr(key, record[key])

    def _record_memory(self, trial, outcome: SweepOutcome) -> str | None:
        """Record the most memory (and GPU memory) any level needed; why the trial breaks
        ``--max-memory-mb`` or ``--max-gpu-memory-mb``, or None."""
        over_gpu = self._record_gpu_memory(trial, outcome)
        over = self._record_host_memory(trial, outcome)
        return over or over_gpu

    def _record_gpu_memory(self, trial, outcome: SweepOutcome) -> str | None:
        usage = [dict(level.resources or {}) for level in outcome.levels]
        used = max((u["gpu_memory_used_mb"] for u in usage if "gpu_memory_used_mb" in u), default=None)
        if used is None:
            return None
        trial.set_user_attr("gpu_memory_mb", round(used, 3))
        total = max((u.get("gpu_memory_total_mb", 0.0) for u in usage), default=0.0)
        if total:
            trial.set_user_attr("gpu_memory_total_mb", round(total, 3))
        limit = self.settings.max_gpu_memory_mb
        if limit is None:
            return None
        trial.set_constraint(GPU_MEMORY_CONSTRAINT, (used - limit) / limit)
        return (
            None
            if used <= limit
            else f"GPU memory {used:.0f} MiB broke the --max-gpu-memory-mb {limit:g} limit"
        )

    def _record_host_memory(self, trial, outcome: SweepOutcome) -> str | None:
        figures = [memory_figure(dict(level.resources or {})) for level in outcome.levels]
        known = [figure for figure in figures if figure is not None]
        if not known:
            return None
        used, source = max(known)
        trial.set_user_attr("memory_mb", round(used, 3))
        trial.set_user_attr("memory_source", source)
        limit = self.settings.max_memory_mb
        if limit is None:
            return None
        trial.set_constraint(MEMORY_CONSTRAINT, (used - limit) / limit)
        if used <= limit:
            return None
        return f"{source} {used:.0f} MiB broke the --max-memory-mb {limit:g} limit"


LOADING_THE_CONFIG = "while loading the config"  # when a fault came before any request was sent


def _variant_of(params) -> tuple[str | None, str | None]:
    """A trial's execution provider and precision (None where the space has one choice)."""
    return params.get("execution_provider"), params.get("precision")


_COPIED_ATTRS = (
    "sweep",
    "stop_reason",
    "feasible",
    "throughput",
    "p99_ms",
    "p50_ms",
    "concurrency",
    "request_rate",
    "reason",
    "load_generator",
    "measure_s",
    "screen_s",
    "precise_s",
    "second_load",
    "client_cpu_ms",
    "uncertainty",
    "server",
    "resources",
    "memory_mb",
    "memory_source",
)


def _seconds(levels) -> float:
    return sum(level.measure_s or 0.0 for level in levels)


def _measured_config(study, key: str):
    """The trial that already measured the config with this key (canonicalisation), or None."""
    for trial in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    ):
        attrs = trial.user_attrs
        if config_digest_of(attrs) != key or "same_config_as" in attrs or attrs.get("transient_fault"):
            continue
        if trial.state != TrialState.FAIL or "reason" in attrs:
            return trial
    return None


CLAIM_POLL_S = 1.0
CLAIM_WAIT_LIMIT_S = 1800.0


def _claim_config(trial, key: str):
    """The trial whose measurement of this config ``trial`` reuses, or None once ``trial`` may measure it.

    Workers that propose one config at the same moment must not both measure it. A trial running the
    same config that has marked itself ``measured_here`` is waited for; between trials still deciding, the
    lower-numbered one measures and the others wait. A trial reads the running trials again after its
    ``measured_here`` write and yields to a lower-numbered one it missed, which closes the round trip
    between the first read and the write. A worker that died
    mid-trial is found (same host at once, elsewhere by its heartbeat) so nobody waits on it forever.
    """
    deadline = time.monotonic() + CLAIM_WAIT_LIMIT_S
    while True:
        earlier = _measured_config(trial.study, key)
        if earlier is not None:
            return earlier
        rivals = _running_with_config(trial, key)
        ahead = [t for t in rivals if t.user_attrs.get("measured_here") or t.number < trial.number]
        if time.monotonic() > deadline:
            trial.set_user_attr("measured_here", True)
            return None
        if not ahead:
            trial.set_user_attr("measured_here", True)
            # Read once more after the claim: a lower-numbered trial that set its key after our read
            # (the one open round trip) is seen now, and we yield to it; it cannot have missed us both ways.
            if not any(t.number < trial.number for t in _running_with_config(trial, key)):
                return None
            trial.set_user_attr("measured_here", False)
        time.sleep(CLAIM_POLL_S)
        recover_dead_local_trials(trial.study)
        fail_stale(trial.study)


def _running_with_config(trial, key: str) -> list:
    """Other RUNNING trials of the study whose config has this key."""
    return [
        other
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if other.number != trial.number and config_digest_of(other.user_attrs) == key
    ]


def _reuse_measurement(trial, earlier) -> float:
    """Record ``earlier``'s result on ``trial`` without measuring: two parameter sets, one config."""
    trial.set_user_attr("same_config_as", earlier.number)
    for key in _COPIED_ATTRS:
        if key in earlier.user_attrs:
            trial.set_user_attr(key, earlier.user_attrs[key])
    for name, value in earlier.constraints.items():
        trial.set_constraint(name, value)
    for step, value in earlier.intermediate_values.items():
        trial.report(value, step)
    if earlier.state == TrialState.COMPLETE:
        return earlier.value
    if earlier.state == TrialState.PRUNED:
        raise optuna.TrialPruned(f"same config as trial {earlier.number}")
    raise TrialFailed(earlier.user_attrs.get("reason", f"same config as failed trial {earlier.number}"))


def _infeasible_for_memory(trial, exc: MemoryExhausted) -> optuna.TrialPruned:
    """``infeasible_for_memory``, and a constraint the sampler learns from."""
    trial.set_constraint(MEMORY_CONSTRAINT, 1.0)
    return infeasible_for_memory(trial, exc)
