"""A ``tritonserver`` binary run as a child process: the shared body of the embedded and local targets.

``TritonProcess`` starts the binary it is given with the backend directory and environment it is
given, bound to 127.0.0.1 on free ports with explicit model control; polls readiness against a
deadline; keeps the server's log and attaches it to start errors; stops it with SIGINT then SIGKILL of
its whole process group (backend stubs too); and notices when it dies. The child is tied to this
process (parent-death signal, atexit), so it never outlives the CLI. Model files are placed in the
server's own repository (it shares our filesystem), linked when possible.
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping
from functools import partial
from pathlib import Path

from optimizer.errors import ConfigRejected, ServerDiedError, ServerStartError
from optimizer.serving.base import Capabilities, ServingTarget
from optimizer.serving.control import ModelControl
from optimizer.serving.memory_limit import MemoryCgroup
from optimizer.serving.metrics import read_gpus

__all__ = ["STARTUP_TIMEOUT_S", "STOP_TIMEOUT_S", "TritonProcess"]

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_RUNNING: weakref.WeakSet[TritonProcess] = weakref.WeakSet()


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct free ports: all held open at once, so the kernel cannot hand one out twice."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the server's own sockets: connections of a server that just stopped (TIME_WAIT) do not
        # hold the port, a listening socket still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _is_stopped(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and fields[0] in ("T", "t")


STUB_NAME = "triton_python_backend_stub"


def reap_orphaned_stubs() -> list[int]:
    """Kill Python-backend stubs whose Triton died without them; return their pids.

    The parent-death signal takes the server down with a killed optimizer, but the server's backend
    stubs are its children, not ours, and outlive it (seen here: they never exit). A stub adopted by
    init whose process-group leader (its server) is gone serves nobody.
    """
    reaped = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if not fields or fields[1] != "1" or fields[0] == "Z":
            continue
        try:
            if Path(os.readlink(entry / "exe").removesuffix(" (deleted)")).name != STUB_NAME:
                continue
        except OSError:
            continue
        leader = int(fields[2])
        leader_fields = _proc_stat(leader)
        if leader_fields is not None and leader_fields[0] != "Z":
            continue  # its server still runs
        try:
            os.kill(int(entry.name), signal.SIGKILL)
            reaped.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            pass
    return reaped


def _prepare_child(cgroup: MemoryCgroup | None) -> None:
    """Runs in the server's child between fork and exec: its cgroup first (what it starts stays there)."""
    if cgroup is not None:
        cgroup.join()
    _die_with_parent()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask Linux to SIGKILL it when this process dies, so a
    # killed optimizer never leaves a server behind.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TritonProcess(ServingTarget):
    """A ``tritonserver`` child process bound to ``host``, with explicit model control.

    Args:
        binary: the ``tritonserver`` executable.
        backend_directory: passed as ``--backend-directory``.
        environment: variables set over this process's environment for the server.
        workdir: where the log (and, by default, the model repository) go; default a temporary
            directory removed on exit.
        host: the address every endpoint binds to.
        http_port, grpc_port, metrics_port: fixed ports; None picks free ones (retried on a clash).
        model_repository: the server's ``--model-repository`` (default ``workdir/models``).
        startup_timeout: seconds to wait for readiness.
        extra_args: more ``tritonserver`` arguments, appended last.
        memory_limit_mb: run the server and its backend stubs in a memory cgroup of this size
            (``--memory-limit-mb``); the kernel kills what goes over, and :meth:`memory_kills` says so.
    """

    name = "process"
    capabilities = Capabilities(can_restart=True, gpu_metrics=True, shared_filesystem=True)

    def __init__(
        self,
        binary: Path,
        backend_directory: Path,
        *,
        environment: Mapping[str, str] | None = None,
        workdir: Path | None = None,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        model_repository: Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        extra_args: tuple[str, ...] = (),
        memory_limit_mb: float | None = None,
    ) -> None:
        self.binary = Path(binary)
        self.backend_directory = Path(backend_directory)
        self.environment = dict(environment or {})
        self.host = host
        self._fixed_ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self._workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="optimize-triton-"))
        self._owns_workdir = workdir is None
        self.model_repository = model_repository or self._workdir / "models"
        self.log_path = self._workdir / "tritonserver.log"
        self._startup_timeout = startup_timeout
        self._extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None
        # Checked now, so a system that cannot limit the server's memory is said before any work.
        self._cgroup = MemoryCgroup(memory_limit_mb) if memory_limit_mb is not None else None
        self.memory_limit_mb = memory_limit_mb
        self._control: ModelControl | None = None
        self.ports: dict[str, int] = {}

    # --- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> TritonProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def start(self) -> None:
        """Start the server and wait until it is ready; raise ServerStartError with its log if not."""
        reap_orphaned_stubs()
        self.model_repository.mkdir(parents=True, exist_ok=True)
        if self._cgroup is not None:
            self._cgroup.create()
        for name, port in self._fixed_ports.items():
            if port is not None and _port_taken(self.host, port):
                raise ServerStartError(
                    f"{name} port {port} on {self.host} is in use: choose another with --{name}-port"
                )
        attempts = 1 if all(self._fixed_ports.values()) else 3
        for attempt in range(attempts):
            free = iter(_free_ports(self.host, 3))
            self.ports = {name: port or next(free) for name, port in self._fixed_ports.items()}
            self._spawn()
            try:
                self._wait_ready()
                break
            except ServerStartError:
                log = self.log_tail(50).lower()
                port_clash = "address already in use" in log or "cannot listen" in log
                self._kill()
                if not port_clash or attempt == attempts - 1:
                    raise
        self._control = ModelControl(self.grpc_url, is_alive=self.is_alive)
        _RUNNING.add(self)

    def _arguments(self) -> list[str]:
        return [
            str(self.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_directory}",
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

    def _spawn(self) -> None:
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(  # noqa: S603 - argument list, never a shell
                self._arguments(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.environment},
                start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it cleanly
                preexec_fn=partial(_prepare_child, self._cgroup),
            )
        except OSError as exc:
            raise ServerStartError(f"cannot run {self.binary}: {exc.strerror or exc}") from exc
        finally:
            log.close()

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
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                # Not ready yet; an HTTP/2 answer (BadStatusLine) is another server's gRPC port, taken
                # between choosing the port and binding it: ours then exits, and is_alive() says so.
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
        if process.poll() is None and not _is_stopped(process.pid):  # a stopped (hung) server ignores SIGINT
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        if self._cgroup is not None:
            self._cgroup.remove()  # its processes are gone: the process group was killed and waited for
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

    def memory_kills(self) -> int:
        """Processes of the server the kernel killed for its memory limit since the last call (0: no limit)."""
        return self._cgroup.new_kills() if self._cgroup is not None else 0

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exit_status(self) -> str | None:
        code = self._process.poll() if self._process is not None else None
        if code is None:
            return None
        if code < 0:
            try:
                return f"killed by signal {-code} ({signal.Signals(-code).name})"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

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

    def gpus(self) -> tuple[str, ...] | None:
        """The GPUs the server reports in its own /metrics (their UUIDs); None if unreadable."""
        return read_gpus(self.metrics_url)

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
        return self._load_explaining(name, config_json)

    def unload_model(self, name: str) -> None:
        self.control.unload(name)

    def load_from_repository(self, name: str) -> float:
        """Load ``name`` as its repository holds it: its own ``config.pbtxt`` and version directories.

        Returns:
            Seconds the load request took.
        """
        if not self.is_alive():
            raise ServerDiedError(f"the Triton server is not running:\n{self.log_tail()}")
        return self._load_explaining(name, None)

    def _load_explaining(self, name: str, config_json: str | None) -> float:
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
            target.stat().st_size == source.stat().st_size
            and target.stat().st_mtime_ns == source.stat().st_mtime_ns
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
