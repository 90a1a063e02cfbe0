"""Int8 recipes, tried in order until one keeps the model's outputs within the accuracy tolerance.

``quantize_dynamic`` with its defaults saturates on x86 CPUs without VNNI (ONNX Runtime's documentation
recommends per-channel weights and ``reduce_range`` there), transformer embeddings and the last layers
are the usual victims, and dynamic int8 is the wrong int8 for convolutional models (each Conv's
activations are quantized at run time; on 2 cores a small CNN ran 2.7x slower than fp32). So one int8
recipe tried and given up leaves the biggest CPU win on the table. Each recipe here is a way to make the
int8 file; :func:`optimizer.model.variants.choose_int8` tries them in :func:`recipe_order`, and the study
serves the first that passes the guard, recording why the others were refused.

Each recipe also has a fused form (``fused-<recipe>``): the same quantization of the graph after ONNX
Runtime's transformer fusions (:mod:`optimizer.model.fusion`). ``choose_int8`` tries it once the plain
recipe passes, and serves whichever of the two passes and runs faster in process.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from optimizer.model.fusion import fuse_transformer

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BASE_RECIPES",
    "DEFAULT_INT8_RECIPE",
    "GPU_INT8_RECIPE",
    "GPU_PROVIDERS",
    "INT8_RECIPES",
    "Recipe",
    "fused_recipe",
    "recipe_order",
    "recipes_for",
]

Samples = Sequence[Mapping[str, "np.ndarray"]]
# ONNX's shape inference does not know the fused contrib ops (SkipLayerNormalization, BiasGelu): the
# tensors they produce are fp32, which the quantizer must be told (only tensors of unknown type).
UNKNOWN_TYPES_ARE_FLOAT = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT
CALIBRATION_SAMPLES = 32  # static int8's activation ranges come from this many of the study's samples


@dataclass(frozen=True)
class Recipe:
    """One way to make the int8 file: ``build(fp32 model, target, samples)``."""

    name: str
    summary: str
    build: Callable[[Path, Path, Samples], None]
    calibrated: bool = False  # needs the study's samples to build


def _dynamic(per_channel: bool, keep_ends: bool = False) -> Callable[[Path, Path, Samples], None]:
    def build(source: Path, target: Path, samples: Samples) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _private_copy(source, target) as private:
            quantize_dynamic(
                str(private),
                str(target),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                reduce_range=per_channel,
                nodes_to_exclude=_sensitive_nodes(private) if keep_ends else None,
                extra_options=UNKNOWN_TYPES_ARE_FLOAT,
            )

    return build


def _static(symmetric: bool) -> Callable[[Path, Path, Samples], None]:
    """Static int8 (QDQ), per-channel weights, activations calibrated on the study's samples.

    ``symmetric``: TensorRT's int8, signed symmetric activations and weights with 8-bit range (TensorRT
    quantizes symmetrically and runs int8 from QDQ nodes; u8 activations and 7-bit weights fall back to
    other kernels there). Otherwise the CPU's: u8 activations and 7-bit weights (``reduce_range``: no u8s8
    saturation on CPUs without VNNI).
    """

    def build(source: Path, target: Path, samples: Samples) -> None:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._samples = iter(list(samples)[:CALIBRATION_SAMPLES])

            def get_next(self):
                return next(self._samples, None)

        symmetric_options = {"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {}
        with _private_copy(source, target) as private:
            quantize_static(
                str(private),
                str(target),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=not symmetric,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options={**UNKNOWN_TYPES_ARE_FLOAT, **symmetric_options},
            )

    return build


DEFAULT_INT8_RECIPE = "dynamic"  # what optimize served before there were recipes: model.int8.onnx
GPU_INT8_RECIPE = "symmetric-qdq"
# The execution providers that serve int8 from symmetric QDQ only (never the CPU's dynamic recipes).
GPU_PROVIDERS = ("cuda", "tensorrt")
FUSED_PREFIX = "fused-"
_BASE: tuple[Recipe, ...] = (
    Recipe("dynamic", "dynamic int8, per-tensor weights (quantize_dynamic's defaults)", _dynamic(False)),
    Recipe(
        "dynamic-per-channel",
        "dynamic int8, per-channel 7-bit weights (reduce_range)",
        _dynamic(True),
    ),
    Recipe(
        "dynamic-keep-ends",
        "dynamic int8, per-channel 7-bit weights, embeddings and the last layer left in fp32",
        _dynamic(True, keep_ends=True),
    ),
    Recipe(
        "static-qdq",
        f"static int8 (QDQ), per-channel 7-bit weights, activations calibrated on {CALIBRATION_SAMPLES} samples",
        _static(symmetric=False),
        calibrated=True,
    ),
)
# The GPU providers' one recipe (recipes_for), never tried for the CPU.
_GPU_RECIPE = Recipe(
    GPU_INT8_RECIPE,
    f"static int8 (QDQ), symmetric int8 activations and weights calibrated on {CALIBRATION_SAMPLES} "
    "samples: TensorRT's int8",
    _static(symmetric=True),
    calibrated=True,
)


def _after_fusion(build: Callable[[Path, Path, Samples], None]) -> Callable[[Path, Path, Samples], None]:
    def fused_then_quantized(source: Path, target: Path, samples: Samples) -> None:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fuse-") as work:
            fused = Path(work) / "model.fused.onnx"
            fuse_transformer(source, fused)  # ModelError when there is nothing to fuse
            build(fused, target, samples)

    return fused_then_quantized


def fused_recipe(name: str) -> str:
    """The fused form of recipe ``name``: the same quantization after the transformer fusions."""
    return f"{FUSED_PREFIX}{name}"


BASE_RECIPES = tuple(recipe.name for recipe in _BASE)
INT8_RECIPES: dict[str, Recipe] = (
    {recipe.name: recipe for recipe in _BASE}
    | {
        fused_recipe(recipe.name): Recipe(
            fused_recipe(recipe.name),
            f"{recipe.summary}, after the transformer fusions",
            _after_fusion(recipe.build),
            recipe.calibrated,
        )
        for recipe in _BASE
    }
    | {GPU_INT8_RECIPE: _GPU_RECIPE}
)


def recipes_for(providers: Sequence[str]) -> tuple[str, ...] | None:
    """The int8 recipes a space's providers may serve: a GPU provider's only (symmetric QDQ, for
    TensorRT's INT8 mode); None: the CPU's, in :func:`recipe_order`."""
    if any(provider in GPU_PROVIDERS for provider in providers):
        return (GPU_INT8_RECIPE,)
    return None


def recipe_order(model_path: Path) -> tuple[str, ...]:
    """The order to try the recipes in: static first for a convolutional model, dynamic first otherwise."""
    if _has_conv(model_path):
        return ("static-qdq", "dynamic-per-channel", "dynamic", "dynamic-keep-ends")
    return ("dynamic", "dynamic-per-channel", "dynamic-keep-ends", "static-qdq")


def _has_conv(model_path: Path) -> bool:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return any(node.op_type in ("Conv", "ConvTranspose") for node in graph.node)


def _sensitive_nodes(model_path: Path) -> list[str]:
    """The nodes whose quantization hurts most often: embedding lookups and the last quantizable layer."""
    import onnx

    nodes = onnx.load(str(model_path), load_external_data=False).graph.node
    embeddings = [node.name for node in nodes if node.op_type == "Gather" and node.name]
    layers = [node.name for node in nodes if node.op_type in ("MatMul", "Gemm", "Conv") and node.name]
    return embeddings + layers[-1:]


@contextmanager
def _private_copy(source: Path, target: Path) -> Iterator[Path]:
    """A private copy of ``source`` beside ``target``, with ONNX Runtime's quantization advice silenced.

    The quantizers write helper files ("<model>-inferred.onnx") beside their input and delete them
    after: on a private copy two processes quantizing one model do not delete each other's files, and
    nothing is written next to the user's model. They log advice to the root logger; the user's
    terminal is kept for our own lines.
    """
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".quantize-") as work:
        private = Path(work) / "model.onnx"
        shutil.copyfile(source, private)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            yield private
        finally:
            root.setLevel(level)
