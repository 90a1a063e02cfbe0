"""Recorded joint surfaces, and the replay target that serves a joint study from one.

A joint recording (``bench/record_joint_surface.py``) measured every joint config of a finite space (each
model's config, all loaded together) under the mixed load, each at least twice, on a real server.
``--target replay:DIR`` then runs a joint study without a server, as a recording of one model does
(:mod:`optimizer.measurement.replay`): loading the models notes each one's rendered config, and
measuring the mix replays a level of one of the joint config's recorded sweeps (a repeat drawn at random
per trial). Feasibility and the mix's throughput are worked out again from the recorded per-model figures,
so a replay may use other budgets than the recording did; the traffic mix must be the recorded one (it
changed what each model was sent). Nothing is interpolated: a joint config outside the recording is an
error that names the recording's space.

Files: ``meta.json`` (``"kind": "joint"``, the models and how to rebuild them, the traffic, the budgets,
the machine), ``space.yaml`` (each model's space), ``outcomes.csv`` (one row per joint config per repeat)
and ``levels.csv`` (one row per model per measured level per repeat).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from optimizer.config.render import config_digest, config_from_json
from optimizer.errors import UsageError
from optimizer.measurement.levels import LevelResult
from optimizer.measurement.mixed import MixLevel, mix_throughput, shares_of
from optimizer.measurement.replay import (
    Recording,
    RecordingTarget,
    build_recorded_model,
    draw_sweep,
    level_of_any_repeat,
    open_recording,
    read_outcomes,
    read_rows,
    recorded_level,
)
from optimizer.serving.base import RecordedStudy

__all__ = [
    "JointRecordedConfig",
    "JointReplayTarget",
    "JointSurface",
    "OUTCOME_FIELDS",
    "LEVEL_FIELDS",
    "is_joint_recording",
    "joint_key",
    "load_joint_surface",
]

OUTCOME_FIELDS = ("joint_key", "repeat", "state", "reason", "candidates", "trial_s", "configs")
LEVEL_FIELDS = (
    "joint_key",
    "repeat",
    "clients",
    "model",
    "throughput",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "requests",
    "duration_s",
)

RecordedSweep = tuple[tuple[int, Mapping[str, LevelResult]], ...]  # (clients, each model's figures) per level


def joint_key(digests: Mapping[str, str]) -> str:
    """The key of a joint config: every model's config digest, by model name."""
    text = json.dumps(sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JointRecordedConfig:
    """One joint config of a recording: its sweeps (one per repeat) and the reason of each failed repeat."""

    key: str
    candidates: Mapping[str, str]  # each model's config in one line
    configs: Mapping[str, Mapping]  # each model's rendered config (model_config.proto as JSON)
    sweeps: tuple[RecordedSweep, ...]
    failures: tuple[str, ...]


@dataclass(frozen=True)
class JointSurface(Recording):
    """A joint recording: every joint config measured, with the models, mix and budgets it was made with."""

    configs: Mapping[str, JointRecordedConfig]

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(self.meta["models"])

    @property
    def traffic(self) -> dict[str, float]:
        return {name: float(weight) for name, weight in self.meta["traffic"].items()}

    @property
    def latency_budgets_ms(self) -> dict[str, float]:
        return {name: float(ms) for name, ms in self.meta["latency_budgets_ms"].items()}

    def model_path(self, name: str) -> Path:
        """The recorded model ``name``, rebuilt into the cache (named as it was recorded)."""
        model = self.meta["models"][name]
        return build_recorded_model(name, model["builder"], model.get("args", {}))

    def shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """The shapes (dynamic dims) the model's requests were recorded with."""
        return {tensor: tuple(dims) for tensor, dims in self.meta["models"][name].get("shapes", {}).items()}


def is_joint_recording(path: Path | str) -> bool:
    """Whether ``path`` holds a joint recording (else it is one model's, or not a recording at all)."""
    meta = Path(path) / "meta.json"
    try:
        return json.loads(meta.read_text()).get("kind") == "joint"
    except (OSError, ValueError, AttributeError):
        return False


def load_joint_surface(path: Path | str) -> JointSurface:
    """Read a joint recording directory."""
    path, meta = open_recording(
        path, "a joint recording", "bench/record_joint_surface.py", "bench/data/joint"
    )
    levels: dict[tuple[str, int], dict[int, dict[str, LevelResult]]] = defaultdict(lambda: defaultdict(dict))
    for row in read_rows(path / "levels.csv"):
        clients = int(row["clients"])
        levels[(row["joint_key"], int(row["repeat"]))][clients][row["model"]] = recorded_level(row, clients)

    def sweep(key: str, repeat: int) -> RecordedSweep:
        return tuple(sorted(levels.get((key, repeat), {}).items()))

    configs = {
        key: JointRecordedConfig(
            key, json.loads(row["candidates"]), json.loads(row["configs"]), sweeps, failures
        )
        for key, (row, sweeps, failures) in read_outcomes(path, "joint_key", sweep).items()
    }
    return JointSurface(path=path, meta=meta, configs=configs)


class JointReplayTarget(RecordingTarget):
    """A serving target that answers a joint study from a joint recording instead of a server.

    :func:`optimizer.measurement.engines.make_mix_source` hands out its :meth:`measure_mix`.
    """

    def __init__(self, path: Path | str, seed: int | None = None) -> None:
        self.surface = load_joint_surface(path)
        super().__init__(self.surface.path, self.surface.meta, seed)
        self._digests: dict[str, str] = {}
        self._drawn: tuple[JointRecordedConfig, RecordedSweep] | None = None

    def check_model(self, sha256: str) -> None:
        """Refuse a model the recording does not hold."""
        recorded = {model["sha256"] for model in self.meta["models"].values()}
        if sha256 not in recorded:
            raise UsageError(
                f"the recording {str(self.surface.path)!r} holds other models "
                f"({', '.join(self.surface.model_names)}): replay it with the models it recorded"
            )

    def load_model(self, name: str, config_json: str, files: Mapping[str, Path]) -> float:
        self._digests[name] = config_digest(config_from_json(config_json))
        self._drawn = None  # the next measurement draws a repeat of the joint config now loaded
        return 0.0

    def recorded_levels(self) -> None:
        raise UsageError(
            "this recording is of several models tuned together: replay it without --model, as a joint study"
        )

    def recorded_mix(self) -> Callable[[int, Mapping[str, float], Mapping[str, float]], MixLevel | None]:
        return self.measure_mix

    def measure_mix(
        self, clients: int, shares: Mapping[str, float], budgets_ms: Mapping[str, float]
    ) -> MixLevel | None:
        """The recorded level at ``clients`` of the loaded joint config; None where no repeat reached it."""
        self.check_traffic(shares)
        config, drawn = self._loaded()
        results = dict(drawn).get(clients) or level_of_any_repeat(
            config, lambda sweep: dict(sweep).get(clients), self.rng
        )
        if results is None:
            return None
        over = tuple(name for name in shares if results[name].p99_ms > budgets_ms[name])
        return MixLevel(clients, results, mix_throughput(results, shares), over)

    def recorded_study(self) -> RecordedStudy:
        surface = self.surface
        return RecordedStudy(
            surface.space_path,
            {name: (surface.model_path(name), surface.shapes(name)) for name in surface.model_names},
            joint=True,
            traffic=surface.traffic,
            latency_budgets_ms=surface.latency_budgets_ms,
        )

    def check_traffic(self, shares: Mapping[str, float]) -> None:
        """Refuse another traffic mix than the recorded one."""
        recorded = shares_of(self.surface.traffic)
        same = recorded.keys() == shares.keys() and all(
            math.isclose(recorded[name], shares[name]) for name in recorded
        )
        if not same:
            mix = ", ".join(f"{name}={weight:g}" for name, weight in self.surface.traffic.items())
            raise UsageError(
                f"the recording {str(self.surface.path)!r} was measured in the traffic mix {mix}: "
                "replay it in that mix (another mix sends each model other requests)"
            )

    def _loaded(self) -> tuple[JointRecordedConfig, RecordedSweep]:
        """The joint config loaded and the repeat drawn for it (drawn at its first measurement)."""
        if self._drawn is None:
            every_model = set(self._digests) == set(self.surface.model_names)
            config = self.surface.configs.get(joint_key(self._digests)) if every_model else None
            if config is None:
                raise UsageError(
                    f"this joint config is not in the recording {str(self.surface.path)!r}: search the "
                    f"space it recorded (--space {self.surface.space_path})"
                )
            self._drawn = (config, draw_sweep(config, self.rng))
        return self._drawn
