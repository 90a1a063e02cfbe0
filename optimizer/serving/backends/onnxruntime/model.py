"""A Python-based Triton backend named ``onnxruntime``.

Triton serves every model whose config says ``backend: "onnxruntime"`` with this file when the
server has no native onnxruntime backend (the embedded server from the nvidia-pytriton wheel has none).
It honours the native backend's own config fields, so the config it runs is the ``config.pbtxt`` a
production Triton with the native backend runs:

- ``default_model_filename`` (default ``model.onnx``) inside the version directory;
- ``parameters``: ``intra_op_thread_count``, ``inter_op_thread_count``, ``execution_mode``,
  ``enable_mem_arena``, ``enable_mem_pattern``;
- ``optimization.graph.level`` (-1 basic, 1 extended, 2 disabled, absent: all);
- ``optimization.execution_accelerators``: CPU ``openvino``; GPU ``cuda`` (its parameters, and the
  model-level ``cudnn_conv_algo_search``, ``gpu_mem_limit``, ``arena_extend_strategy``,
  ``do_copy_in_default_stream``) and ``tensorrt`` (``precision_mode`` FP32/FP16/BF16/INT8, anything
  else refused; ``max_workspace_size_bytes``, ``int8_calibration_table_name``,
  ``int8_use_native_calibration_table`` and every ``trt_*`` option of the README's mapping table);
- ``instance_group`` kind and device.

Requests arrive grouped by Triton's dynamic batcher; they are concatenated along the batch axis,
run once, and split back. Tensors cross the stub boundary as numpy arrays (``as_numpy`` /
``Tensor(name, array)``), the route that proved reliable with the bundled stub.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
# The native backend's TensorRT keys (its README's "Parameter mapping" table) whose ONNX Runtime option is
# named otherwise; every other key is a ``trt_*`` option of the same name.
_TRT_RENAMED = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "int8_calibration_table_name": "trt_int8_calibration_table_name",
    "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
}
# precision_mode's allowed values (the native backend refuses any other).
_TRT_PRECISIONS = {
    "FP32": {},
    "FP16": {"trt_fp16_enable": True},
    "BF16": {"trt_bf16_enable": True},
    "INT8": {"trt_int8_enable": True},
}
_TRT_BOOL_KEYS = {
    "trt_int8_use_native_calibration_table",
    "trt_dla_enable",
    "trt_engine_cache_enable",
    "trt_timing_cache_enable",
    "trt_force_timing_cache",
    "trt_dump_subgraphs",
    "trt_force_sequential_engine_build",
    "trt_context_memory_sharing_enable",
    "trt_layer_norm_fp32_fallback",
    "trt_detailed_build_log",
    "trt_build_heuristics_enable",
    "trt_sparsity_enable",
    "trt_cuda_graph_enable",
    "trt_dump_ep_context_model",
}
# The model-level parameters the native backend still hands to the CUDA provider (its README's
# "Deprecated Parameters"), with their values as ONNX Runtime spells them.
_CUDA_MODEL_PARAMETERS = {
    "cudnn_conv_algo_search": {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"},
    "gpu_mem_limit": None,
    "arena_extend_strategy": {"0": "kNextPowerOfTwo", "1": "kSameAsRequested"},
    "do_copy_in_default_stream": None,
}


def _parameters(config):
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def session_options(config):
    """ONNX Runtime session options from the native backend's config fields."""
    params = _parameters(config)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_thread_count", "0") or 0)
    options.inter_op_num_threads = int(params.get("inter_op_thread_count", "0") or 0)
    if params.get("execution_mode", "0") == "1":
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if "enable_mem_arena" in params:
        options.enable_cpu_mem_arena = params["enable_mem_arena"] not in ("0", "false")
    if "enable_mem_pattern" in params:
        options.enable_mem_pattern = params["enable_mem_pattern"] not in ("0", "false")
    level = config.get("optimization", {}).get("graph", {}).get("level", 0)
    options.graph_optimization_level = _GRAPH_LEVELS.get(
        int(level), ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    return options


def _tensorrt_options(parameters, device_id):
    """The TensorRT provider's options from the ``tensorrt`` accelerator's parameters; an unknown
    ``precision_mode``, or a key the native backend does not map, is refused as the native backend does."""
    options = {"device_id": device_id}
    for key, value in parameters.items():
        if key == "precision_mode":
            if value.upper() not in _TRT_PRECISIONS:
                raise ValueError(f"unsupported precision_mode {value!r}: use FP32, FP16, BF16 or INT8")
            options.update(_TRT_PRECISIONS[value.upper()])
            continue
        name = _TRT_RENAMED.get(key, key)
        if not name.startswith("trt_"):
            raise ValueError(f"unknown TensorRT accelerator parameter {key!r}")
        options[name] = value in ("1", "true", "True") if name in _TRT_BOOL_KEYS else value
    return options


def _cuda_options(config, parameters, device_id):
    """The CUDA provider's options: the model-level parameters the native backend passes (deprecated
    there, still honoured), then the ``cuda`` accelerator's own parameters, as ONNX Runtime names them."""
    options = {"device_id": device_id}
    model = _parameters(config)
    for key, values in _CUDA_MODEL_PARAMETERS.items():
        if key not in model:
            continue
        if values is not None and model[key] not in values:
            raise ValueError(f"unsupported {key} {model[key]!r}: one of {', '.join(values)}")
        options[key] = values[model[key]] if values is not None else model[key]
    options.update(parameters)
    return options


def execution_providers(config, instance_kind, device_id):
    """The ONNX Runtime provider list for this instance, primary provider first."""
    accelerators = config.get("optimization", {}).get("execution_accelerators", {})
    if instance_kind == "GPU":
        providers = []
        cuda_parameters = {}
        for accelerator in accelerators.get("gpu_execution_accelerator", []):
            if accelerator["name"] == "tensorrt":
                providers.append(
                    (
                        "TensorrtExecutionProvider",
                        _tensorrt_options(accelerator.get("parameters", {}), device_id),
                    )
                )
            elif accelerator["name"] == "cuda":
                cuda_parameters = dict(accelerator.get("parameters", {}))
            else:
                raise ValueError(f"unknown gpu_execution_accelerator {accelerator['name']!r}")
        # As in the native backend, CUDA runs whatever TensorRT does not take.
        cuda = ("CUDAExecutionProvider", _cuda_options(config, cuda_parameters, device_id))
        return providers + [cuda, "CPUExecutionProvider"]
    providers = []
    for accelerator in accelerators.get("cpu_execution_accelerator", []):
        if accelerator["name"] != "openvino":
            raise ValueError(f"unknown cpu_execution_accelerator {accelerator['name']!r}")
        providers.append(("OpenVINOExecutionProvider", dict(accelerator.get("parameters", {}))))
    return providers + ["CPUExecutionProvider"]


def _check_providers_run(session, requested):
    # ONNX Runtime silently falls back to CPU when a provider cannot load: refuse instead, so a trial
    # never measures the CPU while its config says CUDA.
    active = set(session.get_providers())
    for provider in requested:
        name = provider[0] if isinstance(provider, tuple) else provider
        if name not in active:
            raise RuntimeError(
                f"execution provider {name} did not load in this ONNX Runtime "
                f"(active: {', '.join(sorted(active))}; available: {', '.join(ort.get_available_providers())})"
            )


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {filename!r} not found in version {args['model_version']}")
        kind = args.get("model_instance_kind", "CPU")
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        providers = execution_providers(config, kind, device_id)
        self.session = ort.InferenceSession(path, session_options(config), providers=providers)
        _check_providers_run(self.session, providers[:-1])  # the last one, CPU, always loads
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        self.output_dtypes = {
            tensor["name"]: pb_utils.triton_string_to_numpy(tensor["data_type"])
            for tensor in config["output"]
        }

    def execute(self, requests):
        if self.batching and len(requests) > 1:
            try:
                return self._execute_batched(requests)
            except Exception:  # e.g. shapes that cannot be concatenated: fall back to one by one
                pass
        return [self._execute_one(request) for request in requests]

    def _inputs(self, request):
        return {
            name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names
        }

    def _response(self, outputs):
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value.astype(self.output_dtypes[name], copy=False)))
            for name, value in zip(self.output_names, outputs)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _execute_one(self, request):
        try:
            return self._response(self.session.run(self.output_names, self._inputs(request)))
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {exc}"))

    def _execute_batched(self, requests):
        feeds = [self._inputs(request) for request in requests]
        sizes = [next(iter(feed.values())).shape[0] for feed in feeds]
        batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in self.input_names}
        outputs = self.session.run(self.output_names, batch)
        bounds = np.cumsum([0] + sizes)
        return [
            self._response([output[start:stop] for output in outputs])
            for start, stop in zip(bounds[:-1], bounds[1:])
        ]

    def finalize(self):
        self.session = None
