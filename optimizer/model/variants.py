"""Variants of the user's fp32 model: fp16, int8 by one of several recipes, and the transformer-fused graph.

Variants are derived once per model content and cached by hash under the cache directory, never next
to the user's file. A repository serves a variant through ``default_model_filename``, so an exported
repository carries exactly the file that was measured: each int8 recipe has its own file name
(``model.int8.onnx`` for the dynamic default, ``model.int8-<recipe>.onnx`` for the others), and the
fp16 the CUDA provider serves, made after the transformer fusions as ONNX Runtime's transformer tools
make it, is ``model.fp16-fused.onnx``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optimizer.errors import ModelError, disk_full, is_disk_full
from optimizer.model.accuracy import AccuracyGuard
from optimizer.model.fusion import fuse_transformer
from optimizer.model.intake import ModelInfo
from optimizer.model.quantize import DEFAULT_INT8_RECIPE, INT8_RECIPES, fused_recipe, recipe_order

__all__ = [
    "Int8Choice",
    "choose_int8",
    "config_files",
    "inprocess_rate",
    "model_files",
    "precision_of",
    "precision_of_file",
    "recipe_of_file",
    "served_recipe",
    "variant_filename",
    "variant_path",
]

# The file inside the version directory that each precision serves (``default_model_filename``).
MODEL_FILENAMES = {
    "fp32": "model.onnx",
    "fp16": "model.fp16.onnx",
    "int8": "model.int8.onnx",
    "fp32-fused": "model.fused.onnx",
}
INPROCESS_S = 0.5  # how long each variant's in-process rate is measured
FUSION_ROUNDS = 4  # alternating rounds that decide between a recipe and its fused form
# The fused form must be this much faster to be served: within it the two are a coin flip on this
# machine (127.5 vs 127.4 inf/s on the example encoder), and the plain recipe is the simpler file.
FUSION_MARGIN = 0.03


# The fp16 the CUDA provider serves: the transformer fusions first (attention, LayerNorm, GELU: the kernels
# ONNX Runtime runs in fp16 on a GPU), then fp16 with the unsafe ops kept fp32, as ONNX Runtime's
# transformer optimizer makes it. The CPU's fp16 stays unfused: its fused kernels are fp32 only.
FP16_FUSED = "fused"


def variant_filename(precision: str, recipe: str = DEFAULT_INT8_RECIPE) -> str:
    """The served file of ``precision``; an int8 recipe other than the default, and the fused fp16, have
    their own names."""
    if precision == "int8" and recipe != DEFAULT_INT8_RECIPE:
        return f"model.int8-{recipe}.onnx"
    if precision == "fp16" and recipe == FP16_FUSED:
        return "model.fp16-fused.onnx"
    return MODEL_FILENAMES[precision]


def served_recipe(precision: str, provider: str, int8_recipe: str = DEFAULT_INT8_RECIPE) -> str:
    """How the file that serves ``precision`` on ``provider`` is made: the study's int8 recipe, the fused
    fp16 on CUDA, else the plain conversion (``DEFAULT_INT8_RECIPE`` stands for "the default" here)."""
    if precision == "int8":
        return int8_recipe
    if precision == "fp16" and provider == "cuda":
        return FP16_FUSED
    return DEFAULT_INT8_RECIPE


# Ops an fp16 variant keeps in fp32: a transformer's normalisations (fused, or as ReduceMean / Pow / Sqrt
# when not) and softmax, which overflow or lose their sums in fp16.
FP16_KEEPS_FP32 = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
    "Sqrt",
)
# A subfolder per conversion that changed since optimize first cached variants.
CONVERSION_VERSIONS = {"fp16": "fp16-norms-fp32"}


def variant_path(
    info: ModelInfo, precision: str, cache: Path, recipe: str = DEFAULT_INT8_RECIPE, samples=()
) -> Path:
    """The file that serves ``precision``: the model itself for fp32, else a cached converted copy.

    ``samples`` calibrate a static int8 recipe (the study's request samples).
    """
    if precision == "fp32":
        return info.path
    # A conversion that changed keeps its files apart (an older cache holds the earlier fp16 conversion).
    folder = cache / "variants" / info.sha256[:16] / CONVERSION_VERSIONS.get(precision, "")
    target = folder / variant_filename(precision, recipe)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp.onnx")
    os.close(fd)
    try:
        if precision == "int8":
            if recipe not in INT8_RECIPES:
                raise ModelError(f"unknown int8 recipe {recipe!r}: use one of {', '.join(INT8_RECIPES)}")
            if INT8_RECIPES[recipe].calibrated and not samples:
                raise ModelError(
                    f"the {recipe} int8 variant needs calibration samples: run a study to build it"
                )
            INT8_RECIPES[recipe].build(info.path, Path(tmp), samples)
        elif precision == "fp32-fused":
            try:
                fuse_transformer(info.path, Path(tmp))
            except ModelError as exc:
                raise ModelError(f"no fp32-fused variant: {exc}") from None
        elif recipe == FP16_FUSED:
            _fused_fp16(info.path, Path(tmp))
        else:
            _fp16(info.path, Path(tmp))
        os.replace(tmp, target)  # atomic: a crash never leaves half a variant in the cache
    except ModelError:
        raise
    except Exception as exc:
        if is_disk_full(exc):  # not the model's fault: said as the disk's, never recorded as a refusal
            raise disk_full(target.parent, 3 * info.path.stat().st_size) from exc
        name = precision if precision != "int8" else f"int8 ({recipe})"
        raise ModelError(f"could not make the {name} variant of the model: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(source))
    # Inputs and outputs stay fp32 so clients and the config do not change; the ops ONNX Runtime's own
    # block list keeps, and the normalisations and softmax, stay fp32 (their sums overflow fp16 on a GPU).
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEPS_FP32]
    )
    onnx.save(converted, str(target))


def _fused_fp16(source: Path, target: Path) -> None:
    """fp16 after the transformer fusions, converted as ONNX Runtime's transformer optimizer does (its
    symbolic shape inference types the fused com.microsoft ops, which ONNX's own cannot); a model without
    such patterns is converted as it is."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        fused = Path(scratch) / "fused.onnx"
        try:
            fuse_transformer(source, fused)
        except ModelError:  # nothing to fuse: the plain conversion is the fused one
            _fp16(source, target)
            return
        model = OnnxModel(onnx.load(str(fused)))
    model.convert_float_to_float16(
        use_symbolic_shape_infer=True,
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEPS_FP32],
    )
    onnx.save(model.model, str(target))


def precision_of_file(filename: str | None) -> str:
    """The precision a model file serves (``default_model_filename``; none means the fp32 ``model.onnx``)."""
    name = filename or "model.onnx"
    for precision in ("int8", "fp16"):
        if name.startswith(f"model.{precision}-"):
            return precision
    by_file = {file: precision for precision, file in MODEL_FILENAMES.items()}
    return by_file.get(name, "fp32")


def recipe_of_file(filename: str | None) -> str:
    """The recipe a model file was made with: an int8 recipe, or the fused fp16 (the default for any
    other file)."""
    name = filename or ""
    for precision in ("int8", "fp16"):
        prefix = f"model.{precision}-"
        if name.startswith(prefix) and name.endswith(".onnx"):
            return name[len(prefix) : -len(".onnx")]
    return DEFAULT_INT8_RECIPE


def precision_of(config) -> str:
    """The precision a rendered config (a ``ModelConfig``) serves, read from its model file."""
    return precision_of_file(config.default_model_filename)


def model_files(
    info: ModelInfo, precision: str, cache: Path, recipe: str = DEFAULT_INT8_RECIPE
) -> dict[str, Path]:
    """Repository-relative files of one candidate: ``{"1/model.int8.onnx": path}``."""
    return {f"1/{variant_filename(precision, recipe)}": variant_path(info, precision, cache, recipe)}


def config_files(info: ModelInfo, config, cache: Path) -> dict[str, Path]:
    """The files a rendered config (a ``ModelConfig``) serves, found from its ``default_model_filename``."""
    filename = config.default_model_filename
    return model_files(info, precision_of_file(filename), cache, recipe_of_file(filename))


@dataclass(frozen=True)
class Int8Choice:
    """What choosing the int8 recipe found: the recipe served (None: none passed) and every attempt."""

    recipe: str | None
    attempts: tuple[dict, ...] = field(default=())
    fusion: str = ""  # how the recipe's fused form compared, when it was tried

    def reasons(self) -> str:
        """Why each refused recipe was refused, in one line."""
        return "; ".join(f"{a['recipe']}: {a['reason']}" for a in self.attempts if not a["ok"])


def choose_int8(
    info: ModelInfo,
    samples: Sequence[Mapping[str, np.ndarray]],
    guard: AccuracyGuard,
    cache: Path,
    recipes: Sequence[str] | None = None,
    provider: str = "cpu",
) -> Int8Choice:
    """Try the int8 recipes in order until one passes the accuracy ``guard`` (the variant run on
    ``provider``, the one that will serve it, where it loads); record each one's outcome. ``samples``
    calibrate the static recipes (the study's requests).

    An attempt records its recipe, whether it passed, why (the guard's figures, or why it could not be
    built) and its in-process rate (inferences/s on one request at a time, beside fp32's), so a study can
    say which recipe it serves and why the others were refused.
    """
    attempts: list[dict] = []
    for recipe in recipes or recipe_order(info.path):
        try:
            path = variant_path(info, "int8", cache, recipe, samples)
        except ModelError as exc:
            attempts.append({"recipe": recipe, "ok": False, "reason": str(exc)})
            continue
        report = guard.check(info.path, path, "int8", provider)
        attempt = {
            "recipe": recipe,
            **report.to_dict(),
            "inprocess_rate": round(inprocess_rate(path, samples), 1),
        }
        attempts.append(attempt)
        if report.ok:
            return _with_fusion(info, samples, guard, cache, recipe, attempts, recipes)
    return Int8Choice(None, tuple(attempts))


def _with_fusion(
    info: ModelInfo,
    samples: Sequence[Mapping[str, np.ndarray]],
    guard: AccuracyGuard,
    cache: Path,
    recipe: str,
    attempts: list[dict],
    recipes: Sequence[str] | None,
) -> Int8Choice:
    """``recipe`` passed: try it after the transformer fusions too, and serve that if it runs faster here.

    Both are measured in alternating rounds (one measurement each would decide on this machine's noise);
    a fused form that cannot be built (nothing to fuse) or breaks the guard is recorded and left.
    """
    fused = fused_recipe(recipe)
    if recipes is not None and fused not in recipes:  # e.g. a recording that never measured it
        return Int8Choice(recipe, tuple(attempts))
    try:
        path = variant_path(info, "int8", cache, fused, samples)
    except ModelError as exc:  # most often nothing to fuse: not a refusal, the model has no such pattern
        return Int8Choice(recipe, tuple(attempts), f"{fused} not built: {exc}")
    report = guard.check(info.path, path, "int8")
    if not report.ok:
        attempts.append({"recipe": fused, **report.to_dict()})
        return Int8Choice(recipe, tuple(attempts), f"{fused} broke the accuracy guard")
    plain = variant_path(info, "int8", cache, recipe, samples)
    rates: dict[Path, list[float]] = {plain: [], path: []}
    for round_ in range(FUSION_ROUNDS):
        for file in (plain, path) if round_ % 2 == 0 else (path, plain):
            rates[file].append(inprocess_rate(file, samples, INPROCESS_S / 2))
    plain_rate, fused_rate = (round(statistics.median(rates[f]), 1) for f in (plain, path))
    attempts[-1]["inprocess_rate"] = plain_rate
    attempts.append({"recipe": fused, **report.to_dict(), "inprocess_rate": fused_rate})
    if fused_rate > plain_rate * (1 + FUSION_MARGIN):
        return Int8Choice(
            fused, tuple(attempts), f"faster in process than {recipe}: {fused_rate} vs {plain_rate} inf/s"
        )
    return Int8Choice(
        recipe,
        tuple(attempts),
        f"{fused} kept the outputs but ran slower in process: {fused_rate} vs {plain_rate} inf/s",
    )


def inprocess_rate(
    path: Path, samples: Sequence[Mapping[str, np.ndarray]], seconds: float = INPROCESS_S
) -> float:
    """Requests per second of ``path`` in this process, one sample at a time (ONNX Runtime's defaults)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    chosen = list(samples)
    session.run(None, dict(chosen[0]))  # the first run allocates
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        sample = chosen[count % len(chosen)]
        session.run(None, dict(sample))
        count += 1
    return count / elapsed
