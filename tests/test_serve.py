"""`optimize serve`: a repository exported from a real study, served by the real embedded Triton."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import pytest

from optimizer.cli import main
from optimizer.config.render import config_from_pbtxt, render_config
from optimizer.config.repository import write_repository
from optimizer.config.space import Candidate
from optimizer.errors import ModelError, UsageError
from optimizer.measurement.levels import MeasureSettings
from optimizer.model.intake import inspect_model, synthetic_inputs
from optimizer.output.serve import binding_warning, check_repository, perf_analyzer_command
from optimizer.study.results import best_trial
from optimizer.study.run import run_study
from optimizer.study.settings import StudySettings
from studies import NO_CONFIRMATION

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


# --- helpers -------------------------------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and "Traceback" not in err
    return lines[0]


def _free_ports(count: int = 3) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _repository(tmp_path: Path, model: Path, candidate: Candidate | None = None, name: str = "mlp") -> Path:
    info = inspect_model(model)
    candidate = candidate or Candidate()
    write_repository(
        tmp_path / "repo",
        render_config(info, candidate, model_name=name),
        {"1/model.onnx": info.path},
    )
    return tmp_path / "repo"


class Served:
    """``python -m optimizer serve ARGS`` as a child process, its output in files."""

    def __init__(self, args: list[str], tmp_path: Path) -> None:
        self.http, self.grpc, self.metrics = _free_ports()
        self.out, self.err = tmp_path / "serve.out", tmp_path / "serve.err"
        ports = [
            "--http-port",
            str(self.http),
            "--grpc-port",
            str(self.grpc),
            "--metrics-port",
            str(self.metrics),
        ]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "optimizer", "serve", *args, *ports],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )

    def output(self) -> str:
        return self.out.read_text()

    def wait_ready(self, model: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"serve exited with {self.process.returncode}:\n{self.output()}\n{self.err.read_text()}"
                )
            try:
                url = f"http://127.0.0.1:{self.http}/v2/models/{model}/ready"
                with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310
                    if response.status == 200 and "ready; press Ctrl-C" in self.output():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(
            f"serve was not ready in {READY_TIMEOUT_S:.0f} s:\n{self.output()}\n{self.err.read_text()}"
        )

    def server_pid(self) -> int:
        children = [pid for pid, ppid, _ in _processes() if ppid == self.process.pid]
        assert len(children) == 1, children
        return children[0]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def _processes() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every live (non-zombie) process, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                found.append((int(entry.name), int(fields[1]), int(fields[2])))
    return found


def _cmdlines_mentioning(text: str) -> list[int]:
    pids = []
    for pid, _, _ in _processes():
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def _direct(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _infer_http(port: int, model: str, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inputs = []
        for name, array in feeds.items():
            tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return client.infer(model, inputs).as_numpy(output)
    finally:
        client.close()


def _infer_grpc(port: int, model: str, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inputs = []
        for name, array in feeds.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return client.infer(model, inputs).as_numpy(output)
    finally:
        client.close()


# --- a small real study ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(triton, tmp_path_factory: pytest.TempPathFactory):
    """A 2-trial study on the example MLP, and the repository `optimize export` wrote from it."""
    from optimizer.model import examples

    root = tmp_path_factory.mktemp("serve-study")
    model = examples.build_mlp(root / "mlp.onnx")
    measure = MeasureSettings(warmup_s=0.1, window_s=0.3, min_requests=10, max_window_s=1.0, rule="fixed")
    settings = StudySettings(
        model_path=model,
        budget=2,
        latency_budget_ms=200.0,
        study_name="s",
        output_dir=root,
        concurrency=(1, 2, 4),
        seed=1,
        measure=measure,
        search=NO_CONFIRMATION,
    )
    run_study(settings, target=triton)
    storage = f"sqlite:///{root}/s.db"
    repository = root / "exported"
    assert main(["export", "--study-name", "s", "--out", str(repository), "--storage", storage]) == 0
    best = best_trial(optuna.load_study(study_name="s", storage=storage))
    # The file the exported config serves (the best may be the int8 variant): what answers must match.
    config = config_from_pbtxt((repository / "mlp" / "config.pbtxt").read_text())
    served = repository / "mlp" / "1" / (config.default_model_filename or "model.onnx")
    return {"model": model, "storage": storage, "repository": repository, "best": best, "served": served}


# --- without a server ------------------------------------------------------------------------------------------


def test_check_repository_accepts_a_repository_or_one_model_directory(models, tmp_path):
    repo = _repository(tmp_path, models["mlp"])
    root, found = check_repository(repo)
    assert root == repo and [m.name for m in found] == ["mlp"] and found[0].versions == (1,)
    root, found = check_repository(repo / "mlp")  # what `optimize export` prints
    assert root == repo and [m.name for m in found] == ["mlp"]


@pytest.mark.parametrize(
    ("damage", "error", "fragment"),
    [
        (lambda m: (m / "config.pbtxt").unlink(), ModelError, "config.pbtxt is missing"),
        (
            lambda m: (m / "config.pbtxt").write_text("max_batch_size: {{ nonsense"),
            ModelError,
            "not a valid Triton model config",
        ),
        (
            lambda m: (m / "config.pbtxt").write_text('name: "other" backend: "onnxruntime"'),
            ModelError,
            "directory is 'mlp'",
        ),
        (
            lambda m: (m / "config.pbtxt").write_text('backend: "tensorflow"'),
            ModelError,
            "'tensorflow' is not served",
        ),
        (lambda m: (m / "1" / "model.onnx").unlink(), ModelError, "1/model.onnx is missing"),
        (lambda m: (m / "1").rename(m / "v1"), ModelError, "no version directory"),
    ],
)
def test_invalid_repository_is_refused_with_a_clear_error(models, tmp_path, damage, error, fragment):
    repo = _repository(tmp_path, models["mlp"])
    damage(repo / "mlp")
    with pytest.raises(error, match=fragment):
        check_repository(repo)


def test_cli_refuses_a_repository_without_a_valid_config_in_one_line(models, tmp_path, capsys):
    repo = _repository(tmp_path, models["mlp"])
    (repo / "mlp" / "config.pbtxt").write_text("this is not a config")
    assert main(["serve", str(repo)]) == ModelError.exit_code
    assert "not a valid Triton model config" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "give a model repository REPO or --study-name NAME"),
        (["REPO", "--study-name", "s"], "give a model repository REPO or --study-name NAME"),
        (["REPO", "--trial", "1"], "use them with --study-name"),
        (["REPO", "--model", "nope"], "no model 'nope'"),
        (["REPO", "--host", "::1"], "--host must be an IPv4 address"),
        (["REPO", "--shape", "x"], "malformed"),
    ],
)
def test_cli_usage_errors_are_one_line(models, tmp_path, capsys, args, fragment):
    repo = _repository(tmp_path, models["mlp"])
    code = main(["serve", *[str(repo) if a == "REPO" else a for a in args]])
    assert code == UsageError.exit_code
    assert fragment in _one_error_line(capsys.readouterr().err)


def test_perf_analyzer_command_carries_shapes_of_dynamic_inputs_only(models, tmp_path):
    repo = _repository(tmp_path, models["encoder"], Candidate(max_batch_size=4), name="enc")
    _, (model,) = check_repository(repo)
    command, notes = perf_analyzer_command(
        model, "127.0.0.1:8001", concurrency=4, shapes={"input_ids": [128], "attention_mask": [128]}
    )
    assert command == (
        "perf_analyzer -m enc -u 127.0.0.1:8001 -i grpc --concurrency-range 4 "
        "--shape input_ids:128 --shape attention_mask:128 --input-data zero"
    )  # token ids in range
    assert notes == []
    command, notes = perf_analyzer_command(model, "127.0.0.1:8001", shapes={"input_ids": [16]})
    assert command.endswith("--concurrency-range 1 --shape input_ids:16 --input-data zero")
    assert notes and "--shape attention_mask:DIMS" in notes[0]
    _, (mlp,) = check_repository(_repository(tmp_path / "m", models["mlp"]))
    command, _ = perf_analyzer_command(mlp, "127.0.0.1:8001", shapes={"x": [64]})  # static: no --shape needed
    assert "--shape" not in command and "--input-data" not in command  # float input: random data is fine


def test_binding_beyond_loopback_warns_that_any_client_can_load_models():
    assert binding_warning("127.0.0.1") is None and binding_warning("127.0.0.2") is None
    warning = binding_warning("0.0.0.0")
    assert warning and "model-control API" in warning and "load" in warning


# --- against the real server -----------------------------------------------------------------------------------


@pytest.mark.server
def test_served_repository_answers_http_and_grpc_like_onnxruntime_and_ctrl_c_leaves_no_process(
    study, tmp_path
):
    served = Served([str(study["repository"])], tmp_path)
    try:
        served.wait_ready("mlp")
        server_pid = served.server_pid()
        info = inspect_model(study["model"])
        max_batch = max(1, study["best"].user_attrs["config"].get("max_batch_size", 1))
        for batch in sorted({1, min(3, max_batch)}):
            feeds = synthetic_inputs(info, {"x": (64,)}, batch, seed=batch)
            expected = _direct(study["served"], feeds)["logits"]
            for infer, port in ((_infer_http, served.http), (_infer_grpc, served.grpc)):
                got = infer(port, "mlp", feeds, "logits")
                assert got.shape == expected.shape
                assert float(np.max(np.abs(got - expected))) <= 1e-5
        out = served.output()
        assert (
            f"http://127.0.0.1:{served.http}" in out and f"http://127.0.0.1:{served.metrics}/metrics" in out
        )
        assert f"perf_analyzer -m mlp -u 127.0.0.1:{served.grpc} -i grpc --concurrency-range 1" in out
    finally:
        code = served.stop()
    assert code == 0, served.err.read_text()
    assert served.output().rstrip().endswith("stopped")
    assert [pid for pid, _, pgid in _processes() if pgid == server_pid or pid == server_pid] == []
    assert _cmdlines_mentioning(f"--model-repository={study['repository'].resolve()}") == []


@pytest.mark.server
def test_serving_a_study_uses_its_best_trial_and_concurrency(study, tmp_path):
    served = Served(["--study-name", "s", "--storage", study["storage"]], tmp_path)
    try:
        served.wait_ready("mlp")
        feeds = synthetic_inputs(inspect_model(study["model"]), {"x": (64,)}, 1, seed=7)
        got = _infer_grpc(served.grpc, "mlp", feeds, "logits")
        assert float(np.max(np.abs(got - _direct(study["served"], feeds)["logits"]))) <= 1e-5
        out = served.output()
        best = study["best"]
        assert f"trial {best.number} of study 's'" in out
        assert f"--concurrency-range {best.user_attrs['concurrency']}" in out
    finally:
        assert served.stop() == 0


@pytest.mark.server
def test_taken_port_gives_one_error_line_and_a_non_zero_exit(study, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        http, metrics = _free_ports(2)
        done = subprocess.run(  # noqa: S603
            [
                sys.executable,
                "-m",
                "optimizer",
                "serve",
                str(study["repository"]),
                "--http-port",
                str(http),
                "--grpc-port",
                str(port),
                "--metrics-port",
                str(metrics),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ),
        )
    assert done.returncode != 0
    line = _one_error_line(done.stderr)
    assert f"grpc port {port}" in line and "in use" in line and "--grpc-port" in line
