"""Tests for optimizer.config.render: a Candidate becomes Triton's ModelConfig and round-trips exactly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.config.render import (
    TRT_WORKSPACE_BYTES,
    config_from_json,
    config_from_pbtxt,
    config_key,
    render_config,
    to_dict,
    to_json,
    to_pbtxt,
)
from optimizer.config.space import (
    CPU_MEM_ARENAS,
    CPU_PROVIDERS,
    EXECUTION_MODES,
    GPU_PROVIDERS,
    GRAPH_LEVELS,
    PRECISIONS,
    Candidate,
)
from optimizer.model.intake import ModelInfo, TensorSpec
from optimizer.model.quantize import INT8_RECIPES
from optimizer.model.variants import MODEL_FILENAMES, precision_of_file, recipe_of_file


def _info(inputs: list[TensorSpec], outputs: list[TensorSpec], *, batching: bool = True) -> ModelInfo:
    return ModelInfo(
        source_path=Path("/models/model.onnx"),
        path=Path("/models/model.onnx"),
        sha256="0" * 64,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        batching=batching,
        opset=17,
    )


MLP = _info([TensorSpec("x", "float32", ("batch", 64))], [TensorSpec("logits", "float32", ("batch", 10))])
ENCODER = _info(
    [
        TensorSpec("input_ids", "int64", ("batch", "sequence"), index_range=(0, 1000)),
        TensorSpec("attention_mask", "int64", ("batch", "sequence")),
    ],
    [
        TensorSpec("last_hidden_state", "float32", ("batch", "sequence", 32)),
        TensorSpec("pooled", "float32", ("batch", 32)),
    ],
)
FIXED_BATCH_MLP = _info(
    [TensorSpec("x", "float32", (1, 64))],
    [TensorSpec("logits", "float32", (1, 10))],
    batching=False,
)
SCALAR_SCORE = _info([TensorSpec("x", "float32", ("batch", 4))], [TensorSpec("score", "float32", ("batch",))])
MULTI_DTYPE = _info(
    [
        TensorSpec("a", "float32", ("batch", 8)),
        TensorSpec("b", "int32", ("batch", 8)),
        TensorSpec("c", "float16", ("batch", 8)),
    ],
    [TensorSpec("sum", "float32", ("batch", 8)), TensorSpec("half", "float16", ("batch", 8))],
)


def _render(candidate: Candidate, info: ModelInfo = MLP, **kwargs: str) -> mc.ModelConfig:
    return render_config(info, candidate, model_name="model", **kwargs)


# --- baseline and batching ----------------------------------------------------------------------


def test_baseline_candidate_renders_one_cpu_instance_without_batching_or_parameters() -> None:
    expected = config_from_pbtxt(
        """
        name: "model"
        backend: "onnxruntime"
        max_batch_size: 1
        input { name: "x" data_type: TYPE_FP32 dims: 64 }
        output { name: "logits" data_type: TYPE_FP32 dims: 10 }
        instance_group { count: 1 kind: KIND_CPU }
        """
    )

    config = _render(Candidate())

    assert config == expected
    assert not config.HasField("dynamic_batching")
    assert not config.HasField("optimization")
    assert dict(config.parameters) == {}
    assert config.default_model_filename == ""


def test_dynamic_batching_sets_preferred_sizes_and_queue_delay() -> None:
    candidate = Candidate(max_batch_size=8, preferred_batch_sizes=(8, 4), max_queue_delay_us=500)

    config = _render(candidate)

    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500


def test_dynamic_batching_is_enabled_even_without_preferred_sizes_or_delay() -> None:
    config = _render(Candidate(max_batch_size=4))

    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == []
    assert config.dynamic_batching.max_queue_delay_microseconds == 0


def test_instance_count_sets_the_instance_group_count() -> None:
    config = _render(Candidate(instance_count=3))

    assert [(group.count, group.kind) for group in config.instance_group] == [
        (3, mc.ModelInstanceGroup.KIND_CPU)
    ]


def test_intra_op_threads_sets_the_intra_op_thread_count_parameter() -> None:
    config = _render(Candidate(intra_op_threads=2))

    assert list(config.parameters) == ["intra_op_thread_count"]
    assert config.parameters["intra_op_thread_count"].string_value == "2"


def test_session_options_render_as_the_native_backends_parameters() -> None:
    untuned = _render(Candidate())
    tuned = _render(Candidate(execution_mode="parallel", cpu_mem_arena="disabled"))
    assert "execution_mode" not in untuned.parameters and "enable_mem_arena" not in untuned.parameters
    assert tuned.parameters["execution_mode"].string_value == "1"
    assert tuned.parameters["enable_mem_arena"].string_value == "0"


@pytest.mark.server
def test_a_config_with_session_options_loads_and_serves(triton, models) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    from optimizer.model.intake import inspect_model
    from optimizer.model.variants import config_files
    from optimizer.paths import cache_dir

    info = inspect_model(models["mlp"])
    candidate = Candidate(max_batch_size=4, execution_mode="parallel", cpu_mem_arena="disabled")
    config = render_config(info, candidate, model_name="mlp_session")
    triton.load_model("mlp_session", to_json(config), config_files(info, config, cache_dir()))
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    tensor = grpcclient.InferInput(info.inputs[0].name, [2, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 64), np.float32))
    served = client.infer("mlp_session", [tensor]).as_numpy(info.outputs[0].name)
    client.close()
    assert served.shape == (2, 10) and np.all(np.isfinite(served))


@pytest.mark.parametrize(
    ("recipe", "filename"),
    [("dynamic", "model.int8.onnx"), ("static-qdq", "model.int8-static-qdq.onnx")],
)
def test_each_int8_recipe_serves_its_own_file(recipe: str, filename: str) -> None:
    config = _render(Candidate(precision="int8", int8_recipe=recipe))
    assert config.default_model_filename == filename
    assert precision_of_file(filename) == "int8" and recipe_of_file(filename) == recipe


# --- precision and providers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "filename"), [("int8", "model.int8.onnx"), ("fp16", "model.fp16.onnx")]
)
def test_reduced_precision_serves_its_converted_file(precision: str, filename: str) -> None:
    config = _render(Candidate(precision=precision))

    assert config.default_model_filename == filename
    assert MODEL_FILENAMES[precision] == filename


def test_fp32_serves_the_default_model_file() -> None:
    assert _render(Candidate(precision="fp32")).default_model_filename == ""


def test_tensorrt_fp16_sets_trt_precision_mode_and_serves_the_fp32_file() -> None:
    config = _render(Candidate(provider="tensorrt", precision="fp16"))

    assert config.default_model_filename == ""
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert dict(trt.parameters) == {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES),
        "trt_layer_norm_fp32_fallback": "1",  # LayerNorm kept in fp32: it overflows in fp16
    }


def test_tensorrt_fp32_sets_trt_precision_mode_fp32() -> None:
    config = _render(Candidate(provider="tensorrt", precision="fp32"))

    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.parameters["precision_mode"] == "FP32"


def test_tensorrt_int8_serves_the_int8_file_in_tensorrts_int8_mode() -> None:
    config = _render(Candidate(provider="tensorrt", precision="int8"))

    assert config.default_model_filename == "model.int8.onnx"
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.parameters["precision_mode"] == "INT8"


def test_tensorrt_with_engine_cache_dir_enables_the_engine_cache() -> None:
    config = _render(Candidate(provider="tensorrt"), engine_cache_dir="/cache/trt")

    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.parameters["trt_engine_cache_enable"] == "1"
    assert trt.parameters["trt_engine_cache_path"] == "/cache/trt"


def test_tensorrt_without_engine_cache_dir_sets_no_cache_parameters() -> None:
    config = _render(Candidate(provider="tensorrt"))

    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert "trt_engine_cache_enable" not in trt.parameters
    assert "trt_engine_cache_path" not in trt.parameters


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_providers_run_on_gpu_instances_with_a_gpu_accelerator(provider: str) -> None:
    config = _render(Candidate(provider=provider))

    assert [group.kind for group in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    accelerators = config.optimization.execution_accelerators
    assert [a.name for a in accelerators.gpu_execution_accelerator] == [provider]
    assert list(accelerators.cpu_execution_accelerator) == []


def test_cuda_ignores_the_engine_cache_dir() -> None:
    config = _render(Candidate(provider="cuda"), engine_cache_dir="/cache/trt")

    (cuda,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert dict(cuda.parameters) == {}


def test_openvino_uses_a_cpu_execution_accelerator_on_cpu_instances() -> None:
    config = _render(Candidate(provider="openvino"))

    assert [group.kind for group in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    accelerators = config.optimization.execution_accelerators
    assert [a.name for a in accelerators.cpu_execution_accelerator] == ["openvino"]
    assert list(accelerators.gpu_execution_accelerator) == []


# --- inputs and outputs -------------------------------------------------------------------------


def test_non_batching_model_renders_max_batch_size_zero_and_full_dims() -> None:
    candidate = Candidate(max_batch_size=8, preferred_batch_sizes=(8,), max_queue_delay_us=100)

    config = _render(candidate, FIXED_BATCH_MLP)

    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert [list(t.dims) for t in config.input] == [[1, 64]]
    assert [list(t.dims) for t in config.output] == [[1, 10]]


def test_dynamic_dims_render_as_minus_one_without_the_batch_dim() -> None:
    config = _render(Candidate(), ENCODER)

    assert {t.name: list(t.dims) for t in config.input} == {
        "input_ids": [-1],
        "attention_mask": [-1],
    }
    assert {t.name: list(t.dims) for t in config.output} == {
        "last_hidden_state": [-1, 32],
        "pooled": [32],
    }
    assert {t.name: t.data_type for t in config.input} == {
        "input_ids": mc.TYPE_INT64,
        "attention_mask": mc.TYPE_INT64,
    }


def test_scalar_per_item_output_renders_dims_one_with_an_empty_reshape() -> None:
    config = _render(Candidate(), SCALAR_SCORE)

    (score,) = config.output
    assert list(score.dims) == [1]
    assert score.HasField("reshape")
    assert list(score.reshape.shape) == []
    (x,) = config.input
    assert not x.HasField("reshape")


def test_tensor_dtypes_map_to_triton_data_types() -> None:
    config = _render(Candidate(), MULTI_DTYPE)

    assert {t.name: t.data_type for t in list(config.input) + list(config.output)} == {
        "a": mc.TYPE_FP32,
        "b": mc.TYPE_INT32,
        "c": mc.TYPE_FP16,
        "sum": mc.TYPE_FP32,
        "half": mc.TYPE_FP16,
    }


# --- serialisation ------------------------------------------------------------------------------

RICH = Candidate(
    provider="tensorrt",
    precision="fp16",
    max_batch_size=16,
    preferred_batch_sizes=(16, 8),
    max_queue_delay_us=2500,
    instance_count=2,
    intra_op_threads=4,
    graph_level="extended",
)


def test_pbtxt_round_trip_equals_the_original_message() -> None:
    config = _render(RICH, SCALAR_SCORE, engine_cache_dir="/cache/trt")

    assert config_from_pbtxt(to_pbtxt(config)) == config


def test_json_round_trip_equals_the_original_message() -> None:
    config = _render(RICH, SCALAR_SCORE, engine_cache_dir="/cache/trt")

    assert config_from_json(to_json(config)) == config
    assert config_from_json(to_dict(config)) == config


def test_config_key_is_equal_for_equal_configs_and_differs_when_a_field_differs() -> None:
    key = config_key(_render(RICH, ENCODER))

    assert config_key(_render(RICH, ENCODER)) == key
    assert config_key(config_from_pbtxt(to_pbtxt(_render(RICH, ENCODER)))) == key
    assert config_key(_render(replace(RICH, max_queue_delay_us=2600), ENCODER)) != key


# --- property -----------------------------------------------------------------------------------


@st.composite
def candidates(draw: st.DrawFn) -> Candidate:
    """Any Candidate the search could produce: preferred sizes from {max, max/2, max/4} above 1."""
    max_batch = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]))
    if max_batch > 1:
        options = sorted({max_batch // d for d in (1, 2, 4) if max_batch // d > 1}, reverse=True)
        preferred = tuple(size for size in options if draw(st.booleans()))
        delay = draw(st.integers(0, 50_000))
    else:
        preferred, delay = (), 0
    return Candidate(
        provider=draw(st.sampled_from(CPU_PROVIDERS + GPU_PROVIDERS)),
        precision=draw(st.sampled_from(PRECISIONS)),
        max_batch_size=max_batch,
        preferred_batch_sizes=preferred,
        max_queue_delay_us=delay,
        instance_count=draw(st.integers(1, 8)),
        intra_op_threads=draw(st.integers(0, 16)),
        graph_level=draw(st.sampled_from(GRAPH_LEVELS)),
        execution_mode=draw(st.sampled_from(EXECUTION_MODES)),
        cpu_mem_arena=draw(st.sampled_from(CPU_MEM_ARENAS)),
        int8_recipe=draw(st.sampled_from(sorted(INT8_RECIPES))),
    )


@given(
    candidate=candidates(),
    info=st.sampled_from([MLP, ENCODER, FIXED_BATCH_MLP, SCALAR_SCORE, MULTI_DTYPE]),
    engine_cache_dir=st.sampled_from([None, "/cache/trt"]),
)
def test_any_rendered_config_round_trips_exactly_and_has_a_stable_key(
    candidate: Candidate, info: ModelInfo, engine_cache_dir: str | None
) -> None:
    config = render_config(info, candidate, model_name="model", engine_cache_dir=engine_cache_dir)
    again = render_config(info, candidate, model_name="model", engine_cache_dir=engine_cache_dir)

    from_pbtxt = config_from_pbtxt(to_pbtxt(config))
    from_json = config_from_json(to_json(config))

    assert from_pbtxt == config
    assert from_json == config
    assert config_key(again) == config_key(config)
    assert config_key(from_pbtxt) == config_key(from_json) == config_key(config)
    assert all(size <= config.max_batch_size for size in config.dynamic_batching.preferred_batch_size)
