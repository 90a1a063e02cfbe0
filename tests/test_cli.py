"""The command line: one clear line and a non-zero exit for bad input, no traceback, nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import children

from optimizer.cli import main


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and "Traceback" not in err
    return lines[0]


def test_help_lists_the_commands(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0 and "study" in out and "inspect" in out and "export" in out


def test_inspect_shows_inputs_batch_dimension_and_request_shapes(models, capsys):
    code, out, _ = _run(
        ["inspect", str(models["encoder"]), "--shape", "input_ids:32", "--shape", "attention_mask:32"], capsys
    )
    assert code == 0
    assert "input_ids" in out and "int64" in out and "[batch, sequence]" in out
    assert "dynamic (first axis)" in out
    assert "input_ids:32" in out


def test_inspect_notes_a_fixed_batch_model_conversion(models, capsys):
    code, out, _ = _run(["inspect", str(models["fixed"])], capsys)
    out = " ".join(out.split())  # rich wraps long lines
    assert code == 0 and "note:" in out and "dynamic batch axis" in out


@pytest.mark.parametrize(
    ("make_args", "expected_code", "fragment"),
    [
        (lambda m, t: ["inspect", str(t / "missing.onnx")], 3, "does not exist"),
        (lambda m, t: ["inspect", str(t)], 3, "is a directory"),
        (lambda m, t: ["inspect", str(_write(t / "empty.onnx", b""))], 3, "is empty"),
        (
            lambda m, t: ["inspect", str(_write(t / "text.onnx", b"not a model at all"))],
            3,
            "not a valid ONNX model",
        ),
        (lambda m, t: ["inspect", str(_truncated(m["cnn"], t))], 3, "not a valid ONNX model"),
        (lambda m, t: ["inspect", str(m["encoder"])], 3, "--shape input_ids:N"),
        (lambda m, t: ["inspect", str(m["mlp"]), "--shape", "y:3"], 2, "unknown input 'y'"),
        (
            lambda m, t: ["inspect", str(m["mlp"]), "--shape", "x:64,2"],
            2,
            "has 2 dimension(s) but the input has 1",
        ),
        (lambda m, t: ["inspect", str(m["mlp"]), "--shape", "x:-4"], 2, "below 1"),
        (lambda m, t: ["inspect", str(m["mlp"]), "--shape", "x64"], 2, "malformed"),
        (lambda m, t: ["study", "--model", str(m["mlp"]), "--budget", "0"], 2, "--budget must be at least 1"),
        (lambda m, t: ["study", "--model", str(m["mlp"]), "--latency-budget-ms", "0"], 2, "positive number"),
        (
            lambda m, t: ["study", "--model", str(m["mlp"]), "--latency-budget-ms", "nan"],
            2,
            "positive number",
        ),
        (lambda m, t: ["study", "--model", str(m["mlp"]), "--study-name", "../escape"], 2, "not allowed"),
        (lambda m, t: ["study", "--model", str(m["mlp"]), "--concurrency", "4,2"], 2, "ascending"),
        (lambda m, t: ["study", "--model", str(m["mlp"]), "--space", "nosuchspace"], 4, "no space named"),
        (lambda m, t: ["export", "--study-name", "nothing", "--out", str(t / "o")], 6, "no study 'nothing'"),
    ],
)
def test_bad_input_gets_one_line_and_a_nonzero_exit(
    models, tmp_path, capsys, make_args, expected_code, fragment
):
    code, _, err = _run(make_args(models, tmp_path), capsys)
    assert code == expected_code, err
    assert fragment in _one_error_line(err)
    assert not list(tmp_path.glob("*.db"))


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["inspect", str(tmp_path / "missing.onnx"), "--debug"])


def test_debug_before_the_command_shows_the_traceback_too(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "inspect", str(tmp_path / "missing.onnx")])


def test_help_lists_each_fixed_choice_and_groups_the_study_options_in_panels(capsys):
    code, out, _ = _run(["study", "--help"], capsys)
    assert code == 0
    for choices in (
        "tpe|random|grid",
        "builtin|perf_analyzer",
        "grpc|http",
        "ci|fixed",
        "embedded|local|docker",
    ):
        assert choices in out, choices
    for panel in ("Model", "Search", "Measurement", "Target", "Scale-out"):
        assert f"─ {panel} " in out, panel


def test_unknown_option_or_choice_is_one_line_from_the_parser(capsys):
    code, _, err = _run(["study", "--sampler", "cmaes"], capsys)
    assert code == 2 and "'cmaes' is not one of 'tpe', 'random', 'grid'" in _one_error_line(err)
    code, _, err = _run(["study", "--no-such-option"], capsys)
    assert code == 2 and "No such option: --no-such-option" in _one_error_line(err)


def test_an_unexpected_exception_is_reported_as_a_bug_with_its_traceback_saved(monkeypatch, capsys):
    from optimizer import doctor

    def broken():
        raise ZeroDivisionError("division by zero in a check")

    monkeypatch.setattr(doctor, "run_checks", broken)
    code, _, err = _run(["doctor"], capsys)
    line = _one_error_line(err)
    assert code == 70 and "internal error ZeroDivisionError: division by zero in a check" in line
    saved = Path(line.split("the traceback is in ", 1)[1].split(" (please", 1)[0])
    assert saved.is_file() and "Traceback" in saved.read_text() and "ZeroDivisionError" in saved.read_text()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(source: Path, tmp_path: Path) -> Path:
    data = source.read_bytes()
    return _write(tmp_path / "truncated.onnx", data[: len(data) // 2])


@pytest.mark.server
def test_ctrl_c_stops_the_server_and_leaves_no_running_trial(models, tmp_path):
    import optuna

    db = tmp_path / "c.db"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "optimizer",
            "study",
            "--model",
            str(models["mlp"]),
            "--budget",
            "20",
            "--latency-budget-ms",
            "200",
            "--study-name",
            "c",
            "--storage",
            f"sqlite:///{db}",
            "--window-s",
            "1",
            "--stop-rule",
            "fixed",
            "--concurrency",
            "1,2,4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not children(process.pid, "tritonserver") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(6)  # well into the first trials
    os.kill(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert children(process.pid) == []
    study = optuna.load_study(study_name="c", storage=f"sqlite:///{db}")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
