"""Precision variants of the user's fp32 model: fp16 and int8 (dynamic quantization).

Variants are derived once per model content and cached by hash under the cache directory, never next
to the user's file. A repository serves a variant through ``default_model_filename``, so an exported
repository carries exactly the file that was measured.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from optimizer.errors import ModelError
from optimizer.model.intake import ModelInfo

__all__ = ["variant_path", "model_files"]

# The file inside the version directory that each precision serves (``default_model_filename``).
MODEL_FILENAMES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def variant_path(info: ModelInfo, precision: str, cache: Path) -> Path:
    """The file that serves ``precision``: the model itself for fp32, else a cached converted copy."""
    if precision == "fp32":
        return info.path
    target = cache / "variants" / info.sha256[:16] / MODEL_FILENAMES[precision]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp.onnx")
    os.close(fd)
    try:
        _CONVERTERS[precision](info.path, Path(tmp))
        os.replace(tmp, target)  # atomic: a crash never leaves half a variant in the cache
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"could not make the {precision} variant of the model: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic writes "<source>-inferred.onnx" beside its input and deletes it after: give it a
    # private copy, so two processes quantizing one model do not delete each other's file, and nothing
    # is written next to the user's model.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".quantize-") as work:
        private = Path(work) / "model.onnx"
        shutil.copyfile(source, private)
        # quantize_dynamic logs advice to the root logger; keep the user's terminal for our own lines.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(private), str(target), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)


def _fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    # Inputs and outputs stay fp32 so clients and the config do not change; unsafe ops stay fp32.
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(target))


_CONVERTERS = {"int8": _int8, "fp16": _fp16}


def precision_of_file(filename: str | None) -> str:
    """The precision a model file serves (``default_model_filename``; none means the fp32 ``model.onnx``)."""
    by_file = {name: precision for precision, name in MODEL_FILENAMES.items()}
    return by_file.get(filename or "model.onnx", "fp32")


def precision_of(config) -> str:
    """The precision a rendered config (a ``ModelConfig``) serves, read from its model file."""
    return precision_of_file(config.default_model_filename)


def model_files(info: ModelInfo, precision: str, cache: Path) -> dict[str, Path]:
    """Repository-relative files of one candidate: ``{"1/model.int8.onnx": path}``."""
    return {f"1/{MODEL_FILENAMES[precision]}": variant_path(info, precision, cache)}
