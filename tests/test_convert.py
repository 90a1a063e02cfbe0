"""optimize convert: a real PyTorch module exported to ONNX with a dynamic batch, checked, then studied."""

from __future__ import annotations

import textwrap
import warnings

import pytest

from optimizer.cli import main
from optimizer.errors import UsageError
from optimizer.model.convert import InputSpec, parse_inputs
from optimizer.model.intake import inspect_model
from optimizer.study.run import run_study
from studies import load_study, study_settings

torch = pytest.importorskip("torch")  # the convert extra; .ci/run and the README's test command install it

MODULE = textwrap.dedent(
    """
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 16)
            layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
            self.body = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, ids, scale):
            return self.head(self.body(self.embed(ids)).mean(dim=1)) * scale

    def make_model():
        torch.manual_seed(0)
        return Encoder()

    class FixedBatch(torch.nn.Module):
        def forward(self, x):
            return torch.stack([row * 2 for row in x])  # a tracer unrolls this loop for the batch it saw

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.relu(self.layer(x))

    NOT_A_MODULE = 3
    """
)
INPUTS = ["--input", "ids:8:int64", "--input", "scale:1"]


@pytest.fixture
def module_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODULE)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_inputs_are_parsed_in_order_with_dtypes_and_bad_ones_refused():
    assert parse_inputs(["ids:8:int64", "scale:1"]) == (
        InputSpec("ids", (8,), "int64"),
        InputSpec("scale", (1,), "float32"),
    )
    for bad, fragment in [
        ("ids", "malformed"),
        ("ids:8:complex", "dtype"),
        ("ids:eight", "whole number"),
        ("ids:0", "below 1"),
    ]:
        with pytest.raises(UsageError, match=fragment):
            parse_inputs([bad])
    with pytest.raises(UsageError, match="twice"):
        parse_inputs(["x:1", "x:2"])
    with pytest.raises(UsageError, match="give every input"):
        parse_inputs([])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_module_becomes_an_onnx_model_with_a_dynamic_batch(module_file, tmp_path, capsys, exporter):
    out = tmp_path / f"{exporter}.onnx"
    assert (
        main(["convert", f"{module_file}:make_model", *INPUTS, "--out", str(out), "--exporter", exporter])
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        f"wrote {out}" in printed
        and "dynamic batch" in printed
        and f"optimize study --model {out}" in printed
    )
    info = inspect_model(out)
    assert info.batching
    assert [(i.name, i.dtype) for i in info.inputs] == [("ids", "int64"), ("scale", "float32")]
    assert [i.dims[1:] for i in info.inputs] == [(8,), (1,)]


def test_a_torchscript_file_converts_too(module_file, tmp_path, capsys):
    namespace: dict = {}
    exec(compile(MODULE, str(module_file), "exec"), namespace)  # noqa: S102 - the test's own module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated (and its tracer warns); its files live on
        scripted = torch.jit.trace(namespace["Tiny"]().eval(), (torch.zeros(2, 4),))
        saved = tmp_path / "tiny.pt"
        torch.jit.save(scripted, str(saved))
    out = tmp_path / "from-pt.onnx"
    assert (
        main(["convert", str(saved), "--input", "x:4", "--out", str(out), "--exporter", "torchscript"]) == 0
    )
    assert inspect_model(out).batching


@pytest.mark.server
def test_a_converted_model_is_studied_on_the_real_server(module_file, triton, tmp_path, capsys):
    out = tmp_path / "encoder.onnx"
    assert main(["convert", f"{module_file}:make_model", *INPUTS, "--out", str(out)]) == 0
    summary = run_study(study_settings(out, tmp_path, budget=2), target=triton)
    assert summary.best is not None and summary.best.throughput > 0
    assert load_study(tmp_path).user_attrs["model_path"] == str(out)


@pytest.mark.parametrize(
    "spec, inputs, code, fragment",
    [
        ("missing.py:make_model", INPUTS, 2, "does not exist"),
        ("{file}:nothing", INPUTS, 2, "has no 'nothing'"),
        ("{file}:NOT_A_MODULE", INPUTS, 2, "not a torch.nn.Module"),
        ("{file}", INPUTS, 2, "names no factory"),
        ("{file}:make_model", ["--input", "ids:8:int64"], 2, "forward() failed"),
        (
            "{file}:FixedBatch",
            ["--input", "x:4", "--exporter", "torchscript"],
            3,
            "cannot run the exported model with batch 3",
        ),
    ],
)
def test_bad_conversions_are_one_line_and_write_nothing(
    module_file, tmp_path, capsys, spec, inputs, code, fragment
):
    out = tmp_path / "out.onnx"
    assert main(["convert", spec.format(file=module_file), *inputs, "--out", str(out)]) == code
    assert fragment in _one_error_line(capsys)
