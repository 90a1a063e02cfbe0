"""The bad-input catalogue: each mistake gets one line naming the problem and the fix, a non-zero exit,
no traceback, and leaves an existing study database byte for byte as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import optuna
import pytest
from onnx import TensorProto, helper

from optimizer.cli import main
from optimizer.study.run import run_study
from studies import study_settings

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def existing(models, triton, tmp_path_factory) -> dict[str, Path]:
    """A finished real study (budget 1) and one whose only trial met no latency budget."""
    root = tmp_path_factory.mktemp("existing")
    run_study(study_settings(models["mlp"], root, budget=1, study_name="s"), target=triton)
    run_study(
        study_settings(models["mlp"], root, budget=1, study_name="nofeasible", latency_budget_ms=0.001),
        target=triton,
    )
    files = {"root": root, "db": root / "s.db"}
    files["custom"] = _custom_op_model(root / "custom.onnx")
    files["npz_wrong_dtype"] = _npz(root / "dtype.npz", x=np.ones((2, 64), np.float64))
    files["npz_wrong_shape"] = _npz(root / "shape.npz", x=np.ones((2, 32), np.float32))
    files["npz_not_npz"] = _write(root / "data.csv", "1,2,3\n")
    x = np.ones((4, 64), np.float32)
    files["labels_count"] = _npz(root / "labels_count.npz", x=x, labels=np.zeros(3, np.int64))
    files["labels_shape"] = _npz(root / "labels_shape.npz", x=x, labels=np.zeros((4, 2), np.int64))
    files["accuracy_no_input"] = _npz(root / "no_input.npz", y=x)
    files["metric_raises"] = _write(
        root / "raises.py", "def bad(outputs, reference, data):\n    raise ValueError('boom')\n"
    )
    files["metric_named_top1"] = _write(
        root / "named.py", "def top1_agreement(outputs, reference, data):\n    return 1.0\n"
    )
    files["metric_not_number"] = _write(
        root / "notnum.py", "def bad(outputs, reference, data):\n    return 'high'\n"
    )
    for name, text in {
        "unknown_key": "max_batch_sizes: [1, 8]\n",
        "wrong_type": "instance_count: many\n",
        "empty_range": "instance_count: [1, 0]\n",
        "impossible": "execution_providers: [cuda]\n",
        "not_yaml": "max_batch_size: [1, 8\n",
    }.items():
        files[f"space_{name}"] = _write(root / f"{name}.yaml", text)
    return files


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _custom_op_model(path: Path) -> Path:
    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# (id, args built from (models, files, tmp_path), exit code, fragment of the one-line message)
CASES = [
    ("missing-model", lambda m, f, t: ["--model", str(t / "nope.onnx")], 3, "does not exist: check the path"),
    (
        "directory-model",
        lambda m, f, t: ["--model", str(t)],
        3,
        "is a directory with no config.pbtxt: give a model's .onnx file",
    ),
    ("zero-byte-model", lambda m, f, t: ["--model", str(_write(t / "z.onnx", ""))], 3, "is empty (0 bytes)"),
    (
        "text-model",
        lambda m, f, t: ["--model", str(_write(t / "t.onnx", "hello"))],
        3,
        "not a valid ONNX model",
    ),
    (
        "truncated-model",
        lambda m, f, t: ["--model", str(_truncated(m["cnn"], t))],
        3,
        "check the file is complete",
    ),
    ("unsupported-op", lambda m, f, t: ["--model", str(f["custom"])], 3, "ONNX Runtime cannot run"),
    ("unresolved-dims", lambda m, f, t: ["--model", str(m["encoder"])], 3, "pass --shape input_ids:N"),
    ("shape-malformed", lambda m, f, t: ["--shape", "x=64"], 2, "write NAME:D1,D2"),
    ("shape-unknown-input", lambda m, f, t: ["--shape", "pixels:64"], 2, "unknown input 'pixels'"),
    ("shape-wrong-rank", lambda m, f, t: ["--shape", "x:8,8"], 2, "give 1"),
    ("shape-negative", lambda m, f, t: ["--shape", "x:-1"], 2, "every dimension must be >= 1"),
    ("shape-not-a-number", lambda m, f, t: ["--shape", "x:abc"], 2, "not a whole number"),
    ("input-data-not-npz", lambda m, f, t: ["--input-data", str(f["npz_not_npz"])], 2, "not a .npz file"),
    ("input-data-missing", lambda m, f, t: ["--input-data", str(t / "none.npz")], 2, "does not exist"),
    (
        "metric-does-not-import",
        lambda m, f, t: ["--accuracy-metric", "no_such_module_xyz:f1"],
        2,
        "no_such_module_xyz does not import (ModuleNotFoundError",
    ),
    (
        "metric-raises",
        lambda m, f, t: ["--accuracy-metric", f"{f['metric_raises']}:bad"],
        2,
        "--accuracy-metric bad raised ValueError: boom",
    ),
    (
        "metric-not-a-number",
        lambda m, f, t: ["--accuracy-metric", f"{f['metric_not_number']}:bad"],
        2,
        "returned str, not a number",
    ),
    (
        "metric-unknown-name",
        lambda m, f, t: ["--accuracy-metric", "f1"],
        2,
        "is not a built-in metric (top1_agreement, top1_accuracy",
    ),
    (
        "labels-count",
        lambda m, f, t: ["--accuracy-data", str(f["labels_count"]), "--accuracy-metric", "top1_accuracy"],
        2,
        "must hold the same number (>= 1) of samples on their first axis: x 4, labels 3",
    ),
    (
        "labels-shape",
        lambda m, f, t: ["--accuracy-data", str(f["labels_shape"]), "--accuracy-metric", "top1_accuracy"],
        2,
        "the labels hold 8 values for 4 predictions",
    ),
    (
        "accuracy-data-without-the-input",
        lambda m, f, t: [
            "--accuracy-data",
            str(f["accuracy_no_input"]),
            "--accuracy-metric",
            "top1_agreement",
        ],
        2,
        "--accuracy-data has no array for input x",
    ),
    (
        "goal-unknown-metric",
        lambda m, f, t: ["--accuracy-goal", "f2>=0.9"],
        2,
        "names metric 'f2', which the study does not compute",
    ),
    (
        "goal-not-a-goal",
        lambda m, f, t: ["--accuracy-goal", "f1 is good"],
        2,
        "is not a goal: write NAME>=0.99",
    ),
    (
        "accuracy-data-without-a-metric",
        lambda m, f, t: ["--accuracy-data", str(f["labels_shape"])],
        2,
        "--accuracy-data is read by the accuracy metrics: add --accuracy-goal",
    ),
    (
        "metric-named-like-another",
        lambda m, f, t: [
            "--accuracy-metric",
            f"{f['metric_named_top1']}:top1_agreement",
            "--accuracy-goal",
            "top1_agreement>=0.9",
        ],
        2,
        "is named 'top1_agreement' like another metric of the study: rename the function",
    ),
    (
        "percent-goal-of-a-zero-score",
        lambda m, f, t: ["--accuracy-goal", "max_abs_error<=+10%"],
        2,
        "fp32's own max_abs_error is 0, so a percentage of it allows nothing",
    ),
    (
        "input-data-dtype",
        lambda m, f, t: ["--input-data", str(f["npz_wrong_dtype"])],
        2,
        "model expects float32",
    ),
    (
        "input-data-shape",
        lambda m, f, t: ["--input-data", str(f["npz_wrong_shape"])],
        2,
        "holds samples of shape [32]",
    ),
    (
        "space-unknown-key",
        lambda m, f, t: ["--space", str(f["space_unknown_key"])],
        4,
        "unknown field(s) max_batch_sizes",
    ),
    (
        "space-wrong-type",
        lambda m, f, t: ["--space", str(f["space_wrong_type"])],
        4,
        "instance_count must be a [low, high]",
    ),
    (
        "space-empty-range",
        lambda m, f, t: ["--space", str(f["space_empty_range"])],
        4,
        "instance_count is an empty range",
    ),
    ("space-impossible", lambda m, f, t: ["--space", str(f["space_impossible"])], 4, "set device: gpu"),
    ("space-not-yaml", lambda m, f, t: ["--space", str(f["space_not_yaml"])], 4, "is not valid YAML"),
    ("space-missing", lambda m, f, t: ["--space", str(t / "none.yaml")], 4, "does not exist"),
    ("space-unknown-name", lambda m, f, t: ["--space", "tpu"], 4, "no space named 'tpu'"),
    ("budget-zero", lambda m, f, t: ["--budget", "0"], 2, "--budget must be at least 1"),
    ("budget-negative", lambda m, f, t: ["--budget", "-3"], 2, "--budget must be at least 1"),
    ("latency-zero", lambda m, f, t: ["--latency-budget-ms", "0"], 2, "positive number of milliseconds"),
    ("latency-negative", lambda m, f, t: ["--latency-budget-ms", "-5"], 2, "positive number of milliseconds"),
    ("latency-nan", lambda m, f, t: ["--latency-budget-ms", "nan"], 2, "positive number of milliseconds"),
    ("tolerance-negative", lambda m, f, t: ["--accuracy-tolerance", "-1"], 2, "between 0 and 2"),
    ("concurrency-bad", lambda m, f, t: ["--concurrency", "8,4"], 2, "ascending order"),
    ("request-rate-zero", lambda m, f, t: ["--request-rate", "0"], 2, "distinct positive requests/s"),
    ("request-rate-negative", lambda m, f, t: ["--request-rate", "-5"], 2, "distinct positive requests/s"),
    ("request-rate-nan", lambda m, f, t: ["--request-rate", "nan"], 2, "distinct positive requests/s"),
    ("request-rate-words", lambda m, f, t: ["--request-rate", "fast"], 2, "distinct positive requests/s"),
    (
        "request-rate-and-concurrency",
        lambda m, f, t: ["--request-rate", "50", "--concurrency", "1,2"],
        2,
        "not both",
    ),
    ("max-memory-zero", lambda m, f, t: ["--max-memory-mb", "0"], 2, "positive number of MiB"),
    ("max-memory-negative", lambda m, f, t: ["--max-memory-mb", "-1"], 2, "positive number of MiB"),
    (
        "load-generator-unknown",
        lambda m, f, t: ["--load-generator", "locust"],
        2,
        "Invalid value for '--load-generator'",
    ),
    ("protocol-unknown", lambda m, f, t: ["--protocol", "udp"], 2, "'udp' is not one of 'grpc', 'http'"),
    (
        "stop-rule-unknown",
        lambda m, f, t: ["--stop-rule", "never"],
        2,
        "'never' is not one of 'ci', 'fixed'",
    ),
    (
        "window-over-cap",
        lambda m, f, t: ["--window-s", "5", "--max-window-s", "2"],
        2,
        "at most --max-window-s",
    ),
    ("p99-ci-zero", lambda m, f, t: ["--p99-ci", "0"], 2, "positive fractions"),
    ("cpus-bad", lambda m, f, t: ["--cpus", "0-999"], 2, "cores this machine does not offer"),
    (
        "sampler-unknown",
        lambda m, f, t: ["--sampler", "cmaes"],
        2,
        "'cmaes' is not one of 'tpe', 'random', 'grid'",
    ),
    (
        "starting-point-unknown",
        lambda m, f, t: ["--starting-points", "variants,fast"],
        4,
        "unknown starting point 'fast'",
    ),
    ("grid-of-a-range", lambda m, f, t: ["--sampler", "grid"], 4, "a grid needs max_queue_delay_us as"),
    (
        "warm-start-missing",
        lambda m, f, t: ["--warm-start", "nowhere"],
        6,
        "no study 'nowhere' to warm-start",
    ),
    ("replay-no-directory", lambda m, f, t: ["--target", "replay:"], 2, "takes the recording's directory"),
    ("replay-not-a-recording", lambda m, f, t: ["--target", f"replay:{t}"], 2, "is not a recorded surface"),
    (
        "storage-malformed",
        lambda m, f, t: ["--storage", "studies.db"],
        5,
        "is malformed: use e.g. sqlite:///",
    ),
    (
        "storage-unreachable",
        lambda m, f, t: ["--storage", "postgresql://u:secret@127.0.0.1:1/x"],
        5,
        "cannot open study storage 'postgresql://u:***@127.0.0.1:1/x'",
    ),
    ("study-name-traversal", lambda m, f, t: ["--study-name", "../../etc"], 2, "is not allowed"),
    ("study-name-slash", lambda m, f, t: ["--study-name", "a/b"], 2, "is not allowed"),
    ("study-other-model", lambda m, f, t: ["--model", str(m["cnn"])], 6, "made for a different model"),
    (
        "study-other-latency",
        lambda m, f, t: ["--latency-budget-ms", "7"],
        6,
        "uses a latency budget of 200 ms",
    ),
    (
        "study-other-tolerance",
        lambda m, f, t: ["--accuracy-tolerance", "0.5"],
        6,
        "accuracy tolerance of 0.01",
    ),
]


def _truncated(source: Path, tmp_path: Path) -> Path:
    data = source.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.mark.parametrize(("case", "build", "code", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_study_bad_input(case, build, code, fragment, models, existing, tmp_path, capsys):
    before = _digest(existing["db"])
    args = [
        "study",
        "--model",
        str(models["mlp"]),
        "--study-name",
        "s",
        "--storage",
        f"sqlite:///{existing['db']}",
        "--latency-budget-ms",
        "200",
        "--budget",
        "2",
    ]
    extra = build(models, existing, tmp_path)
    # Later options win in Typer, so the case's own value replaces the default above; --model is the
    # exception (given twice it tunes two models together), so a case's own --model replaces it here.
    if "--model" in extra:
        args = args[:1] + args[3:]
    assert main(args + extra) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err
    assert _digest(existing["db"]) == before


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (
            lambda f: [
                "export",
                "--study-name",
                "nofeasible",
                "--out",
                "x",
                "--storage",
                f"sqlite:///{f['root']}/nofeasible.db",
            ],
            6,
            "has no feasible completed trial",
        ),
        (
            lambda f: [
                "export",
                "--study-name",
                "s",
                "--trial",
                "99",
                "--out",
                "x",
                "--storage",
                f"sqlite:///{f['db']}",
            ],
            6,
            "has no measured trial 99",
        ),
        (lambda f: ["export", "--study-name", "unknown", "--out", "x"], 6, "no study 'unknown'"),
        (lambda f: ["inspect", str(f["root"] / "none.onnx")], 3, "does not exist"),
    ],
    ids=["export-no-feasible", "export-unknown-trial", "export-unknown-study", "inspect-missing"],
)
def test_other_commands_bad_input(args, code, fragment, existing, capsys):
    before = _digest(existing["db"])
    assert main(args(existing)) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err
    assert _digest(existing["db"]) == before


def test_the_catalogue_has_at_least_thirty_cases():
    assert len(CASES) + 4 >= 30


@pytest.mark.parametrize("flag", [["--load-generator", "perf_analyzer"], ["--confirm-with", "perf_analyzer"]])
def test_perf_analyzer_that_cannot_be_installed_is_one_line(models, tmp_path, monkeypatch, capsys, flag):
    from optimizer.measurement import perf_analyzer

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no perf_analyzer on PATH
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(tmp_path / "cache"))  # none installed in the cache
    monkeypatch.setattr(perf_analyzer.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # and pip finds nothing to install: as offline
    args = ["study", "--model", str(models["mlp"]), "--study-name", "pa", *flag]
    assert main([*args, "--storage", f"sqlite:///{tmp_path / 'pa.db'}"]) == 8
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: installing tritonclient==2.51.0 failed"), err
    assert "Traceback" not in err
    assert not (tmp_path / "pa.db").exists()  # refused before the study was made


def test_max_memory_below_the_idle_server_is_impossible_before_any_trial(models, tmp_path, capsys):
    args = ["study", "--model", str(models["mlp"]), "--study-name", "mem", "--max-memory-mb", "1"]
    assert main([*args, "--storage", f"sqlite:///{tmp_path / 'mem.db'}", "--latency-budget-ms", "200"]) == 6
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--max-memory-mb 1 is impossible" in lines[0], err
    assert "server process-tree RSS is already" in lines[0]
    study = optuna.load_study(study_name="mem", storage=f"sqlite:///{tmp_path / 'mem.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.WAITING]  # the baseline, never run
