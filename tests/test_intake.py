"""Tests for optimizer.model.intake: reading real ONNX models, shape arguments, and synthetic inputs."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from optimizer.errors import ModelError, UsageError
from optimizer.model import examples
from optimizer.model.intake import (
    ModelInfo,
    TensorSpec,
    inspect_model,
    parse_shape_args,
    resolve_shapes,
    synthetic_inputs,
)

VOCAB = 50
NO_BATCH_NOTE = (
    "the model has no dynamic batch dimension: it is served with max_batch_size 0 "
    "(no dynamic batching); export it with a dynamic first axis to let Triton batch requests"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real models from optimizer.model.examples, built once for this module."""
    root = tmp_path_factory.mktemp("intake_models")
    return {
        "mlp": examples.build_mlp(root / "mlp.onnx", in_features=8, hidden=16, out_features=4),
        "cnn": examples.build_cnn(root / "cnn.onnx", channels=3, size=8, classes=5),
        "encoder": examples.build_encoder(
            root / "encoder.onnx",
            vocab_size=VOCAB,
            hidden=32,
            layers=1,
            heads=2,
            ffn=64,
            max_positions=32,
        ),
        "fixed": examples.build_fixed_batch_mlp(
            root / "fixed.onnx", in_features=8, hidden=16, out_features=4
        ),
        "multi": examples.build_multi_dtype(root / "multi.onnx"),
    }


@pytest.fixture(scope="module")
def infos(built: dict[str, Path]) -> dict[str, ModelInfo]:
    """The models as intake describes them, with no cache (so the fixed-batch model stays fixed)."""
    return {name: inspect_model(path) for name, path in built.items()}


# --- inspect_model ------------------------------------------------------------------------------


def test_inspect_mlp_reports_float_tensors_with_a_dynamic_batch(built: dict[str, Path]) -> None:
    path = built["mlp"]

    info = inspect_model(path)

    assert info == ModelInfo(
        source_path=path.resolve(),
        path=path.resolve(),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        inputs=(TensorSpec("x", "float32", ("batch", 8)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 4)),),
        batching=True,
        opset=examples.OPSET,
    )


def test_inspect_cnn_reports_image_dims_after_its_named_batch(infos: dict[str, ModelInfo]) -> None:
    info = infos["cnn"]

    assert info.inputs == (TensorSpec("image", "float32", ("N", 3, 8, 8)),)
    assert info.outputs == (TensorSpec("logits", "float32", ("N", 5)),)
    assert info.batching is True
    assert info.notes == ()


def test_inspect_encoder_finds_token_id_range_from_the_embedding_table(
    infos: dict[str, ModelInfo],
) -> None:
    info = infos["encoder"]

    assert info.inputs == (
        TensorSpec("input_ids", "int64", ("batch", "sequence"), index_range=(0, VOCAB)),
        TensorSpec("attention_mask", "int64", ("batch", "sequence"), index_range=None),
    )
    assert info.outputs == (
        TensorSpec("last_hidden_state", "float32", ("batch", "sequence", 32)),
        TensorSpec("pooled", "float32", ("batch", 32)),
    )
    assert info.batching is True
    assert info.input("input_ids").index_range == (0, VOCAB)


def test_inspect_multi_dtype_model_reports_each_dtype(infos: dict[str, ModelInfo]) -> None:
    info = infos["multi"]

    assert [(t.name, t.dtype) for t in info.inputs] == [
        ("a", "float32"),
        ("b", "int32"),
        ("c", "float16"),
    ]
    assert [(t.name, t.dtype) for t in info.outputs] == [("sum", "float32"), ("half", "float16")]
    assert all(t.dims == ("batch", 8) for t in info.inputs + info.outputs)


def test_fixed_batch_model_without_cache_is_served_without_batching_and_says_so(
    built: dict[str, Path],
) -> None:
    info = inspect_model(built["fixed"])

    assert info.batching is False
    assert info.path == built["fixed"].resolve()
    assert info.inputs == (TensorSpec("x", "float32", (1, 8)),)
    assert info.outputs == (TensorSpec("logits", "float32", (1, 4)),)
    assert info.notes == (NO_BATCH_NOTE,)


def test_fixed_batch_model_with_cache_is_served_from_a_batch_dynamic_copy_in_the_cache(
    built: dict[str, Path], tmp_path: Path
) -> None:
    source = built["fixed"]
    original_bytes = source.read_bytes()
    cache = tmp_path / "cache"

    info = inspect_model(source, cache=cache)

    assert info.batching is True
    assert info.source_path == source.resolve()
    assert info.path.is_file()
    assert info.path.parent == cache / "models"
    assert info.path.parent != source.resolve().parent
    assert info.inputs == (TensorSpec("x", "float32", ("batch", 8)),)
    assert info.outputs == (TensorSpec("logits", "float32", ("batch", 4)),)
    assert len(info.notes) == 1
    assert str(info.path) in info.notes[0]
    assert source.read_bytes() == original_bytes  # the user's file is never written to
    assert inspect_model(source, cache=cache).path == info.path  # the copy is reused


def test_fixed_batch_model_falls_back_to_no_batching_when_shape_inference_cannot_load(
    built: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime.tools.symbolic_shape_infer", None)  # import fails
    cache = tmp_path / "cache"

    info = inspect_model(built["fixed"], cache=cache)

    assert info.batching is False
    assert info.notes == (NO_BATCH_NOTE,)
    assert not (cache / "models").exists()


def _missing(tmp_path: Path, built: dict[str, Path]) -> Path:
    return tmp_path / "absent.onnx"


def _directory(tmp_path: Path, built: dict[str, Path]) -> Path:
    path = tmp_path / "model_dir"
    path.mkdir()
    return path


def _empty(tmp_path: Path, built: dict[str, Path]) -> Path:
    path = tmp_path / "empty.onnx"
    path.touch()
    return path


def _text(tmp_path: Path, built: dict[str, Path]) -> Path:
    path = tmp_path / "notes.onnx"
    path.write_text("this is a README, not a model\nsecond line\n")
    return path


def _truncated(tmp_path: Path, built: dict[str, Path]) -> Path:
    data = built["mlp"].read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        pytest.param(_missing, "does not exist", id="missing"),
        pytest.param(_directory, "is a directory", id="directory"),
        pytest.param(_empty, "is empty (0 bytes)", id="zero-bytes"),
        pytest.param(_text, "is not a valid ONNX model", id="text-file"),
        pytest.param(_truncated, "is not a valid ONNX model", id="truncated"),
    ],
)
def test_unusable_model_file_raises_a_one_line_model_error_naming_the_path(
    make: Callable[[Path, dict[str, Path]], Path],
    phrase: str,
    tmp_path: Path,
    built: dict[str, Path],
) -> None:
    path = make(tmp_path, built)

    with pytest.raises(ModelError) as caught:
        inspect_model(path)

    message = caught.value.message
    assert phrase in message
    assert str(path) in message
    assert "\n" not in message


# --- parse_shape_args ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {}),
        (["input_ids:128"], {"input_ids": (128,)}),
        (["input_ids:128", "attention_mask:128"], {"input_ids": (128,), "attention_mask": (128,)}),
        (["image:3,224,224"], {"image": (3, 224, 224)}),
    ],
)
def test_parse_shape_args_reads_name_colon_comma_separated_dims(
    args: list[str], expected: dict[str, tuple[int, ...]]
) -> None:
    assert parse_shape_args(args) == expected


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        pytest.param(["input_ids"], "malformed", id="no-colon"),
        pytest.param(["input_ids:"], "malformed", id="no-dims"),
        pytest.param([":128"], "malformed", id="no-name"),
        pytest.param(["x:1,,2"], "not a whole number", id="empty-dim"),
        pytest.param(["x:abc"], "not a whole number", id="word"),
        pytest.param(["x:1.5"], "not a whole number", id="fraction"),
        pytest.param(["x:0"], "below 1", id="zero"),
        pytest.param(["x:4,-3"], "below 1", id="negative"),
        pytest.param(["x:4", "x:8"], "given twice for input 'x'", id="duplicate"),
    ],
)
def test_parse_shape_args_rejects_malformed_shapes(args: list[str], phrase: str) -> None:
    with pytest.raises(UsageError, match="--shape") as caught:
        parse_shape_args(args)

    assert phrase in caught.value.message
    if len(args) == 1:
        assert repr(args[0]) in caught.value.message


# --- resolve_shapes -----------------------------------------------------------------------------


def test_resolve_shapes_of_encoder_without_shapes_names_both_inputs_and_the_fix(
    infos: dict[str, ModelInfo],
) -> None:
    with pytest.raises(ModelError) as caught:
        resolve_shapes(infos["encoder"], {})

    message = caught.value.message
    assert "'input_ids'" in message and "'attention_mask'" in message
    assert "--shape input_ids:" in message
    assert "--shape attention_mask:" in message
    assert "without the batch dimension" in message


def test_resolve_shapes_uses_given_shapes_for_dynamic_dims(infos: dict[str, ModelInfo]) -> None:
    given = {"input_ids": (16,), "attention_mask": (16,)}

    assert resolve_shapes(infos["encoder"], given) == given


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mlp", {"x": (8,)}),
        ("cnn", {"image": (3, 8, 8)}),
        ("fixed", {"x": (1, 8)}),  # not batching: the fixed batch axis is part of the shape
    ],
)
def test_resolve_shapes_of_fixed_dims_needs_no_shape_arguments(
    infos: dict[str, ModelInfo], name: str, expected: dict[str, tuple[int, ...]]
) -> None:
    assert resolve_shapes(infos[name], {}) == expected


def test_resolve_shapes_accepts_a_shape_that_repeats_the_fixed_dims(
    infos: dict[str, ModelInfo],
) -> None:
    assert resolve_shapes(infos["mlp"], {"x": (8,)}) == {"x": (8,)}


def test_resolve_shapes_rejects_an_unknown_input_listing_the_real_ones(
    infos: dict[str, ModelInfo],
) -> None:
    with pytest.raises(UsageError, match="unknown input 'token_ids'") as caught:
        resolve_shapes(infos["encoder"], {"token_ids": (16,)})

    assert "input_ids, attention_mask" in caught.value.message


def test_resolve_shapes_rejects_a_shape_of_the_wrong_rank(infos: dict[str, ModelInfo]) -> None:
    given = {"input_ids": (1, 16), "attention_mask": (16,)}

    with pytest.raises(UsageError, match="'input_ids' has 2 dimension\\(s\\) but the input has 1"):
        resolve_shapes(infos["encoder"], given)


def test_resolve_shapes_rejects_a_shape_contradicting_a_fixed_dim(
    infos: dict[str, ModelInfo],
) -> None:
    with pytest.raises(UsageError, match="sets dimension 0 to 9 but the model fixes it at 8"):
        resolve_shapes(infos["mlp"], {"x": (9,)})


# --- synthetic_inputs ---------------------------------------------------------------------------


def test_synthetic_encoder_inputs_have_token_ids_in_vocab_and_masks_of_ones(
    infos: dict[str, ModelInfo],
) -> None:
    arrays = synthetic_inputs(infos["encoder"], {"input_ids": (16,), "attention_mask": (16,)}, 4)

    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    assert sorted(arrays) == ["attention_mask", "input_ids"]
    assert (ids.shape, ids.dtype) == ((4, 16), np.dtype("int64"))
    assert ids.min() >= 0 and ids.max() < VOCAB
    assert (mask.shape, mask.dtype) == ((4, 16), np.dtype("int64"))
    assert (mask == 1).all()


def test_synthetic_inputs_match_each_input_dtype_and_batched_shape(
    infos: dict[str, ModelInfo],
) -> None:
    arrays = synthetic_inputs(infos["multi"], {"a": (8,), "b": (8,), "c": (8,)}, 3)

    assert {name: (a.shape, a.dtype.name) for name, a in arrays.items()} == {
        "a": ((3, 8), "float32"),
        "b": ((3, 8), "int32"),
        "c": ((3, 8), "float16"),
    }
    assert 0 <= arrays["b"].min() and arrays["b"].max() < 100


def test_synthetic_float32_inputs_lie_in_zero_one(infos: dict[str, ModelInfo]) -> None:
    x = synthetic_inputs(infos["mlp"], {"x": (8,)}, 256)["x"]

    assert (x.shape, x.dtype) == ((256, 8), np.dtype("float32"))
    assert x.min() >= 0.0 and x.max() < 1.0


def test_synthetic_float16_inputs_stay_below_one(infos: dict[str, ModelInfo]) -> None:
    c = synthetic_inputs(infos["multi"], {"a": (8,), "b": (8,), "c": (8,)}, 4096, seed=0)["c"]

    assert c.max() < 1.0


def test_synthetic_inputs_of_a_non_batching_model_add_no_batch_axis(
    infos: dict[str, ModelInfo],
) -> None:
    x = synthetic_inputs(infos["fixed"], {"x": (1, 8)}, 5)["x"]

    assert x.shape == (1, 8)


def test_synthetic_inputs_are_reproducible_per_seed(infos: dict[str, ModelInfo]) -> None:
    shapes = {"x": (8,)}

    first = synthetic_inputs(infos["mlp"], shapes, 2, seed=7)["x"]

    assert np.array_equal(first, synthetic_inputs(infos["mlp"], shapes, 2, seed=7)["x"])
    assert not np.array_equal(first, synthetic_inputs(infos["mlp"], shapes, 2, seed=8)["x"])
