"""Deterministic builders of small, real ONNX models used as examples and test fixtures.

Every builder draws its weights from ``np.random.default_rng(seed)`` in a fixed order, so
two builds with the same arguments produce byte-identical files.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "EXAMPLE_MODEL_NAME",
    "EXAMPLE_SHAPES",
    "example_shapes",
    "OPSET",
    "IR_VERSION",
    "build_cnn",
    "build_encoder",
    "build_ensemble",
    "build_fixed_batch_mlp",
    "build_mlp",
    "build_multi_dtype",
    "example_model",
]

OPSET = 17
# onnxruntime 1.31 reads IR <= 11; 9 is what opset 17-19 exporters emit.
IR_VERSION = 9

EXAMPLE_MODEL_NAME = "example_encoder"
EXAMPLE_SHAPES: dict[str, tuple[int, ...]] = {"input_ids": (128,), "attention_mask": (128,)}

# The producer name is part of every built file, so of its sha256: recordings pin those hashes, so keep it.
_PRODUCER = "optimizer.examples"
_Dim = int | str


class _GraphBuilder:
    """Accumulates nodes and initializers with unique, readable names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: dict[str, int] = {}
        self._scalars: dict[tuple[str, float | int], str] = {}

    def unique(self, prefix: str) -> str:
        """Returns ``prefix`` the first time, then ``prefix_1``, ``prefix_2``, ..."""
        count = self._used.get(prefix, 0)
        self._used[prefix] = count + 1
        return prefix if count == 0 else f"{prefix}_{count}"

    def const(self, name: str, value: np.ndarray) -> str:
        """Adds ``value`` as an initializer and returns its tensor name."""
        tensor_name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), tensor_name))
        return tensor_name

    def scalar(self, value: float | int, dtype: type[np.generic] = np.float32) -> str:
        """Returns a shared rank-0 initializer holding ``value``."""
        key = (np.dtype(dtype).name, value)
        if key not in self._scalars:
            self._scalars[key] = self.const(f"const_{key[0]}", np.array(value, dtype=dtype))
        return self._scalars[key]

    def ints(self, name: str, values: Sequence[int]) -> str:
        """Adds a 1-D int64 initializer (shapes, axes)."""
        return self.const(name, np.asarray(values, dtype=np.int64))

    def weight(self, name: str, shape: Sequence[int], fan_in: int) -> str:
        """Adds a float32 weight drawn from N(0, 1/sqrt(fan_in))."""
        std = 1.0 / math.sqrt(fan_in)
        return self.const(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def bias(self, name: str, size: int, std: float = 0.02) -> str:
        """Adds a small random float32 bias vector."""
        return self.const(name, (self.rng.standard_normal(size) * std).astype(np.float32))

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        output: str | None = None,
        **attrs: Any,
    ) -> str:
        """Appends a single-output node and returns the output tensor name."""
        node_name = self.unique(op_type)
        out = output if output is not None else f"{node_name}_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=node_name, **attrs))
        return out

    def model(
        self,
        graph_name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
    ) -> onnx.ModelProto:
        """Wraps the accumulated nodes into an opset-17 model."""
        graph = helper.make_graph(
            self.nodes, graph_name, list(inputs), list(outputs), initializer=self.initializers
        )
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=_PRODUCER,
        )


def _tensor(name: str, elem_type: int, shape: Sequence[_Dim]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def _save(model: onnx.ModelProto, path: Path) -> Path:
    """Checks ``model`` (including strict shape inference), writes it and returns ``path``."""
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _dense(g: _GraphBuilder, x: str, prefix: str, fan_in: int, fan_out: int) -> str:
    """MatMul + Add over the last axis (works for any leading dims)."""
    w = g.weight(f"{prefix}.weight", (fan_in, fan_out), fan_in)
    b = g.bias(f"{prefix}.bias", fan_out)
    return g.op("Add", [g.op("MatMul", [x, w]), b])


def _gemm(g: _GraphBuilder, x: str, prefix: str, fan_in: int, fan_out: int, output: str | None = None) -> str:
    w = g.weight(f"{prefix}.weight", (fan_in, fan_out), fan_in)
    b = g.bias(f"{prefix}.bias", fan_out)
    return g.op("Gemm", [x, w, b], output=output)


def _mlp(path: Path, seed: int, batch: _Dim, in_features: int, hidden: int, out_features: int) -> Path:
    g = _GraphBuilder(seed)
    h = g.op("Relu", [_gemm(g, "x", "fc1", in_features, hidden)])
    h = g.op("Relu", [_gemm(g, h, "fc2", hidden, hidden)])
    _gemm(g, h, "fc3", hidden, out_features, output="logits")
    model = g.model(
        "mlp",
        [_tensor("x", TensorProto.FLOAT, [batch, in_features])],
        [_tensor("logits", TensorProto.FLOAT, [batch, out_features])],
    )
    return _save(model, path)


def build_mlp(
    path: Path,
    *,
    seed: int = 0,
    in_features: int = 64,
    hidden: int = 256,
    out_features: int = 10,
) -> Path:
    """Builds a 2-hidden-layer ReLU MLP with a dynamic batch dimension.

    Args:
        path: Where to write the ``.onnx`` file (parent directories are created).
        seed: Seed for the weight generator.
        in_features: Width of input ``x``.
        hidden: Width of both hidden layers.
        out_features: Width of output ``logits``.

    Returns:
        ``path``. Input ``x`` float32 ``[batch, in_features]``; output ``logits`` float32
        ``[batch, out_features]``.
    """
    return _mlp(path, seed, "batch", in_features, hidden, out_features)


def build_fixed_batch_mlp(
    path: Path,
    *,
    seed: int = 0,
    in_features: int = 64,
    out_features: int = 10,
    hidden: int = 256,
    batch: int = 1,
) -> Path:
    """Builds the same MLP as :func:`build_mlp` but with its batch dimension fixed (to 1 by default).

    Args:
        path: Where to write the ``.onnx`` file.
        seed: Seed for the weight generator.
        in_features: Width of input ``x``.
        out_features: Width of output ``logits``.
        hidden: Width of both hidden layers.
        batch: The fixed batch (a batch of 1 is read as a dynamic one by intake; others are not).

    Returns:
        ``path``. Input ``x`` float32 ``[batch, in_features]``; output ``logits`` float32
        ``[batch, out_features]``.
    """
    return _mlp(path, seed, batch, in_features, hidden, out_features)


def build_cnn(
    path: Path,
    *,
    seed: int = 0,
    channels: int = 3,
    size: int = 32,
    classes: int = 10,
) -> Path:
    """Builds a small image classifier: Conv/Relu/MaxPool, Conv/Relu, GAP, Flatten, Gemm.

    Args:
        path: Where to write the ``.onnx`` file.
        seed: Seed for the weight generator.
        channels: Input channels.
        size: Input height and width (must be even for the 2x2 pool to tile it).
        classes: Width of output ``logits``.

    Returns:
        ``path``. Input ``image`` float32 ``[N, channels, size, size]``; output ``logits``
        float32 ``[N, classes]``.
    """
    c1, c2 = 16, 32
    g = _GraphBuilder(seed)

    def conv(x: str, prefix: str, c_in: int, c_out: int) -> str:
        w = g.weight(f"{prefix}.weight", (c_out, c_in, 3, 3), c_in * 9)
        b = g.bias(f"{prefix}.bias", c_out)
        return g.op("Conv", [x, w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    h = g.op("Relu", [conv("image", "conv1", channels, c1)])
    h = g.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = g.op("Relu", [conv(h, "conv2", c1, c2)])
    h = g.op("Flatten", [g.op("GlobalAveragePool", [h])], axis=1)
    _gemm(g, h, "fc", c2, classes, output="logits")
    model = g.model(
        "cnn",
        [_tensor("image", TensorProto.FLOAT, ["N", channels, size, size])],
        [_tensor("logits", TensorProto.FLOAT, ["N", classes])],
    )
    return _save(model, path)


def _layer_norm(g: _GraphBuilder, x: str, prefix: str, hidden: int) -> str:
    scale = g.const(f"{prefix}.weight", np.ones(hidden, dtype=np.float32))
    bias = g.const(f"{prefix}.bias", np.zeros(hidden, dtype=np.float32))
    return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-12)


def _gelu(g: _GraphBuilder, x: str) -> str:
    """Exact GELU, 0.5 * x * (1 + erf(x / sqrt(2))), as exported by BERT checkpoints."""
    erf = g.op("Erf", [g.op("Div", [x, g.scalar(math.sqrt(2.0))])])
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, g.scalar(1.0)])]), g.scalar(0.5)])


def _additive_mask(g: _GraphBuilder, mask: str) -> str:
    """Turns an int64 ``[batch, seq]`` 0/1 mask into a float ``[batch, 1, 1, seq]`` bias."""
    keep = g.op("Cast", [mask], to=TensorProto.FLOAT)
    dropped = g.op("Sub", [g.scalar(1.0), keep])
    bias = g.op("Mul", [dropped, g.scalar(-10000.0)])
    return g.op("Unsqueeze", [bias, g.ints("mask_axes", [1, 2])])


def _attention(g: _GraphBuilder, x: str, mask_bias: str, prefix: str, hidden: int, heads: int) -> str:
    head_dim = hidden // heads
    # 0 copies the input dim, so batch and sequence stay dynamic through the reshapes.
    split_shape = g.ints(f"{prefix}.split_shape", [0, 0, heads, head_dim])
    merge_shape = g.ints(f"{prefix}.merge_shape", [0, 0, hidden])

    def project(name: str, perm: Sequence[int]) -> str:
        y = _dense(g, x, f"{prefix}.{name}", hidden, hidden)
        return g.op("Transpose", [g.op("Reshape", [y, split_shape])], perm=list(perm))

    q = project("query", (0, 2, 1, 3))  # [b, h, s, d]
    k = project("key", (0, 2, 3, 1))  # [b, h, d, s]
    v = project("value", (0, 2, 1, 3))  # [b, h, s, d]
    scores = g.op("Mul", [g.op("MatMul", [q, k]), g.scalar(1.0 / math.sqrt(head_dim))])
    probs = g.op("Softmax", [g.op("Add", [scores, mask_bias])], axis=-1)
    context = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    context = g.op("Reshape", [context, merge_shape])
    return _dense(g, context, f"{prefix}.output", hidden, hidden)


def _encoder_block(
    g: _GraphBuilder, x: str, mask_bias: str, prefix: str, hidden: int, heads: int, ffn: int
) -> str:
    attn = _attention(g, x, mask_bias, f"{prefix}.attention", hidden, heads)
    x = _layer_norm(g, g.op("Add", [attn, x]), f"{prefix}.attention.norm", hidden)
    inner = _gelu(g, _dense(g, x, f"{prefix}.ffn.intermediate", hidden, ffn))
    out = _dense(g, inner, f"{prefix}.ffn.output", ffn, hidden)
    return _layer_norm(g, g.op("Add", [out, x]), f"{prefix}.ffn.norm", hidden)


def _embeddings(g: _GraphBuilder, vocab_size: int, hidden: int, max_positions: int) -> str:
    # BERT-style small embedding init; the LayerNorm right after fixes the scale anyway.
    words = g.const(
        "embeddings.word.weight",
        (g.rng.standard_normal((vocab_size, hidden)) * 0.02).astype(np.float32),
    )
    positions = g.const(
        "embeddings.position.weight",
        (g.rng.standard_normal((max_positions, hidden)) * 0.02).astype(np.float32),
    )
    tokens = g.op("Gather", [words, "input_ids"], axis=0)
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.scalar(1, np.int64)], axis=0)
    position_ids = g.op("Range", [g.scalar(0, np.int64), seq_len, g.scalar(1, np.int64)])
    pos = g.op("Gather", [positions, position_ids], axis=0)
    return _layer_norm(g, g.op("Add", [tokens, pos]), "embeddings.norm", hidden)


def build_encoder(
    path: Path,
    *,
    seed: int = 0,
    vocab_size: int = 1000,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    ffn: int = 1024,
    max_positions: int = 512,
) -> Path:
    """Builds a BERT-like transformer encoder with dynamic batch and sequence.

    The token embedding table is the initializer ``embeddings.word.weight`` of shape
    ``[vocab_size, hidden]``. Sequences longer than ``max_positions`` fail at run time.

    Args:
        path: Where to write the ``.onnx`` file.
        seed: Seed for the weight generator.
        vocab_size: Number of token ids; valid ``input_ids`` are in ``[0, vocab_size)``.
        hidden: Model width; must be divisible by ``heads``.
        layers: Number of encoder blocks.
        heads: Attention heads per block.
        ffn: Width of the feed-forward inner layer.
        max_positions: Rows of the position embedding table.

    Returns:
        ``path``. Inputs ``input_ids`` and ``attention_mask`` int64 ``[batch, sequence]``;
        outputs ``last_hidden_state`` float32 ``[batch, sequence, hidden]`` and ``pooled``
        float32 ``[batch, hidden]``.

    Raises:
        ValueError: If ``hidden`` is not divisible by ``heads``.
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    g = _GraphBuilder(seed)
    x = _embeddings(g, vocab_size, hidden, max_positions)
    mask_bias = _additive_mask(g, "attention_mask")
    for i in range(layers):
        x = _encoder_block(g, x, mask_bias, f"encoder.layer.{i}", hidden, heads, ffn)
    g.op("Identity", [x], output="last_hidden_state")
    first_token = g.op("Gather", [x, g.scalar(0, np.int64)], axis=1)
    g.op("Tanh", [_dense(g, first_token, "pooler", hidden, hidden)], output="pooled")

    dims: list[_Dim] = ["batch", "sequence"]
    model = g.model(
        "encoder",
        [
            _tensor("input_ids", TensorProto.INT64, dims),
            _tensor("attention_mask", TensorProto.INT64, dims),
        ],
        [
            _tensor("last_hidden_state", TensorProto.FLOAT, [*dims, hidden]),
            _tensor("pooled", TensorProto.FLOAT, ["batch", hidden]),
        ],
    )
    return _save(model, path)


def build_multi_dtype(path: Path, *, seed: int = 0) -> Path:
    """Builds a weightless model mixing float32, int32 and float16 tensors.

    ``sum = a + float(b) + float(c)`` and ``half = float16(a) * c``.

    Args:
        path: Where to write the ``.onnx`` file.
        seed: Accepted for a uniform builder signature; the model has no weights.

    Returns:
        ``path``. Inputs ``a`` float32, ``b`` int32, ``c`` float16, all ``[batch, 8]``;
        outputs ``sum`` float32 and ``half`` float16, both ``[batch, 8]``.
    """
    g = _GraphBuilder(seed)
    b_float = g.op("Cast", ["b"], to=TensorProto.FLOAT)
    c_float = g.op("Cast", ["c"], to=TensorProto.FLOAT)
    g.op("Add", [g.op("Add", ["a", b_float]), c_float], output="sum")
    g.op("Mul", [g.op("Cast", ["a"], to=TensorProto.FLOAT16), "c"], output="half")
    shape: list[_Dim] = ["batch", 8]
    model = g.model(
        "multi_dtype",
        [
            _tensor("a", TensorProto.FLOAT, shape),
            _tensor("b", TensorProto.INT32, shape),
            _tensor("c", TensorProto.FLOAT16, shape),
        ],
        [
            _tensor("sum", TensorProto.FLOAT, shape),
            _tensor("half", TensorProto.FLOAT16, shape),
        ],
    )
    return _save(model, path)


def build_ensemble(repository: Path, *, name: str = "pipeline", seed: int = 0) -> Path:
    """Builds a Triton ensemble of two ONNX steps in ``repository``: an MLP feeding another MLP.

    ``<repository>/pre/1/model.onnx`` (``x`` [batch, 64] -> ``logits`` [batch, 32]),
    ``<repository>/head/1/model.onnx`` (``x`` [batch, 32] -> ``logits`` [batch, 10]) and
    ``<repository>/<name>/config.pbtxt``: input ``INPUT`` FP32 [64], output ``OUTPUT`` FP32 [10],
    max batch size 8, with its empty version directory ``1/``.

    Returns:
        The ensemble's directory.
    """
    build_mlp(repository / "pre" / "1" / "model.onnx", seed=seed, in_features=64, out_features=32)
    build_mlp(repository / "head" / "1" / "model.onnx", seed=seed + 1, in_features=32, out_features=10)
    directory = repository / name
    (directory / "1").mkdir(parents=True, exist_ok=True)
    (directory / "config.pbtxt").write_text(
        f"""name: "{name}"
platform: "ensemble"
max_batch_size: 8
input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ 64 ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 10 ] }} ]
ensemble_scheduling {{
  step [
    {{
      model_name: "pre"
      model_version: -1
      input_map {{ key: "x" value: "INPUT" }}
      output_map {{ key: "logits" value: "features" }}
    }},
    {{
      model_name: "head"
      model_version: -1
      input_map {{ key: "x" value: "features" }}
      output_map {{ key: "logits" value: "OUTPUT" }}
    }}
  ]
}}
"""
    )
    return directory


def example_shapes(path: Path, cache_dir: Path) -> dict[str, tuple[int, ...]]:
    """The request shapes a study sends the bundled example (``EXAMPLE_SHAPES``) when ``path`` is it, under
    ``cache_dir`` (as :func:`example_model` places it); none for any other model."""
    bundled = Path(cache_dir) / f"{EXAMPLE_MODEL_NAME}.onnx"
    try:
        same = Path(path).resolve() == bundled.resolve()
    except OSError:
        same = False
    return dict(EXAMPLE_SHAPES) if same else {}


def example_model(cache_dir: Path) -> Path:
    """Returns the default example encoder, building it into ``cache_dir`` on first use.

    The model is written to a temporary file and moved into place atomically, so a crash
    or a concurrent caller never observes a partial file.

    Args:
        cache_dir: Directory holding ``example_encoder.onnx`` (created if missing).

    Returns:
        Path of ``cache_dir / "example_encoder.onnx"``.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{EXAMPLE_MODEL_NAME}.onnx"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A per-call name (not mkstemp, whose 0600 mode would stick to the cached file) lets
    # concurrent callers build side by side; the last os.replace wins with identical bytes.
    tmp = cache_dir / f".{EXAMPLE_MODEL_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        build_encoder(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
