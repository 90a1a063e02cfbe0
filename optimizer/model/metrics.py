"""Accuracy as the user measures it: their data (``--accuracy-data``), their metric (``--accuracy-metric``)
and their goal (``--accuracy-goal``).

A metric is called as ``function(outputs, reference, data) -> float``, higher is better unless it says
otherwise: ``outputs`` the variant's outputs and ``reference`` fp32's on the same inputs (dicts of arrays
by output name, samples on the first axis), ``data`` the inputs with their labels. fp32's own score is
the metric of fp32's outputs against themselves, so a goal can name a floor (``f1>=85``) or a loss
relative to it (``f1>=fp32-0.5``, ``f1>=fp32-1%``, or ``f1>=-1%`` for short), the goal kinds of ONNX
Runtime's optimization tool (Olive): a threshold, a maximum degradation, absolute or in percent.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optimizer.errors import UsageError

__all__ = [
    "BUILTIN_METRICS",
    "AccuracyData",
    "Goal",
    "Metric",
    "load_accuracy_data",
    "parse_goal",
    "resolve_metric",
    "data_from_samples",
    "figure_text",
    "goal_metric",
]

Arrays = Mapping[str, np.ndarray]
MetricFunction = Callable[[Arrays, Arrays, Arrays], float]


class MetricError(ValueError):
    """A metric that cannot be computed on these outputs or data: what is missing, in one line."""


@dataclass(frozen=True)
class Metric:
    name: str
    function: MetricFunction
    higher_is_better: bool = True
    description: str = ""

    def __call__(self, outputs: Arrays, reference: Arrays, data: Arrays) -> float:
        return self.function(outputs, reference, data)


@dataclass(frozen=True)
class AccuracyData:
    """The inputs a guard runs (samples on the first axis) and the labels beside them."""

    inputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "the study's requests"
    sha256: str | None = None  # the file's content (a resumed study must be judged on the same data)

    @property
    def count(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Inputs and labels together: a metric's ``data``."""
        return {**self.inputs, **self.labels}

    def requests(self, batching: bool) -> list[dict[str, np.ndarray]]:
        """One request per sample ([1, ...] when the model batches)."""
        return [
            {name: (array[i : i + 1] if batching else array[i]) for name, array in self.inputs.items()}
            for i in range(self.count)
        ]


# --- built-in metrics ---------------------------------------------------------------------------------------


def _float_outputs(outputs: Arrays, min_ndim: int) -> list[tuple[str, np.ndarray]]:
    return [
        (name, array)
        for name, array in outputs.items()
        if np.issubdtype(array.dtype, np.floating) and array.ndim >= min_ndim
    ]


def _class_scores(outputs: Arrays, metric: str) -> tuple[str, np.ndarray]:
    found = _float_outputs(outputs, 2)
    if not found:
        raise MetricError(
            f"{metric} needs an output of class scores ([samples, ..., classes]); the model has none"
        )
    return found[0]


def _label(
    data: Arrays, names: Sequence[str], metric: str, inputs: Sequence[str], *, only_array: bool = False
) -> np.ndarray:
    """The label array under one of ``names``; ``only_array``: else the one array that is not an input."""
    for name in names:
        if name in data:
            return np.asarray(data[name])
    others = [n for n in data if n not in inputs]
    if only_array and len(others) == 1:
        return np.asarray(data[others[0]])
    raise MetricError(
        f"{metric} needs labels in --accuracy-data under {' and '.join(repr(n) for n in names)}; "
        f"it holds {', '.join(sorted(data)) or 'nothing'}"
    )


def top1_agreement(outputs: Arrays, reference: Arrays, data: Arrays) -> float:  # noqa: ARG001
    """The share of samples (and positions) whose top class is fp32's."""
    name, scores = _class_scores(outputs, "top1_agreement")
    return float(np.mean(np.argmax(scores, axis=-1) == np.argmax(reference[name], axis=-1)))


def _top1_accuracy(inputs: Sequence[str]) -> MetricFunction:
    def top1_accuracy(outputs: Arrays, reference: Arrays, data: Arrays) -> float:  # noqa: ARG001
        """The share of samples whose top class is the label."""
        _, scores = _class_scores(outputs, "top1_accuracy")
        labels = _label(data, ("labels", "label"), "top1_accuracy", inputs, only_array=True)
        predicted = np.argmax(scores, axis=-1)
        if labels.size != predicted.size:
            raise MetricError(
                f"top1_accuracy: the labels hold {labels.size} values for {predicted.size} predictions "
                f"(shape {list(labels.shape)} against {list(predicted.shape)})"
            )
        return float(np.mean(predicted.reshape(-1) == labels.reshape(-1)))

    return top1_accuracy


MAX_ANSWER_TOKENS = 30  # the SQuAD evaluation's longest answer span


def _span_logits(outputs: Arrays) -> tuple[np.ndarray, np.ndarray]:
    named = {n.lower(): a for n, a in outputs.items()}
    start = next((a for n, a in named.items() if "start" in n), None)
    end = next((a for n, a in named.items() if "end" in n), None)
    if start is None or end is None:
        two = _float_outputs(outputs, 2)
        if len(two) < 2:
            raise MetricError(
                "squad metrics need start and end logits ([samples, sequence]): outputs named start/end, "
                "or the first two outputs"
            )
        (_, start), (_, end) = two[:2]
    return start.reshape(start.shape[0], -1), end.reshape(end.shape[0], -1)


def _best_spans(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's span maximising start + end logits with start <= end < start + MAX_ANSWER_TOKENS."""
    length = start.shape[1]
    offsets = np.arange(length)
    allowed = (offsets[None, :] >= offsets[:, None]) & (
        offsets[None, :] - offsets[:, None] < MAX_ANSWER_TOKENS
    )
    scores = start[:, :, None] + end[:, None, :]
    scores = np.where(allowed[None], scores, -np.inf)
    flat = scores.reshape(scores.shape[0], -1).argmax(axis=1)
    return flat // length, flat % length


def _gold_spans(data: Arrays, count: int, inputs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    starts = _label(data, ("start_positions",), "squad metrics", inputs).reshape(-1)
    ends = _label(data, ("end_positions",), "squad metrics", inputs).reshape(-1)
    if starts.size != count or ends.size != count:
        raise MetricError(
            f"squad metrics: start_positions and end_positions hold {starts.size} and {ends.size} values "
            f"for {count} samples"
        )
    return starts.astype(np.int64), ends.astype(np.int64)


def _squad(inputs: Sequence[str], kind: str) -> MetricFunction:
    def score(outputs: Arrays, reference: Arrays, data: Arrays) -> float:  # noqa: ARG001
        start, end = _span_logits(outputs)
        predicted_start, predicted_end = _best_spans(start, end)
        gold_start, gold_end = _gold_spans(data, start.shape[0], inputs)
        if kind == "exact_match":
            return float(np.mean((predicted_start == gold_start) & (predicted_end == gold_end)) * 100)
        overlap = np.minimum(predicted_end, gold_end) - np.maximum(predicted_start, gold_start) + 1
        overlap = np.maximum(overlap, 0)
        precision = overlap / (predicted_end - predicted_start + 1)
        recall = overlap / np.maximum(gold_end - gold_start + 1, 1)
        f1 = np.where(overlap > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        return float(np.mean(f1) * 100)

    score.__name__ = f"squad_{kind}"
    return score


def _pooled_cosine(inputs: Sequence[str]) -> MetricFunction:
    mask_name = next((n for n in inputs if "mask" in n.lower()), None)

    def pooled_cosine(outputs: Arrays, reference: Arrays, data: Arrays) -> float:
        """Mean over samples of the cosine between the variant's and fp32's mean-pooled embeddings
        (tokens masked by the attention mask when the model has one)."""
        found = _float_outputs(outputs, 2)
        if not found:
            raise MetricError(
                "pooled_cosine needs an embedding output ([samples, tokens, hidden] or [samples, hidden])"
            )
        name, hidden = found[0]
        ours, theirs = _pool(hidden, data, mask_name), _pool(reference[name], data, mask_name)
        if not np.all(np.isfinite(ours)):  # an overflowed variant (fp16): no agreement to speak of
            return math.nan
        norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
        cosines = np.where(norms > 0, np.sum(ours * theirs, axis=1) / np.maximum(norms, 1e-30), 1.0)
        return float(np.mean(cosines))

    return pooled_cosine


def _pool(hidden: np.ndarray, data: Arrays, mask_name: str | None) -> np.ndarray:
    hidden = hidden.astype(np.float64)
    if hidden.ndim == 2:  # already one vector per sample
        return hidden
    hidden = hidden.reshape(hidden.shape[0], hidden.shape[1], -1)
    mask = np.ones(hidden.shape[:2])
    if mask_name is not None and mask_name in data:
        given = np.asarray(data[mask_name]).reshape(hidden.shape[0], -1)
        if given.shape[1] == hidden.shape[1]:
            mask = given.astype(np.float64)
    weights = mask[:, :, None]
    return np.sum(hidden * weights, axis=1) / np.maximum(np.sum(weights, axis=1), 1.0)


def max_abs_error(outputs: Arrays, reference: Arrays, data: Arrays) -> float:  # noqa: ARG001
    """The largest absolute difference from fp32 over every output (lower is better)."""
    errors = [
        float(np.max(np.abs(outputs[n].astype(np.float64) - reference[n].astype(np.float64)), initial=0.0))
        for n in reference
    ]
    return max(errors, default=0.0)


def builtin_metrics(inputs: Sequence[str] = ()) -> dict[str, Metric]:
    """The built-in metrics, for a model with these input names (the attention mask, the labels)."""
    return {
        "top1_agreement": Metric(
            "top1_agreement", top1_agreement, description="top-1 class agrees with fp32"
        ),
        "top1_accuracy": Metric(
            "top1_accuracy", _top1_accuracy(inputs), description="top-1 class is the label"
        ),
        "squad_exact_match": Metric(
            "squad_exact_match", _squad(inputs, "exact_match"), description="answer span exact match, %"
        ),
        "squad_f1": Metric("squad_f1", _squad(inputs, "f1"), description="answer span token F1, %"),
        "pooled_cosine": Metric(
            "pooled_cosine",
            _pooled_cosine(inputs),
            description="cosine of mean-pooled embeddings with fp32's",
        ),
        "max_abs_error": Metric(
            "max_abs_error", max_abs_error, higher_is_better=False, description="vs fp32"
        ),
    }


BUILTIN_METRICS = tuple(builtin_metrics())


def resolve_metric(spec: str, inputs: Sequence[str] = ()) -> Metric:
    """A built-in metric by name, or the user's ``module:function`` (or ``path/to/file.py:function``).

    Raises:
        UsageError: an unknown name, a module that does not import, no such function.
    """
    builtin = builtin_metrics(inputs)
    if spec in builtin:
        return builtin[spec]
    if ":" not in spec:
        raise UsageError(
            f"--accuracy-metric {spec!r} is not a built-in metric ({', '.join(BUILTIN_METRICS)}) nor "
            "module:function: name one of those, or your own function as module:function"
        )
    module_name, _, function_name = spec.rpartition(":")
    module = _import(module_name, spec)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(
            f"--accuracy-metric {spec!r}: {module_name} has no function {function_name!r}: define "
            f"{function_name}(outputs, reference, data) -> float there"
        )
    # A function may say lower is better (an error, a loss): ``function.higher_is_better = False``.
    higher = bool(getattr(function, "higher_is_better", True))
    return Metric(function_name, function, higher_is_better=higher, description=spec)


def _import(module_name: str, spec: str):
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or loader_spec.loader is None or not path.is_file():
                raise FileNotFoundError(f"no file {module_name}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            return module
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # a module beside the user, as `python -m` would find it
        return importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raises while importing
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"--accuracy-metric {spec!r}: {module_name} does not import ({type(exc).__name__}: {first}): "
            "check the module is on the path (run from its folder) or give path/to/file.py:function"
        ) from None


def score(metric: Metric, outputs: Arrays, reference: Arrays, data: Arrays) -> float:
    """``metric`` on these outputs, as a float.

    Raises:
        UsageError: the metric raised, or returned something that is not a finite number.
    """
    try:
        value = metric(outputs, reference, data)
    except MetricError as exc:
        raise UsageError(f"--accuracy-metric {metric.name}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's function
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UsageError(
            f"--accuracy-metric {metric.name} raised {type(exc).__name__}: {first} (called as "
            f"{metric.name}(outputs, reference, data) with dicts of arrays by name)"
        ) from None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UsageError(
            f"--accuracy-metric {metric.name} returned {type(value).__name__}, not a number: return a float"
        )
    return float(value)  # possibly NaN: a variant's NaN misses every goal; fp32's is refused by the guard


# --- goals -------------------------------------------------------------------------------------------------

_GOAL = re.compile(r"^\s*(?P<metric>[^<>=\s]+)\s*(?P<op>>=|<=)\s*(?P<bound>\S+)\s*$")
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# fp32's own score, optionally moved by an amount: fp32, fp32-0.5, fp32-1%, or -1% for short.
_RELATIVE = re.compile(
    rf"^(?:fp32(?:(?P<sign>[-+])(?P<amount>{_NUMBER})(?P<percent>%?))?|(?P<short>[-+])(?P<short_amount>{_NUMBER})%)$"
)


def goal_metric(text: str) -> str:
    """The metric a goal names (the text before its operator)."""
    match = _GOAL.match(text)
    return match["metric"] if match else text.strip()


@dataclass(frozen=True)
class Goal:
    """``metric >= bound`` (or ``<=``): a fixed bound, or fp32's own score less (more) an amount."""

    text: str
    metric: str
    op: str  # ">=" or "<=" (the metric's direction: >= where higher is better)
    value: float  # the threshold, or the amount fp32's score may move
    relative: str = ""  # "": a threshold; "abs": fp32's score -/+ value; "percent": fp32's score -/+ value %

    def bound(self, fp32: float) -> float:
        if not self.relative:
            return self.value
        amount = self.value if self.relative == "abs" else abs(fp32) * self.value / 100
        return fp32 - amount if self.op == ">=" else fp32 + amount

    def met(self, value: float, fp32: float) -> bool:
        """Whether ``value`` meets the goal (never when it is not a number)."""
        if not math.isfinite(value):
            return False
        bound = self.bound(fp32)
        return value >= bound - 1e-12 if self.op == ">=" else value <= bound + 1e-12


def parse_goal(text: str, metrics: Mapping[str, Metric]) -> Goal:
    """``NAME>=0.99``, ``NAME>=fp32-0.5``, ``NAME>=fp32-1%`` or ``NAME>=-1%`` (``<=`` and ``+`` for a
    metric where lower is better, such as ``max_abs_error<=0.05``).

    Raises:
        UsageError: the text is not a goal, names a metric the study does not compute, or points the
            wrong way for its metric.
    """
    match = _GOAL.match(text)
    if match is None:
        raise UsageError(
            f"--accuracy-goal {text!r} is not a goal: write NAME>=0.99 (a floor), NAME>=fp32-0.5 or "
            "NAME>=-1% (at most that much below fp32's own score)"
        )
    name, op, bound = match["metric"], match["op"], match["bound"]
    metric = metrics.get(name)
    if metric is None:
        hint = f"--accuracy-metric {name}" if name in BUILTIN_METRICS else f"--accuracy-metric module:{name}"
        raise UsageError(
            f"--accuracy-goal {text!r} names metric {name!r}, which the study does not compute: use one of "
            f"{', '.join(metrics) or 'the built-in metrics'}, or add {hint}"
        )
    wanted = ">=" if metric.higher_is_better else "<="
    if op != wanted:
        better = "higher" if metric.higher_is_better else "lower"
        raise UsageError(
            f"--accuracy-goal {text!r}: {name} is better {better}, so its goal is {name}{wanted}..."
        )
    relative = _RELATIVE.match(bound)
    if relative is not None:
        sign = relative["sign"] or relative["short"]
        amount = float(relative["amount"] or relative["short_amount"] or 0.0)
        if sign is not None and amount and (sign == "-") != (op == ">="):
            raise UsageError(
                f"--accuracy-goal {text!r}: a goal below fp32 is NAME>=fp32-X, one above it NAME<=fp32+X"
            )
        kind = "percent" if (relative["percent"] or relative["short"]) else "abs"
        return Goal(text.strip(), name, op, amount, kind)
    try:
        value = float(bound)
    except ValueError:
        raise UsageError(f"--accuracy-goal {text!r}: {bound!r} is not a number, fp32-X or -X%") from None
    if not math.isfinite(value):
        raise UsageError(f"--accuracy-goal {text!r}: the bound must be a finite number")
    if bound.startswith("-"):  # most often a loss without its %: say which was meant
        raise UsageError(
            f"--accuracy-goal {text!r}: a negative floor reads like a loss; write {name}>=fp32{bound} (at most "
            f"{bound[1:]} below fp32) or {name}>={bound}% (in percent)"
        )
    return Goal(text.strip(), name, op, value)


def figure_text(pair: Mapping[str, float], digits: int = 4) -> str:
    """A variant's score beside fp32's: ``86.3 (fp32 86.7, -0.4)``."""
    variant, fp32 = float(pair["variant"]), float(pair["fp32"])
    return f"{variant:.{digits}g} (fp32 {fp32:.{digits}g}, {variant - fp32:+.3g})"


# --- data ----------------------------------------------------------------------------------------------------


def load_accuracy_data(path: Path | str, inputs: Sequence[str], check_input) -> AccuracyData:
    """``--accuracy-data``: a .npz with one array per model input (samples on the first axis) and, under
    any other names, their labels. ``check_input(name, array)`` raises for an input the model cannot take.

    Raises:
        UsageError: a missing or unreadable file, a missing input, arrays of different sample counts.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--accuracy-data {str(path)!r} does not exist: give a .npz file (numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError) as exc:
        raise UsageError(
            f"--accuracy-data {str(path)!r} is not a .npz file of arrays (numpy.savez): {exc}"
        ) from exc
    missing = [name for name in inputs if name not in arrays]
    if missing:
        raise UsageError(
            f"--accuracy-data has no array for input {', '.join(missing)}: it needs one per model input "
            f"({', '.join(inputs)}), labels under other names"
        )
    counts = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        listed = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise UsageError(
            f"--accuracy-data arrays must hold the same number (>= 1) of samples on their first axis: {listed}"
        )
    for name in inputs:
        check_input(name, arrays[name])
    return AccuracyData(
        {n: arrays[n] for n in inputs},
        {n: a for n, a in arrays.items() if n not in inputs},
        str(path),
        hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def data_from_samples(samples: Sequence[Mapping[str, np.ndarray]], batching: bool) -> AccuracyData:
    """The study's own requests as metric data (no labels)."""
    names = list(samples[0])
    if batching:
        return AccuracyData({n: np.concatenate([s[n] for s in samples]) for n in names})
    return AccuracyData({n: np.stack([s[n] for s in samples]) for n in names})
