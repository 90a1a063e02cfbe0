"""The docker serving target: NVIDIA's Triton container, started and removed through the Docker SDK.

The container runs ``nvcr.io/nvidia/tritonserver:<tag>-py3`` with explicit model control and an empty
model repository on a tmpfs the container owns: model files travel in each load request (``files=``),
so no host path is ever mounted. Its ports are published on 127.0.0.1 only, GPUs are requested with
device requests when the space is a GPU space, and a missing image is pulled with progress. The
container is removed when the target stops — also on Ctrl-C and on errors, at interpreter exit, and,
for a run that was killed outright, by the next run (containers carry their owner's host and pid).

The Docker client is injectable (``client=``): tests check the container specification against a
fake client, as no Docker daemon runs where this was written.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from optimizer.errors import ConfigRejected, ServerDiedError, ServerStartError
from optimizer.serving.base import Capabilities, ServingTarget
from optimizer.serving.control import ModelControl, load_files
from optimizer.serving.metrics import read_gpus
from optimizer.serving.process import _log_errors

__all__ = [
    "DEFAULT_TAG",
    "DockerTriton",
    "DockerUnreachable",
    "PullProgress",
    "connect",
    "container_spec",
    "image_name",
]

IMAGE_REPOSITORY = "nvcr.io/nvidia/tritonserver"
DEFAULT_TAG = "24.10"
CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
MODEL_REPOSITORY = "/models"
OWNER_LABEL = "optimize.owner"
STARTUP_TIMEOUT_S = 180.0  # a first start on a GPU box loads CUDA and probes every device
STOP_TIMEOUT_S = 20
_RUNNING: weakref.WeakSet[DockerTriton] = weakref.WeakSet()

Announce = Callable[[str], None]


class DockerUnreachable(ServerStartError):
    """No Docker daemon answers: ``problem`` says where and why, ``fix`` what to do."""

    def __init__(self, where: str, reason: str) -> None:
        self.problem = f"cannot reach a Docker daemon at {where} ({reason})"
        self.fix = "start Docker (or point DOCKER_HOST at a running daemon)"
        if reason == "permission denied":
            self.fix = "add your user to the docker group"
        super().__init__(f"{self.problem}: {self.fix}, or use --target embedded or --target local")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def image_name(tag: str = DEFAULT_TAG) -> str:
    """``nvcr.io/nvidia/tritonserver:<tag>-py3``; a tag given with its own suffix is kept as is."""
    return f"{IMAGE_REPOSITORY}:{tag if '-' in tag else f'{tag}-py3'}"


def container_spec(
    image: str, *, gpus: bool, name: str, owner: str, gpu_devices: str | None = None
) -> dict[str, Any]:
    """The keyword arguments of ``client.containers.run`` for one Triton container (pure).

    ``gpus`` requests every GPU of the host, or those of ``gpu_devices`` (``"0,1"``).
    """
    from docker.types import DeviceRequest, Ulimit

    devices = [d.strip() for d in (gpu_devices or "").split(",") if d.strip()]
    if devices:
        requests = [DeviceRequest(device_ids=devices, capabilities=[["gpu"]])]
    else:
        requests = [DeviceRequest(count=-1, capabilities=[["gpu"]])]

    return {
        "image": image,
        "command": [
            "tritonserver",
            f"--model-repository={MODEL_REPOSITORY}",
            "--model-control-mode=explicit",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
        ],
        "name": name,
        "detach": True,  # not auto-removed: we remove it once its log has been read
        # Published on the host's loopback only: model control must not be open to the network.
        "ports": {f"{port}/tcp": ("127.0.0.1", None) for port in CONTAINER_PORTS.values()},
        # The repository is the container's own tmpfs: no host path is mounted, files come with each load.
        "tmpfs": {MODEL_REPOSITORY: "rw,size=64m"},
        "device_requests": requests if gpus else [],
        # NVIDIA's recommended settings for the Triton container (Python backend stubs use /dev/shm).
        "shm_size": "1g",
        "ulimits": [
            Ulimit(name="memlock", soft=-1, hard=-1),
            Ulimit(name="stack", soft=67108864, hard=67108864),
        ],
        "labels": {OWNER_LABEL: owner},
    }


def connect() -> Any:
    """A Docker client for the daemon of the environment; ServerStartError in one line when there is none."""
    import docker
    from docker.errors import DockerException

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if where.startswith("unix://"):
        # Tried first with a socket we close: the SDK leaks its socket when the daemon is not there.
        reason = _unix_socket_problem(where.removeprefix("unix://"))
        if reason:
            raise DockerUnreachable(where, reason)
    try:
        return docker.from_env()
    except DockerException as exc:
        text = " ".join(str(exc).split())
        if "Connection refused" in text:
            text = "connection refused"
        raise DockerUnreachable(where, text if len(text) <= 200 else text[:197] + "...") from exc


def _unix_socket_problem(path: str) -> str | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(path)
        except FileNotFoundError:
            return "no daemon socket there"
        except PermissionError:
            return "permission denied"
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


class PullProgress:
    """Turns the Docker pull event stream into an occasional one-line summary (bytes and layers)."""

    def __init__(
        self, image: str, *, every_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.image = image
        self._every_s = every_s
        self._clock = clock
        self._last = clock()
        self._sizes: dict[str, tuple[int, int]] = {}
        self._done: set[str] = set()

    def update(self, event: Mapping[str, Any]) -> str | None:
        """Record one event; return a summary line when one is due, else None."""
        layer, status = event.get("id"), str(event.get("status", ""))
        detail = event.get("progressDetail") or {}
        if layer and status == "Downloading" and detail.get("total"):
            self._sizes[layer] = (int(detail.get("current", 0)), int(detail["total"]))
        elif layer and status in ("Download complete", "Pull complete", "Already exists"):
            self._done.add(layer)
            if layer in self._sizes:
                total = self._sizes[layer][1]
                self._sizes[layer] = (total, total)
        now = self._clock()
        if now - self._last < self._every_s:
            return None
        self._last = now
        return self.summary()

    def summary(self) -> str:
        current = sum(c for c, _ in self._sizes.values()) / 1e9
        total = sum(t for _, t in self._sizes.values()) / 1e9
        return f"pulling {self.image}: {current:.2f} of {total:.2f} GB downloaded, {len(self._done)} layer(s) done"


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_dead(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's run: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class DockerTriton(ServingTarget):
    """Triton in NVIDIA's container, reached on 127.0.0.1; model files sent with each load request.

    Args:
        tag: the image tag (``24.10`` -> ``nvcr.io/nvidia/tritonserver:24.10-py3``).
        image: a full image name instead of the tag (e.g. a mirror).
        gpus: request GPUs (``device_requests``); set for a GPU space.
        gpu_devices: which GPUs (``"0,1"``, as ``--gpus``); default all of them.
        client: a Docker client (default: the environment's daemon, see :func:`connect`).
        announce: where pull progress and notes go, one line per call (default stderr).
        startup_timeout: seconds to wait for the server's readiness.
    """

    name = "docker"

    def __init__(
        self,
        *,
        tag: str = DEFAULT_TAG,
        image: str | None = None,
        gpus: bool = False,
        gpu_devices: str | None = None,
        client: Any | None = None,
        announce: Announce = _stderr,
        startup_timeout: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.image = image or image_name(tag)
        self.gpus_requested = gpus
        self.gpu_devices = gpu_devices
        self.capabilities = Capabilities(can_restart=True, gpu_metrics=True, shared_filesystem=False)
        self._client = client
        self._announce = announce
        self._startup_timeout = startup_timeout
        self._container: Any | None = None
        self._control: ModelControl | None = None
        self._last_log = ""
        self.ports: dict[str, int] = {}

    def __enter__(self) -> DockerTriton:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- lifecycle ---------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect()
        return self._client

    def start(self) -> None:
        """Pull the image if needed, start the container and wait until Triton is ready."""
        from docker.errors import APIError

        client = self.client
        self._remove_orphans(client)
        self._ensure_image(client)
        name = f"optimize-triton-{uuid.uuid4().hex[:12]}"
        spec = container_spec(
            self.image, gpus=self.gpus_requested, gpu_devices=self.gpu_devices, name=name, owner=_owner()
        )
        try:
            self._container = client.containers.run(**spec)
            _RUNNING.add(self)
            self.ports = self._published_ports()
            self._wait_ready()
        except BaseException as exc:  # Ctrl-C too: never leave the container behind
            self._remove(name)
            if isinstance(exc, APIError):
                hint = (
                    " (GPUs need the NVIDIA Container Toolkit on the Docker host)"
                    if self.gpus_requested
                    else ""
                )
                raise ServerStartError(f"Docker could not start {self.image}: {_explain(exc)}{hint}") from exc
            raise
        self._control = ModelControl(self.grpc_url, is_alive=self.is_alive)

    def _remove_orphans(self, client: Any) -> None:
        """Remove containers left by an optimize run that was killed before it could remove them."""
        from docker.errors import APIError

        try:
            containers = client.containers.list(all=True, filters={"label": OWNER_LABEL})
        except APIError:
            return
        for container in containers:
            if _owner_is_dead(container.labels.get(OWNER_LABEL, "")):
                self._announce(
                    f"removing container {container.name}, left by an optimize run that was killed"
                )
                try:
                    container.remove(force=True)
                except APIError:
                    pass

    def _ensure_image(self, client: Any) -> None:
        from docker.errors import APIError, ImageNotFound

        try:
            client.images.get(self.image)
            return
        except ImageNotFound:
            pass
        except APIError as exc:
            raise ServerStartError(f"Docker could not look up {self.image}: {_explain(exc)}") from exc
        repository, _, tag = self.image.rpartition(":")
        self._announce(f"pulling {self.image} (first use: several GB)")
        progress = PullProgress(self.image)
        try:
            for event in client.api.pull(repository, tag=tag, stream=True, decode=True):
                if "error" in event:
                    raise ServerStartError(f"cannot pull {self.image}: {event['error']}")
                line = progress.update(event)
                if line:
                    self._announce(line)
        except APIError as exc:
            raise ServerStartError(
                f"cannot pull {self.image}: {_explain(exc)} (nvcr.io may need `docker login nvcr.io`)"
            ) from exc
        self._announce(progress.summary().replace("pulling", "pulled", 1))

    def _published_ports(self) -> dict[str, int]:
        deadline = time.monotonic() + 10.0
        assert self._container is not None  # called right after the container started
        while True:
            self._container.reload()
            published = self._container.ports or {}
            ports = {}
            for name, port in CONTAINER_PORTS.items():
                bindings = published.get(f"{port}/tcp") or []
                loopback = [b for b in bindings if b.get("HostIp") == "127.0.0.1" and b.get("HostPort")]
                if loopback:
                    ports[name] = int(loopback[0]["HostPort"])
            if len(ports) == len(CONTAINER_PORTS):
                return ports
            if self._container.status in ("exited", "dead") or time.monotonic() > deadline:
                raise ServerStartError(
                    f"the Triton container published no loopback ports:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if not self.is_alive():
                raise ServerStartError(f"the Triton container exited while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - loopback URL
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise ServerStartError(
            f"the Triton container was not ready after {self._startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the container (SIGTERM, then SIGKILL after a grace period) and remove it."""
        if self._control is not None:
            self._control.close()
            self._control = None
        container, self._container = self._container, None
        if container is None:
            return
        from docker.errors import APIError

        try:
            container.stop(timeout=STOP_TIMEOUT_S)
        except APIError:
            pass
        self._last_log = _logs(container, 200) or self._last_log
        try:
            container.remove(force=True)
        except APIError:
            pass
        _RUNNING.discard(self)

    def _remove(self, name: str) -> None:
        from docker.errors import APIError

        container, self._container = self._container, None
        try:
            container = container or self.client.containers.get(name)
            self._last_log = _logs(container, 200) or self._last_log
            container.remove(force=True)
        except APIError:
            pass
        _RUNNING.discard(self)

    def restart(self) -> None:
        """Remove the container and start a fresh one (new ports)."""
        self.stop()
        self.start()

    def is_alive(self) -> bool:
        from docker.errors import APIError

        if self._container is None:
            return False
        try:
            self._container.reload()
        except APIError:
            return False
        return self._container.status == "running"

    # --- addresses and state -----------------------------------------------------------------------

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    @property
    def control(self) -> ModelControl:
        if self._control is None:
            raise ServerDiedError("the Triton container is not running")
        return self._control

    def server_version(self) -> str:
        return str(self.control.server_metadata().get("version", "unknown"))

    def gpus(self) -> tuple[str, ...] | None:
        """The GPUs the containerised server reports in its own /metrics."""
        return read_gpus(self.metrics_url) if self.ports else None

    def log_tail(self, lines: int = 20) -> str:
        text = _logs(self._container, lines) if self._container is not None else self._last_log
        return "\n".join(text.splitlines()[-lines:])

    # --- models --------------------------------------------------------------------------------------

    def unload_model(self, name: str) -> None:
        self.control.unload(name)

    def load_model(self, name: str, config_json: str, files: Mapping[str, Path]) -> float:
        """Load or hot-reload ``name`` with the config, its files sent in the request (nothing mounted)."""
        if not self.is_alive():
            raise ServerDiedError(f"the Triton container is not running:\n{self.log_tail()}")
        since = int(time.time())
        try:
            return self.control.load(name, config_json, files=load_files(files))
        except ConfigRejected as exc:
            # Triton's reply is often just "failed to load"; the container's log says why.
            details = _log_errors(_logs(self._container, 200, since=since))
            raise ConfigRejected("; ".join([exc.message, *details])) from exc


def _logs(container: Any, lines: int, **options: Any) -> str:
    from docker.errors import APIError

    if container is None:
        return ""
    try:
        return container.logs(tail=lines, **options).decode(errors="replace")
    except APIError:
        return ""


def _explain(exc: Exception) -> str:
    from docker.errors import APIError

    explanation = (exc.explanation if isinstance(exc, APIError) else None) or str(exc)
    text = " ".join(str(explanation).split())
    return text if len(text) <= 300 else text[:297] + "..."


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()
