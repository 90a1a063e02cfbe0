"""optuna-dashboard on a study's storage, bound to loopback unless asked otherwise, stopped by Ctrl-C.

``optuna_dashboard.run_server`` stops on Ctrl-C by catching KeyboardInterrupt, but ``wsgiref`` swallows
one raised while a response is being written (seen here: the server then ran on). So the dashboard's
WSGI app (``optuna_dashboard.wsgi``) is served by our own ``wsgiref`` loop, and SIGINT / SIGTERM only set
a flag the loop checks between requests: every stop is honoured within half a second.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna_dashboard

from optimizer.errors import StudyError, UsageError
from optimizer.study.storage import open_storage

__all__ = ["dashboard_url", "serve_dashboard"]

POLL_S = 0.5


def dashboard_url(host: str, port: int, study_id: int | None = None) -> str:
    """The address to open: the study list, or one study's page."""
    shown = f"[{host}]" if ":" in host else host
    path = f"studies/{study_id}" if study_id is not None else ""
    return f"http://{shown}:{port}/dashboard/{path}"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass  # one line per request would bury the URL


class _Server4(WSGIServer):
    address_family = socket.AF_INET


class _Server6(WSGIServer):
    address_family = socket.AF_INET6


def _bind(host: str, port: int, app: Any) -> WSGIServer:
    server_class = _Server6 if ":" in host else _Server4
    try:
        server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(
            f"cannot listen on {host}:{port} ({reason}): choose another --port or --host"
        ) from exc
    server.timeout = POLL_S
    return server


@contextmanager
def _stop_requested() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (previous handlers restored after)."""
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_dashboard(
    storage_url: str,
    *,
    host: str,
    port: int,
    study_name: str | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve optuna-dashboard for ``storage_url`` until SIGINT (Ctrl-C) or SIGTERM; main thread only.

    Args:
        storage_url: The Optuna storage holding the studies.
        host: The address to bind (loopback by default in the CLI).
        port: The TCP port.
        study_name: A study to point the printed URL at; it must exist in the storage.
        announce: Called with the URL once the server listens.

    Raises:
        UsageError: if the port cannot be bound.
        StudyError: if ``study_name`` is not in the storage.
    """

    storage = open_storage(storage_url, create_dirs=False)
    study_id = None
    if study_name is not None:
        try:
            study_id = storage.get_study_id_from_name(study_name)
        except KeyError as exc:
            raise StudyError(f"no study named {study_name!r} in that storage: check --study-name") from exc
    with _stop_requested() as stop, _bind(host, port, optuna_dashboard.wsgi(storage)) as server:
        announce(dashboard_url(host, port, study_id))
        while not stop.is_set():
            server.handle_request()  # returns after POLL_S without a request
