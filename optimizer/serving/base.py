"""The serving-target contract: what the study, the trial and the load generators ask of a Triton server.

:class:`ServingTarget` declares the hooks every target fills (start, stop, load a model, where its
endpoints are) and gives defaults for the rest (no TLS, no auth headers, no process of ours, this
machine's hardware, any model accepted). Callers rely on the contract, never on probing attributes:
a target that can do more says so by overriding a method or by its :class:`Capabilities`.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.serving.environment import available_cores, hardware
from optimizer.serving.metrics import METRICS_ERRORS, fetch_metrics, process_tree_rss_mb, resource_usage

__all__ = ["Capabilities", "RecordedStudy", "ServingTarget"]


@dataclass(frozen=True)
class Capabilities:
    """What a target can do, so the study (and the user) know what to expect of it.

    Attributes:
        can_restart: optimize can start a fresh server after a crash (else a crash ends the study).
        gpu_metrics: the server's own /metrics is readable, so its GPUs are seen from the server's side.
        shared_filesystem: model files are placed in the server's repository; else they travel in the
            load request.
        serves_requests: it answers inference requests (a replay answers from a recording instead), so
            another load generator can cross-check the figures.
        same_machine: the server runs on this machine, so a model run in this process (the in-process
            profile) is measured on the hardware the server uses.
        picks_gpus: optimize gives the server the GPUs of ``--gpus`` when it starts it
            (``CUDA_VISIBLE_DEVICES``, Docker's device request); else each config names them
            (``instance_group.gpus``).
    """

    can_restart: bool
    gpu_metrics: bool
    shared_filesystem: bool
    serves_requests: bool = True
    same_machine: bool = True
    picks_gpus: bool = True


@dataclass(frozen=True)
class RecordedStudy:
    """The study a recording was made from: its models, their request shapes, the space, and for several
    models recorded together (``joint``) the traffic mix and the latency budgets."""

    space_path: Path
    models: Mapping[str, tuple[Path, Mapping[str, tuple[int, ...]]]]  # name: (its file, its request shapes)
    joint: bool = False
    traffic: Mapping[str, float] = field(default_factory=dict)
    latency_budgets_ms: Mapping[str, float] = field(default_factory=dict)


class ServingTarget:
    """A Triton server a study loads configs into and measures; a context manager (start ... stop).

    Subclasses fill the abstract hooks; the defaults below fit a server on this machine reached without
    TLS. ``name`` is the ``--target`` it is chosen by.
    """

    name: str = "target"
    capabilities: Capabilities = Capabilities(can_restart=False, gpu_metrics=False, shared_filesystem=False)

    def __enter__(self) -> ServingTarget:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- hooks every target fills ----------------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def is_alive(self) -> bool:
        raise NotImplementedError

    @property
    def grpc_url(self) -> str:
        raise NotImplementedError

    def server_version(self) -> str:
        raise NotImplementedError

    def load_model(self, name: str, config_json: str, files: Mapping[str, Path]) -> float:
        """Load or hot-reload ``name``; ``files`` maps repository-relative paths to local files; seconds taken."""
        raise NotImplementedError

    def unload_model(self, name: str) -> None:
        """Unload ``name`` (its instances, and the memory they hold, go)."""
        raise NotImplementedError

    # --- defaults ---------------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        """``http://host:port``, or "" when the target has no HTTP endpoint optimize can reach."""
        return ""

    @property
    def metrics_url(self) -> str:
        """The server's /metrics URL, or "" when it cannot be read."""
        return ""

    @property
    def pid(self) -> int | None:
        """The server's process when it is a child of ours (its tree's memory is the server's)."""
        return None

    def gpus(self) -> tuple[str, ...] | None:
        """UUIDs of the GPUs the server reports in its own /metrics; None when it cannot be read."""
        return None

    def log_tail(self, lines: int = 20) -> str:  # noqa: ARG002 - subclasses with a log use it
        return ""

    def exit_status(self) -> str | None:
        """How the server's process ended ("killed by signal 11 (SIGSEGV)", "exit code 1"); None while it
        runs, or when it is not a process of ours."""
        return None

    def memory_kills(self) -> int:
        """Processes of the server the kernel killed for a memory limit optimize set, since the last call."""
        return 0

    def client_options(self) -> dict[str, Any]:
        """tritonclient gRPC options for inference requests (TLS); none for a server on loopback."""
        return {}

    def request_headers(self) -> dict[str, str]:
        """Headers sent with every request (auth); none by default."""
        return {}

    def metrics_ssl_context(self) -> ssl.SSLContext | None:
        """The SSL context for an https /metrics URL; None for plain http."""
        return None

    def cpu_cores(self) -> int:
        """The CPU cores the server's instances share: this process's (a child server inherits them)."""
        return available_cores()

    def hardware(self) -> dict[str, Any]:
        """The machine the measurements describe (recorded with the study)."""
        return hardware()

    def check_model(self, sha256: str) -> None:
        """Refuse a model this target cannot serve; every model is accepted by default."""

    def recorded_levels(self) -> Any | None:
        """The load generator of a target that answers from a recording instead of serving requests (a
        ``LevelSource``: measurement's type, above this stage); None: measure the server's requests.

        A target that cannot answer one model's levels at all raises UsageError saying what to do.
        """
        return None

    def recorded_mix(self) -> Any | None:
        """Likewise for a joint study's mixed load (a ``MixSource``); None: measure the server's requests."""
        return None

    def check_traffic(self, shares: Mapping[str, float]) -> None:
        """Refuse a traffic mix (each model's share of the requests) this target cannot serve; every mix
        is accepted by default."""

    def recorded_study(self) -> RecordedStudy | None:
        """What a target that answers from a recording recorded, for the command line to fill in what
        the user left out (the models, the space); None: a server, which serves what it is sent."""
        return None

    def int8_recipes(self) -> tuple[str, ...] | None:
        """The int8 recipes this target can serve, in the order to try them; None: every recipe, in the
        order the model calls for (a recording serves only the files it recorded)."""
        return None

    def resources(self) -> dict[str, float]:
        """The server's memory and utilisation now: its /metrics figures and, for a child process, its RSS.

        Anything that cannot be read is left out: resources are recorded, they never fail a measurement.
        """
        usage: dict[str, float] = {}
        if self.metrics_url:
            try:
                text = fetch_metrics(self.metrics_url, timeout=2.0, context=self.metrics_ssl_context())
                usage.update(resource_usage(text))
            except METRICS_ERRORS:
                pass
        rss = process_tree_rss_mb(self.pid) if self.pid is not None else None
        if rss is not None:
            usage["server_rss_mb"] = rss
        return usage
