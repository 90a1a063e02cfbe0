"""Tests for the deterministic example ONNX model builders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optimizer.model import examples

# Small encoder so the shape/mask tests stay fast; the default size is covered separately.
SMALL_ENCODER: dict[str, int] = {
    "vocab_size": 100,
    "hidden": 32,
    "layers": 2,
    "heads": 4,
    "ffn": 64,
    "max_positions": 64,
}

Builder = Callable[..., Path]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _encoder_feeds(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
    }


def _assert_finite(outputs: dict[str, np.ndarray]) -> None:
    for name, value in outputs.items():
        assert np.isfinite(value.astype(np.float64)).all(), name


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_runs(tmp_path: Path, batch: int) -> None:
    path = examples.build_mlp(tmp_path / "mlp.onnx", in_features=12, out_features=5)
    onnx.checker.check_model(str(path))
    x = np.random.default_rng(batch).standard_normal((batch, 12)).astype(np.float32)
    out = _run(path, {"x": x})
    assert list(out) == ["logits"]
    assert out["logits"].shape == (batch, 5)
    assert out["logits"].dtype == np.float32
    _assert_finite(out)


@pytest.mark.parametrize("batch", [1, 3])
def test_cnn_runs(tmp_path: Path, batch: int) -> None:
    path = examples.build_cnn(tmp_path / "cnn.onnx", classes=7)
    onnx.checker.check_model(str(path))
    image = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    out = _run(path, {"image": image})
    assert out["logits"].shape == (batch, 7)
    assert out["logits"].dtype == np.float32
    _assert_finite(out)


def test_cnn_only_batch_is_dynamic(tmp_path: Path) -> None:
    model = onnx.load(str(examples.build_cnn(tmp_path / "cnn.onnx")))
    assert _dims(model.graph.input[0]) == ["N", 3, 32, 32]
    assert _dims(model.graph.output[0]) == ["N", 10]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seq", [16, 40])
def test_encoder_runs(tmp_path: Path, batch: int, seq: int) -> None:
    path = examples.build_encoder(tmp_path / "enc.onnx", **SMALL_ENCODER)
    onnx.checker.check_model(str(path))
    rng = np.random.default_rng(batch * 100 + seq)
    out = _run(path, _encoder_feeds(rng, batch, seq, SMALL_ENCODER["vocab_size"]))
    assert out["last_hidden_state"].shape == (batch, seq, SMALL_ENCODER["hidden"])
    assert out["pooled"].shape == (batch, SMALL_ENCODER["hidden"])
    assert out["last_hidden_state"].dtype == np.float32
    assert out["pooled"].dtype == np.float32
    _assert_finite(out)
    # The final LayerNorm keeps activations in a normal range.
    assert np.abs(out["last_hidden_state"]).max() < 20
    assert np.abs(out["pooled"]).max() <= 1


def test_encoder_graph_interface(tmp_path: Path) -> None:
    model = onnx.load(str(examples.build_encoder(tmp_path / "enc.onnx", **SMALL_ENCODER)))
    assert model.ir_version == examples.IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    inputs = {i.name: i for i in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}
    for value_info in inputs.values():
        assert value_info.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert _dims(value_info) == ["batch", "sequence"]
    outputs = {o.name: _dims(o) for o in model.graph.output}
    assert outputs == {"last_hidden_state": ["batch", "sequence", 32], "pooled": ["batch", 32]}
    vocab_tables = [
        t
        for t in model.graph.initializer
        if list(t.dims) == [SMALL_ENCODER["vocab_size"], SMALL_ENCODER["hidden"]]
    ]
    assert len(vocab_tables) == 1
    ops = {n.op_type for n in model.graph.node}
    assert {"LayerNormalization", "Erf", "Softmax", "Range", "Shape", "Tanh"} <= ops


def test_encoder_attention_mask_matters(tmp_path: Path) -> None:
    path = examples.build_encoder(tmp_path / "enc.onnx", **SMALL_ENCODER)
    session = _session(path)
    rng = np.random.default_rng(7)
    feeds = _encoder_feeds(rng, 2, 24, SMALL_ENCODER["vocab_size"])
    full_hidden, full_pooled = session.run(None, feeds)

    masked = dict(feeds, attention_mask=feeds["attention_mask"].copy())
    masked["attention_mask"][:, 12:] = 0
    masked_hidden, masked_pooled = session.run(None, masked)
    assert not np.allclose(full_pooled, masked_pooled, atol=1e-4)
    assert not np.allclose(full_hidden[:, :12], masked_hidden[:, :12], atol=1e-4)

    # Masked positions must not influence the visible ones, whatever tokens they hold.
    scrambled = dict(masked, input_ids=masked["input_ids"].copy())
    scrambled["input_ids"][:, 12:] = rng.integers(0, SMALL_ENCODER["vocab_size"], (2, 12))
    scrambled_hidden, scrambled_pooled = session.run(None, scrambled)
    np.testing.assert_allclose(scrambled_hidden[:, :12], masked_hidden[:, :12], atol=1e-5)
    np.testing.assert_allclose(scrambled_pooled, masked_pooled, atol=1e-5)


def test_encoder_rejects_indivisible_heads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divisible"):
        examples.build_encoder(tmp_path / "enc.onnx", hidden=30, heads=4)


def test_fixed_batch_mlp(tmp_path: Path) -> None:
    path = examples.build_fixed_batch_mlp(tmp_path / "fixed.onnx", in_features=12, out_features=5)
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert _dims(model.graph.input[0]) == [1, 12]
    assert _dims(model.graph.output[0]) == [1, 5]
    rng = np.random.default_rng(0)
    out = _run(path, {"x": rng.standard_normal((1, 12)).astype(np.float32)})
    assert out["logits"].shape == (1, 5)
    assert out["logits"].dtype == np.float32
    _assert_finite(out)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _run(path, {"x": rng.standard_normal((3, 12)).astype(np.float32)})


def test_fixed_batch_mlp_matches_mlp_weights(tmp_path: Path) -> None:
    dynamic = examples.build_mlp(tmp_path / "mlp.onnx", seed=4)
    fixed = examples.build_fixed_batch_mlp(tmp_path / "fixed.onnx", seed=4)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(dynamic, {"x": x})["logits"], _run(fixed, {"x": x})["logits"])


@pytest.mark.parametrize("batch", [1, 3])
def test_multi_dtype(tmp_path: Path, batch: int) -> None:
    path = examples.build_multi_dtype(tmp_path / "multi.onnx")
    onnx.checker.check_model(str(path))
    rng = np.random.default_rng(batch)
    a = rng.standard_normal((batch, 8)).astype(np.float32)
    b = rng.integers(-50, 50, (batch, 8)).astype(np.int32)
    c = rng.standard_normal((batch, 8)).astype(np.float16)
    out = _run(path, {"a": a, "b": b, "c": c})
    assert out["sum"].dtype == np.float32
    assert out["half"].dtype == np.float16
    assert out["sum"].shape == out["half"].shape == (batch, 8)
    expected_sum = a + b.astype(np.float32) + c.astype(np.float32)
    np.testing.assert_allclose(out["sum"], expected_sum, rtol=1e-6)
    np.testing.assert_allclose(
        out["half"].astype(np.float32), (a.astype(np.float16) * c).astype(np.float32), rtol=1e-3
    )


BUILDS: list[tuple[Builder, dict[str, Any]]] = [
    (examples.build_mlp, {}),
    (examples.build_cnn, {}),
    (examples.build_encoder, {}),
    (examples.build_fixed_batch_mlp, {}),
    (examples.build_multi_dtype, {}),
]


@pytest.mark.parametrize(("builder", "kwargs"), BUILDS, ids=lambda v: getattr(v, "__name__", ""))
def test_same_seed_is_byte_identical(tmp_path: Path, builder: Builder, kwargs: dict[str, Any]) -> None:
    first = builder(tmp_path / "a" / "m.onnx", seed=3, **kwargs)
    second = builder(tmp_path / "b" / "m.onnx", seed=3, **kwargs)
    assert first == tmp_path / "a" / "m.onnx"
    assert first.read_bytes() == second.read_bytes()
    if builder is not examples.build_multi_dtype:
        other = builder(tmp_path / "c" / "m.onnx", seed=4, **kwargs)
        assert other.read_bytes() != first.read_bytes()


def test_example_model_is_cached(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = examples.example_model(cache)
    assert path == cache / f"{examples.EXAMPLE_MODEL_NAME}.onnx"
    assert list(cache.iterdir()) == [path]
    mtime = path.stat().st_mtime_ns
    assert examples.example_model(cache) == path
    assert path.stat().st_mtime_ns == mtime

    session = _session(path)
    assert {i.name for i in session.get_inputs()} == set(examples.EXAMPLE_SHAPES)
    shapes = examples.EXAMPLE_SHAPES
    feeds = {name: np.ones((2, *shape), dtype=np.int64) for name, shape in shapes.items()}
    hidden, pooled = session.run(None, feeds)
    assert hidden.shape == (2, 128, 256)
    assert pooled.shape == (2, 256)
