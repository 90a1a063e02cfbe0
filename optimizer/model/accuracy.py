"""The accuracy guard: a precision variant is served only if its outputs stay close to the fp32 model's.

Both models run on the same inputs (the user's ``--input-data`` or realistic synthetic inputs) with ONNX
Runtime: the fp32 reference on the CPU, the variant on the provider that will serve it (CUDA or TensorRT
for a GPU space) when that provider loads here, else on the CPU, and the report says which ran it (the
CPU cannot show an fp16 overflow on the GPU). On TensorRT the variant runs in the mode that serves it:
fp16 as TensorRT's FP16 mode (with the LayerNorm fp32 fallback the served config has), int8 in its INT8
mode. The gate is cosine similarity, per output and per sample: a variant passes when
``1 - cosine <= tolerance`` everywhere. Max absolute and relative errors and, for classifier-like outputs
(``[batch, classes]``), top-1 agreement are recorded beside it.

With the user's metrics (:mod:`optimizer.model.metrics`) the guard also scores fp32 and the variant on the
accuracy data, and with goals the goals decide instead of the cosine rule (:class:`AccuracyGuard`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from optimizer.errors import UsageError
from optimizer.model.metrics import AccuracyData, Goal, Metric, data_from_samples, figure_text, score

__all__ = ["AccuracyGuard", "AccuracyReport", "check_variant", "compare_outputs"]

MAX_SAMPLES = 64

Outputs = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class AccuracyReport:
    precision: str
    cosine: float  # worst cosine similarity over outputs and samples
    max_abs: float
    max_rel: float  # max_abs relative to the largest reference magnitude of that output
    top1: float | None  # worst top-1 agreement over classifier-like outputs, if any
    samples: int
    tolerance: float
    provider: str = "cpu"  # the provider the variant ran on
    wanted: str = "cpu"  # the provider that will serve it (the guard fell back to the CPU if they differ)
    # The user's metrics on the accuracy data: {name: {"fp32": score, "variant": score}}, and each goal
    # with whether the variant met it; with goals, they decide instead of the cosine rule.
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    goals: tuple[tuple[str, bool], ...] = ()
    data: str = ""  # what the metrics ran on
    finite: bool = True  # every output a number (an fp16 overflow gives inf or NaN)

    @property
    def ok(self) -> bool:
        if self.goals:  # outputs that are not numbers fail whatever a metric makes of them
            return self.finite and all(met for _, met in self.goals)
        return 1.0 - self.cosine <= self.tolerance

    def reason(self) -> str:
        where = "" if self.provider == "cpu" == self.wanted else f" on the {self.provider} provider"
        if self.provider != self.wanted:
            where += f" ({self.wanted}, which serves it, does not load here)"
        if self.goals:
            return self._goal_reason() + where
        verdict = "within" if self.ok else "outside"
        top1 = f", top-1 agreement {self.top1:.3f}" if self.top1 is not None else ""
        metrics = f"; {self.metric_figures()}" if self.metrics else ""
        return (
            f"{self.precision} variant {verdict} the accuracy tolerance: 1 - cosine = {1 - self.cosine:.2e} "
            f"(tolerance {self.tolerance:g}), max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g}"
            f"{top1} over {self.samples} samples{metrics}{where}"
        )

    def _goal_reason(self) -> str:
        missed = [goal for goal, met in self.goals if not met]
        verdict = (
            "meets the accuracy goals" if not missed else f"misses the accuracy goal {', '.join(missed)}"
        )
        if not self.finite:
            verdict = "has outputs that are not finite (inf or NaN)"
        return f"{self.precision} variant {verdict}: {self.metric_figures()} on {self.data}"

    def metric_figures(self) -> str:
        """``squad_f1 86.3 (fp32 86.7, -0.4)``, one per metric."""
        return ", ".join(f"{name} {figure_text(pair)}" for name, pair in self.metrics.items())

    def to_dict(self) -> dict:
        """The study's record: the figures, the verdict and its sentence; the user's metrics, goals and
        data only when the study has them, and ``finite`` only when an output was not."""
        data = {
            k: v
            for k, v in asdict(self).items()
            if not (k in ("metrics", "goals", "data") and not v) and not (k == "finite" and v)
        }
        data["ok"] = self.ok
        data["reason"] = self.reason()
        return data


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / norms)


def compare_outputs(
    precision: str, reference: Sequence[Outputs], candidate: Sequence[Outputs], tolerance: float
) -> AccuracyReport:
    """Compare per-sample outputs of the fp32 model (``reference``) and a variant (``candidate``)."""
    cosine, max_abs, max_rel, finite = 1.0, 0.0, 0.0, True
    agreements: dict[str, list[bool]] = {}
    for ref, got in zip(reference, candidate):
        for name, expected in ref.items():
            actual = got[name]
            if not np.all(np.isfinite(actual.astype(np.float64))):
                cosine, finite = -1.0, False
                continue
            cosine = min(cosine, _cosine(expected, actual))
            error = float(
                np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64)), initial=0.0)
            )
            scale = float(np.max(np.abs(expected.astype(np.float64)), initial=0.0))
            max_abs = max(max_abs, error)
            max_rel = max(max_rel, error / scale if scale > 0 else (0.0 if error == 0 else np.inf))
            if expected.ndim == 2 and expected.shape[1] >= 2 and np.issubdtype(expected.dtype, np.floating):
                same = np.argmax(expected, axis=1) == np.argmax(actual, axis=1)
                agreements.setdefault(name, []).extend(same.tolist())
    top1 = min((float(np.mean(v)) for v in agreements.values()), default=None)
    return AccuracyReport(precision, cosine, max_abs, max_rel, top1, len(reference), tolerance, finite=finite)


# Our provider names as ONNX Runtime's (the guard's own copy: the model stage knows no serving names).
_ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# TensorRT's options for the precision a variant is served in: the same modes the served config sets
# (optimizer.config.render: precision_mode FP16 with trt_layer_norm_fp32_fallback, INT8).
TENSORRT_MODES = {
    "fp16": {"trt_fp16_enable": True, "trt_layer_norm_fp32_fallback": True},
    "int8": {"trt_int8_enable": True},
}


def _run(
    path: Path, samples: Sequence[Outputs], provider: str = "cpu", precision: str = "fp32"
) -> tuple[list[dict[str, np.ndarray]], str]:
    """The outputs of ``path`` on ``samples``, on ``provider`` where it loads (else the CPU), in the mode
    that serves ``precision`` there; the provider that ran them."""
    import onnxruntime as ort

    wanted: list = ["CPUExecutionProvider"]
    if provider in ("cuda", "tensorrt"):
        from optimizer.model.libraries import preload_gpu_libraries_once

        preload_gpu_libraries_once()  # this process's library path was fixed at its start
        options = TENSORRT_MODES.get(precision, {}) if provider == "tensorrt" else {}
        wanted.insert(0, (_ORT_PROVIDERS[provider], dict(options)))
    try:
        session = ort.InferenceSession(str(path), providers=wanted)
    except Exception:  # a GPU provider whose libraries fail to load can refuse the session outright
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ran = next(
        (ours for ours, theirs in _ORT_PROVIDERS.items() if theirs == session.get_providers()[0]), "cpu"
    )
    names = [output.name for output in session.get_outputs()]
    return [dict(zip(names, session.run(names, dict(sample)))) for sample in samples], ran


def check_variant(
    reference_path: Path,
    variant_path: Path,
    samples: Sequence[Outputs],
    precision: str,
    tolerance: float,
    provider: str = "cpu",
    reference: Sequence[Outputs] | None = None,
) -> AccuracyReport:
    """Run the fp32 model (on the CPU) and the variant (on ``provider`` where it loads) on ``samples`` and
    compare their outputs. ``reference``: fp32's outputs on those samples, when already run."""
    chosen = list(samples)[:MAX_SAMPLES]
    if reference is None:
        reference, _ = _run(reference_path, chosen)
    outputs, ran = _run(variant_path, chosen, provider, precision)
    report = compare_outputs(precision, reference, outputs, tolerance)
    return replace(report, provider=ran, wanted=provider)


@dataclass
class AccuracyGuard:
    """What decides whether a variant may be served: the cosine rule on the study's requests, and the
    user's metrics on their data (``metrics``), which decide instead when the user set goals."""

    samples: Sequence[Outputs]  # the study's requests: the cosine rule's inputs
    tolerance: float  # 1 - cosine similarity allowed (the study's --accuracy-tolerance)
    metrics: tuple[Metric, ...] = ()
    goals: tuple[Goal, ...] = ()
    data: AccuracyData | None = None  # None: the metrics run on the study's requests
    batching: bool = True  # whether the model takes a batch axis (one request per sample either way)
    # fp32's outputs and scores, run once per reference file however many variants are checked.
    _requests_fp32: dict[Path, list[dict[str, np.ndarray]]] = field(default_factory=dict, repr=False)
    _fp32: dict[Path, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    _scores: dict[Path, dict[str, float]] = field(default_factory=dict, repr=False)

    @cached_property
    def metric_data(self) -> AccuracyData:
        return (
            self.data if self.data is not None else data_from_samples(self.samples[:MAX_DATA], self.batching)
        )

    def fp32_scores(self, reference: Path) -> dict[str, float]:
        """fp32's own score on each metric, run before any trial so that a metric or data that cannot be
        used is bad input (UsageError) rather than a failure halfway through a study."""
        if reference not in self._scores:
            outputs = self._reference_outputs(reference)
            data = self.metric_data.arrays
            scores = {m.name: score(m, outputs, outputs, data) for m in self.metrics}
            for name, value in scores.items():
                if not math.isfinite(value):
                    raise UsageError(
                        f"--accuracy-metric {name} returned {value} on fp32's own outputs: return a finite number"
                    )
            for goal in self.goals:
                if goal.relative == "percent" and scores[goal.metric] == 0:
                    raise UsageError(
                        f"--accuracy-goal {goal.text!r}: fp32's own {goal.metric} is 0, so a percentage of it "
                        f"allows nothing: give an amount ({goal.metric}{goal.op}fp32{'-' if goal.op == '>=' else '+'}X)"
                        " or a bound"
                    )
            self._scores[reference] = scores
        return self._scores[reference]

    def check(self, reference: Path, variant: Path, precision: str, provider: str = "cpu") -> AccuracyReport:
        """The variant's verdict, with its metric figures and goals when the study has them."""
        if reference not in self._requests_fp32:
            self._requests_fp32[reference], _ = _run(reference, list(self.samples)[:MAX_SAMPLES])
        report = check_variant(
            reference,
            variant,
            self.samples,
            precision,
            self.tolerance,
            provider,
            self._requests_fp32[reference],
        )
        if not self.metrics:
            return report
        data = self.metric_data
        fp32 = self._reference_outputs(reference)
        fp32_scores = self.fp32_scores(reference)
        ran, _ = _run(variant, data.requests(self.batching), provider, precision)
        outputs = _stack(ran, self.batching)
        finite = report.finite and all(np.all(np.isfinite(a)) for a in outputs.values() if _is_float(a))
        figures = {
            m.name: {"fp32": fp32_scores[m.name], "variant": score(m, outputs, fp32, data.arrays)}
            for m in self.metrics
        }
        goals = tuple(
            (g.text, g.met(figures[g.metric]["variant"], figures[g.metric]["fp32"])) for g in self.goals
        )
        source = (
            f"{data.count} samples of {data.source}" if self.data else f"{data.count} of the study's requests"
        )
        return replace(report, metrics=figures, goals=goals, data=source, finite=finite)

    def _reference_outputs(self, reference: Path) -> dict[str, np.ndarray]:
        if reference not in self._fp32:
            try:
                ran, _ = _run(reference, self.metric_data.requests(self.batching))
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error on the user's data
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UsageError(
                    f"the model does not run on {self.metric_data.source}: {first[:300]} (check the arrays "
                    "hold values the model takes, e.g. token ids inside its vocabulary)"
                ) from None
            self._fp32[reference] = _stack(ran, self.batching)
        return self._fp32[reference]


MAX_DATA = 256  # the study's requests the metrics run on when the user gave no accuracy data


def _stack(outputs: Sequence[Mapping[str, np.ndarray]], batching: bool) -> dict[str, np.ndarray]:
    """Per-request outputs as one array per output, samples on the first axis.

    Raises:
        UsageError: an output whose shape changes from sample to sample (or a scalar): a metric cannot
            take it as one array.
    """
    stacked = {}
    for name in outputs[0]:
        arrays = [np.asarray(o[name]) for o in outputs]
        shapes = {a.shape[1:] if batching else a.shape for a in arrays}
        if len(shapes) > 1 or (batching and arrays[0].ndim == 0):
            raise UsageError(
                f"output {name!r} has shapes {sorted(map(list, shapes))[:3]} across the samples: the accuracy "
                "metrics take outputs of one shape per sample; use --accuracy-tolerance (the cosine rule) instead"
            )
        stacked[name] = np.concatenate(arrays) if batching else np.stack(arrays)
    return stacked


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))
