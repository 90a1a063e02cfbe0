"""Search spaces: validated YAML files under ``spaces/``, and the mapping from an Optuna trial to a Candidate.

A space is data. Loading one checks every key and value and names the field at fault. The space is
static (every trial suggests the same parameters) because Optuna's multivariate TPE models a static
space jointly; parameters that do not matter for a candidate (e.g. queue delay when the max batch size
is 1) are still suggested and simply do not change the rendered config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import SpaceError
from optimizer.model.quantize import DEFAULT_INT8_RECIPE

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "CPU_PROVIDERS",
    "GPU_PROVIDERS",
    "Candidate",
    "STARTING_POINT_NAMES",
    "SearchSpace",
    "baseline_params",
    "fit_params",
    "parse_starting_points",
    "profile_point",
    "starting_points",
    "grid_of",
    "load_space",
    "preferred_label",
    "space_from_dict",
    "suggest_candidate",
]

CPU_PROVIDERS = ("cpu", "openvino")
GPU_PROVIDERS = ("cuda", "tensorrt")
# fp32-fused: the fp32 graph after ONNX Runtime's transformer optimizer (attention, LayerNorm, GELU fusions).
PRECISIONS = ("fp32", "fp16", "int8", "fp32-fused")
GRAPH_LEVELS = ("default", "basic", "extended", "disabled")
# Session options the native onnxruntime backend reads from a config's parameters (its README), each a
# searchable dimension where a space lists more than its default (the first value).
EXECUTION_MODES = ("sequential", "parallel")  # parameters.execution_mode 0 / 1
CPU_MEM_ARENAS = ("enabled", "disabled")  # parameters.enable_mem_arena 1 / 0
# A sampled queue delay below this many microseconds means "no delay" (0): the log scale cannot hold 0.
NO_DELAY_BELOW_US = 10
# Preferred batch sizes are chosen relative to the max batch size: max, max/2, max/4.
PREFERRED_DIVISORS = (1, 2, 4)

# The spaces shipped with the package: the checkout's top-level spaces/, linked into the package as
# optimizer/spaces so that a wheel carries them and an editable install reads the checkout's files.
SPACES_DIR: Traversable = resources.files("optimizer") / "spaces"


@dataclass(frozen=True)
class Candidate:
    """One point of the joint space: everything needed to render a Triton model config."""

    provider: str = "cpu"
    precision: str = "fp32"
    max_batch_size: int = 1  # 0: the model cannot batch
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    instance_count: int = 1
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    graph_level: str = "default"
    execution_mode: str = "sequential"
    cpu_mem_arena: str = "enabled"
    # How the int8 file is made (optimizer.model.quantize): chosen per model before trials, not searched.
    int8_recipe: str = DEFAULT_INT8_RECIPE

    @property
    def dynamic_batching(self) -> bool:
        return self.max_batch_size > 1

    def summary(self) -> str:
        """One readable line, e.g. ``cpu fp32 mbs=8 pref=[8,4] delay=500us inst=2 thr=1``."""
        precision = self.precision
        if precision == "int8" and self.int8_recipe != DEFAULT_INT8_RECIPE:
            precision = f"int8:{self.int8_recipe}"
        parts = [self.provider, precision, f"mbs={self.max_batch_size}"]
        if self.dynamic_batching:
            pref = ",".join(str(size) for size in self.preferred_batch_sizes)
            parts += [f"pref=[{pref}]", f"delay={self.max_queue_delay_us}us"]
        parts += [f"inst={self.instance_count}", f"thr={self.intra_op_threads or 'auto'}"]
        if self.graph_level != "default":
            parts.append(f"graph={self.graph_level}")
        if self.execution_mode != "sequential":
            parts.append(f"exec={self.execution_mode}")
        if self.cpu_mem_arena != "enabled":
            parts.append("arena=off")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preferred_batch_sizes"] = list(self.preferred_batch_sizes)
        return data


@dataclass(frozen=True)
class IntRange:
    """A numeric field: every whole number in [low, high], or only ``choices`` when a space lists them.

    Listed choices are suggested as a categorical parameter; a recorded grid (bench/data) is one.
    """

    low: int
    high: int
    choices: tuple[int, ...] = ()

    def to_data(self) -> Any:
        return {"choices": list(self.choices)} if self.choices else [self.low, self.high]


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space."""

    name: str
    device: str  # "cpu" or "gpu"
    execution_providers: tuple[str, ...]
    precisions: tuple[str, ...]
    max_batch_size: IntRange  # powers of two
    preferred_batch_sizes: bool
    max_queue_delay_us: IntRange
    instance_count: IntRange
    intra_op_threads: IntRange
    graph_levels: tuple[str, ...] = ("default",)
    execution_modes: tuple[str, ...] = ("sequential",)
    cpu_mem_arenas: tuple[str, ...] = ("enabled",)
    # False: instances x threads never exceed the cores; the threads are derived from the instance count
    # (see derived_threads) and the instance count is capped at the cores. True: both are searched as given,
    # oversubscribed points included.
    oversubscribe: bool = True
    # Listed sets of preferred batch sizes, as divisors of the max batch size ((): none). Empty: the
    # ``preferred_batch_sizes`` flag decides (one yes/no parameter per divisor in PREFERRED_DIVISORS).
    preferred_sets: tuple[tuple[int, ...], ...] = ()
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved space, as stored in the study."""
        return {
            "name": self.name,
            "device": self.device,
            "execution_providers": list(self.execution_providers),
            "precisions": list(self.precisions),
            "max_batch_size": self.max_batch_size.to_data(),
            "preferred_batch_sizes": (
                [list(divisors) for divisors in self.preferred_sets]
                if self.preferred_sets
                else self.preferred_batch_sizes
            ),
            "max_queue_delay_us": self.max_queue_delay_us.to_data(),
            "instance_count": self.instance_count.to_data(),
            "intra_op_threads": self.intra_op_threads.to_data(),
            "graph_levels": list(self.graph_levels),
            "oversubscribe": self.oversubscribe,
            # Only when searched: a study stored before these fields existed resolves to the same space.
            **({"execution_modes": list(self.execution_modes)} if len(self.execution_modes) > 1 else {}),
            **({"cpu_mem_arenas": list(self.cpu_mem_arenas)} if len(self.cpu_mem_arenas) > 1 else {}),
        }


_KEYS = {
    "name",
    "description",
    "device",
    "execution_providers",
    "precisions",
    "max_batch_size",
    "preferred_batch_sizes",
    "max_queue_delay_us",
    "instance_count",
    "intra_op_threads",
    "graph_levels",
    "execution_modes",
    "cpu_mem_arenas",
    "oversubscribe",
}


def load_space(name_or_path: str) -> SearchSpace:
    """Load a space by name (``cpu`` -> ``spaces/cpu.yaml``) or by path, validated."""
    import yaml  # here, not at the top: the command line imports this module for --help

    path = _space_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"space file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:
        raise SpaceError(f"space file {str(path)!r} cannot be read: {exc.strerror}") from exc
    if not isinstance(data, dict):
        raise SpaceError(f"space file {str(path)!r} must hold a mapping of fields, got {type(data).__name__}")
    data.setdefault("name", Path(path.name).stem)
    return space_from_dict(data, source=str(path))


def _space_path(name_or_path: str) -> Path | Traversable:
    candidate = Path(name_or_path)
    looks_like_path = candidate.suffix in (".yaml", ".yml") or "/" in name_or_path or candidate.is_file()
    if looks_like_path:
        if candidate.is_dir():
            raise SpaceError(f"space file {name_or_path!r} is a directory, not a file: give the .yaml file")
        if not candidate.is_file():
            raise SpaceError(f"space file {name_or_path!r} does not exist: check the path")
        return candidate
    bundled = SPACES_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        names = sorted(p.name.removesuffix(".yaml") for p in SPACES_DIR.iterdir() if p.name.endswith(".yaml"))
        raise SpaceError(
            f"no space named {name_or_path!r}: use one of {', '.join(names)} or a path to a .yaml file"
        )
    return bundled


def space_from_dict(data: dict[str, Any], *, source: str = "") -> SearchSpace:
    """Validate a space given as a mapping; raise :class:`SpaceError` naming the bad field."""
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise SpaceError(
            f"space has unknown field(s) {', '.join(unknown)}: allowed fields are {', '.join(sorted(_KEYS))}"
        )
    device = _choice(data, "device", ("cpu", "gpu"), default="cpu")
    default_provider = "cpu" if device == "cpu" else "cuda"
    providers = _choices(
        data, "execution_providers", GPU_PROVIDERS + CPU_PROVIDERS, default=[default_provider]
    )
    gpu_providers = [p for p in providers if p in GPU_PROVIDERS]
    if device == "cpu" and gpu_providers:
        raise SpaceError(
            f"execution_providers lists the GPU provider {gpu_providers[0]!r} in a cpu space: set device: gpu"
        )
    space = SearchSpace(
        name=str(data.get("name", "custom")),
        device=device,
        execution_providers=providers,
        precisions=_choices(data, "precisions", PRECISIONS, default=["fp32"]),
        max_batch_size=_power_of_two_range(data, "max_batch_size", default=(1, 16)),
        preferred_batch_sizes=_preferred_flag(data),
        max_queue_delay_us=_int_range(data, "max_queue_delay_us", minimum=0, default=(0, 10000)),
        instance_count=_int_range(data, "instance_count", minimum=1, default=(1, 2)),
        intra_op_threads=_int_range(data, "intra_op_threads", minimum=0, default=(0, 0)),
        graph_levels=_choices(data, "graph_levels", GRAPH_LEVELS, default=["default"]),
        execution_modes=_choices(data, "execution_modes", EXECUTION_MODES, default=["sequential"]),
        cpu_mem_arenas=_choices(data, "cpu_mem_arenas", CPU_MEM_ARENAS, default=["enabled"]),
        preferred_sets=_preferred_sets(data),
        oversubscribe=_oversubscribe(data, device),
        source=source,
    )
    _check_holds_baseline(space)
    _check_threads_are_derived(space)
    return space


def _oversubscribe(data: dict[str, Any], device: str) -> bool:
    # On CPU the instances share the cores: unless the space asks, none is given more threads than its
    # share. A GPU space searches instances as given (its CPU threads matter little).
    value = data.get("oversubscribe", device != "cpu")
    if not isinstance(value, bool):
        raise SpaceError(f"oversubscribe must be true or false, got {value!r}")
    return value


def _check_threads_are_derived(space: SearchSpace) -> None:
    threads = space.intra_op_threads
    if not space.oversubscribe and (threads.high > 0 or any(threads.choices)):
        raise SpaceError(
            f"intra_op_threads {threads.to_data()} is searched, but with oversubscribe: false each instance's "
            "threads are derived from the cores (cores / instances): drop intra_op_threads, or set "
            "oversubscribe: true to search threads and instances freely, oversubscribed points included"
        )


def _check_holds_baseline(space: SearchSpace) -> None:
    # Trial 0 is the untuned config; it must be a point of the space so the sampler can learn from it.
    rules = [
        (space.max_batch_size.low == 1, f"max_batch_size must start at 1, not {space.max_batch_size.low}"),
        (space.instance_count.low == 1, f"instance_count must start at 1, not {space.instance_count.low}"),
        (
            space.intra_op_threads.low == 0,
            f"intra_op_threads must start at 0 (ONNX Runtime's default), not {space.intra_op_threads.low}",
        ),
        (
            not space.preferred_sets or () in space.preferred_sets,
            "preferred_batch_sizes must list [] (no preferred sizes) among its sets",
        ),
        ("fp32" in space.precisions, f"precisions must include fp32, got {list(space.precisions)}"),
        (
            "default" in space.graph_levels,
            f"graph_levels must include default, got {list(space.graph_levels)}",
        ),
        (
            "sequential" in space.execution_modes,
            f"execution_modes must include sequential, got {list(space.execution_modes)}",
        ),
        (
            "enabled" in space.cpu_mem_arenas,
            f"cpu_mem_arenas must include enabled, got {list(space.cpu_mem_arenas)}",
        ),
    ]
    for holds, rule in rules:
        if not holds:
            raise SpaceError(f"{rule}, so the baseline (untuned) config is part of the space")


def _choice(data: dict[str, Any], key: str, allowed: tuple[str, ...], *, default: str) -> str:
    value = data.get(key, default)
    if value not in allowed:
        raise SpaceError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _choices(
    data: dict[str, Any], key: str, allowed: tuple[str, ...], *, default: list[str]
) -> tuple[str, ...]:
    value = data.get(key, default)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SpaceError(f"{key} must be a non-empty list drawn from {', '.join(allowed)}, got {value!r}")
    for item in value:
        if item not in allowed:
            raise SpaceError(f"{key} has {item!r}, which is not one of {', '.join(allowed)}")
    if len(set(value)) != len(value):
        raise SpaceError(f"{key} lists a value twice: {value!r}")
    return tuple(str(v) for v in value)


PREFERRED_RULE = (
    "preferred_batch_sizes must be true, false, or a list of sets of divisors of the max batch size "
    "drawn from 1, 2, 4 (e.g. [[], [1], [1, 2]]: none, max, max and max/2)"
)


def _preferred_flag(data: dict[str, Any]) -> bool:
    value = data.get("preferred_batch_sizes", True)
    if isinstance(value, list):
        return True
    if not isinstance(value, bool):
        raise SpaceError(f"{PREFERRED_RULE}, got {value!r}")
    return value


def _preferred_sets(data: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    value = data.get("preferred_batch_sizes", True)
    if not isinstance(value, list):
        return ()
    sets = []
    for item in value:
        if not isinstance(item, list) or not all(d in PREFERRED_DIVISORS for d in item):
            raise SpaceError(f"{PREFERRED_RULE}, got {value!r}")
        sets.append(tuple(sorted(set(item))))
    if not sets or len(set(sets)) != len(sets):
        raise SpaceError(f"{PREFERRED_RULE} (non-empty, each set once), got {value!r}")
    return tuple(sets)


def preferred_label(divisors: tuple[int, ...]) -> str:
    """The categorical value naming a set of divisors: ``()`` -> "none", ``(1, 2)`` -> "max,max/2"."""
    return ",".join("max" if d == 1 else f"max/{d}" for d in divisors) or "none"


def _int_range(data: dict[str, Any], key: str, *, minimum: int, default: tuple[int, int]) -> IntRange:
    value = data.get(key, list(default))
    if isinstance(value, dict):
        return _int_choices(key, value, minimum)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise SpaceError(f"{key} must be a [low, high] pair of whole numbers, got {value!r}")
    low, high = value
    if low < minimum:
        raise SpaceError(f"{key} must not go below {minimum}, got low={low}")
    if high < low:
        raise SpaceError(f"{key} is an empty range: high ({high}) is below low ({low})")
    return IntRange(low, high)


def _int_choices(key: str, value: dict[str, Any], minimum: int) -> IntRange:
    choices = value.get("choices")
    rule = f"{key} must be a [low, high] pair or {{choices: [whole numbers]}}"
    if (
        set(value) != {"choices"}
        or not isinstance(choices, list)
        or not choices
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in choices)
    ):
        raise SpaceError(f"{rule}, got {value!r}")
    if len(set(choices)) != len(choices):
        raise SpaceError(f"{key} lists a choice twice: {choices!r}")
    if min(choices) < minimum:
        raise SpaceError(f"{key} must not go below {minimum}, got {min(choices)}")
    ordered = tuple(sorted(choices))
    return IntRange(ordered[0], ordered[-1], ordered)


def _power_of_two_range(data: dict[str, Any], key: str, *, default: tuple[int, int]) -> IntRange:
    span = _int_range(data, key, minimum=1, default=default)
    for bound in span.choices or (span.low, span.high):
        if bound & (bound - 1):
            raise SpaceError(f"{key} values must be powers of two, got {bound}")
    return span


# --- from an Optuna trial to a candidate -------------------------------------------------------------


def derived_threads(instances: int, cores: int) -> int:
    """Intra-op threads per instance when the instances share ``cores`` without oversubscribing them.

    One instance keeps ONNX Runtime's default (a thread per core: the untuned baseline); ``k`` instances
    get ``cores // k`` each (at least one).
    """
    return 0 if instances == 1 else max(1, cores // instances)


def instance_span(space: SearchSpace, cores: int) -> IntRange:
    """The instance counts ``space`` searches on ``cores`` cores: capped at the cores unless it oversubscribes."""
    span = space.instance_count
    if space.oversubscribe:
        return span
    if span.choices:
        kept = tuple(c for c in span.choices if c <= cores) or (span.choices[0],)
        return IntRange(kept[0], kept[-1], kept)
    return IntRange(span.low, max(span.low, min(span.high, cores)))


def suggest_candidate(trial: Any, space: SearchSpace, *, batching: bool, cores: int) -> Candidate:
    """Ask ``trial`` (an ``optuna.Trial``) for every parameter of ``space`` and build the Candidate.

    ``cores``: the CPU cores the server may use (the threads of a space that does not oversubscribe
    are derived from them).
    """
    provider = _categorical(trial, "execution_provider", space.execution_providers)
    precision = _categorical(trial, "precision", space.precisions)
    max_batch = _suggest_max_batch(trial, space.max_batch_size)
    divisors = _suggest_preferred(trial, space)
    delay = _suggest_delay(trial, space.max_queue_delay_us)
    instances = _suggest_int(trial, "instance_count", instance_span(space, cores))
    if space.oversubscribe:
        threads = _suggest_int(trial, "intra_op_threads", space.intra_op_threads)
    else:
        threads = derived_threads(instances, cores)
    graph_level = _categorical(trial, "graph_level", space.graph_levels)
    execution_mode = _categorical(trial, "execution_mode", space.execution_modes)
    cpu_mem_arena = _categorical(trial, "cpu_mem_arena", space.cpu_mem_arenas)
    if not batching:
        max_batch = 0
    sizes = tuple(sorted({max_batch // d for d in divisors if max_batch // d > 1}, reverse=True))
    return Candidate(
        provider=provider,
        precision=precision,
        max_batch_size=max_batch,
        preferred_batch_sizes=sizes if max_batch > 1 else (),
        max_queue_delay_us=delay if max_batch > 1 else 0,
        instance_count=instances,
        intra_op_threads=threads,
        graph_level=graph_level,
        execution_mode=execution_mode,
        cpu_mem_arena=cpu_mem_arena,
    )


def _categorical(trial: Any, name: str, choices: tuple[str, ...]) -> str:
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))


def _suggest_int(trial: Any, name: str, span: IntRange) -> int:
    if span.choices:
        return int(trial.suggest_categorical(name, list(span.choices)))
    return int(trial.suggest_int(name, span.low, span.high))


def _suggest_max_batch(trial: Any, span: IntRange) -> int:
    if span.choices:
        return int(trial.suggest_categorical("max_batch_size", list(span.choices)))
    # Powers of two on a log scale: 1, 2, 4, ... are equally likely a priori.
    return 2 ** trial.suggest_int("max_batch_size_log2", int(math.log2(span.low)), int(math.log2(span.high)))


def _suggest_preferred(trial: Any, space: SearchSpace) -> tuple[int, ...]:
    """The divisors of the max batch size that are preferred batch sizes."""
    if space.preferred_sets:
        labels = {preferred_label(divisors): divisors for divisors in space.preferred_sets}
        return labels[trial.suggest_categorical("preferred_batch_sizes", list(labels))]
    if not space.preferred_batch_sizes:
        return ()
    return tuple(
        d for d in PREFERRED_DIVISORS if trial.suggest_categorical(f"prefer_max_div_{d}", [False, True])
    )


def _suggest_delay(trial: Any, span: IntRange) -> int:
    if span.choices:
        return int(trial.suggest_categorical("max_queue_delay_us", list(span.choices)))
    if span.high == 0:
        return 0
    low = max(span.low, 1)
    value = trial.suggest_int("max_queue_delay_us", low, span.high, log=True)
    return 0 if span.low == 0 and value < NO_DELAY_BELOW_US else value


def baseline_params(space: SearchSpace) -> dict[str, Any]:
    """The parameters of the untuned config (1 instance, no dynamic batching, fp32, default provider)."""
    params: dict[str, Any] = {"instance_count": 1}
    if space.oversubscribe:
        params["intra_op_threads"] = 0
    if space.max_batch_size.choices:
        params["max_batch_size"] = 1
    else:
        params["max_batch_size_log2"] = 0
    if len(space.execution_providers) > 1:
        params["execution_provider"] = space.execution_providers[0]
    if len(space.precisions) > 1:
        params["precision"] = "fp32"
    if len(space.graph_levels) > 1:
        params["graph_level"] = "default"
    if len(space.execution_modes) > 1:
        params["execution_mode"] = "sequential"
    if len(space.cpu_mem_arenas) > 1:
        params["cpu_mem_arena"] = "enabled"
    if space.preferred_sets:
        params["preferred_batch_sizes"] = preferred_label(())
    elif space.preferred_batch_sizes:
        params.update({f"prefer_max_div_{d}": False for d in PREFERRED_DIVISORS})
    if space.max_queue_delay_us.choices:
        params["max_queue_delay_us"] = space.max_queue_delay_us.low
    elif space.max_queue_delay_us.high > 0:
        params["max_queue_delay_us"] = max(space.max_queue_delay_us.low, 1)
    return params


STARTING_POINT_NAMES = ("variants", "batching", "batching-lowp")


def parse_starting_points(text: str) -> tuple[str, ...]:
    """``variants,batching`` as names; ``none`` (or nothing) for no starting points."""
    names = tuple(name.strip() for name in text.split(",") if name.strip() and name.strip() != "none")
    unknown = [name for name in names if name not in STARTING_POINT_NAMES]
    if unknown:
        raise SpaceError(
            f"unknown starting point {unknown[0]!r}: use {', '.join(STARTING_POINT_NAMES)} or none"
        )
    return names


def starting_points(
    space: SearchSpace, names: tuple[str, ...], *, precision_order: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Well-known good configs to measure early, by name; each is the baseline with some fields changed.

    ``variants``: one batching config (below) per execution provider x precision, so that no variant is
    written off on a random draw that gave it poor batching or threads; ``batching``: the largest max
    batch size, preferring it, a short queue delay; ``batching-lowp``: the same with the lowest precision
    in the space (int8, else fp16). ``precision_order`` (e.g. fastest in process first) orders the
    variants; by default the space's order.
    """
    points: list[dict[str, Any]] = []
    for name in names:
        if name not in STARTING_POINT_NAMES:
            raise SpaceError(f"unknown starting point {name!r}: use {', '.join(STARTING_POINT_NAMES)}")
        for variant in _variants_of(space, name, precision_order or space.precisions):
            params = {**baseline_params(space), **_batching_params(space), **variant}
            if params not in points and params != baseline_params(space):
                points.append(params)
    return points


def profile_point(space: SearchSpace, precision: str, batch: int) -> dict[str, Any] | None:
    """The batching starting point at ``precision`` with the largest power of two up to ``batch`` as the
    max batch size: where the in-process profile found the model fast. None when it is the baseline."""
    if precision not in space.precisions:
        return None
    span = space.max_batch_size
    allowed = span.choices or tuple(2**k for k in range(span.low.bit_length() - 1, span.high.bit_length()))
    size = max((b for b in allowed if b <= max(batch, 1)), default=span.low)
    params = baseline_params(space)
    if size > 1:  # a batch of one: the baseline's batching, only the variant changes
        params.update(_batching_params(space))
        if span.choices:
            params["max_batch_size"] = size
        else:
            params["max_batch_size_log2"] = int(math.log2(size))
    if len(space.precisions) > 1:
        params["precision"] = precision
    return None if params == baseline_params(space) else params


def _variants_of(space: SearchSpace, name: str, precisions: tuple[str, ...]) -> list[dict[str, Any]]:
    """The provider/precision parameters each named starting point is measured with."""
    if name == "batching":
        return [{}]
    if name == "batching-lowp":
        low = [p for p in ("int8", "fp16") if p in space.precisions]
        return [{"precision": low[0]}] if low else []
    variants = []
    for provider in space.execution_providers:
        for precision in precisions:
            variant: dict[str, Any] = {}
            if len(space.execution_providers) > 1:
                variant["execution_provider"] = provider
            if len(space.precisions) > 1:
                variant["precision"] = precision
            variants.append(variant)
    return variants


def _batching_params(space: SearchSpace) -> dict[str, Any]:
    span = space.max_batch_size
    params: dict[str, Any] = (
        {"max_batch_size": span.high} if span.choices else {"max_batch_size_log2": int(math.log2(span.high))}
    )
    if space.preferred_sets:
        if (1,) in space.preferred_sets:
            params["preferred_batch_sizes"] = preferred_label((1,))
    elif space.preferred_batch_sizes:
        params["prefer_max_div_1"] = True
    delay = space.max_queue_delay_us
    if delay.choices:
        params["max_queue_delay_us"] = min((d for d in delay.choices if d > 0), default=0)
    elif delay.high > 0:
        params["max_queue_delay_us"] = min(max(delay.low, 1000), delay.high)  # 1 ms: a common first choice
    return params


def grid_of(space: SearchSpace, *, batching: bool = True, cores: int) -> dict[str, list[Any]]:
    """Every value of every parameter ``suggest_candidate`` asks for: the search space of a grid.

    Only spaces whose queue delay is listed (``{choices: …}``) or fixed at 0 have a grid; a log-scale
    range of delays has thousands of values.
    """
    delay = space.max_queue_delay_us
    if not delay.choices and delay.high > 0:
        raise SpaceError("a grid needs max_queue_delay_us as {choices: [...]} (or 0), not a range")
    recorder = _GridRecorder()
    suggest_candidate(recorder, space, batching=batching, cores=cores)
    return recorder.params


class _GridRecorder:
    """Stands in for an Optuna trial and notes the values each suggestion could take."""

    def __init__(self) -> None:
        self.params: dict[str, list[Any]] = {}

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        self.params[name] = list(choices)
        return choices[0]

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> int:
        self.params[name] = list(range(low, high + 1))
        return low


def fit_params(
    space: SearchSpace, params: dict[str, Any], *, batching: bool = True, cores: int
) -> dict[str, Any] | None:
    """``params`` cut to what ``space`` asks for, or None when one is missing or outside the space.

    Used to enqueue another study's configs (warm start): only those this space can propose are kept.
    """
    checker = _ParamChecker(params)
    suggest_candidate(checker, space, batching=batching, cores=cores)
    return checker.fitted if checker.fits else None


class _ParamChecker:
    """Stands in for an Optuna trial, answering from ``params`` and noting whether each value fits."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.fitted: dict[str, Any] = {}
        self.fits = True

    def _take(self, name: str, allowed) -> Any:
        value = self.params.get(name)
        if name not in self.params or not allowed(value):
            self.fits = False
            return None
        self.fitted[name] = value
        return value

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        value = self._take(name, lambda v: v in choices)
        return value if value is not None else choices[0]

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> int:
        value = self._take(name, lambda v: isinstance(v, int) and low <= v <= high)
        return value if value is not None else low
