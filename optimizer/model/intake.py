"""Model intake: read an ONNX model's inputs and outputs, find its batch dimension, resolve shapes.

The result is a :class:`ModelInfo` that the rest of the pipeline uses; nothing here talks to a server.
A model whose batch dimension is fixed to 1 is given a dynamic one when that provably keeps its outputs
(checked with ONNX Runtime); otherwise it is served with ``max_batch_size: 0``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from optimizer.errors import ModelError, UsageError

__all__ = [
    "ModelInfo",
    "TensorSpec",
    "inspect_model",
    "parse_shape_args",
    "resolve_shapes",
    "synthetic_inputs",
]

Dim = int | str  # a fixed size, or the name of a dynamic dimension ("?" when unnamed)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the ONNX file declares it."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    dims: tuple[Dim, ...]
    # Valid value range for integer inputs that index a table (e.g. token ids < vocab size).
    index_range: tuple[int, int] | None = None

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.dims) if isinstance(d, str))


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a model."""

    source_path: Path  # the user's file, never written to
    path: Path  # the file to serve: the user's, or a batch-dynamic copy in the cache
    sha256: str  # of the user's file: the identity of a study's model
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: bool  # the first dimension of every input and output is a dynamic batch
    opset: int
    notes: tuple[str, ...] = ()

    def tensor_dims(self, spec: TensorSpec) -> tuple[Dim, ...]:
        """Dims as Triton's config lists them: without the batch dimension when batching."""
        return spec.dims[1:] if self.batching else spec.dims

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_model(path: Path | str, *, cache: Path | None = None) -> ModelInfo:
    """Read ``path`` and describe it; raise :class:`ModelError` with the fix when it is unusable.

    Args:
        path: The ONNX model file.
        cache: Where a batch-dynamic copy of a fixed-batch model may be written. Without it, such a
            model is described as non-batching.
    """
    source = _check_model_file(Path(path))
    model = _load_onnx(source)
    inputs = _graph_inputs(model)
    outputs = tuple(_tensor_spec(value) for value in model.graph.output)
    info = ModelInfo(
        source_path=source,
        path=source,
        sha256=file_sha256(source),
        inputs=inputs,
        outputs=outputs,
        batching=_has_dynamic_batch(inputs, outputs),
        opset=_default_opset(model),
    )
    if info.batching:
        return info
    if _has_fixed_unit_batch(inputs) and cache is not None:
        return _try_dynamic_batch(info, model, cache)
    return replace(info, notes=(_NO_BATCH_NOTE,))


_NO_BATCH_NOTE = (
    "the model has no dynamic batch dimension: it is served with max_batch_size 0 "
    "(no dynamic batching); export it with a dynamic first axis to let Triton batch requests"
)


def _check_model_file(path: Path) -> Path:
    if not path.exists():
        raise ModelError(f"model file {str(path)!r} does not exist: check the path")
    if path.is_dir():
        raise ModelError(f"{str(path)!r} is a directory: give the path of the .onnx file inside it")
    if path.stat().st_size == 0:
        raise ModelError(f"model file {str(path)!r} is empty (0 bytes): export the model again")
    return path.resolve()


def _load_onnx(path: Path):  # -> onnx.ModelProto
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, OSError for external data
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{str(path)!r} is not a valid ONNX model ({first_line[:200]}): "
            "check the file is complete and export it again"
        ) from exc
    if not model.graph.input:
        raise ModelError(f"{str(path)!r} has no inputs: it cannot be served")
    return model


def _graph_inputs(model) -> tuple[TensorSpec, ...]:
    initializers = {init.name for init in model.graph.initializer}
    ranges = _index_ranges(model)
    specs = []
    for value in model.graph.input:
        if value.name in initializers:  # old exporters list weights as inputs
            continue
        specs.append(replace(_tensor_spec(value), index_range=ranges.get(value.name)))
    return tuple(specs)


def _tensor_spec(value) -> TensorSpec:
    import onnx

    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise ModelError(f"input or output {value.name!r} is not a tensor: only tensors are supported")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    return TensorSpec(name=value.name, dtype=dtype, dims=tuple(dims))


def _index_ranges(model) -> dict[str, tuple[int, int]]:
    """Integer inputs used as Gather indices into a constant table get that table's row count."""
    tables = {init.name: tuple(init.dims) for init in model.graph.initializer}
    ranges: dict[str, tuple[int, int]] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            rows = tables[node.input[0]][axis] if tables[node.input[0]] else 0
            if rows > 0:
                ranges[node.input[1]] = (0, int(rows))
    return ranges


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _has_dynamic_batch(inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> bool:
    tensors = list(inputs) + list(outputs)
    return all(t.dims and isinstance(t.dims[0], str) for t in tensors)


def _has_fixed_unit_batch(inputs: Iterable[TensorSpec]) -> bool:
    return all(t.dims and t.dims[0] == 1 for t in inputs)


def _try_dynamic_batch(info: ModelInfo, model, cache: Path) -> ModelInfo:
    """Give a fixed batch-1 model a dynamic batch axis if ONNX Runtime proves the outputs unchanged."""
    target = cache / "models" / f"{info.sha256[:16]}-dynamic-batch.onnx"
    if not target.exists() and not _write_dynamic_batch_copy(info, model, target):
        return replace(info, notes=(_NO_BATCH_NOTE,))
    import onnx

    converted = onnx.load(str(target), load_external_data=False)
    return replace(
        info,
        path=target,
        inputs=tuple(replace(spec, dims=("batch",) + spec.dims[1:]) for spec in info.inputs),
        outputs=tuple(_tensor_spec(value) for value in converted.graph.output),
        batching=True,
        notes=(
            "the model's batch dimension was fixed to 1; a copy with a dynamic batch axis "
            f"(checked against the original with ONNX Runtime) is served from {target}",
        ),
    )


def _write_dynamic_batch_copy(info: ModelInfo, model, target: Path) -> bool:
    import onnx

    if any(len(spec.dynamic_axes) for spec in info.inputs):
        return False  # other dynamic dims: no concrete shape to check the conversion with
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    for value in list(converted.graph.input) + list(converted.graph.output):
        if value.type.tensor_type.shape.dim:
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del converted.graph.value_info[:]
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # needs sympy

        converted = SymbolicShapeInference.infer_shapes(converted, auto_merge=True)
        if converted is None or not _same_outputs_per_row(info, model, converted):
            return False
    except Exception:  # any failure means the batch axis is baked into the graph
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(converted, target)
    return True


def _same_outputs_per_row(info: ModelInfo, original, converted) -> bool:
    import onnxruntime as ort

    # info is still non-batching here, so these shapes include the fixed batch axis of 1.
    full_shapes = {spec.name: tuple(int(d) for d in spec.dims) for spec in info.inputs}
    rows = [synthetic_inputs(info, full_shapes, 1, seed=i) for i in (0, 1)]
    batch = {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
    one = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    two = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = [one.run(None, row) for row in rows]
    got = two.run(None, batch)
    for index, output in enumerate(got):
        if output.shape[0] != 2:
            return False
        for row in (0, 1):
            if not np.allclose(output[row], expected[row][index][0], rtol=1e-4, atol=1e-5):
                return False
    return True


def _atomic_save(model, target: Path) -> None:
    import onnx

    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def parse_shape_args(args: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``--shape NAME:D1,D2`` options (perf_analyzer's syntax) into a mapping."""
    shapes: dict[str, tuple[int, ...]] = {}
    for arg in args:
        name, sep, dims_text = arg.rpartition(":")
        if not sep or not name or not dims_text:
            raise UsageError(f"--shape {arg!r} is malformed: write NAME:D1,D2,... e.g. input_ids:128")
        try:
            dims = tuple(int(d) for d in dims_text.split(","))
        except ValueError:
            raise UsageError(
                f"--shape {arg!r} has a dimension that is not a whole number: write e.g. {name}:128"
            ) from None
        if any(d <= 0 for d in dims):
            raise UsageError(f"--shape {arg!r} has a dimension below 1: every dimension must be >= 1")
        if name in shapes:
            raise UsageError(f"--shape is given twice for input {name!r}: give it once")
        shapes[name] = dims
    return shapes


def resolve_shapes(info: ModelInfo, given: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every input as a client sends it (without batch when batching).

    Raises:
        UsageError: ``given`` names an unknown input, or a shape of the wrong rank, or one that
            contradicts a fixed dimension.
        ModelError: an input has dynamic dimensions that ``given`` does not resolve.
    """
    names = [spec.name for spec in info.inputs]
    for name in given:
        if name not in names:
            raise UsageError(
                f"--shape names unknown input {name!r}: the model's inputs are {', '.join(names)}"
            )
    shapes: dict[str, tuple[int, ...]] = {}
    missing = []
    for spec in info.inputs:
        dims = info.tensor_dims(spec)
        if spec.name in given:
            shapes[spec.name] = _check_given_shape(spec.name, dims, given[spec.name], info.batching)
        elif any(isinstance(d, str) for d in dims):
            missing.append(_shape_hint(spec.name, dims))
        else:
            shapes[spec.name] = tuple(int(d) for d in dims)
    if missing:
        raise ModelError(
            "inputs with dynamic dimensions need a concrete shape"
            + (" (without the batch dimension)" if info.batching else "")
            + ": "
            + "; ".join(missing)
        )
    return shapes


def _check_given_shape(
    name: str, dims: tuple[Dim, ...], shape: tuple[int, ...], batching: bool
) -> tuple[int, ...]:
    if len(shape) != len(dims):
        where = "without the batch dimension " if batching else ""
        raise UsageError(
            f"--shape for {name!r} has {len(shape)} dimension(s) but the input has {len(dims)} "
            f"{where}({_dims_text(dims)}): give {len(dims)}"
        )
    for axis, (declared, value) in enumerate(zip(dims, shape)):
        if isinstance(declared, int) and declared != value:
            raise UsageError(
                f"--shape for {name!r} sets dimension {axis} to {value} but the model fixes it at {declared}"
            )
    return shape


def _shape_hint(name: str, dims: tuple[Dim, ...]) -> str:
    example = ",".join(str(d) if isinstance(d, int) else "N" for d in dims)
    dynamic = ", ".join(str(d) for d in dims if isinstance(d, str))
    return (
        f"input {name!r} has dims ({_dims_text(dims)}), {dynamic} unresolved: pass --shape {name}:{example}"
    )


def _dims_text(dims: tuple[Dim, ...]) -> str:
    return ", ".join(str(d) for d in dims)


def synthetic_inputs(
    info: ModelInfo, shapes: Mapping[str, tuple[int, ...]], batch: int, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Realistic random inputs: token ids inside the vocabulary, masks of ones, floats in [0, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in info.inputs:
        shape = ((batch,) if info.batching else ()) + tuple(shapes[spec.name])
        arrays[spec.name] = _random_tensor(rng, spec, shape)
    return arrays


def _random_tensor(rng: np.random.Generator, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        if "mask" in spec.name.lower():
            return np.ones(shape, dtype=dtype)
        low, high = spec.index_range or (0, 100)
        return rng.integers(low, high, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        # Casting can round values just below 1 up to 1.0 (float16): keep the documented [0, 1).
        below_one = np.nextafter(dtype.type(1), dtype.type(0))
        return np.minimum(rng.random(shape).astype(dtype), below_one)
    raise ModelError(f"input {spec.name!r} has dtype {spec.dtype}, which optimize cannot generate data for")


def load_input_data(info: ModelInfo, path: Path | str) -> list[dict[str, np.ndarray]]:
    """Samples from ``--input-data``: a .npz file with one array per input, samples along the first axis.

    Each returned sample holds one request's inputs (batch 1 when the model batches).

    Raises:
        UsageError: the file is missing, not a .npz, or its arrays do not match the model's inputs.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--input-data {str(path)!r} does not exist: give a .npz file (numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError) as exc:
        raise UsageError(
            f"--input-data {str(path)!r} is not a .npz file with one array per input (numpy.savez): {exc}"
        ) from exc
    names = [spec.name for spec in info.inputs]
    if sorted(arrays) != sorted(names):
        raise UsageError(
            f"--input-data has arrays {', '.join(sorted(arrays)) or 'none'}; the model's inputs are {', '.join(names)}"
        )
    counts = {array.shape[0] if array.ndim else 0 for array in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise UsageError(
            "--input-data arrays must all hold the same number (>= 1) of samples along their first axis"
        )
    for spec in info.inputs:
        _check_input_array(info, spec, arrays[spec.name])
    count = counts.pop()
    keep_axis = info.batching  # batching models get [1, ...] per request; others the full stored shape
    return [
        {name: (array[i : i + 1] if keep_axis else array[i]) for name, array in arrays.items()}
        for i in range(count)
    ]


def check_input_array(info: ModelInfo, name: str, array: np.ndarray, option: str = "--accuracy-data") -> None:
    """Raise UsageError when ``array`` (samples on the first axis) cannot feed input ``name``."""
    spec = next(s for s in info.inputs if s.name == name)
    _check_input_array(info, spec, array, option)


def _check_input_array(
    info: ModelInfo, spec: TensorSpec, array: np.ndarray, option: str = "--input-data"
) -> None:
    if array.dtype != np.dtype(spec.dtype):
        raise UsageError(
            f"{option} array {spec.name!r} has dtype {array.dtype}, but the model expects {spec.dtype}"
        )
    dims = info.tensor_dims(spec)
    sample_shape = array.shape[1:]
    fits = len(sample_shape) == len(dims) and all(
        isinstance(d, str) or d == s for d, s in zip(dims, sample_shape)
    )
    if not fits:
        raise UsageError(
            f"{option} array {spec.name!r} holds samples of shape {list(sample_shape)}, "
            f"but the model expects ({_dims_text(dims)}) per request"
        )


def shapes_from_samples(info: ModelInfo, samples: list[dict[str, np.ndarray]]) -> dict[str, tuple[int, ...]]:
    """Request shapes (without batch when batching) read off the first input-data sample."""
    first = samples[0]
    return {name: tuple(first[name].shape[1:] if info.batching else first[name].shape) for name in first}


def check_model_runs(info: ModelInfo, sample: Mapping[str, np.ndarray]) -> None:
    """Run one request through ONNX Runtime on the CPU, so a model it cannot load stops the run early.

    Raises:
        ModelError: the session cannot be created (unsupported opset or operator) or the run fails.
    """
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
        session.run(None, dict(sample))
    except Exception as exc:  # onnxruntime raises its own exception types for load and run failures
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"ONNX Runtime cannot run {str(info.source_path)!r} ({detail}): check the model's opset and "
            "operators are supported by onnxruntime, or export it again"
        ) from exc


SYNTHETIC_SAMPLES = 32  # requests a study sends in turn when the user gives no input data


def load_requests(
    path: Path, shapes: Mapping[str, tuple[int, ...]], input_data: Path | None, *, cache: Path
) -> tuple[ModelInfo, dict[str, tuple[int, ...]], list[dict[str, np.ndarray]]]:
    """The model, its request shapes and its request samples (the user's ``input_data``, or synthetic).

    The model is run once on the first sample, so a model ONNX Runtime cannot run stops here.
    """
    model = inspect_model(path, cache=cache)
    if input_data is not None:
        samples = load_input_data(model, input_data)
        resolved = resolve_shapes(model, {**shapes_from_samples(model, samples), **shapes})
    else:
        resolved = resolve_shapes(model, shapes)
        samples = [synthetic_inputs(model, resolved, 1, seed=seed) for seed in range(SYNTHETIC_SAMPLES)]
    check_model_runs(model, samples[0])
    return model, resolved, samples
