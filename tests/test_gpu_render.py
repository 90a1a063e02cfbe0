"""The GPU configs, field by field against model_config.proto and the onnxruntime backend's README.

No GPU runs here: these tests check what a GPU server would be sent. TensorRT candidates carry an
optimization profile over the batch sizes the trial sends, engine and timing caches keyed by model,
precision and profile, a ``model_warmup`` at the max batch, and a ``precision_mode`` the native backend
accepts; an exported config carries no path of the measuring machine. int8 on a GPU provider is the
symmetric QDQ recipe, never one of the CPU's.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.config.render import (
    config_digest,
    portable,
    render_config,
    tensorrt_cache_dir,
    tensorrt_profile,
    to_pbtxt,
)
from optimizer.config.space import Candidate, load_space
from optimizer.model.accuracy import AccuracyGuard
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.model.quantize import GPU_INT8_RECIPE, INT8_RECIPES, recipes_for
from optimizer.model.variants import variant_path
from optimizer.study.trial_rules import render_trial_config

# The onnxruntime backend README's TensorRT parameter table (triton-inference-server/onnxruntime_backend,
# "Parameter mapping between ONNX Runtime and Triton ONNXRuntime Backend"): every key optimize writes
# must be one of these, and precision_mode one of its allowed values.
DOCUMENTED_TRT_KEYS = {
    "precision_mode",
    "max_workspace_size_bytes",
    "trt_max_partition_iterations",
    "trt_min_subgraph_size",
    "int8_calibration_table_name",
    "int8_use_native_calibration_table",
    "trt_engine_cache_enable",
    "trt_engine_cache_path",
    "trt_engine_cache_prefix",
    "trt_layer_norm_fp32_fallback",
    "trt_timing_cache_enable",
    "trt_timing_cache_path",
    "trt_profile_min_shapes",
    "trt_profile_opt_shapes",
    "trt_profile_max_shapes",
    "trt_builder_optimization_level",
    "trt_cuda_graph_enable",
}
PRECISION_MODES = {"FP32", "FP16", "BF16", "INT8"}
# "input1:dim1xdim2...,input2:dim1xdim2...": the README's format of a profile's shapes.
PROFILE_FORMAT = re.compile(r"^[^:,]+:\d+(x\d+)*(,[^:,]+:\d+(x\d+)*)*$")


@pytest.fixture(scope="module")
def encoder(models):
    """The test encoder (int64 tokens, a dynamic sequence) and its requests at sequence 16."""
    info = inspect_model(models["encoder"])
    shapes = resolve_shapes(info, {"input_ids": (16,), "attention_mask": (16,)})
    return info, shapes


def _trt(config: mc.ModelConfig) -> mc.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator:
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    return accelerator


TRT_FP16 = Candidate(
    provider="tensorrt", precision="fp16", max_batch_size=16, preferred_batch_sizes=(8, 4), instance_count=2
)


def test_a_tensorrt_candidate_has_a_profile_from_one_to_the_max_batch_with_the_preferred_size_as_opt(
    encoder,
):
    info, shapes = encoder
    config = render_config(info, TRT_FP16, model_name="enc", engine_cache_dir="/c/trt", request_shapes=shapes)
    parameters = dict(_trt(config).parameters)
    assert parameters["trt_profile_min_shapes"] == "input_ids:1x16,attention_mask:1x16"
    assert parameters["trt_profile_opt_shapes"] == "input_ids:8x16,attention_mask:8x16"
    assert parameters["trt_profile_max_shapes"] == "input_ids:16x16,attention_mask:16x16"
    assert all(PROFILE_FORMAT.match(parameters[f"trt_profile_{w}_shapes"]) for w in ("min", "opt", "max"))
    assert parameters["precision_mode"] == "FP16" and parameters["trt_layer_norm_fp32_fallback"] == "1"
    assert set(parameters) <= DOCUMENTED_TRT_KEYS and parameters["precision_mode"] in PRECISION_MODES
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert config.instance_group[0].count == 2 and not config.instance_group[0].gpus  # per GPU, every GPU


def test_the_engine_and_timing_caches_share_one_folder(encoder):
    info, shapes = encoder
    config = render_config(info, TRT_FP16, model_name="enc", engine_cache_dir="/c/trt", request_shapes=shapes)
    parameters = dict(_trt(config).parameters)
    assert parameters["trt_engine_cache_enable"] == "1" and parameters["trt_engine_cache_path"] == "/c/trt"
    assert parameters["trt_timing_cache_enable"] == "1" and parameters["trt_timing_cache_path"] == "/c/trt"


def test_a_tensorrt_config_warms_up_at_its_max_batch_with_every_input(encoder):
    info, shapes = encoder
    config = render_config(info, TRT_FP16, model_name="enc", request_shapes=shapes)
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 16
    assert set(warmup.inputs) == {"input_ids", "attention_mask"}
    for tensor in warmup.inputs.values():
        assert tensor.data_type == mc.TYPE_INT64 and list(tensor.dims) == [16]
        assert tensor.WhichOneof("input_data_type") == "zero_data"  # zeros: never an out-of-range token


def test_without_a_preferred_size_the_profiles_opt_is_the_max_batch(encoder):
    info, shapes = encoder
    candidate = Candidate(provider="tensorrt", max_batch_size=8)
    assert tensorrt_profile(info, candidate, shapes)["trt_profile_opt_shapes"].startswith("input_ids:8x16")
    single = Candidate(provider="tensorrt", max_batch_size=1)
    assert tensorrt_profile(info, single, shapes)["trt_profile_max_shapes"].startswith("input_ids:1x16")


def test_a_model_that_does_not_batch_has_one_shape_and_warms_up_with_one_request(models):
    info = inspect_model(models["fixed"])
    assert not info.batching
    shapes = resolve_shapes(info, {})
    config = render_config(info, Candidate(provider="tensorrt"), model_name="f", request_shapes=shapes)
    parameters = dict(_trt(config).parameters)
    assert parameters["trt_profile_min_shapes"] == parameters["trt_profile_max_shapes"]
    assert parameters["trt_profile_min_shapes"].startswith(
        f"{info.inputs[0].name}:1x"
    )  # its fixed batch of 1
    assert config.model_warmup[0].batch_size == 1


def test_tensorrt_int8_is_tensorrts_int8_mode_on_the_symmetric_qdq_file(encoder):
    info, shapes = encoder
    candidate = Candidate(provider="tensorrt", precision="int8", int8_recipe=GPU_INT8_RECIPE)
    config = render_config(info, candidate, model_name="enc", request_shapes=shapes)
    assert _trt(config).parameters["precision_mode"] == "INT8"
    assert config.default_model_filename == f"model.int8-{GPU_INT8_RECIPE}.onnx"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_cuda_candidate_has_no_tensorrt_parameters_and_no_warmup(encoder, precision):
    info, shapes = encoder
    config = render_config(
        info, Candidate(provider="cuda", precision=precision), model_name="enc", request_shapes=shapes
    )
    assert _trt(config).name == "cuda" and not _trt(config).parameters
    assert not config.model_warmup


def test_a_cpu_config_is_the_same_with_or_without_the_request_shapes(encoder):
    info, shapes = encoder
    candidate = Candidate(max_batch_size=8, preferred_batch_sizes=(4,), instance_count=2)
    with_shapes = render_config(info, candidate, model_name="enc", request_shapes=shapes)
    assert with_shapes == render_config(info, candidate, model_name="enc")


def test_the_config_pbtxt_of_a_tensorrt_config_parses_back_as_model_config_proto(encoder):
    info, shapes = encoder
    config = render_config(info, TRT_FP16, model_name="enc", engine_cache_dir="/c/trt", request_shapes=shapes)
    parsed = text_format.Parse(to_pbtxt(config), mc.ModelConfig())  # Triton reads config.pbtxt so
    assert parsed == config


def test_an_exported_config_has_no_cache_path_and_the_cache_path_is_not_part_of_its_identity(encoder):
    info, shapes = encoder
    here = render_config(info, TRT_FP16, model_name="enc", engine_cache_dir="/a/trt", request_shapes=shapes)
    there = render_config(info, TRT_FP16, model_name="enc", engine_cache_dir="/b/trt", request_shapes=shapes)
    exported = dict(_trt(portable(here)).parameters)
    assert not {k for k in exported if "cache" in k}
    assert exported["trt_profile_max_shapes"] and portable(here).model_warmup  # the build is kept
    assert config_digest(here) == config_digest(there)


def test_the_cache_folder_is_keyed_by_model_precision_and_profile(encoder, tmp_path):
    info, shapes = encoder
    base = tensorrt_cache_dir(tmp_path, info, TRT_FP16, shapes)
    assert base.parent == tmp_path / "tensorrt"
    assert base == tensorrt_cache_dir(tmp_path, info, TRT_FP16.__class__(**vars(TRT_FP16)), shapes)
    assert base != tensorrt_cache_dir(
        tmp_path,
        info,
        Candidate(provider="tensorrt", max_batch_size=16, preferred_batch_sizes=(8, 4)),
        shapes,
    )  # fp32
    assert base != tensorrt_cache_dir(
        tmp_path, info, Candidate(**{**vars(TRT_FP16), "max_batch_size": 32}), shapes
    )
    other_shapes = {name: (32,) for name in shapes}
    assert base != tensorrt_cache_dir(tmp_path, info, TRT_FP16, other_shapes)


def test_a_trials_tensorrt_config_takes_its_profile_from_the_requests_and_its_cache_under_ours(
    encoder, monkeypatch, tmp_path
):
    info, shapes = encoder
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(tmp_path))
    samples = [synthetic_inputs(info, shapes, 1, seed=0)]
    config = render_trial_config(info, TRT_FP16, "enc", samples)
    parameters = dict(_trt(config).parameters)
    assert parameters["trt_profile_max_shapes"] == "input_ids:16x16,attention_mask:16x16"
    assert Path(parameters["trt_engine_cache_path"]).is_relative_to(tmp_path / "tensorrt")


def test_gpu_providers_serve_int8_from_the_symmetric_qdq_recipe_only():
    assert recipes_for(("cuda",)) == recipes_for(("tensorrt",)) == (GPU_INT8_RECIPE,)
    assert recipes_for(load_space("gpu").execution_providers) == (GPU_INT8_RECIPE,)
    assert recipes_for(("cpu",)) is None  # the CPU's own order (dynamic first, ...)
    assert INT8_RECIPES[GPU_INT8_RECIPE].calibrated


def test_the_symmetric_qdq_file_quantizes_with_signed_zero_points_tensorrt_can_run(models, tmp_path):
    info = inspect_model(models["mlp"])
    samples = [synthetic_inputs(info, resolve_shapes(info, {}), 1, seed=seed) for seed in range(8)]
    path = variant_path(info, "int8", tmp_path, GPU_INT8_RECIPE, samples)
    graph = onnx.load(str(path)).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    assert not any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in graph.node)
    zero_points = {
        init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer if "zero_point" in init.name
    }
    assert zero_points and not any(array.any() for array in zero_points.values())  # symmetric: all 0
    # Activations and weights signed int8 (biases are int32, as QDQ quantizes them).
    assert {array.dtype for name, array in zero_points.items() if "bias" not in name} == {np.dtype(np.int8)}


def test_a_gpu_spaces_int8_variant_tries_the_symmetric_qdq_recipe_and_no_cpu_recipe(models):
    import optuna

    from optimizer.study.precisions import accurate_precisions
    from optimizer.study.run import QuietReporter

    info = inspect_model(models["mlp"])
    samples = [synthetic_inputs(info, resolve_shapes(info, {}), 1, seed=seed) for seed in range(8)]
    study = optuna.create_study(direction="maximize")
    accurate_precisions(study, info, load_space("gpu"), AccuracyGuard(samples, 0.01), QuietReporter())
    attempts = study.user_attrs["variants"]["int8"]["attempts"]
    assert [attempt["recipe"] for attempt in attempts] == [GPU_INT8_RECIPE]


# --- the embedded server's backend reads the same fields as the native one --------------------------------


@pytest.fixture(scope="module")
def backend():
    """The embedded server's onnxruntime backend (serving/backends/onnxruntime/model.py), imported here
    with a stand-in for the stub's triton_python_backend_utils (only its provider mapping is used)."""
    import importlib.util
    import sys
    import types

    import optimizer.serving.embedded as embedded

    stand_in = types.ModuleType("triton_python_backend_utils")
    previous = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = stand_in
    try:
        spec = importlib.util.spec_from_file_location("embedded_onnxruntime_backend", embedded.BACKEND_SOURCE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        if previous is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = previous


def _as_backend_sees(config: mc.ModelConfig) -> dict:
    """The config as Triton hands it to a Python backend (model_config.proto as JSON)."""
    from google.protobuf import json_format

    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def test_the_embedded_backend_turns_a_rendered_tensorrt_config_into_tensorrt_provider_options(
    backend, encoder
):
    info, shapes = encoder
    config = render_config(info, TRT_FP16, model_name="enc", engine_cache_dir="/c/trt", request_shapes=shapes)
    (trt, cuda, cpu) = backend.execution_providers(_as_backend_sees(config), "GPU", 1)
    assert trt[0] == "TensorrtExecutionProvider" and cpu == "CPUExecutionProvider"
    options = trt[1]
    assert options["device_id"] == 1 and options["trt_fp16_enable"] is True
    assert options["trt_max_workspace_size"] == "1073741824"
    assert options["trt_engine_cache_enable"] is True and options["trt_engine_cache_path"] == "/c/trt"
    assert options["trt_timing_cache_enable"] is True and options["trt_layer_norm_fp32_fallback"] is True
    assert options["trt_profile_max_shapes"] == "input_ids:16x16,attention_mask:16x16"
    assert cuda == ("CUDAExecutionProvider", {"device_id": 1})


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (
            {"precision_mode": "INT8", "int8_calibration_table_name": "t.flatbuffers"},
            {"trt_int8_enable": True, "trt_int8_calibration_table_name": "t.flatbuffers"},
        ),
        ({"precision_mode": "BF16"}, {"trt_bf16_enable": True}),
        (
            {"int8_use_native_calibration_table": "1", "trt_builder_optimization_level": "3"},
            {"trt_int8_use_native_calibration_table": True, "trt_builder_optimization_level": "3"},
        ),
    ],
)
def test_tensorrt_parameters_map_to_onnx_runtimes_options_as_the_native_backend_documents(
    backend, parameters, expected
):
    options = backend._tensorrt_options(parameters, 0)
    assert {key: options[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"precision_mode": "FP8"}, "unsupported precision_mode 'FP8'"),
        ({"workspace": "1"}, "unknown TensorRT"),
    ],
)
def test_what_the_native_backend_refuses_the_embedded_one_refuses(backend, parameters, message):
    with pytest.raises(ValueError, match=message):
        backend._tensorrt_options(parameters, 0)


def test_the_cuda_providers_options_come_from_the_model_parameters_and_the_cuda_accelerator(backend):
    config = mc.ModelConfig(name="m")
    for key, value in {
        "cudnn_conv_algo_search": "1",
        "gpu_mem_limit": "4294967200",
        "arena_extend_strategy": "1",
        "do_copy_in_default_stream": "0",
    }.items():
        config.parameters[key].string_value = value
    config.optimization.execution_accelerators.gpu_execution_accelerator.add(
        name="cuda", parameters={"cudnn_conv_use_max_workspace": "0"}
    )
    (cuda, _) = backend.execution_providers(_as_backend_sees(config), "GPU", 0)
    assert cuda == (
        "CUDAExecutionProvider",
        {
            "device_id": 0,
            "cudnn_conv_algo_search": "HEURISTIC",
            "gpu_mem_limit": "4294967200",
            "arena_extend_strategy": "kSameAsRequested",
            "do_copy_in_default_stream": "0",
            "cudnn_conv_use_max_workspace": "0",
        },
    )
    config.parameters["cudnn_conv_algo_search"].string_value = "7"
    with pytest.raises(ValueError, match="unsupported cudnn_conv_algo_search '7'"):
        backend.execution_providers(_as_backend_sees(config), "GPU", 0)


def test_the_accuracy_guard_says_it_checked_a_gpu_variant_on_the_cpu_when_the_gpu_provider_does_not_load(
    models,
):
    import optuna

    from optimizer.model.accuracy import check_variant
    from optimizer.study.precisions import accurate_precisions, serving_providers

    info = inspect_model(models["mlp"])
    samples = [synthetic_inputs(info, resolve_shapes(info, {}), 1, seed=seed) for seed in range(8)]
    fp16 = variant_path(info, "fp16", Path(info.path).parent / "variants")
    report = check_variant(info.path, fp16, samples, "fp16", 0.01, provider="cuda")
    assert (report.provider, report.wanted) == ("cpu", "cuda")  # no GPU here: run where it loads
    assert "on the cpu provider (cuda, which serves it, does not load here)" in report.reason()
    assert serving_providers(("cuda", "tensorrt")) == ("cuda", "tensorrt")
    assert serving_providers(("cpu", "openvino")) == ("cpu",)

    notes: list[str] = []
    reporter = type("Notes", (), {"note": lambda self, message: notes.append(message)})()
    study = optuna.create_study(direction="maximize")
    accurate_precisions(study, info, load_space("gpu"), AccuracyGuard(samples, 0.01), reporter)
    assert study.user_attrs["variants"]["fp16"]["wanted"] == "cuda"
    assert any(n.startswith("fp16: accuracy checked on the cpu provider; cuda") for n in notes), notes


def test_gpus_are_named_in_a_gpu_instance_group_and_only_for_a_server_optimize_does_not_start(encoder):
    from optimizer.serving.embedded import EmbeddedTriton
    from optimizer.serving.remote import RemoteTriton
    from optimizer.study.trial_rules import config_gpus

    info, shapes = encoder
    on_gpu = render_config(info, Candidate(provider="cuda", instance_count=2), model_name="e", gpus=(0, 2))
    assert list(on_gpu.instance_group[0].gpus) == [0, 2] and on_gpu.instance_group[0].count == 2
    on_cpu = render_config(info, Candidate(provider="cpu"), model_name="e", gpus=(0, 2))
    assert not on_cpu.instance_group[0].gpus  # a CPU instance names no GPU
    remote = RemoteTriton("localhost:1")  # not started: only its capabilities are read
    assert config_gpus("0,2", remote) == (0, 2)
    assert config_gpus(None, remote) == ()
    # A server optimize starts sees only the --gpus devices already (CUDA_VISIBLE_DEVICES, numbered from 0).
    assert config_gpus("0,2", EmbeddedTriton.__new__(EmbeddedTriton)) == ()


def test_gpus_that_are_not_indexes_are_refused_in_one_line(tmp_path, capsys):
    from optimizer.cli import main

    code = main(["study", "--gpus", "first", "--storage", f"sqlite:///{tmp_path}/s.db"])
    assert code == 2 and "--gpus takes GPU indexes separated by commas" in capsys.readouterr().err


def test_an_fp16_variant_keeps_normalisations_and_softmax_in_fp32(models, tmp_path):
    info = inspect_model(models["encoder"])
    path = variant_path(info, "fp16", tmp_path)
    graph = onnx.load(str(path)).graph
    converted = {node.op_type for node in graph.node}
    assert "Softmax" in converted or "ReduceMean" in converted  # the encoder has them
    fp16 = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT16}
    assert fp16  # the weights are fp16
    kept = [
        node
        for node in graph.node
        if node.op_type in ("Softmax", "ReduceMean", "Pow", "Sqrt", "LayerNormalization")
    ]
    # Their inputs come through a Cast to fp32 or straight from fp32 tensors: never an fp16 initializer.
    assert kept and not any(name in fp16 for node in kept for name in node.input)
    assert path.parent.name == "fp16-norms-fp32"  # apart from the earlier conversion's cached files
