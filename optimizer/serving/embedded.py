"""The embedded serving target: the Triton Inference Server bundled in the nvidia-pytriton wheel.

``prepare_bundle()`` copies the bundled server, its Python backend, the stub for the running Python
and our Python-based ``onnxruntime`` backend into the cache once. ``EmbeddedTriton`` runs that server
as a child process bound to 127.0.0.1 on free ports with explicit model control, polls readiness
against a deadline, keeps its log, stops it with SIGINT then SIGKILL, and notices when it dies. The
child is tied to this process (parent-death signal, atexit), so it never outlives the CLI.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping
from pathlib import Path

from optimizer.errors import ConfigRejected, ServerDiedError, ServerStartError
from optimizer.paths import cache_dir
from optimizer.serving.control import ModelControl

__all__ = ["EmbeddedTriton", "prepare_bundle"]

BACKEND_SOURCE = Path(__file__).parent / "backends" / "onnxruntime" / "model.py"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
_RUNNING: weakref.WeakSet[EmbeddedTriton] = weakref.WeakSet()


def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError(
            "the embedded Triton needs the nvidia-pytriton package: pip install nvidia-pytriton==0.7.0"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _bundle_key(source: Path) -> str:
    digest = hashlib.sha256()
    digest.update(BACKEND_SOURCE.read_bytes())
    digest.update(str(source.resolve()).encode())
    digest.update(str((source / "bin" / "tritonserver").stat().st_mtime_ns).encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


def prepare_bundle(root: Path | None = None) -> Path:
    """A runnable copy of the bundled Triton with our backend, made once per version; return its path."""
    source = _pytriton_dir() / "tritonserver"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerStartError(f"the bundled Triton has no Python backend stub for Python {python_version}")
    bundle = (root or cache_dir()) / "triton" / _bundle_key(source)
    if (bundle / "bin" / "tritonserver").is_file():
        return bundle
    bundle.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=bundle.parent, prefix=".staging-"))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
        (staging / "backends" / "onnxruntime").mkdir(parents=True, exist_ok=True)
        shutil.copy2(BACKEND_SOURCE, staging / "backends" / "onnxruntime" / "model.py")
        os.replace(staging, bundle)  # atomic: concurrent workers never see half a bundle
    except OSError:
        if not (bundle / "bin" / "tritonserver").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return bundle


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask Linux to SIGKILL it when this process dies, so a
    # killed optimizer never leaves a server behind.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedTriton:
    """The bundled Triton as a child process, bound to loopback, with explicit model control."""

    name = "embedded"
    can_restart = True

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        model_repository: Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self._fixed_ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self._workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="optimize-triton-"))
        self._owns_workdir = workdir is None
        self.model_repository = model_repository or self._workdir / "models"
        self.log_path = self._workdir / "tritonserver.log"
        self._startup_timeout = startup_timeout
        self._extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None
        self._control: ModelControl | None = None
        self.ports: dict[str, int] = {}

    # --- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> EmbeddedTriton:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def start(self) -> None:
        """Start the server and wait until it is ready; raise ServerStartError with its log if not."""
        bundle = prepare_bundle()
        self.model_repository.mkdir(parents=True, exist_ok=True)
        for name, port in self._fixed_ports.items():
            if port is not None and _port_taken(self.host, port):
                raise ServerStartError(f"{name} port {port} on {self.host} is in use: choose another with --{name}-port")
        attempts = 1 if all(self._fixed_ports.values()) else 3
        for attempt in range(attempts):
            self.ports = {name: port or _free_port(self.host) for name, port in self._fixed_ports.items()}
            self._spawn(bundle)
            try:
                self._wait_ready()
                break
            except ServerStartError:
                port_clash = "address already in use" in self.log_tail(50).lower()
                self._kill()
                if not port_clash or attempt == attempts - 1:
                    raise
        self._control = ModelControl(self.grpc_url, is_alive=self.is_alive)
        _RUNNING.add(self)

    def _spawn(self, bundle: Path) -> None:
        args = [
            str(bundle / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={bundle / 'backends'}",
            "--model-control-mode=explicit",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-port={self.ports['metrics']}",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
            *self._extra_args,
        ]
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(  # noqa: S603 - argument list, never a shell
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it cleanly
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = _pytriton_dir().parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        # The backend stub runs `python` from PATH to find its packages: make it this environment's.
        scripts = sysconfig.get_path("scripts")
        env["PATH"] = os.pathsep.join([scripts, str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if not self.is_alive():
                raise ServerStartError(f"the Triton server exited while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - loopback URL
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise ServerStartError(
            f"the Triton server was not ready after {self._startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server: SIGINT, wait, then SIGKILL the whole process group (backend stubs too)."""
        if self._control is not None:
            self._control.close()
            self._control = None
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        _RUNNING.discard(self)

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
        self._process = None

    def restart(self) -> None:
        """Kill whatever is left of the server and start a fresh one (new ports)."""
        self.stop()
        self.start()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # --- addresses and state -----------------------------------------------------------------------

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}/metrics"

    @property
    def control(self) -> ModelControl:
        if self._control is None:
            raise ServerDiedError("the Triton server is not running")
        return self._control

    def server_version(self) -> str:
        return str(self.control.server_metadata().get("version", "unknown"))

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # --- models --------------------------------------------------------------------------------------

    def load_model(self, name: str, config_json: str, files: Mapping[str, Path]) -> float:
        """Place ``files`` in the model repository (once) and load or hot-reload ``name`` with the config.

        Returns:
            Seconds the load request took.
        """
        if not self.is_alive():
            raise ServerDiedError(f"the Triton server is not running:\n{self.log_tail()}")
        for relative, path in files.items():
            _link_or_copy(Path(path), self.model_repository / name / relative)
        log_offset = self._log_size()
        try:
            return self.control.load(name, config_json)
        except ConfigRejected as exc:
            # Triton's reply is often just "failed to poll from model repository"; its log says why.
            details = _log_errors(self._log_since(log_offset))
            raise ConfigRejected("; ".join([exc.message, *details])) from exc

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""


_LOG_NOISE = ("Failed to set config modification time",)


def _log_errors(text: str) -> list[str]:
    """The messages of Triton's error lines (``E1124 ... file.cc:N] "message"``)."""
    messages = []
    for line in text.splitlines():
        if not line.startswith("E") or "] " not in line:
            continue
        message = line.split("] ", 1)[1].strip().strip('"')
        if message and not any(noise in message for noise in _LOG_NOISE) and message not in messages:
            messages.append(message)
    return messages[:3]


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        same = os.path.samefile(source, target) or (
            target.stat().st_size == source.stat().st_size and target.stat().st_mtime_ns == source.stat().st_mtime_ns
        )
        if same:
            return
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copy2(source, target)


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()
