"""Serving targets: where a candidate config is loaded and measured.

Every target is a context manager with the same small surface (:class:`ServingTarget`); the study
only talks to that. ``EmbeddedTriton`` is the default: the Triton bundled in the nvidia-pytriton
wheel, run as a child process on loopback.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

__all__ = ["ServingTarget"]


class ServingTarget(Protocol):
    """What the study needs from a Triton server."""

    name: str
    grpc_url: str
    http_url: str
    metrics_url: str
    can_restart: bool

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def restart(self) -> None: ...

    def is_alive(self) -> bool: ...

    def server_version(self) -> str: ...

    def load_model(self, name: str, config_json: str, files: Mapping[str, Path]) -> float:
        """Load or hot-reload ``name``; ``files`` maps repository-relative paths to local files."""
        ...

    def log_tail(self, lines: int = 20) -> str: ...
