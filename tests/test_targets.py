"""Serving targets other than the default: local binary, remote server, Docker container, the factory.

``local`` and ``remote`` run real studies against real Triton servers started here; ``docker`` is
checked on the container it asks a (fake) Docker client for, as no Docker daemon runs here.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from procs import listening_addresses

from optimizer.cli import main
from optimizer.config.render import render_config, to_json
from optimizer.config.space import Candidate
from optimizer.errors import ServerDiedError, ServerStartError, UsageError
from optimizer.measurement.builtin import LoadGenerator
from optimizer.model import examples
from optimizer.model.intake import inspect_model, synthetic_inputs
from optimizer.serving.docker import DockerTriton, PullProgress, container_spec, image_name
from optimizer.serving.embedded import EmbeddedTriton, bundle_environment, prepare_bundle
from optimizer.serving.local import LocalTriton
from optimizer.serving.metrics import gpus_in_metrics
from optimizer.serving.remote import RemoteTriton, TlsOptions, parse_grpc_url
from optimizer.study.run import run_study
from optimizer.study.storage import count_finished
from optimizer.study.targets import make_target, parse_headers
from studies import FAST, CrashOnTrial, study_settings

GPU_METRICS = """\
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-aaaa"} 0.5
nv_gpu_utilization{gpu_uuid="GPU-bbbb"} 0
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-aaaa"} 1.7e+10
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.25
"""


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and "Traceback" not in err
    return lines[0]


def _study(tmp_path: Path, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name}.db")


@pytest.fixture(scope="module")
def remote_server(tmp_path_factory):
    """A real Triton started on loopback by the test, as a remote server: its own empty repository."""
    workdir = tmp_path_factory.mktemp("remote")
    with EmbeddedTriton(workdir=workdir, model_repository=workdir / "repository") as server:
        yield server


class _StubHandler(http.server.BaseHTTPRequestHandler):
    """Answers Triton's readiness and metrics endpoints, for targets whose server is faked."""

    metrics = GPU_METRICS

    def do_GET(self):  # noqa: N802 - http.server's name
        body = self.metrics.encode() if self.path == "/metrics" else b""
        self.send_response(200 if self.path in ("/metrics", "/v2/health/ready") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_http():
    """A loopback HTTP server answering /v2/health/ready and /metrics (with two GPUs); yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


# --- local: the bundled binary used as the user's own install ----------------------------------------------


def _local_target(**options) -> LocalTriton:
    bundle = prepare_bundle()
    # Outside the wheel's directory the bundled binary needs its libraries and `python` on the paths.
    return LocalTriton(bundle / "bin" / "tritonserver", environment=bundle_environment(), **options)


@pytest.mark.server
def test_local_target_runs_a_real_study_with_the_binarys_own_backends(models, tmp_path):
    target = _local_target()
    assert target.backend_directory == prepare_bundle() / "backends"  # found next to its bin/
    summary = run_study(study_settings(models["mlp"], tmp_path, budget=3), target=target)
    study = _study(tmp_path)
    assert summary.finished == count_finished(study) == 3
    assert study.user_attrs["target"] == "local"
    assert study.user_attrs["server_version"] == "2.51.0"
    assert summary.best_repository is not None and (summary.best_repository / "config.pbtxt").is_file()
    assert not target.is_alive()


@pytest.mark.server
def test_local_target_listens_on_loopback_notices_a_crash_and_restarts(models):
    info = inspect_model(models["mlp"])
    config = to_json(render_config(info, Candidate(), model_name="mlp"))
    with _local_target() as server:
        for port in server.ports.values():
            assert listening_addresses(port) == {"127.0.0.1"}
        server.load_model("mlp", config, {"1/model.onnx": info.path})
        os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while server.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.is_alive()
        with pytest.raises(ServerDiedError):
            server.load_model("mlp", config, {"1/model.onnx": info.path})
        server.restart()
        server.load_model("mlp", config, {"1/model.onnx": info.path})
        assert server.control.is_model_ready("mlp")


def test_local_target_without_a_binary_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerStartError, match="no tritonserver on PATH: pass --triton-binary"):
        LocalTriton()
    with pytest.raises(ServerStartError, match="does not exist"):
        LocalTriton(tmp_path / "tritonserver")
    binary = tmp_path / "opt" / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    with pytest.raises(ServerStartError, match="not executable"):
        LocalTriton(binary)
    binary.chmod(0o755)
    (tmp_path / "opt" / "backends").mkdir()
    assert LocalTriton(binary, workdir=tmp_path).backend_directory == tmp_path / "opt" / "backends"


# --- remote: a server started separately, files sent in the load request ------------------------------------


@pytest.mark.server
def test_remote_study_sends_the_model_files_and_leaves_the_server_as_found(remote_server, models, tmp_path):
    private = tmp_path / "client-only"  # nothing the server is pointed at
    private.mkdir()
    model = Path(shutil.copy(models["mlp"], private / "mlp.onnx"))
    target = RemoteTriton(remote_server.grpc_url, metrics_url=remote_server.metrics_url)
    summary = run_study(study_settings(model, tmp_path, budget=3), target=target)
    study = _study(tmp_path)
    assert summary.finished == 3 and summary.best is not None
    assert study.user_attrs["target"] == "remote"
    assert study.user_attrs["server_version"] == "2.51.0"
    assert list(remote_server.model_repository.iterdir()) == []  # the files came with the requests
    assert not remote_server.control.is_model_ready("mlp")  # unloaded when the study ended
    assert target.capabilities.can_restart is False and target.capabilities.shared_filesystem is False


@pytest.mark.server
def test_a_joint_study_runs_on_a_remote_server_and_leaves_it_as_found(
    remote_server, models, tmp_path, capsys
):
    private = tmp_path / "client-only"  # nothing the server is pointed at
    private.mkdir()
    paths = [Path(shutil.copy(models[name], private / f"{name}.onnx")) for name in ("mlp", "cnn")]
    remote = [
        "--target",
        "remote",
        "--url",
        remote_server.grpc_url,
        "--metrics-url",
        remote_server.metrics_url,
    ]
    args = ["study", "--model", str(paths[0]), "--model", str(paths[1]), "--shape", "cnn.image:3,32,32"]
    args += ["--latency-budget-ms", "500", "--budget", "2", "--seed", "0", *remote, "--window-s", "0.3"]
    args += ["--warmup-s", "0.1", "--study-name", "jr", "--storage", f"sqlite:///{tmp_path / 'jr'}.db"]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    measured = [t for t in _study(tmp_path, "jr").trials if t.user_attrs.get("levels")]
    assert len(measured) == 2 and all(set(t.user_attrs["configs"]) == {"mlp", "cnn"} for t in measured)
    assert list(remote_server.model_repository.iterdir()) == []  # the files came with the requests
    assert not remote_server.control.is_model_ready("mlp") and not remote_server.control.is_model_ready("cnn")
    # An ensemble's steps must be in the server's repository (Triton reads them from there): refused.
    examples.build_ensemble(private / "repo")
    ensemble = ["study", "--model", str(private / "repo" / "pipeline"), "--model", str(paths[1]), *remote]
    assert main([*ensemble, "--study-name", "je", "--storage", f"sqlite:///{tmp_path / 'je'}.db"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "needs its steps in the server's model repository" in err[0]


@pytest.mark.server
def test_remote_server_gpus_come_from_its_own_metrics(remote_server, stub_http):
    with RemoteTriton(remote_server.grpc_url, metrics_url=remote_server.metrics_url) as target:
        assert target.gpus() == ()  # this CPU-only server reports no GPU
    with RemoteTriton(remote_server.grpc_url, metrics_url=f"http://127.0.0.1:{stub_http}/metrics") as target:
        assert target.gpus() == ("GPU-aaaa", "GPU-bbbb")
        assert target.capabilities.gpu_metrics
    assert RemoteTriton(remote_server.grpc_url).gpus() is None  # no metrics URL: unknown, not "none"


@pytest.mark.server
def test_remote_wrong_metrics_url_is_refused_before_any_trial(remote_server):
    wrong = f"http://127.0.0.1:{remote_server.ports['grpc']}/metrics"
    with pytest.raises(ServerStartError, match="cannot read the server's metrics at .* check --metrics-url"):
        RemoteTriton(remote_server.grpc_url, metrics_url=wrong).start()


@pytest.mark.server
def test_remote_refuses_to_replace_a_model_it_did_not_load(remote_server, models):
    info = inspect_model(models["mlp"])
    config = to_json(render_config(info, Candidate(), model_name="theirs"))
    owner = RemoteTriton(remote_server.grpc_url)
    owner.start()  # stands for another deployment on the same server
    try:
        owner.load_model("theirs", config, {"1/model.onnx": info.path})
        with RemoteTriton(remote_server.grpc_url) as target:
            with pytest.raises(Exception, match="already serves a model named 'theirs'"):
                target.load_model("theirs", config, {"1/model.onnx": info.path})
        assert remote_server.control.is_model_ready("theirs")
    finally:
        owner.stop()


@pytest.mark.server
def test_remote_server_that_dies_ends_the_study_and_keeps_finished_trials(models, tmp_path):
    from optimizer.measurement.levels import MeasureSettings

    server = EmbeddedTriton()
    server.start()
    try:
        target = RemoteTriton(server.grpc_url)
        slow = MeasureSettings(warmup_s=0.5, window_s=1.5, min_requests=10, max_window_s=3.0, rule="fixed")
        with pytest.raises(ServerDiedError, match="the remote server cannot be restarted by optimize"):
            run_study(
                study_settings(models["mlp"], tmp_path, budget=4, measure=slow),
                CrashOnTrial(server, 1),
                target=target,
            )
    finally:
        server.stop()
    study = _study(tmp_path)
    baseline = study.trials[0]
    assert baseline.state == optuna.trial.TrialState.COMPLETE and baseline.user_attrs["throughput"] > 0
    assert study.trials[1].state == optuna.trial.TrialState.FAIL
    assert len(study.trials) == 2  # the study stopped: no trial ran against a dead server


def _start_tritonserver(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, dict[str, int]]:
    """The bundled binary started by hand (not through our targets), ready on loopback."""
    bundle = prepare_bundle()
    ports = {}
    for name in ("http", "grpc", "metrics"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports[name] = sock.getsockname()[1]
    (tmp_path / "repository").mkdir(exist_ok=True)
    command = [
        str(bundle / "bin" / "tritonserver"),
        f"--model-repository={tmp_path / 'repository'}",
        f"--backend-directory={bundle / 'backends'}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        *(f"--{name}-port={port}" for name, port in ports.items()),
        *args,
    ]
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,  # noqa: S603
        env={**os.environ, **bundle_environment()},
    )
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/health/ready", timeout=1):
                return process, ports
        except OSError:
            time.sleep(0.1)
    process.kill()
    process.wait()
    pytest.fail(f"tritonserver did not start:\n{(tmp_path / 'server.log').read_text()[-2000:]}")


@pytest.mark.server
def test_remote_server_without_explicit_model_control_is_refused_before_any_trial(models, tmp_path, capsys):
    process, ports = _start_tritonserver(tmp_path, "--model-control-mode=none")
    try:
        code = main(
            [
                "study",
                "--target",
                "remote",
                "--url",
                f"127.0.0.1:{ports['grpc']}",
                "--model",
                str(models["mlp"]),
                "--budget",
                "1",
                "--latency-budget-ms",
                "200",
                "--study-name",
                "s",
                "--storage",
                f"sqlite:///{tmp_path}/s.db",
            ]
        )
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    line = _one_error_line(capsys.readouterr().err)
    assert code == 7
    assert "refuses model-control requests" in line and "--model-control-mode=explicit" in line
    assert count_finished(_study(tmp_path)) == 0
    assert all(
        t.state == optuna.trial.TrialState.WAITING for t in _study(tmp_path).trials
    )  # only the enqueued baseline


def _study_cli(models, tmp_path, *args: str) -> list[str]:
    return [
        "study",
        "--model",
        str(models["mlp"]),
        "--budget",
        "1",
        "--latency-budget-ms",
        "200",
        "--study-name",
        "s",
        "--storage",
        f"sqlite:///{tmp_path}/s.db",
        *args,
    ]


def test_unreachable_remote_port_is_one_clear_line(models, tmp_path, capsys):
    code = main(_study_cli(models, tmp_path, "--target", "remote", "--url", "127.0.0.1:1"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 7
    assert "nothing is listening at 127.0.0.1:1 (connection refused)" in line and "--url" in line


@pytest.mark.server
def test_remote_wrong_port_is_one_clear_line(remote_server, models, tmp_path, capsys):
    http_port = f"127.0.0.1:{remote_server.ports['http']}"
    code = main(_study_cli(models, tmp_path, "--target", "remote", "--url", http_port))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 7 and "not a plaintext Triton gRPC endpoint" in line and "usually 8001" in line


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(  # noqa: S603
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_bogus_root_certificate_is_one_clear_line(models, tmp_path, capsys):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    code = main(
        _study_cli(
            models, tmp_path, "--target", "remote", "--url", "127.0.0.1:8001", "--ssl-root-cert", str(bogus)
        )
    )
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "--ssl-root-cert" in line and "no valid PEM certificate" in line


@pytest.mark.server
def test_tls_to_a_plaintext_server_is_one_clear_line(remote_server, models, tmp_path, capsys):
    cert, _ = _self_signed(tmp_path)
    code = main(
        _study_cli(
            models,
            tmp_path,
            "--target",
            "remote",
            "--url",
            remote_server.grpc_url,
            "--ssl-root-cert",
            str(cert),
        )
    )
    line = _one_error_line(capsys.readouterr().err)
    assert code == 7 and "TLS handshake with" in line and "does not speak TLS" in line


@pytest.mark.server
def test_remote_over_tls_checks_and_loads_and_plaintext_to_it_is_refused(models, tmp_path):
    cert, key = _self_signed(tmp_path)
    tls_args = ("--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}")
    info = inspect_model(models["mlp"])
    with EmbeddedTriton(extra_args=tls_args) as server:
        with RemoteTriton(server.grpc_url, tls=TlsOptions(root_cert=cert)) as target:
            assert target.server_version() == "2.51.0"
            target.load_model(
                "mlp",
                to_json(render_config(info, Candidate(), model_name="mlp")),
                {"1/model.onnx": info.path},
            )
            assert target.control.is_model_ready("mlp")
            options, headers = target.client_options(), target.request_headers() or None
            samples = [synthetic_inputs(info, {"x": (64,)}, 1)]
            generator = LoadGenerator(
                target.grpc_url, "mlp", samples, FAST, client_options=options, headers=headers
            )
            assert (
                generator.measure(2).requests >= FAST.min_requests
            )  # the measured traffic goes over TLS too
        with pytest.raises(ServerStartError, match="closed the connection.*needs TLS"):
            RemoteTriton(server.grpc_url).start()


class _RecordingClient:
    """Stands in for tritonclient's gRPC client: records the headers of every call."""

    calls: list[tuple[str, object]] = []

    def __init__(self, url, **options):
        self.options = options

    def get_server_metadata(self, headers=None, as_json=False, client_timeout=None):
        self.calls.append(("metadata", headers))
        return {"version": "2.99.0", "extensions": ["model_repository"]}

    def unload_model(self, name, headers=None, unload_dependents=False, client_timeout=None):
        self.calls.append(("unload", headers))

    def close(self):
        pass


def test_remote_headers_go_with_every_call(monkeypatch):
    import tritonclient.grpc

    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", _RecordingClient)
    _RecordingClient.calls = []
    target = make_target(
        "remote", url="triton.example.com:8001", headers=["Authorization: Bearer abc", "x-team:ml"]
    )
    with target:
        assert target.server_version() == "2.99.0"
    expected = {"authorization": "Bearer abc", "x-team": "ml"}
    assert _RecordingClient.calls == [("metadata", expected), ("unload", expected)]


def test_remote_url_and_headers_are_checked():
    assert parse_grpc_url("triton.example.com:8001") == "triton.example.com:8001"
    assert parse_grpc_url("[::1]:8001") == "[::1]:8001"
    for bad in ("http://host:8001", "host", "host:0", "host:70000", "host:8001/v2"):
        with pytest.raises(UsageError, match="--url takes HOST:PORT"):
            parse_grpc_url(bad)
    with pytest.raises(UsageError, match="--header takes KEY:VALUE"):
        parse_headers(["no-colon"])
    with pytest.raises(UsageError, match="go together"):
        TlsOptions(client_cert=Path("/nonexistent")).check()


@pytest.mark.parametrize(
    ("status", "message", "fragment"),
    [
        (
            "StatusCode.UNAVAILABLE",
            "errors resolving nowhere.invalid:8001: Domain name not found",
            "cannot resolve the host of h:1",
        ),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", "no answer from h:1 within 10 s"),
        (
            "StatusCode.UNAUTHENTICATED",
            "missing token",
            "refused the request (missing token): check the --header",
        ),
        (
            "StatusCode.UNAVAILABLE",
            "Tls handshake failed: CERTIFICATE_VERIFY_FAILED: self signed certificate",
            "TLS handshake with h:1 failed: its certificate is not signed by --ssl-root-cert",
        ),
        ("StatusCode.UNIMPLEMENTED", "Received http2 header with status: 404", "not as a Triton gRPC server"),
    ],
)
def test_connection_failures_are_explained(status, message, fragment):
    from optimizer.serving.remote import describe_connection_failure

    line = describe_connection_failure("h:1", status, message, tls=False, timeout=10.0)
    assert fragment in line and "\n" not in line


# --- the factory -------------------------------------------------------------------------------------------


def test_make_target_refuses_options_of_another_target_and_unknown_kinds(tmp_path):
    with pytest.raises(UsageError, match="--target must be one of embedded, local, docker, remote"):
        make_target("kubernetes")
    with pytest.raises(UsageError, match="--url applies to --target remote, not --target local"):
        make_target("local", url="host:8001")
    with pytest.raises(UsageError, match="--triton-binary applies to --target local, not --target remote"):
        make_target("remote", url="host:8001", triton_binary=tmp_path)
    with pytest.raises(UsageError, match="--target remote needs --url"):
        make_target("remote")
    docker_target = make_target("docker", docker_image_tag="24.08", gpu_space=True)
    assert isinstance(docker_target, DockerTriton)
    assert docker_target.image == "nvcr.io/nvidia/tritonserver:24.08-py3" and docker_target.gpus_requested


def test_option_for_another_target_is_refused_on_the_command_line(models, tmp_path, capsys):
    code = main(_study_cli(models, tmp_path, "--url", "127.0.0.1:8001"))  # --target left at embedded
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "--url applies to --target remote, not --target embedded" in line
    assert not (tmp_path / "s.db").exists()


def test_gpus_are_read_from_nv_gpu_metrics_only():
    assert gpus_in_metrics(GPU_METRICS) == ("GPU-aaaa", "GPU-bbbb")
    assert gpus_in_metrics("# TYPE nv_cpu_utilization gauge\nnv_cpu_utilization 0.1\n") == ()


# --- docker: the container it asks for, against a fake Docker client ---------------------------------------


class FakeContainer:
    def __init__(self, client, spec):
        self.client, self.spec = client, spec
        self.name = spec["name"]
        self.labels = spec["labels"]
        self.status = "running"
        self.stopped = self.removed = False
        self.reloads = 0

    @property
    def ports(self):
        # Like Docker: each container port published on the host IP asked for, at a port Docker chose.
        published = self.client.published
        return {
            key: [{"HostIp": host, "HostPort": str(published[int(key.split("/")[0])])}]
            for key, (host, _) in self.spec["ports"].items()
        }

    def reload(self):
        self.reloads += 1
        if self.client.interrupt_on_reload and self.reloads >= self.client.interrupt_on_reload:
            raise KeyboardInterrupt
        if self.client.exit_on_reload and self.reloads >= self.client.exit_on_reload:
            self.status = "exited"

    def logs(self, tail=None, **options):
        return b'I1124 tritonserver starting\nE1124 server.cc:1] "no GPU found"\n'

    def stop(self, timeout=None):
        self.stopped = True
        self.status = "exited"

    def remove(self, force=False, **options):
        assert force
        self.removed = True


class FakeDocker:
    """Just the parts of docker.DockerClient the target uses, recording what it is asked for."""

    def __init__(self, published, *, have_image=False, pull_events=(), orphans=()):
        from docker.errors import ImageNotFound, NotFound

        self.published = published  # container port -> host port
        self.runs: list[FakeContainer] = []
        self.pulls: list[tuple] = []
        self.interrupt_on_reload = self.exit_on_reload = 0
        self.orphans = list(orphans)
        client = self

        class Images:
            def get(self, name):
                if not have_image:
                    raise ImageNotFound(f"No such image: {name}")

        class Api:
            def pull(self, repository, tag=None, stream=False, decode=False):
                client.pulls.append((repository, tag, stream, decode))
                return iter(pull_events)

        class Containers:
            def run(self, **spec):
                container = FakeContainer(client, spec)
                client.runs.append(container)
                return container

            def get(self, name):
                for container in client.runs:
                    if container.name == name:
                        return container
                raise NotFound(name)

            def list(self, all=False, filters=None):  # noqa: A002 - the SDK's name
                return client.orphans

        self.images, self.api, self.containers = Images(), Api(), Containers()


class _RecordingDockerApi:
    """The low-level Docker API under the SDK's own ``containers.run``: records the create request."""

    _version = "1.45"

    def __init__(self):
        self.created: dict = {}
        self.started: list[str] = []

    def create_host_config(self, **options):
        from docker.types import HostConfig

        return HostConfig(version=self._version, **options)

    def create_container(self, **request):
        self.created = request
        return {"Id": "c0ffee"}

    def inspect_container(self, container_id):
        return {"Id": container_id}

    def start(self, container_id, **options):
        self.started.append(container_id)


def test_container_spec_asks_for_the_image_explicit_control_loopback_ports_and_no_host_path():
    from docker.models.containers import ContainerCollection

    spec = container_spec(image_name("24.10"), gpus=False, name="optimize-triton-x", owner="host:1")
    api = _RecordingDockerApi()
    client = type("Client", (), {"api": api})()
    ContainerCollection(client=client).run(**spec)  # the SDK's own translation into the daemon's request
    request = api.created
    assert request["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3" and api.started == ["c0ffee"]
    assert request["command"][0] == "tritonserver" and "--model-control-mode=explicit" in request["command"]
    assert request["labels"] == {"optimize.owner": "host:1"} and request["name"] == "optimize-triton-x"
    host_config = request["host_config"]
    assert host_config["PortBindings"] == {
        f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}] for port in (8000, 8001, 8002)
    }
    assert "Binds" not in host_config and "Mounts" not in host_config  # no host path reaches the container
    assert list(host_config["Tmpfs"]) == ["/models"]
    assert not host_config.get("DeviceRequests") and "AutoRemove" not in host_config  # a CPU space: no GPU


def test_container_spec_requests_gpus_for_a_gpu_space():
    every = container_spec(image_name("24.10"), gpus=True, name="n", owner="h:1")["device_requests"]
    assert [(r["Count"], r["Capabilities"]) for r in every] == [(-1, [["gpu"]])]
    chosen = container_spec(image_name("24.10"), gpus=True, name="n", owner="h:1", gpu_devices="0,2")[
        "device_requests"
    ]
    assert [(r["DeviceIDs"], r["Capabilities"]) for r in chosen] == [(["0", "2"], [["gpu"]])]
    assert image_name("24.10-py3-igpu") == "nvcr.io/nvidia/tritonserver:24.10-py3-igpu"


def test_docker_target_pulls_with_progress_starts_waits_and_removes_the_container(stub_http):
    events = [
        {"status": "Pulling from nvidia/tritonserver", "id": "24.10-py3"},
        {"status": "Downloading", "id": "a", "progressDetail": {"current": 5 * 10**8, "total": 10**9}},
        {"status": "Pull complete", "id": "a"},
    ]
    client = FakeDocker({8000: stub_http, 8001: 1, 8002: stub_http}, pull_events=events)
    notes: list[str] = []
    with DockerTriton(tag="24.10", client=client, announce=notes.append) as target:
        assert target.http_url == f"http://127.0.0.1:{stub_http}" and target.grpc_url == "127.0.0.1:1"
        assert target.is_alive()
        assert target.gpus() == ("GPU-aaaa", "GPU-bbbb")  # from the container's own /metrics
        container = client.runs[0]
    assert client.pulls == [("nvcr.io/nvidia/tritonserver", "24.10-py3", True, True)]
    assert notes[0].startswith("pulling nvcr.io/nvidia/tritonserver:24.10-py3")
    assert (
        notes[-1]
        == "pulled nvcr.io/nvidia/tritonserver:24.10-py3: 1.00 of 1.00 GB downloaded, 1 layer(s) done"
    )
    assert container.spec["command"][0] == "tritonserver" and container.stopped and container.removed
    assert not target.is_alive()


def test_docker_container_is_removed_on_ctrl_c_while_starting(stub_http):
    client = FakeDocker({8000: stub_http, 8001: 1, 8002: 2}, have_image=True)
    client.interrupt_on_reload = 2
    with pytest.raises(KeyboardInterrupt):
        DockerTriton(client=client).start()
    assert client.runs[0].removed


def test_docker_container_that_exits_while_starting_is_removed_with_its_log_in_the_error():
    client = FakeDocker({8000: 1, 8001: 2, 8002: 3}, have_image=True)
    client.exit_on_reload = 2
    with pytest.raises(ServerStartError, match="(?s)exited while starting:\n.*no GPU found"):
        DockerTriton(client=client).start()
    assert client.runs[0].removed


def test_docker_crash_is_noticed_and_restart_uses_a_fresh_container(stub_http):
    client = FakeDocker({8000: stub_http, 8001: 1, 8002: 2}, have_image=True)
    with DockerTriton(client=client) as target:
        client.runs[0].status = "exited"
        assert not target.is_alive()
        assert "no GPU found" in target.log_tail()
        target.restart()
        assert target.is_alive() and len(client.runs) == 2 and client.runs[0].removed
    assert client.runs[1].removed


def test_docker_removes_containers_left_by_a_killed_run(stub_http):
    dead = subprocess.Popen(["true"])  # noqa: S603, S607
    dead.wait()
    host = socket.gethostname()
    client = FakeDocker({8000: stub_http, 8001: 1, 8002: 2}, have_image=True)
    orphan = FakeContainer(
        client, {"name": "old", "labels": {"optimize.owner": f"{host}:{dead.pid}"}, "ports": {}}
    )
    alive = FakeContainer(
        client, {"name": "busy", "labels": {"optimize.owner": f"{host}:{os.getpid()}"}, "ports": {}}
    )
    elsewhere = FakeContainer(
        client, {"name": "far", "labels": {"optimize.owner": f"not-{host}:{dead.pid}"}, "ports": {}}
    )
    client.orphans = [orphan, alive, elsewhere]
    notes: list[str] = []
    with DockerTriton(client=client, announce=notes.append):
        pass
    assert orphan.removed and not alive.removed and not elsewhere.removed
    assert any("removing container old" in note for note in notes)


@pytest.mark.server
def test_docker_target_sends_model_files_in_the_load_request(remote_server, models):
    # The fake "container" publishes the ports of a real Triton, so the load request is real.
    ports = {
        8000: remote_server.ports["http"],
        8001: remote_server.ports["grpc"],
        8002: remote_server.ports["metrics"],
    }
    info = inspect_model(models["mlp"])
    config = to_json(render_config(info, Candidate(), model_name="in_container"))
    with DockerTriton(client=FakeDocker(ports, have_image=True)) as target:
        assert target.server_version() == "2.51.0"
        target.load_model("in_container", config, {"1/model.onnx": info.path})
        assert remote_server.control.is_model_ready("in_container")
    assert not (remote_server.model_repository / "in_container").exists()
    remote_server.control.unload("in_container")


def test_no_docker_daemon_is_one_clear_line(models, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    with pytest.raises(
        ServerStartError, match=r"^cannot reach a Docker daemon at unix:///var/run/docker.sock"
    ):
        DockerTriton().start()
    code = main(_study_cli(models, tmp_path, "--target", "docker"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 7 and "cannot reach a Docker daemon" in line and "--target embedded" in line


def test_pull_progress_summarises_layers_at_most_every_interval():
    now = [0.0]
    progress = PullProgress("img", every_s=2.0, clock=lambda: now[0])
    assert (
        progress.update(
            {"status": "Downloading", "id": "a", "progressDetail": {"current": 1, "total": 4 * 10**9}}
        )
        is None
    )
    now[0] = 2.5
    line = progress.update(
        {"status": "Downloading", "id": "b", "progressDetail": {"current": 10**9, "total": 10**9}}
    )
    assert line == "pulling img: 1.00 of 5.00 GB downloaded, 0 layer(s) done"
    progress.update({"status": "Already exists", "id": "c"})
    assert progress.summary().endswith("1 layer(s) done")
