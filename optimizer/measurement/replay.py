"""Recorded response surfaces, and the replay target that serves a study from one.

A recording (``bench/record_surface.py``) measured every config of a finite space, each at least twice,
on a real server. ``--target replay:DIR`` runs a study against it without a server: loading a config
looks it up by its rendered config, measuring it replays one of its recorded sweeps (a different
repeat each time, drawn at random), so the noise a study meets is the noise that was measured. Nothing
is interpolated: a config outside the recording is an error that names the recording's space.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

from optimizer.config.render import config_digest, config_from_json
from optimizer.errors import ConfigRejected, UsageError
from optimizer.measurement.levels import LevelResult
from optimizer.measurement.sweep import best_feasible, next_step
from optimizer.model import examples
from optimizer.model.quantize import DEFAULT_INT8_RECIPE
from optimizer.paths import cache_dir
from optimizer.serving.base import Capabilities, RecordedStudy, ServingTarget

__all__ = [
    "RECORDING_FILES",
    "BadStarts",
    "RecordedConfig",
    "Recording",
    "RecordingTarget",
    "ReplayTarget",
    "Surface",
    "build_recorded_model",
    "draw_repeat",
    "draw_sweep",
    "level_of_any_repeat",
    "load_surface",
    "open_recording",
    "read_outcomes",
    "read_rows",
    "recorded_level",
    "replay_sweep",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
L = TypeVar("L")


@dataclass(frozen=True)
class RecordedConfig:
    """One config of a recording: its sweeps (one per repeat) and the outcome of each."""

    key: str
    candidate: str
    sweeps: tuple[tuple[LevelResult, ...], ...]  # one per repeat; empty for a failed repeat
    failures: tuple[str, ...]  # the reason of each failed repeat


@dataclass(frozen=True)
class Recording:
    """What every recording holds: its directory, its ``meta.json`` and the space it was recorded in."""

    path: Path
    meta: Mapping

    @property
    def space_path(self) -> Path:
        return self.path / "space.yaml"


@dataclass(frozen=True)
class Surface(Recording):
    """One model's recording: every config measured, with the latency budget it was recorded under."""

    configs: Mapping[str, RecordedConfig]

    @property
    def latency_budget_ms(self) -> float:
        return float(self.meta["latency_budget_ms"])

    def model_path(self) -> Path:
        """The model recorded, rebuilt into the cache."""
        model = self.meta["model"]
        return build_recorded_model(self.meta["model_name"], model["builder"], model.get("args", {}))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The ``--shape`` options the recording was made with (dynamic dims only)."""
        given = self.meta["model"].get("shapes", {})
        return {name: tuple(dims) for name, dims in given.items()}

    def true_throughput(self, key: str, budget_ms: float | None = None) -> float:
        """The config's throughput within the budget: the mean over its repeats (0 when infeasible)."""
        budget = self.latency_budget_ms if budget_ms is None else budget_ms
        config = self.configs[key]
        values = [_replayed_best(sweep, budget) for sweep in config.sweeps]
        values += [0.0] * len(config.failures)
        return sum(values) / len(values)


def build_recorded_model(model_name: str, builder: str, args: Mapping) -> Path:
    """The recorded model, rebuilt into the cache by its builder in optimizer.model.examples (deterministic).

    The file keeps the recorded model name (its stem): the name is part of every recorded config.
    """

    if not builder.startswith("build_") or not callable(getattr(examples, builder, None)):
        raise UsageError(f"the recording names an unknown model builder {builder!r}")
    path = cache_dir() / "examples" / f"{model_name}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        getattr(examples, builder)(partial, **args)
        os.replace(partial, path)
    return path


def load_surface(path: Path | str) -> Surface:
    """Read a recording directory (``levels.csv``, ``outcomes.csv``, ``meta.json``)."""
    path, meta = open_recording(path, "a recorded surface", "bench/record_surface.py", "bench/data/encoder")
    levels: dict[tuple[str, int], list[LevelResult]] = defaultdict(list)
    for row in read_rows(path / "levels.csv"):
        levels[(row["config_key"], int(row["repeat"]))].append(recorded_level(row, int(row["concurrency"])))

    def sweep(key: str, repeat: int) -> tuple[LevelResult, ...]:
        return tuple(sorted(levels.get((key, repeat), []), key=lambda level: level.concurrency))

    outcomes = read_outcomes(path, "config_key", sweep)
    configs = {
        key: RecordedConfig(key, row["candidate"], sweeps, failures)
        for key, (row, sweeps, failures) in outcomes.items()
    }
    return Surface(path=path, meta=meta, configs=configs)


RECORDING_FILES = ("meta.json", "outcomes.csv", "levels.csv", "space.yaml")


def open_recording(path: Path | str, what: str, writer: str, example: str) -> tuple[Path, dict]:
    """A recording directory checked to hold every file, and its ``meta.json``.

    Raises:
        UsageError: a file is missing; says which, and what writes ``what`` (``writer``, e.g. ``example``).
    """
    path = Path(path)
    missing = [name for name in RECORDING_FILES if not (path / name).is_file()]
    if missing:
        raise UsageError(
            f"{str(path)!r} is not {what} (missing {', '.join(missing)}): "
            f"give a directory written by {writer}, e.g. {example}"
        )
    return path, json.loads((path / "meta.json").read_text())


def read_outcomes(
    path: Path, key_field: str, sweep: Callable[[str, int], T]
) -> dict[str, tuple[dict[str, str], tuple[T, ...], tuple[str, ...]]]:
    """Each recorded config's outcomes: its last ``outcomes.csv`` row, the sweep of each measured
    repeat (``sweep(key, repeat)``) and the reason of each failed one, by config key."""
    rows: dict[str, dict[str, str]] = {}
    sweeps: dict[str, list[T]] = defaultdict(list)
    failures: dict[str, list[str]] = defaultdict(list)
    for row in read_rows(path / "outcomes.csv"):
        key = row[key_field]
        rows[key] = row
        if row["state"] == "failed":
            failures[key].append(row["reason"])
        else:
            sweeps[key].append(sweep(key, int(row["repeat"])))
    return {key: (row, tuple(sweeps[key]), tuple(failures[key])) for key, row in rows.items()}


def read_rows(path: Path) -> list[dict[str, str]]:
    """A recording's CSV file, a dict per row."""
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def recorded_level(row: Mapping[str, str], concurrency: int) -> LevelResult:
    """One measured level of a recording's ``levels.csv`` (its load: ``concurrency`` closed-loop clients)."""
    return LevelResult(
        concurrency=concurrency,
        throughput=float(row["throughput"]),
        p50_ms=float(row["p50_ms"]),
        p95_ms=float(row["p95_ms"]),
        p99_ms=float(row["p99_ms"]),
        requests=int(row["requests"]),
        duration_s=float(row["duration_s"]),
        # Recordings made with the study's procedure (screening, adaptive warm-up) say how long each took.
        warmup_s=float(row["warmup_s"]) if row.get("warmup_s") else None,
        phase=row.get("phase") or None,
    )


def _replayed_best(sweep: Sequence[LevelResult], budget_ms: float) -> float:
    """The score a study gives this recorded sweep under ``budget_ms`` (same stopping rule)."""
    measured: list[LevelResult] = []
    for index, level in enumerate(sweep):
        measured.append(level)
        if next_step(measured, budget_ms, remaining=len(sweep) - index - 1):
            break
    best = best_feasible(measured, budget_ms)
    return best.throughput if best is not None else 0.0


@dataclass(frozen=True)
class BadStarts:
    """A noise model on top of the recorded repeats: some loads start slow and stay slow.

    One config measured 440-884 inf/s on freshly started servers (median 533): a load's thread
    placement can cost it near half its throughput for as long as it stays loaded. With probability
    ``rate`` a drawn repeat has its throughput times ``factor`` and its latencies divided by it.
    """

    rate: float
    factor: float = 0.6

    def apply(self, sweep: tuple[LevelResult, ...], rng: random.Random) -> tuple[LevelResult, ...]:
        if rng.random() >= self.rate:
            return sweep
        return tuple(
            replace(
                level,
                throughput=level.throughput * self.factor,
                p50_ms=level.p50_ms / self.factor,
                p95_ms=level.p95_ms / self.factor,
                p99_ms=level.p99_ms / self.factor,
            )
            for level in sweep
        )


class Repeats(Protocol[T_co]):
    """A recorded config's repeats: the sweep of each measured one, the reason of each failed one."""

    @property
    def sweeps(self) -> tuple[T_co, ...]: ...

    @property
    def failures(self) -> tuple[str, ...]: ...


def draw_sweep(config: Repeats[T], rng: random.Random) -> T:
    """One recorded repeat of ``config``, at random; a failed repeat raises ConfigRejected as it failed."""
    index = rng.randrange(len(config.sweeps) + len(config.failures))
    if index >= len(config.sweeps):
        raise ConfigRejected(f"recorded failure: {config.failures[index - len(config.sweeps)]}")
    return config.sweeps[index]


def level_of_any_repeat(
    config: Repeats[T], level_in: Callable[[T], L | None], rng: random.Random
) -> L | None:
    """A level the drawn repeat did not reach (its sweep stopped earlier), from a repeat that did, at
    random; None where none did (every recorded sweep stopped before it)."""
    found = [level for sweep in config.sweeps if (level := level_in(sweep)) is not None]
    return rng.choice(found) if found else None


def draw_repeat(
    config: RecordedConfig, rng: random.Random, bad_starts: BadStarts | None = None
) -> tuple[LevelResult, ...]:
    """One recorded repeat of one model's ``config``, with the noise model's bad starts if given."""
    sweep = draw_sweep(config, rng)
    return bad_starts.apply(sweep, rng) if bad_starts else sweep


def replay_sweep(
    config: RecordedConfig, drawn: Sequence[LevelResult], levels: Sequence[int], on_level, rng: random.Random
) -> list[LevelResult]:
    """Replay the drawn sweep of ``config``: ``on_level(index, result)`` returns False to stop.

    A level the drawn repeat did not reach (its sweep stopped earlier) is taken from another repeat
    that did; when none did, the sweep ends there, as every recorded one did.
    """
    results: list[LevelResult] = []
    for index, concurrency in enumerate(levels):
        at = partial(_level_at, concurrency=concurrency)
        level = at(drawn) or level_of_any_repeat(config, at, rng)
        if level is None:
            break
        results.append(level)
        if not on_level(index, level):
            break
    return results


def _level_at(sweep: Sequence[LevelResult], concurrency: int) -> LevelResult | None:
    return next((level for level in sweep if level.concurrency == concurrency), None)


class ReplayLoadGenerator:
    """Stands in for the load generator: replays the recorded sweeps of the config last loaded."""

    def __init__(self, target: ReplayTarget) -> None:
        self.target = target

    def run_levels(
        self, levels: Sequence[float], on_level: Callable[[int, LevelResult], bool]
    ) -> list[LevelResult]:
        config, drawn = self.target.loaded()
        return replay_sweep(config, drawn, [int(level) for level in levels], on_level, self.target.rng)

    def measure(self, level: float) -> LevelResult:
        results = self.run_levels([level], lambda index, result: False)
        if not results:
            raise ConfigRejected(f"concurrency {level:g} was not recorded for this config")
        return results[0]


class RecordingTarget(ServingTarget):
    """What every replay target shares: no server, and the recording machine's cores and hardware.

    A replay lives with the measurements, not the servers: what it serves is a recording of measured
    levels. Subclasses keep the recording (``self.recording_path``, ``self.meta``) and answer loads.
    """

    name = "replay"
    capabilities = Capabilities(
        can_restart=True,
        gpu_metrics=False,
        shared_filesystem=False,
        serves_requests=False,
        same_machine=False,  # the recording's machine, not this one
    )

    def __init__(self, path: Path, meta: Mapping, seed: int | None) -> None:
        self.recording_path = path
        self.meta = meta
        self.rng = random.Random(seed)

    @property
    def grpc_url(self) -> str:
        return "replay"

    @property
    def http_url(self) -> str:
        return "replay"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def restart(self) -> None:
        pass

    def is_alive(self) -> bool:
        return True

    def server_version(self) -> str:
        return f"replay of {self.meta.get('server_version', '?')}"

    def cpu_cores(self) -> int:
        """The cores of the machine the recording was made on."""
        return int(self.meta.get("hardware", {}).get("cores") or 1)

    def hardware(self) -> dict:
        """The machine the recording was made on (the study's figures are that machine's)."""
        return dict(self.meta.get("hardware", {}))


class ReplayTarget(RecordingTarget):
    """A serving target that answers one model's study from a recorded surface instead of a server.

    :func:`optimizer.measurement.engines.make_load_generator` hands out its replayed sweeps.
    """

    def __init__(
        self, path: Path | str, seed: int | None = None, bad_starts: BadStarts | None = None
    ) -> None:
        self.surface = load_surface(path)
        super().__init__(self.surface.path, self.surface.meta, seed)
        self.bad_starts = bad_starts
        self._loaded: tuple[RecordedConfig, tuple[LevelResult, ...]] | None = None

    def check_model(self, sha256: str) -> None:
        """Refuse a study of another model than the one recorded."""
        recorded = self.surface.meta["model"]["sha256"]
        if sha256 != recorded:
            raise UsageError(
                f"the recording {str(self.surface.path)!r} is of another model (sha256 {recorded[:12]}…, "
                f"this one {sha256[:12]}…): replay it with the model it recorded"
            )

    def int8_recipes(self) -> tuple[str, ...]:
        """The recipe the recording's int8 configs were made with (recordings before recipes: the default)."""
        recorded = self.surface.meta.get("variants", {}).get("int8") or {}
        return (recorded.get("recipe") or DEFAULT_INT8_RECIPE,)

    def load_model(self, name: str, config_json: str, files: Mapping[str, Path]) -> float:
        key = config_digest(config_from_json(config_json))
        if key not in self.surface.configs:
            raise UsageError(
                f"this config is not in the recording {str(self.surface.path)!r}: search the space it "
                f"recorded (--space {self.surface.space_path})"
            )
        config = self.surface.configs[key]
        self._loaded = (config, draw_repeat(config, self.rng, self.bad_starts))
        return 0.0

    def loaded(self) -> tuple[RecordedConfig, tuple[LevelResult, ...]]:
        """The config last loaded and the repeat drawn for it."""
        if self._loaded is None:
            raise ConfigRejected("no config loaded")
        return self._loaded

    def recorded_levels(self) -> ReplayLoadGenerator:
        return ReplayLoadGenerator(self)

    def recorded_study(self) -> RecordedStudy:
        surface = self.surface
        name = surface.meta["model_name"]
        return RecordedStudy(surface.space_path, {name: (surface.model_path(), surface.shapes)})

    def recorded_mix(self) -> None:
        raise UsageError(
            "a recording of one model (--target replay:) answers that model's study only: replay a joint "
            "recording (bench/record_joint_surface.py), or tune the models on a server"
        )
