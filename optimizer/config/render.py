"""Config rendering: a Candidate becomes Triton's own ``ModelConfig`` protobuf.

Pure functions only. ``render_config`` builds the message from small ``_set_*`` steps; ``to_json``
(for the model-control load request) and ``to_pbtxt`` (for ``config.pbtxt``) serialise it with
protobuf's own formats, so the file a study exports is exactly what it measured.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.config.space import Candidate
from optimizer.model.intake import ModelInfo
from optimizer.model.variants import served_recipe, variant_filename

__all__ = [
    "config_from_json",
    "config_from_pbtxt",
    "config_key",
    "render_config",
    "portable",
    "render_ensemble",
    "tensorrt_cache_dir",
    "tensorrt_profile",
    "to_dict",
    "config_digest",
    "to_json",
    "to_pbtxt",
]


_TRITON_TYPES = {
    "bool": mc.TYPE_BOOL,
    "uint8": mc.TYPE_UINT8,
    "uint16": mc.TYPE_UINT16,
    "uint32": mc.TYPE_UINT32,
    "uint64": mc.TYPE_UINT64,
    "int8": mc.TYPE_INT8,
    "int16": mc.TYPE_INT16,
    "int32": mc.TYPE_INT32,
    "int64": mc.TYPE_INT64,
    "float16": mc.TYPE_FP16,
    "float32": mc.TYPE_FP32,
    "float64": mc.TYPE_FP64,
    "object": mc.TYPE_STRING,
}

# The native onnxruntime backend's optimization.graph.level values.
_GRAPH_LEVELS = {"basic": -1, "extended": 1, "disabled": 2}

TRT_WORKSPACE_BYTES = 1 << 30
# TensorRT's precision_mode for each precision the study proposes on the tensorrt provider (the native
# backend refuses any other value): fp16 and int8 are TensorRT's own modes, built from the fp32 file.
TRT_PRECISION_MODES = {"fp32": "FP32", "fp32-fused": "FP32", "fp16": "FP16", "int8": "INT8"}


def render_config(
    info: ModelInfo,
    candidate: Candidate,
    *,
    model_name: str,
    engine_cache_dir: str | None = None,
    request_shapes: Mapping[str, tuple[int, ...]] | None = None,
    gpus: tuple[int, ...] = (),
) -> mc.ModelConfig:
    """The Triton model config for serving ``info`` as ``candidate`` says.

    Args:
        info: The model, from intake.
        candidate: The point of the search space.
        model_name: Triton's name for the model.
        engine_cache_dir: Where TensorRT keeps built engines and its timing cache, so a config seen
            before loads without a rebuild (see :func:`tensorrt_cache_dir`).
        request_shapes: Each input's shape as clients send it (without the batch dimension when the
            model batches): TensorRT's optimization profile and the warm-up at the max batch are built
            from them. None: no profile (TensorRT then builds for the shapes it meets, and rebuilds).
        gpus: The GPUs a GPU provider's instances run on (``instance_group.gpus``; ``count`` is then per
            GPU). Empty: every GPU the server sees.
    """
    config = mc.ModelConfig(name=model_name, backend="onnxruntime")
    config.max_batch_size = candidate.max_batch_size if info.batching else 0
    if candidate.precision != "fp32" and not _precision_is_trt_mode(candidate):
        recipe = served_recipe(candidate.precision, candidate.provider, candidate.int8_recipe)
        config.default_model_filename = variant_filename(candidate.precision, recipe)
    _set_io(config, info)
    _set_instances(config, candidate, gpus)
    _set_batching(config, candidate)
    _set_optimization(config, candidate, engine_cache_dir)
    if candidate.provider == "tensorrt" and request_shapes is not None:
        _set_tensorrt_profile(config, info, candidate, request_shapes)
        _set_warmup(config, info, request_shapes)
    _set_parameters(config, candidate)
    return config


def tensorrt_profile(
    info: ModelInfo, candidate: Candidate, request_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, str]:
    """TensorRT's optimization profile for the candidate: ``trt_profile_{min,opt,max}_shapes`` values.

    Each is ``input:D0xD1...,...`` over every input (the onnxruntime backend's format). The batch
    dimension runs from 1 through the preferred size the batcher aims at (opt; the max batch without
    one) to the max batch size, so one engine serves every batch the trial sends; a model that does not
    batch has one shape.
    """
    batches: dict[str, tuple[int, ...]]
    if info.batching:
        largest = max(1, candidate.max_batch_size)
        opt = max(candidate.preferred_batch_sizes, default=largest) if candidate.dynamic_batching else 1
        batches = {"min": (1,), "opt": (opt,), "max": (largest,)}
    else:
        batches = {"min": (), "opt": (), "max": ()}
    return {
        f"trt_profile_{which}_shapes": ",".join(
            f"{spec.name}:" + "x".join(str(d) for d in batch + tuple(request_shapes[spec.name]))
            for spec in info.inputs
        )
        for which, batch in batches.items()
    }


def tensorrt_cache_dir(
    root: Path, info: ModelInfo, candidate: Candidate, request_shapes: Mapping[str, tuple[int, ...]]
) -> Path:
    """Where a TensorRT candidate's engines and timing cache live, under ``root``: one folder per model
    content, precision and profile, so a config seen before (in this study or another) loads in
    seconds, and the exported repository names the engines it was measured with."""
    profile = json.dumps(tensorrt_profile(info, candidate, request_shapes), sort_keys=True)
    key = hashlib.sha256(f"{info.sha256}|{candidate.precision}|{profile}".encode()).hexdigest()[:16]
    return root / "tensorrt" / f"{info.sha256[:12]}-{candidate.precision}-{key}"


def _precision_is_trt_mode(candidate: Candidate) -> bool:
    # TensorRT makes fp16 itself from the fp32 file (precision_mode FP16): no converted file needed.
    return candidate.provider == "tensorrt" and candidate.precision == "fp16"


def _set_io(config: mc.ModelConfig, info: ModelInfo) -> None:
    for spec, field in [(s, config.input) for s in info.inputs] + [(s, config.output) for s in info.outputs]:
        tensor = field.add()
        tensor.name = spec.name
        tensor.data_type = _TRITON_TYPES[spec.dtype]
        tensor.dims.extend(d if isinstance(d, int) else -1 for d in info.tensor_dims(spec))
        if not tensor.dims:  # a scalar per batch item: Triton wants [1] with reshape to []
            tensor.dims.append(1)
            tensor.reshape.SetInParent()


def _set_instances(config: mc.ModelConfig, candidate: Candidate, gpus: tuple[int, ...]) -> None:
    group = config.instance_group.add()
    group.count = candidate.instance_count
    on_gpu = candidate.provider in ("cuda", "tensorrt")
    group.kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
    if on_gpu:
        group.gpus.extend(gpus)


def _set_batching(config: mc.ModelConfig, candidate: Candidate) -> None:
    if not candidate.dynamic_batching or config.max_batch_size <= 1:
        return
    batching = config.dynamic_batching
    batching.SetInParent()  # present even with no preferred sizes and no delay
    batching.preferred_batch_size.extend(candidate.preferred_batch_sizes)
    batching.max_queue_delay_microseconds = candidate.max_queue_delay_us


def _set_optimization(config: mc.ModelConfig, candidate: Candidate, engine_cache_dir: str | None) -> None:
    if candidate.graph_level != "default":
        config.optimization.graph.level = _GRAPH_LEVELS[candidate.graph_level]
    accelerators = config.optimization.execution_accelerators
    if candidate.provider == "openvino":
        accelerators.cpu_execution_accelerator.add(name="openvino")
    elif candidate.provider == "tensorrt":
        trt = accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = TRT_PRECISION_MODES[candidate.precision]
        trt.parameters["max_workspace_size_bytes"] = str(TRT_WORKSPACE_BYTES)
        if candidate.precision == "fp16":  # LayerNorm in fp16 overflows on transformer models
            trt.parameters["trt_layer_norm_fp32_fallback"] = "1"
        if engine_cache_dir:
            trt.parameters["trt_engine_cache_enable"] = "1"
            trt.parameters["trt_engine_cache_path"] = engine_cache_dir
            trt.parameters["trt_timing_cache_enable"] = "1"
            trt.parameters["trt_timing_cache_path"] = engine_cache_dir
    elif candidate.provider == "cuda":
        accelerators.gpu_execution_accelerator.add(name="cuda")


def _set_tensorrt_profile(
    config: mc.ModelConfig,
    info: ModelInfo,
    candidate: Candidate,
    request_shapes: Mapping[str, tuple[int, ...]],
) -> None:
    trt = next(a for a in config.optimization.execution_accelerators.gpu_execution_accelerator)
    for key, value in tensorrt_profile(info, candidate, request_shapes).items():
        trt.parameters[key] = value


def _set_warmup(
    config: mc.ModelConfig, info: ModelInfo, request_shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Triton's ``model_warmup`` at the max batch: the engine is built while the model loads, before any
    request is timed, in the study and in production alike (zeros: the shapes build it, not the values)."""
    warmup = config.model_warmup.add(name="tensorrt engine at the max batch size")
    warmup.batch_size = max(1, config.max_batch_size)
    for spec in info.inputs:
        tensor = warmup.inputs[spec.name]
        tensor.data_type = _TRITON_TYPES[spec.dtype]
        tensor.dims.extend(request_shapes[spec.name] or (1,))
        tensor.zero_data = True


def _set_parameters(config: mc.ModelConfig, candidate: Candidate) -> None:
    if candidate.intra_op_threads > 0:
        config.parameters["intra_op_thread_count"].string_value = str(candidate.intra_op_threads)
    # The native backend's defaults (sequential, arena on) are left unwritten, as an untuned config has them.
    if candidate.execution_mode == "parallel":
        config.parameters["execution_mode"].string_value = "1"
    if candidate.cpu_mem_arena == "disabled":
        config.parameters["enable_mem_arena"].string_value = "0"


def to_json(config: mc.ModelConfig) -> str:
    """The config as JSON for ``load_model(name, config=...)``."""
    return json_format.MessageToJson(config, preserving_proto_field_name=True, indent=None)


def to_dict(config: mc.ModelConfig) -> dict[str, Any]:
    """The config as a JSON object (for the study database)."""
    return json.loads(to_json(config))


def to_pbtxt(config: mc.ModelConfig) -> str:
    """The config in protobuf text format: the contents of ``config.pbtxt``."""
    return text_format.MessageToString(config)


def config_from_json(text: str | dict[str, Any]) -> mc.ModelConfig:
    data = text if isinstance(text, str) else json.dumps(text)
    return json_format.Parse(data, mc.ModelConfig())


def render_ensemble(name: str, config_text: str, step_max_batch: Mapping[str, int]) -> mc.ModelConfig:
    """An ensemble's own config (``config_text``) with a max batch size every step accepts.

    Triton refuses an ensemble whose ``max_batch_size`` exceeds one of its steps', so it is lowered to
    the smallest of the steps' (``step_max_batch``, by step name). The steps are served as version 1.
    """
    config = config_from_pbtxt(config_text)
    config.name = name
    batching = [size for size in step_max_batch.values() if size > 0]
    if config.max_batch_size > 0 and batching:
        config.max_batch_size = min(config.max_batch_size, *batching)
    for step in config.ensemble_scheduling.step:
        step.model_version = -1
    return config


def config_from_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def config_key(config: mc.ModelConfig) -> str:
    """A canonical string of the config: two candidates with the same key serve identically (where this
    machine keeps TensorRT's caches is not part of it: see :func:`portable`)."""
    return json_format.MessageToJson(
        portable(config), preserving_proto_field_name=True, indent=None, sort_keys=True
    )


# TensorRT's caches: a path of the machine that measured the config, meaningless in an exported repository.
_MACHINE_PARAMETERS = (
    "trt_engine_cache_enable",
    "trt_engine_cache_path",
    "trt_timing_cache_enable",
    "trt_timing_cache_path",
)


def portable(config: mc.ModelConfig) -> mc.ModelConfig:
    """The config without this machine's cache paths: what is exported and compared. A deployment builds
    its TensorRT engine at load instead (the config's ``model_warmup`` runs the build before it serves)."""
    copy = mc.ModelConfig()
    copy.CopyFrom(config)
    for accelerator in copy.optimization.execution_accelerators.gpu_execution_accelerator:
        for key in _MACHINE_PARAMETERS:
            accelerator.parameters.pop(key, None)
    return copy


def config_digest(config: mc.ModelConfig) -> str:
    """A short digest of :func:`config_key`: stored on every trial, and the key of a recorded config."""
    return hashlib.sha256(config_key(config).encode()).hexdigest()[:16]
