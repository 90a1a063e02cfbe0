"""``optimize serve``: run a tuned model repository on the embedded Triton, exactly as it was measured.

``check_repository`` validates the files (pure file reads); ``serving`` starts the same embedded server,
backend and cache a study uses on that repository and loads each model from its own ``config.pbtxt``;
``serve_repository`` prints the endpoints and a ready-to-paste perf_analyzer command, then blocks until
Ctrl-C or SIGTERM; ``serve_study`` exports a study's trial to a temporary repository and serves that.
"""

from __future__ import annotations

import ipaddress
import shlex
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.config.render import config_from_pbtxt
from optimizer.errors import ModelError, ServerDiedError, UsageError
from optimizer.measurement.perf_analyzer import perf_analyzer_args
from optimizer.output.export import choose_trial
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.results import export_trial
from optimizer.study.storage import load_stored_study

__all__ = [
    "RepositoryModel",
    "binding_warning",
    "check_repository",
    "dynamic_shapes",
    "perf_analyzer_command",
    "serve_repository",
    "serve_study",
    "serving",
]

Announce = Callable[[str], None]
# Backends the embedded Triton has, and the file each loads when the config names none.
DEFAULT_MODEL_FILES = {"onnxruntime": "model.onnx", "python": "model.py"}
_PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime"}
POLL_S = 0.5


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class RepositoryModel:
    """A model directory of a repository that the embedded Triton can load as is."""

    name: str
    config: mc.ModelConfig
    versions: tuple[int, ...]  # the versions Triton will serve under the config's version policy


@dataclass(frozen=True)
class Served:
    """A running server with a repository's models loaded."""

    server: EmbeddedTriton
    repository: Path
    models: tuple[RepositoryModel, ...]


# --- the repository ------------------------------------------------------------------------------------


def check_repository(
    repo: Path, models: Sequence[str] | None = None
) -> tuple[Path, tuple[RepositoryModel, ...]]:
    """Validate a Triton model repository; return it and the models to load.

    ``repo`` may also be one model's directory (what ``optimize export`` prints): its parent is then the
    repository and that model the one to load.

    Raises:
        UsageError: the path does not exist, or ``models`` names a model the repository lacks.
        ModelError: a model directory has no parseable ``config.pbtxt``, an unsupported backend, or no
            version directory holding its model file.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise UsageError(f"model repository {str(repo)!r} is not a directory")
    if (repo / "config.pbtxt").is_file():
        if models and list(models) != [repo.name]:
            raise UsageError(
                f"{str(repo)!r} is the directory of model {repo.name!r} alone, not of {', '.join(models)}"
            )
        repo, models = repo.parent, [repo.name]
    available = sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not available:
        raise ModelError(f"model repository {str(repo)!r} holds no model directory (<model>/config.pbtxt)")
    chosen = list(dict.fromkeys(models)) if models else available
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise UsageError(
            f"no model {', '.join(map(repr, unknown))} in {str(repo)!r}: it holds {', '.join(available)}"
        )
    return repo, tuple(_check_model(repo / name) for name in chosen)


def _check_model(directory: Path) -> RepositoryModel:
    config_path = directory / "config.pbtxt"
    if not config_path.is_file():
        raise ModelError(f"{config_path} is missing: every model directory needs a Triton config.pbtxt")
    try:
        config = config_from_pbtxt(config_path.read_text())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path} is not a valid Triton model config: {exc}") from exc
    if config.name and config.name != directory.name:
        raise ModelError(f"{config_path} names model {config.name!r} but its directory is {directory.name!r}")
    present = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
    if config.platform == "ensemble":  # no file of its own: Triton runs its steps, models of the repository
        if not present:
            raise ModelError(
                f"{directory} has no version directory: an ensemble needs one, empty ({directory}/1/)"
            )
        return RepositoryModel(directory.name, config, tuple(_served_versions(config, present)))
    backend = config.backend or _PLATFORM_BACKENDS.get(config.platform, "")
    if backend not in DEFAULT_MODEL_FILES:
        raise ModelError(
            f"{config_path}: backend {backend or config.platform or 'none'!r} is not served by the embedded "
            f"Triton, which has {', '.join(sorted(DEFAULT_MODEL_FILES))}"
        )
    filename = config.default_model_filename or DEFAULT_MODEL_FILES[backend]
    versions = _served_versions(config, present)
    if not versions:
        raise ModelError(f"{directory} has no version directory for its version policy (e.g. {directory}/1/)")
    missing = [v for v in versions if not (directory / str(v) / filename).exists()]
    if missing:
        raise ModelError(
            f"{directory / str(missing[0]) / filename} is missing: the model file of version {missing[0]}"
        )
    return RepositoryModel(directory.name, config, tuple(versions))


def _served_versions(config: mc.ModelConfig, present: list[int]) -> list[int]:
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return present
    if choice == "specific":
        return sorted(policy.specific.versions)
    count = policy.latest.num_versions if choice == "latest" else 1
    return present[-count:] if present else []


# --- what to tell the user -----------------------------------------------------------------------------


def binding_warning(address: str) -> str | None:
    """The warning due when the server listens beyond this machine, or None for loopback."""
    if ipaddress.ip_address(address).is_loopback:
        return None
    return (
        f"warning: listening on {address}: any client that reaches it can load, replace and unload models "
        "through Triton's model-control API; use --host 127.0.0.1 to keep it to this machine"
    )


def dynamic_shapes(
    config: mc.ModelConfig, shapes: Mapping[str, Sequence[int]]
) -> tuple[dict[str, list[int]], list[str]]:
    """The ``shapes`` of the config's inputs that have dynamic dims, and the dynamic inputs without one."""
    given: dict[str, list[int]] = {}
    missing: list[str] = []
    for tensor in config.input:
        if -1 not in tensor.dims:
            continue
        if tensor.name in shapes:
            given[tensor.name] = [int(d) for d in shapes[tensor.name]]
        else:
            missing.append(tensor.name)
    return given, missing


def perf_analyzer_command(
    model: RepositoryModel,
    grpc_url: str,
    *,
    concurrency: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[str, list[str]]:
    """A ready-to-paste perf_analyzer command line, and notes on inputs it still needs a shape for.

    Integer inputs get ``--input-data zero``: perf_analyzer's random integers span the whole type, out of
    bounds for token ids and other indices.
    """
    given, missing = dynamic_shapes(model.config, shapes or {})
    integers = any(mc.DataType.Name(tensor.data_type) in _INTEGER_TYPES for tensor in model.config.input)
    args = perf_analyzer_args(
        model.name,
        grpc_url,
        concurrency=concurrency,
        shapes=given,
        input_data="zero" if integers else None,
    )
    notes = [
        f"input {name!r} has dynamic dimensions: add --shape {name}:DIMS (without the batch dimension"
        f"{'' if model.config.max_batch_size else ', which this model does not have'})"
        for name in missing
    ]
    return shlex.join(["perf_analyzer", *args]), notes


_INTEGER_TYPES = {f"TYPE_{kind}{bits}" for kind in ("INT", "UINT") for bits in (8, 16, 32, 64)}


def _client_host(address: str) -> str:
    return "127.0.0.1" if address == "0.0.0.0" else address  # noqa: S104 - we only print, never bind here


def _announce_endpoints(served: Served, address: str, concurrency: int, shapes, announce: Announce) -> None:
    server = served.server
    host = _client_host(address)
    names = ", ".join(model.name for model in served.models)
    announce(f"serving {names} from {served.repository} (Triton {server.server_version()}, embedded)")
    where = " (all interfaces)" if address == "0.0.0.0" else ""  # noqa: S104
    announce(f"  HTTP     http://{host}:{server.ports['http']}{where}")
    announce(f"  gRPC     {host}:{server.ports['grpc']}{where}")
    announce(f"  metrics  http://{host}:{server.ports['metrics']}/metrics{where}")
    announce("measure with perf_analyzer:")
    for model in served.models:
        command, notes = perf_analyzer_command(
            model, f"{host}:{server.ports['grpc']}", concurrency=concurrency, shapes=shapes
        )
        announce(f"  {command}")
        for note in notes:
            announce(f"  note: {note}")
    announce("ready; press Ctrl-C to stop")


# --- running -------------------------------------------------------------------------------------------


def _bind_address(host: str) -> str:
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(
            f"--host must be an IPv4 address or a name of one (127.0.0.1, 0.0.0.0), got {host!r}"
        ) from exc


@contextmanager
def serving(
    repo: Path,
    *,
    models: Sequence[str] | None = None,
    host: str = "127.0.0.1",
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
) -> Iterator[Served]:
    """The embedded Triton on ``repo`` with its models loaded from their own configs; stopped on exit.

    Ports left None are chosen free. Raises what ``check_repository`` raises, ServerStartError when a
    port is taken or the server does not start, and ConfigRejected when Triton refuses a model.
    """

    repository, chosen = check_repository(repo, models)
    server = EmbeddedTriton(
        model_repository=repository.resolve(),
        host=_bind_address(host),
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
    )
    with server:
        # Ensembles last: Triton checks an ensemble against its steps' configs when it loads it.
        for model in sorted(chosen, key=lambda m: m.config.platform == "ensemble"):
            server.load_from_repository(model.name)
        yield Served(server, repository, chosen)


def serve_repository(
    repo: Path,
    *,
    models: Sequence[str] | None = None,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    shapes: Mapping[str, Sequence[int]] | None = None,
    concurrency: int = 1,
    announce: Announce = _print,
) -> None:
    """Serve a model repository until Ctrl-C or SIGTERM, then stop the server cleanly.

    Args:
        repo: a Triton model repository, or one model's directory in it.
        models: the models to load (default: every model directory).
        host: the IPv4 address to listen on; anything but loopback is announced with a warning.
        http_port: Triton's HTTP port. grpc_port, metrics_port: likewise.
        shapes: request shapes (without the batch dim) for the perf_analyzer command's ``--shape``.
        concurrency: the concurrency of the perf_analyzer command.
        announce: where the endpoints, the command and notes are written, one line per call.

    Raises:
        UsageError, ModelError: bad host or repository. ServerStartError: a port is taken or the server
        did not start. ConfigRejected: Triton refused a model. ServerDiedError: the server died.
    """
    address = _bind_address(host)
    warning = binding_warning(address)
    if warning:
        announce(warning)
    with _stop_signals_interrupt():
        try:
            with serving(
                repo,
                models=models,
                host=address,
                http_port=http_port,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
            ) as served:
                _announce_endpoints(served, address, concurrency, shapes or {}, announce)
                try:
                    _wait_while_alive(served.server)
                except KeyboardInterrupt:
                    announce("stopping the server")
                    raise
        except KeyboardInterrupt:
            announce("stopped")


def _wait_while_alive(server) -> None:
    while server.is_alive():
        time.sleep(POLL_S)
    raise ServerDiedError(f"the Triton server exited unexpectedly:\n{server.log_tail()}")


@contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    # Ctrl-C and SIGTERM (a service manager, `kill`) both stop the server cleanly, even when the shell
    # that started us in the background set SIGINT to be ignored.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_study(
    study_name: str,
    *,
    trial: int | None = None,
    storage: str | None = None,
    models: Sequence[str] | None = None,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    shapes: Mapping[str, Sequence[int]] | None = None,
    announce: Announce = _print,
) -> None:
    """Serve trial ``trial`` (default: the best feasible) of a stored study, as ``serve_repository`` does.

    The perf_analyzer command uses the study's request shapes (``shapes`` overrides some) and the
    concurrency the trial was best at.
    """

    study = load_stored_study(study_name, storage)
    chosen = choose_trial(study, trial)
    attrs = chosen.user_attrs
    if "configs" in attrs:  # a joint study: the traffic mix's figure, each model's in the report
        announce(
            f"trial {chosen.number} of joint study {study_name!r}: {attrs.get('throughput', 0.0):.1f} "
            f"requests/s in the traffic mix; {', '.join(attrs['configs'])} on one server"
        )
    elif "throughput" in attrs:
        announce(
            f"trial {chosen.number} of study {study_name!r}: {attrs.get('candidate', '')}; measured "
            f"{attrs['throughput']:.1f} inferences/s, p99 {attrs['p99_ms']:.2f} ms at concurrency {attrs['concurrency']}"
        )
    with tempfile.TemporaryDirectory(prefix="optimize-serve-") as tmp:
        export_trial(study, chosen, Path(tmp))
        serve_repository(
            Path(tmp),
            models=models,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            shapes={**(study.user_attrs.get("shapes") or {}), **(shapes or {})},
            concurrency=int(attrs.get("concurrency") or 1),
            announce=announce,
        )
