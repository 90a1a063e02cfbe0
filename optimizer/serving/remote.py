"""The remote serving target: a Triton server that is already running somewhere else.

Nothing is assumed about the server's machine: model files travel in the load request (``files=``),
its version comes from its metadata and its GPUs from its own /metrics (``--metrics-url``), never from
the machine optimize runs on. Before any trial, :meth:`RemoteTriton.start` proves the server is
reachable (right port, TLS that works, headers it accepts) and accepts model-control requests (it
runs with ``--model-control-mode=explicit``); each failure is one line saying what to fix.
optimize cannot restart a remote server: if it dies the study ends, keeping every finished trial.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.errors import ConfigRejected, ServerDiedError, ServerError, ServerStartError, UsageError
from optimizer.serving.base import Capabilities, ServingTarget
from optimizer.serving.control import ModelControl, load_files, triton_error_parts
from optimizer.serving.metrics import METRICS_ERRORS, describe_metrics_error, fetch_metrics, gpus_in_metrics

__all__ = ["PROBE_MODEL", "RemoteTriton", "TlsOptions", "describe_connection_failure", "parse_grpc_url"]

CONNECT_TIMEOUT_S = 10.0
LIVE_TIMEOUT_S = 2.0
# Unloading a model the server does not have is a no-op in explicit mode and refused in NONE/POLL
# mode: a probe of the model-control API that changes nothing.
PROBE_MODEL = "__optimize_probe__"
_URL = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def parse_grpc_url(url: str) -> str:
    """``HOST:PORT`` of a gRPC endpoint, checked; raise UsageError saying the expected form."""
    value = url.strip()
    match = _URL.match(value)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise UsageError(
            f"--url takes HOST:PORT of Triton's gRPC endpoint (e.g. triton.example.com:8001), got {url!r}"
        )
    return value


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the gRPC channel: the CA that signed the server's certificate, and an optional client pair."""

    root_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def enabled(self) -> bool:
        return any((self.root_cert, self.client_cert, self.client_key))

    def check(self) -> None:
        """Raise UsageError naming the option when a file is missing or not a PEM certificate/key."""
        if (self.client_cert is None) != (self.client_key is None):
            raise UsageError("--ssl-client-cert and --ssl-client-key go together: give both or neither")
        for option, path in (
            ("--ssl-root-cert", self.root_cert),
            ("--ssl-client-cert", self.client_cert),
            ("--ssl-client-key", self.client_key),
        ):
            if path is not None and not Path(path).is_file():
                raise UsageError(f"{option} {str(path)!r} does not exist or is not a file")
        if self.root_cert is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(self.root_cert))
            except ssl.SSLError as exc:
                raise UsageError(
                    f"--ssl-root-cert {str(self.root_cert)!r} holds no valid PEM certificate: "
                    "give the PEM file of the CA that signed the server's certificate"
                ) from exc
        if self.client_cert is not None and self.client_key is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                    str(self.client_cert), str(self.client_key)
                )
            except ssl.SSLError as exc:
                raise UsageError(
                    "--ssl-client-cert and --ssl-client-key are not a matching PEM certificate and key"
                ) from exc

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context trusting ``root_cert`` (default: the system CAs), for an https metrics URL."""
        context = ssl.create_default_context(cafile=str(self.root_cert) if self.root_cert else None)
        if self.client_cert is not None and self.client_key is not None:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def client_options(self) -> dict[str, Any]:
        """tritonclient's gRPC client arguments (it reads the files itself)."""
        if not self.enabled:
            return {}
        return {
            "ssl": True,
            "root_certificates": str(self.root_cert) if self.root_cert else None,
            "private_key": str(self.client_key) if self.client_key else None,
            "certificate_chain": str(self.client_cert) if self.client_cert else None,
        }


def describe_connection_failure(url: str, status: str, message: str, *, tls: bool, timeout: float) -> str:
    """One line saying why a gRPC call to ``url`` failed and what to do, from gRPC's status and message."""
    text = message.lower()
    port_hint = "check --url HOST:PORT (Triton's gRPC port, usually 8001)"
    if "connection refused" in text:
        return f"nothing is listening at {url} (connection refused): {port_hint} and that the server runs"
    if "resolving" in text or "name not found" in text or "name or service not known" in text:
        return f"cannot resolve the host of {url}: check --url"
    if "security handshaker" in text or "root certificate" in text:
        return f"TLS setup for {url} failed: check the --ssl-root-cert / --ssl-client-cert / --ssl-client-key files"
    if "handshake" in text or "ssl" in text or "tls" in text:
        if "wrong_version_number" in text:
            reason = (
                "the server does not speak TLS at this port (drop the --ssl-* options for a plaintext server)"
            )
        elif "certificate_verify_failed" in text:
            reason = "its certificate is not signed by --ssl-root-cert"
        else:
            reason = _short(message)
        return f"TLS handshake with {url} failed: {reason}"
    if "socket closed" in text or "connection reset" in text:
        if tls:
            return f"{url} closed the connection during TLS set-up: {port_hint}"
        return (
            f"{url} closed the connection: it is not a plaintext Triton gRPC endpoint (an HTTP or metrics "
            f"port? a server that needs TLS? then pass --ssl-root-cert): {port_hint}"
        )
    if status.endswith("DEADLINE_EXCEEDED"):
        return f"no answer from {url} within {timeout:g} s: {port_hint}, and that no firewall is in the way"
    if status.endswith(("UNAUTHENTICATED", "PERMISSION_DENIED")):
        return f"the server at {url} refused the request ({_short(message)}): check the --header credentials"
    if "http2" in text or status.endswith("UNIMPLEMENTED"):
        return f"{url} answered, but not as a Triton gRPC server ({_short(message)}): {port_hint}"
    return f"cannot reach the Triton server at {url}: {_short(message)}"


def _short(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _cause(exc: Exception) -> tuple[str, str]:
    """gRPC status and message of the tritonclient exception behind one of ours."""
    status, message = triton_error_parts(exc.__cause__ or exc)
    return status, message or str(exc)


class RemoteTriton(ServingTarget):
    """A running Triton server reached over gRPC; model files are sent with every load request.

    Args:
        url: ``HOST:PORT`` of the server's gRPC endpoint.
        metrics_url: its /metrics URL (e.g. ``http://host:8002/metrics``), to see its GPUs.
        http_url: its HTTP endpoint, informational (everything optimize does goes over gRPC).
        tls: TLS files for the gRPC channel (and an https metrics URL).
        headers: sent with every call (e.g. ``{"Authorization": "Bearer ..."}``).
        timeout: seconds each check before the study may take.
    """

    name = "remote"

    def __init__(
        self,
        url: str,
        *,
        metrics_url: str | None = None,
        http_url: str | None = None,
        tls: TlsOptions = TlsOptions(),
        headers: Mapping[str, str] | None = None,
        timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._grpc_url = parse_grpc_url(url)
        self._metrics_url = metrics_url or ""
        self._http_url = http_url or ""
        tls.check()
        self.tls = tls
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.capabilities = Capabilities(
            can_restart=False,
            gpu_metrics=bool(metrics_url),
            shared_filesystem=False,
            same_machine=False,
            picks_gpus=False,  # a running server: --gpus goes into each config's instance_group
        )
        self._control: ModelControl | None = None
        self._version = "unknown"
        self._loaded: set[str] = set()

    # --- lifecycle: the checks before any trial -----------------------------------------------------

    def start(self) -> None:
        """Check that the server is reachable and accepts model control; raise ServerStartError if not."""
        self._control = ModelControl(
            self.grpc_url, is_alive=self.is_alive, headers=self.headers or None, **self.tls.client_options()
        )
        try:
            self._version = self._check_reachable()
            self._check_model_control()
            if self.metrics_url:
                self._check_metrics()
        except BaseException:
            self.stop()
            raise

    def _check_reachable(self) -> str:
        try:
            metadata = self.control.server_metadata(timeout=self.timeout)
        except (ServerDiedError, ConfigRejected) as exc:
            status, message = _cause(exc)
            raise ServerStartError(
                describe_connection_failure(
                    self.grpc_url, status, message, tls=self.tls.enabled, timeout=self.timeout
                )
            ) from exc
        if "model_repository" not in metadata.get("extensions", ["model_repository"]):
            raise ServerStartError(
                f"the Triton server at {self.grpc_url} has no model-repository extension: "
                "it cannot load models on request"
            )
        return str(metadata.get("version", "unknown"))

    def _check_model_control(self) -> None:
        try:
            self.control.unload(PROBE_MODEL, timeout=self.timeout)
        except (ServerDiedError, ConfigRejected) as exc:
            status, message = _cause(exc)
            if "not allowed" in message.lower():
                raise ServerStartError(
                    f"the Triton server at {self.grpc_url} refuses model-control requests ({_short(message)}): "
                    "start it with --model-control-mode=explicit"
                ) from exc
            raise ServerStartError(
                f"the Triton server at {self.grpc_url} refused a model-control request ({_short(message)}): "
                "it must run with --model-control-mode=explicit and accept load/unload from this client"
            ) from exc

    def _check_metrics(self) -> None:
        try:
            gpus_in_metrics(self._fetch_metrics())
        except METRICS_ERRORS as exc:
            raise ServerStartError(
                f"cannot read the server's metrics at {self.metrics_url} ({describe_metrics_error(exc)}): "
                "check --metrics-url (Triton's metrics port is usually 8002, path /metrics)"
            ) from exc

    def _fetch_metrics(self) -> str:
        return fetch_metrics(self.metrics_url, timeout=self.timeout, context=self.metrics_ssl_context())

    def stop(self) -> None:
        """Unload the models this run loaded (the server is someone's: leave it as found); close the channel."""
        control, self._control = self._control, None
        if control is None:
            return
        for name in sorted(self._loaded):
            try:
                control.unload(name, timeout=LIVE_TIMEOUT_S)
            except (ServerDiedError, ConfigRejected):
                pass  # a dead or unwilling server: nothing left to tidy
        self._loaded.clear()
        control.close()

    def restart(self) -> None:
        raise ServerDiedError(
            f"the remote Triton server at {self.grpc_url} cannot be restarted by optimize: restart it, then rerun "
            "the same command to resume the study"
        )

    def is_alive(self) -> bool:
        return self._control is not None and self._control.is_live(timeout=LIVE_TIMEOUT_S)

    # --- state ---------------------------------------------------------------------------------------

    @property
    def grpc_url(self) -> str:
        return self._grpc_url

    @property
    def http_url(self) -> str:
        return self._http_url

    @property
    def metrics_url(self) -> str:
        return self._metrics_url

    def client_options(self) -> dict[str, Any]:
        return self.tls.client_options()

    def request_headers(self) -> dict[str, str]:
        return dict(self.headers)

    def metrics_ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.ssl_context() if self.metrics_url.startswith("https:") else None

    @property
    def control(self) -> ModelControl:
        if self._control is None:
            raise ServerDiedError(f"not connected to the Triton server at {self.grpc_url}")
        return self._control

    def server_version(self) -> str:
        """The version the server reported in its metadata when the connection was checked."""
        return self._version

    def gpus(self) -> tuple[str, ...] | None:
        """The GPUs in the server's own /metrics; None without --metrics-url or when unreadable."""
        if not self.metrics_url:
            return None
        try:
            return gpus_in_metrics(self._fetch_metrics())
        except METRICS_ERRORS:
            return None

    def log_tail(self, lines: int = 20) -> str:  # noqa: ARG002 - the base class's signature
        return f"(the log of the remote server at {self.grpc_url} is on its own machine)"

    # --- models --------------------------------------------------------------------------------------

    def unload_model(self, name: str) -> None:
        self.control.unload(name)

    def load_model(self, name: str, config_json: str, files: Mapping[str, Path]) -> float:
        """Load or hot-reload ``name`` with the config, its files sent in the request.

        Raises:
            ServerError: a model of that name, not loaded by this run, is already served (it would be
                replaced). ConfigRejected, ServerDiedError: as :meth:`ModelControl.load`.
        """
        if name not in self._loaded and self.control.is_model_ready(name):
            raise ServerError(
                f"the Triton server at {self.grpc_url} already serves a model named {name!r}: optimize would "
                "replace it; unload it first, or tune a copy of the model file under another name"
            )
        seconds = self.control.load(name, config_json, files=load_files(files))
        self._loaded.add(name)
        return seconds
