"""Model control over Triton's gRPC API: load, reload, unload, readiness, statistics.

The one place where tritonclient's exceptions become ours: a refused config is ``ConfigRejected``
with Triton's own message; a dead or unreachable server is ``ServerDiedError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from optimizer.errors import ConfigRejected, ServerDiedError

__all__ = ["ModelControl", "load_files"]

LOAD_TIMEOUT_S = 600.0  # a TensorRT engine build on a big model can take minutes


def load_files(files: Mapping[str, Path]) -> dict[str, bytes]:
    """Model files for a load request: ``{"1/model.onnx": path}`` -> ``{"file:1/model.onnx": bytes}``."""
    return {f"file:{relative}": Path(path).read_bytes() for relative, path in files.items()}


class ModelControl:
    """A synchronous gRPC client for Triton's model-control and metadata APIs."""

    def __init__(self, grpc_url: str, *, is_alive: Callable[[], bool] = lambda: True, **client_options) -> None:
        import tritonclient.grpc as grpcclient

        self._client = grpcclient.InferenceServerClient(grpc_url, **client_options)
        self._is_alive = is_alive
        self.url = grpc_url

    def close(self) -> None:
        self._client.close()

    def load(self, name: str, config_json: str, *, files: Mapping[str, bytes] | None = None) -> float:
        """Load (or hot-reload) ``name`` with ``config_json``; return the seconds it took.

        Raises:
            ConfigRejected: Triton refused the config or the model failed to initialise with it.
            ServerDiedError: the server is gone.
        """
        from tritonclient.utils import InferenceServerException

        started = time.perf_counter()
        try:
            self._client.load_model(name, config=config_json, files=dict(files) if files else None,
                                    client_timeout=LOAD_TIMEOUT_S)
        except InferenceServerException as exc:
            self._raise_for(exc, f"loading model {name!r}")
        return time.perf_counter() - started

    def unload(self, name: str) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self._client.unload_model(name)
        except InferenceServerException as exc:
            self._raise_for(exc, f"unloading model {name!r}")

    def is_model_ready(self, name: str) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self._client.is_model_ready(name))
        except InferenceServerException:
            return False

    def server_metadata(self) -> dict:
        from tritonclient.utils import InferenceServerException

        try:
            metadata = self._client.get_server_metadata(as_json=True)
        except InferenceServerException as exc:
            self._raise_for(exc, "reading server metadata")
        return metadata

    def model_config(self, name: str) -> dict:
        return self._client.get_model_config(name, as_json=True)["config"]

    def statistics(self, name: str) -> dict:
        return self._client.get_inference_statistics(name, as_json=True)

    def _raise_for(self, exc: Exception, doing: str) -> None:
        message = _clean_message(exc.message() if hasattr(exc, "message") else str(exc))
        status = str(exc.status()) if hasattr(exc, "status") and exc.status() else ""
        if not self._is_alive() or status.endswith("UNAVAILABLE"):
            raise ServerDiedError(f"the Triton server stopped answering while {doing}: {message}") from exc
        if status.endswith("DEADLINE_EXCEEDED"):
            raise ServerDiedError(f"the Triton server did not answer in time while {doing}") from exc
        raise ConfigRejected(message) from exc


def _clean_message(message: str | None) -> str:
    """Triton's message without the Python backend's traceback lines ("At: ...")."""
    text = (message or "").split("\n\nAt:", 1)[0]
    return " ".join(text.split()) or "no message"
