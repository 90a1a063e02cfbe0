"""Serving targets: where a candidate config is loaded and measured.

Every target is a context manager with the same small surface (:class:`ServingTarget`); the study
only talks to that. ``EmbeddedTriton`` is the default: the Triton bundled in the nvidia-pytriton
wheel, run as a child process on loopback. ``LocalTriton`` runs the user's own ``tritonserver``
binary the same way, ``DockerTriton`` runs NVIDIA's container, and ``RemoteTriton`` drives a server
that is already running; ``optimizer.serving.targets.make_target`` builds one by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["Capabilities", "ServingTarget"]


@dataclass(frozen=True)
class Capabilities:
    """What a target can do, so the study (and the user) know what to expect of it.

    Attributes:
        can_restart: optimize can start a fresh server after a crash (else a crash ends the study).
        gpu_metrics: the server's own /metrics is readable, so its GPUs are seen from the server's side.
        shared_filesystem: model files are placed in the server's repository; else they travel in the
            load request.
    """

    can_restart: bool
    gpu_metrics: bool
    shared_filesystem: bool


class ServingTarget(Protocol):
    """What the study needs from a Triton server."""

    name: str
    can_restart: bool

    @property
    def grpc_url(self) -> str: ...

    @property
    def http_url(self) -> str: ...

    @property
    def metrics_url(self) -> str: ...

    capabilities: Capabilities

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def restart(self) -> None: ...

    def is_alive(self) -> bool: ...

    def server_version(self) -> str: ...

    def gpus(self) -> tuple[str, ...] | None:
        """UUIDs of the GPUs the server reports in its own /metrics; None when it cannot be read."""
        ...

    def load_model(self, name: str, config_json: str, files: Mapping[str, Path]) -> float:
        """Load or hot-reload ``name``; ``files`` maps repository-relative paths to local files."""
        ...

    def log_tail(self, lines: int = 20) -> str: ...
