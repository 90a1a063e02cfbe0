"""The way in from PyTorch: a module exported to ONNX with a dynamic batch, checked against PyTorch.

``optimize convert`` takes a module (a ``file.py:factory`` or ``package.module:factory`` that returns an
``nn.Module``, or a TorchScript / whole-module ``.pt`` file) and the dims of one sample of each input,
exports it with PyTorch's exporter (``torch.export``-based by default, the TorchScript one on request), and
runs the ONNX file in ONNX Runtime on a batch of a size the export never saw: a file whose outputs differ
from PyTorch's, or whose batch is not dynamic, is refused. torch is an optional dependency (the
``convert`` extra); this module imports it only when asked to convert.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import ModelError, UsageError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["EXPORTERS", "Conversion", "Exporter", "convert_module", "load_module", "parse_inputs"]


class Exporter(str, Enum):
    """PyTorch's ONNX exporters."""

    dynamo = "dynamo"  # torch.export-based, PyTorch's default
    torchscript = "torchscript"  # the older tracer, for modules torch.export cannot capture


EXPORTERS = tuple(e.value for e in Exporter)
DTYPES = ("float32", "float16", "int64", "int32", "bool")
EXPORT_BATCH = 2  # the batch the module is traced with
CHECK_BATCH = 3  # the batch the ONNX file is checked with: a size the export never saw
RTOL, ATOL = 1e-3, 1e-4  # ONNX Runtime vs PyTorch, fp32 (kernels differ in summation order)


@dataclass(frozen=True)
class InputSpec:
    """One input: its name, the dims of one sample (no batch), its dtype."""

    name: str
    dims: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class Conversion:
    """What ``convert_module`` wrote and how well it matched PyTorch."""

    path: Path
    exporter: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    max_abs_difference: float


def parse_inputs(args: Sequence[str]) -> tuple[InputSpec, ...]:
    """``--input NAME:D1,D2[:DTYPE]`` options (one sample's dims, without the batch) in forward order."""
    specs: list[InputSpec] = []
    for arg in args:
        parts = arg.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise UsageError(
                f"--input {arg!r} is malformed: write NAME:D1,D2[:DTYPE], e.g. input_ids:32:int64"
            )
        name, dims_text = parts[0], parts[1]
        dtype = parts[2] if len(parts) == 3 else "float32"
        if dtype not in DTYPES:
            raise UsageError(f"--input {arg!r} has dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        try:
            dims = tuple(int(d) for d in dims_text.split(","))
        except ValueError:
            raise UsageError(f"--input {arg!r} has a dimension that is not a whole number") from None
        if any(d < 1 for d in dims):
            raise UsageError(f"--input {arg!r} has a dimension below 1: every dimension must be >= 1")
        if any(spec.name == name for spec in specs):
            raise UsageError(f"--input {name!r} is given twice: give each input once, in forward() order")
        specs.append(InputSpec(name, dims, dtype))
    if not specs:
        raise UsageError("give every input of forward() with --input NAME:D1,D2[:DTYPE], in order")
    return tuple(specs)


def _torch():
    try:
        import torch
    except ImportError:
        raise UsageError(
            "optimize convert needs PyTorch: pip install torch 'optimize[convert]' (on CPU-only machines pick "
            "the CPU build of torch)"
        ) from None
    return torch


def load_module(spec: str):
    """The ``nn.Module`` named by ``spec``: ``file.py:factory``, ``package.module:factory``, or a ``.pt``.

    ``factory`` is called without arguments when callable and not already a module.

    Raises:
        UsageError: the file, module or name does not exist, or it is not an ``nn.Module``.
    """
    torch = _torch()
    source, _, name = spec.partition(":")
    if not name and source.endswith((".pt", ".pth")):
        module = _load_saved(torch, Path(source))
    elif not name:
        raise UsageError(
            f"--module {spec!r} names no factory: write file.py:make_model, package.module:make_model, or a .pt"
        )
    else:
        namespace = _import(source)
        if not hasattr(namespace, name):
            raise UsageError(f"{source!r} has no {name!r}: give the function or class that builds the model")
        module = getattr(namespace, name)
        if not isinstance(module, torch.nn.Module) and callable(module):
            module = module()
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"--module {spec!r} gave a {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def _load_saved(torch, path: Path):
    if not path.is_file():
        raise UsageError(f"model file {str(path)!r} does not exist: check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", DeprecationWarning
            )  # TorchScript is deprecated, its files live on
            return torch.jit.load(str(path), map_location="cpu")
    except Exception:  # not TorchScript: a whole module saved with torch.save
        pass
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UsageError(
            f"{str(path)!r} is neither TorchScript nor a whole saved module ({type(exc).__name__}): "
            "save it with torch.jit.save, or give file.py:make_model"
        ) from None


def _import(source: str):
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"module file {source!r} does not exist: check the path")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        namespace = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.resolve().parent))  # its own imports of neighbouring files
        try:
            module_spec.loader.exec_module(namespace)
        except Exception as exc:
            raise UsageError(f"importing {source!r} failed: {type(exc).__name__}: {exc}") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
        return namespace
    try:
        return importlib.import_module(source)
    except ImportError as exc:
        raise UsageError(f"cannot import {source!r}: {exc}") from None


def example_inputs(specs: Sequence[InputSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs with a batch: normal floats, small non-negative integers (valid token ids)."""
    import numpy as np  # here: the command line imports this module for --help

    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        shape = (batch, *spec.dims)
        if spec.dtype.startswith("float"):
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            arrays[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            arrays[spec.name] = rng.integers(0, 100, shape).astype(spec.dtype)
    return arrays


def convert_module(
    module,
    specs: Sequence[InputSpec],
    out: Path,
    *,
    exporter: str = "dynamo",
    opset: int | None = None,
) -> Conversion:
    """Export ``module`` to ``out`` with a dynamic batch on every input and output; check it.

    Raises:
        UsageError: an unknown exporter.
        ModelError: the export failed, or ONNX Runtime's outputs differ from PyTorch's.
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    torch = _torch()
    traced = {name: torch.from_numpy(array) for name, array in example_inputs(specs, EXPORT_BATCH).items()}
    with torch.no_grad():
        reference = _as_tuple(_call(module, traced))
    outputs = ("output",) if len(reference) == 1 else tuple(f"output_{i}" for i in range(len(reference)))
    out.parent.mkdir(parents=True, exist_ok=True)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # its notices (e.g. torchvision ops it skips) are not the user's
    try:
        _export(torch, module, specs, traced, outputs, out, exporter, opset)
    except Exception as exc:
        raise ModelError(
            f"exporting to ONNX failed ({exporter} exporter): {type(exc).__name__}: {_first_line(exc)}"
            + ("; try --exporter torchscript" if exporter == "dynamo" else "")
        ) from exc
    finally:
        exporter_log.setLevel(level)
    difference = _check(module, specs, out, outputs)
    return Conversion(out, exporter, tuple(s.name for s in specs), outputs, difference)


def _call(module, inputs: Mapping[str, Any]):
    try:
        return module(*inputs.values())
    except Exception as exc:
        raise UsageError(
            f"the module's forward() failed on the --input shapes: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _export(torch, module, specs, traced, outputs, out: Path, exporter: str, opset: int | None) -> None:
    names = [s.name for s in specs]
    args = tuple(traced.values())
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own notices; failures raise
            program = torch.onnx.export(
                module,
                args,
                input_names=names,
                output_names=list(outputs),
                dynamic_shapes=tuple({0: batch} for _ in specs),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
            program.save(str(out), external_data=False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated, and says so
        torch.onnx.export(
            module,
            args,
            str(out),
            input_names=names,
            output_names=list(outputs),
            dynamic_axes={name: {0: "batch"} for name in (*names, *outputs)},
            opset_version=opset or 17,
            dynamo=False,
        )


def _check(module, specs, path: Path, outputs: Sequence[str]) -> float:
    """Largest absolute difference of ONNX Runtime from PyTorch on a batch the export never saw."""
    import onnxruntime as ort
    import torch

    inputs = example_inputs(specs, CHECK_BATCH, seed=1)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(list(outputs), inputs)
    except Exception as exc:
        raise ModelError(
            f"ONNX Runtime cannot run the exported model with batch {CHECK_BATCH} (is the batch dynamic in "
            f"forward()?): {_first_line(exc)}"
        ) from exc
    with torch.no_grad():
        expected = [
            t.detach().numpy()
            for t in _as_tuple(_call(module, {k: torch.from_numpy(v) for k, v in inputs.items()}))
        ]
    import numpy as np

    worst = 0.0
    for name, ours, theirs in zip(outputs, got, expected, strict=True):
        if ours.shape != theirs.shape:
            raise ModelError(
                f"output {name!r} has shape {ours.shape} in ONNX Runtime, {theirs.shape} in PyTorch"
            )
        if not np.allclose(ours, theirs, rtol=RTOL, atol=ATOL):
            difference = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64))))
            raise ModelError(
                f"output {name!r} differs from PyTorch by up to {difference:.3g} (allowed {ATOL:g} + {RTOL:g} x |value|): "
                "the export changed the model; try the other --exporter"
            )
        if ours.size:
            worst = max(worst, float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)))))
    return worst


def _as_tuple(result) -> tuple:
    if isinstance(result, (tuple, list)):
        return tuple(result)
    if isinstance(result, dict):
        return tuple(result.values())
    return (result,)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
