"""Model control over Triton's gRPC API: load, reload, unload, readiness, statistics.

The one place where tritonclient's exceptions become ours: a refused config is ``ConfigRejected``
with Triton's own message; a dead or unreachable server is ``ServerDiedError``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from tritonclient.utils import InferenceServerException

from optimizer.errors import ConfigRejected, ServerDiedError

__all__ = ["ModelControl", "load_files"]

LOAD_TIMEOUT_S = 600.0  # a TensorRT engine build on a big model can take minutes
WATCH_INTERVAL_S = 2.0
HUNG_AFTER_S = 10.0  # no liveness answer for this long while a load runs: the server is hung
# Every other call's deadline: a metadata, statistics or unload call that a live server answers at once.
CALL_TIMEOUT_S = 30.0


def load_files(files: Mapping[str, Path]) -> dict[str, bytes]:
    """Model files for a load request: ``{"1/model.onnx": path}`` -> ``{"file:1/model.onnx": bytes}``."""
    return {f"file:{relative}": Path(path).read_bytes() for relative, path in files.items()}


class ModelControl:
    """A synchronous gRPC client for Triton's model-control and metadata APIs."""

    def __init__(
        self,
        grpc_url: str,
        *,
        is_alive: Callable[[], bool] = lambda: True,
        headers: Mapping[str, str] | None = None,
        **client_options,
    ) -> None:
        """``headers`` go with every call (e.g. auth); ``client_options`` (TLS) to tritonclient's client."""
        import tritonclient.grpc as grpcclient

        self._client = grpcclient.InferenceServerClient(grpc_url, **client_options)
        self._is_alive = is_alive
        self._headers = dict(headers) if headers else None
        self.url = grpc_url

    def close(self) -> None:
        self._client.close()

    def load(self, name: str, config_json: str | None, *, files: Mapping[str, bytes] | None = None) -> float:
        """Load (or hot-reload) ``name`` with ``config_json``; return the seconds it took.

        With ``config_json`` None, Triton loads the model's own ``config.pbtxt`` from its repository.

        Raises:
            ConfigRejected: Triton refused the config or the model failed to initialise with it.
            ServerDiedError: the server is gone.
        """
        started = time.perf_counter()
        outcome: dict[str, BaseException | None] = {}

        def request() -> None:
            try:
                self._client.load_model(
                    name,
                    headers=self._headers,
                    config=config_json,
                    files=dict(files) if files else None,
                    client_timeout=LOAD_TIMEOUT_S,
                )
                outcome["error"] = None
            except BaseException as exc:  # handed to the caller's thread below
                outcome["error"] = exc

        # A load may rightly take minutes (TensorRT engines), but a hung server never answers its
        # liveness call: watch that instead of waiting out the load's own deadline.
        worker = threading.Thread(target=request, name=f"load-{name}", daemon=True)
        worker.start()
        silent_since: float | None = None
        while worker.is_alive():
            worker.join(timeout=WATCH_INTERVAL_S)
            if not worker.is_alive():
                break
            if self.is_live(timeout=WATCH_INTERVAL_S):
                silent_since = None
            elif silent_since is None:
                silent_since = time.perf_counter()
            elif time.perf_counter() - silent_since > HUNG_AFTER_S:
                raise ServerDiedError(
                    f"the Triton server stopped answering (hung?) while loading model {name!r}"
                )
        error = outcome.get("error")
        if isinstance(error, InferenceServerException):
            self._raise_for(error, f"loading model {name!r}")
        elif error is not None:
            raise error
        return time.perf_counter() - started

    def unload(self, name: str, *, timeout: float = CALL_TIMEOUT_S) -> None:
        try:
            self._client.unload_model(name, headers=self._headers, client_timeout=timeout)
        except InferenceServerException as exc:
            self._raise_for(exc, f"unloading model {name!r}")

    def is_model_ready(self, name: str) -> bool:
        try:
            return bool(
                self._client.is_model_ready(name, headers=self._headers, client_timeout=CALL_TIMEOUT_S)
            )
        except InferenceServerException:
            return False

    def server_metadata(self, *, timeout: float = CALL_TIMEOUT_S) -> dict:
        try:
            metadata = self._client.get_server_metadata(
                headers=self._headers, as_json=True, client_timeout=timeout
            )
        except InferenceServerException as exc:
            self._raise_for(exc, "reading server metadata")
        return metadata

    def model_config(self, name: str) -> dict:
        config = self._client.get_model_config(
            name, headers=self._headers, as_json=True, client_timeout=CALL_TIMEOUT_S
        )
        return config["config"]

    def statistics(self, name: str) -> dict:
        return self._client.get_inference_statistics(
            name, headers=self._headers, as_json=True, client_timeout=CALL_TIMEOUT_S
        )

    def is_live(self, *, timeout: float = 5.0) -> bool:
        """Whether the server answers its liveness call within ``timeout`` seconds."""
        try:
            return bool(self._client.is_server_live(headers=self._headers, client_timeout=timeout))
        except InferenceServerException:
            return False

    def _raise_for(self, exc: Exception, doing: str) -> None:
        status, message = triton_error_parts(exc)
        message = _clean_message(message)
        if not self._is_alive() or status.endswith("UNAVAILABLE"):
            raise ServerDiedError(f"the Triton server stopped answering while {doing}: {message}") from exc
        if status.endswith("DEADLINE_EXCEEDED"):
            raise ServerDiedError(f"the Triton server did not answer in time (hung?) while {doing}") from exc
        raise ConfigRejected(message) from exc


def triton_error_parts(exc: BaseException) -> tuple[str, str]:
    """The gRPC status (e.g. ``StatusCode.UNAVAILABLE``, or "") and the message of a tritonclient error.

    The one place tritonclient's exceptions are read: their status and message are methods, not fields.
    """
    if isinstance(exc, InferenceServerException):
        return str(exc.status() or ""), exc.message() or str(exc)
    return "", str(exc)


def _clean_message(message: str | None) -> str:
    """Triton's message without the Python backend's traceback lines ("At: ...")."""
    text = (message or "").split("\n\nAt:", 1)[0]
    return " ".join(text.split()) or "no message"
