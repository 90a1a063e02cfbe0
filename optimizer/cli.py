"""The ``optimize`` command line.

Only ``main()`` turns errors into exit codes: an :class:`OptimizeError` prints one ``Error: …`` line
and exits with its code (``--debug`` shows the traceback). Heavy imports (optuna, onnx, tritonclient)
happen inside the commands, so ``optimize --help`` stays fast.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from optimizer.errors import OptimizeError


class Interrupted(OptimizeError):
    exit_code = 130


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find the best Triton Inference Server configuration for an ONNX model.",
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

ShapeOption = Annotated[
    Optional[list[str]],
    typer.Option("--shape", help="Shape of a dynamic input without the batch dim, NAME:D1,D2 (repeatable)."),
]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    _state["debug"] = _state["debug"] or debug


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="The ONNX model file.")],
    shape: ShapeOption = None,
) -> None:
    """Show a model's inputs and outputs, its batch dimension and the shapes a study would send."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from optimizer.model.intake import inspect_model, parse_shape_args, resolve_shapes
    from optimizer.paths import cache_dir

    info = inspect_model(model, cache=cache_dir())
    given = parse_shape_args(shape or [])
    console = Console()
    table = Table(title=f"{info.source_path.name}  (opset {info.opset}, sha256 {info.sha256[:12]})")
    for column in ("", "name", "dtype", "dims"):
        table.add_column(column)
    for kind, specs in (("input", info.inputs), ("output", info.outputs)):
        for spec in specs:
            table.add_row(
                kind, escape(spec.name), spec.dtype, escape("[" + ", ".join(str(d) for d in spec.dims) + "]")
            )
    console.print(table)
    console.print(f"batch dimension: {'dynamic (first axis)' if info.batching else 'none: max_batch_size 0'}")
    for note in info.notes:
        console.print(f"note: {note}")
    shapes = resolve_shapes(info, given)
    console.print("request shapes: " + ", ".join(f"{n}:{','.join(map(str, d))}" for n, d in shapes.items()))


@app.command()
def study(
    model: Annotated[
        Optional[Path], typer.Option("--model", help="ONNX model (default: the bundled example).")
    ] = None,
    budget: Annotated[int, typer.Option(help="Total number of trials in the study.")] = 40,
    latency_budget_ms: Annotated[
        Optional[float],
        typer.Option("--latency-budget-ms", help="p99 latency budget (default: 10x baseline p99)."),
    ] = None,
    space: Annotated[
        Optional[str],
        typer.Option(
            help="Search space: a name under spaces/ or a YAML path (default cpu; replay: its own)."
        ),
    ] = None,
    study_name: Annotated[
        Optional[str], typer.Option("--study-name", help="Default: the model's file name.")
    ] = None,
    storage: Annotated[
        Optional[str], typer.Option(help="Optuna storage URL (default sqlite:///studies/NAME.db).")
    ] = None,
    shape: ShapeOption = None,
    input_data: Annotated[
        Optional[Path],
        typer.Option("--input-data", help=".npz with one array per input (samples on axis 0)."),
    ] = None,
    accuracy_tolerance: Annotated[
        float,
        typer.Option(
            "--accuracy-tolerance", help="Max 1 - cosine similarity of a fp16/int8 variant vs fp32."
        ),
    ] = 0.01,
    concurrency: Annotated[Optional[str], typer.Option(help="Concurrency levels, e.g. 1,2,4,8,16.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampler seed.")] = None,
    sampler: Annotated[
        str, typer.Option(help="tpe (Bayesian, default), random, or grid (a space of listed values).")
    ] = "tpe",
    warm_start: Annotated[
        Optional[str],
        typer.Option(
            "--warm-start", help="A finished study of this model: its best configs are measured first."
        ),
    ] = None,
    window_s: Annotated[
        float,
        typer.Option(
            "--window-s", help="Seconds measured per level (fixed rule) or the shortest window (ci)."
        ),
    ] = 1.0,
    warmup_s: Annotated[
        float, typer.Option("--warmup-s", help="Warm-up seconds per concurrency level.")
    ] = 0.5,
    allow_shared_host: Annotated[
        bool,
        typer.Option("--allow-shared-host", help="Let another worker of this study measure on this machine."),
    ] = False,
    cpus: Annotated[
        Optional[str], typer.Option(help="Pin this worker and its server to cores, e.g. 0-3.")
    ] = None,
    gpus: Annotated[Optional[str], typer.Option(help="GPUs this worker's server may use, e.g. 0,1.")] = None,
    target: Annotated[
        str,
        typer.Option(
            help="Triton to tune: embedded (bundled), local (--triton-binary), docker, remote (--url), "
            "or replay:DIR (a recorded surface, no server)."
        ),
    ] = "embedded",
    triton_binary: Annotated[
        Optional[Path],
        typer.Option("--triton-binary", help="local: tritonserver to run (default: the one on PATH)."),
    ] = None,
    backend_directory: Annotated[
        Optional[Path],
        typer.Option("--backend-directory", help="local: its backends (default: next to its bin/)."),
    ] = None,
    docker_image_tag: Annotated[
        Optional[str],
        typer.Option("--docker-image-tag", help="docker: nvcr.io/nvidia/tritonserver:TAG-py3 (24.10)."),
    ] = None,
    url: Annotated[
        Optional[str], typer.Option(help="remote: HOST:PORT of the server's gRPC endpoint.")
    ] = None,
    metrics_url: Annotated[
        Optional[str], typer.Option("--metrics-url", help="remote: its /metrics URL, to see its GPUs.")
    ] = None,
    ssl_root_cert: Annotated[
        Optional[Path],
        typer.Option("--ssl-root-cert", help="remote: PEM of the CA of the server's TLS certificate."),
    ] = None,
    ssl_client_cert: Annotated[
        Optional[Path], typer.Option("--ssl-client-cert", help="remote: PEM client certificate (mutual TLS).")
    ] = None,
    ssl_client_key: Annotated[
        Optional[Path], typer.Option("--ssl-client-key", help="remote: PEM key of --ssl-client-cert.")
    ] = None,
    header: Annotated[
        Optional[list[str]],
        typer.Option("--header", help="remote: KEY:VALUE sent with every call (repeatable)."),
    ] = None,
    # --- measurement (issue 7) ---
    load_generator: Annotated[
        str,
        typer.Option("--load-generator", help="builtin (asyncio, one process) or perf_analyzer (Triton's)."),
    ] = "builtin",
    protocol: Annotated[str, typer.Option(help="Protocol of the measured requests: grpc or http.")] = "grpc",
    request_rate: Annotated[
        Optional[str],
        typer.Option("--request-rate", help="Open loop: Poisson arrivals at these rates/s, e.g. 50,100,200."),
    ] = None,
    stop_rule: Annotated[
        str,
        typer.Option("--stop-rule", help="ci: stop a window once throughput and p99 are pinned; fixed."),
    ] = "ci",
    max_window_s: Annotated[
        Optional[float],
        typer.Option("--max-window-s", help="Longest window per level (default: max(8, 4 x --window-s))."),
    ] = None,
    throughput_ci: Annotated[
        float, typer.Option("--throughput-ci", help="ci: throughput known within this fraction (95%).")
    ] = 0.05,
    p99_ci: Annotated[
        float, typer.Option("--p99-ci", help="ci: p99 known within this fraction (95%).")
    ] = 0.10,
    max_memory_mb: Annotated[
        Optional[float],
        typer.Option("--max-memory-mb", help="Constraint: the server's process-tree RSS (MiB) under load."),
    ] = None,
) -> None:
    """Run (or resume) the Bayesian study and export the best configuration."""
    from optimizer.config.space import load_space
    from optimizer.measurement.builtin import MeasureSettings
    from optimizer.measurement.sweep import DEFAULT_LEVELS, parse_levels, parse_rates
    from optimizer.model.intake import parse_shape_args
    from optimizer.serving.targets import check_target_options, make_target, parse_headers
    from optimizer.study.progress import RichReporter, print_summary
    from optimizer.study.run import StudySettings, run_study
    from optimizer.study.storage import parse_cpus

    target_options = dict(
        triton_binary=triton_binary,
        backend_directory=backend_directory,
        docker_image_tag=docker_image_tag,
        url=url,
        metrics_url=metrics_url,
        ssl_root_cert=ssl_root_cert,
        ssl_client_cert=ssl_client_cert,
        ssl_client_key=ssl_client_key,
        headers=parse_headers(header or []),
    )
    check_target_options(target, **target_options)  # before any work: a stray --url is an error
    if request_rate and concurrency:
        from optimizer.errors import UsageError

        raise UsageError("give --concurrency (closed loop) or --request-rate (open loop), not both")
    server = None  # embedded: run_study's default
    if target != "embedded":
        gpu_space = target == "docker" and load_space(space or "cpu").device == "gpu"
        server = make_target(
            target,
            gpu_space=gpu_space,
            gpu_devices=gpus if target == "docker" else None,
            seed=seed,
            **target_options,
        )
    replayed = getattr(server, "surface", None)  # a recording answers for its own model and space only
    if replayed is not None and model is None:
        model, shape = (
            replayed.model_path(),
            shape or [f"{n}:{','.join(map(str, d))}" for n, d in replayed.shapes.items()],
        )
    if space is None:
        space = str(replayed.space_path) if replayed is not None else "cpu"
    settings = StudySettings(
        model_path=model,
        budget=budget,
        latency_budget_ms=latency_budget_ms,
        space=space,
        study_name=study_name,
        storage=storage,
        shapes=parse_shape_args(shape or []),
        concurrency=parse_levels(concurrency) if concurrency else DEFAULT_LEVELS,
        seed=seed,
        sampler=sampler,
        warm_start=warm_start,
        measure=MeasureSettings(
            warmup_s=warmup_s,
            window_s=window_s,
            min_requests=30,
            max_window_s=max_window_s if max_window_s is not None else max(8.0, 4 * window_s),
            rule=stop_rule,
            throughput_ci=throughput_ci,
            p99_ci=p99_ci,
        ),
        input_data=input_data,
        accuracy_tolerance=accuracy_tolerance,
        allow_shared_host=allow_shared_host,
        cpus=parse_cpus(cpus) if cpus else frozenset(),
        gpus=gpus,
        load_generator=load_generator,
        protocol=protocol,
        request_rates=parse_rates(request_rate) if request_rate else (),
        max_memory_mb=max_memory_mb,
    )
    try:
        with RichReporter() as reporter:
            summary = run_study(settings, reporter, target=server)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: finished trials are kept; rerun the same command to resume") from None
    print_summary(summary)
    _write_study_report(summary)
    if summary.best is None:
        raise _no_feasible(summary)


def _no_feasible(summary) -> OptimizeError:
    from optimizer.errors import StudyError

    return StudyError(
        f"no configuration met the {summary.latency_budget_ms:g} ms latency budget in {summary.finished} trials: "
        "raise --latency-budget-ms (with a new --study-name) or widen the space"
    )


@app.command()
def export(
    study_name: Annotated[str, typer.Option("--study-name", help="The study to export from.")],
    out: Annotated[Path, typer.Option("--out", help="Directory of the model repository to write.")],
    trial: Annotated[Optional[int], typer.Option(help="Trial number (default: the best feasible).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL.")] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="triton: the model repository; azureml / kserve: the repository under OUT/models "
            "plus deployment manifests.",
        ),
    ] = "triton",
) -> None:
    """Write a trial's config and model file as a Triton model repository (and deployment manifests)."""
    from optimizer.output.deploy import export_deployment

    deployment = export_deployment(study_name, out, fmt=fmt, trial=trial, storage=storage)
    typer.echo(f"wrote {deployment.model_dir}")
    for manifest in deployment.manifests:
        typer.echo(f"wrote {manifest}")


@app.command()
def serve(
    repo: Annotated[
        Optional[Path],
        typer.Argument(help="A model repository (e.g. studies/NAME/best) or one model's directory."),
    ] = None,
    study_name: Annotated[
        Optional[str], typer.Option("--study-name", help="Serve a trial of this study.")
    ] = None,
    trial: Annotated[Optional[int], typer.Option(help="Trial number (default: the best feasible).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL of the study.")] = None,
    model: Annotated[
        Optional[list[str]], typer.Option("--model", help="Model to load (repeatable; default: all).")
    ] = None,
    http_port: Annotated[int, typer.Option("--http-port", min=1, max=65535, help="HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option("--grpc-port", min=1, max=65535, help="gRPC port.")] = 8001,
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", min=1, max=65535, help="Metrics port.")
    ] = 8002,
    host: Annotated[
        str, typer.Option(help="Address to listen on; beyond loopback, any client can load models.")
    ] = "127.0.0.1",
    shape: ShapeOption = None,
) -> None:
    """Serve a model repository (or a study's trial) on the embedded Triton until Ctrl-C."""
    from optimizer.errors import UsageError
    from optimizer.model.intake import parse_shape_args
    from optimizer.output.serve import serve_repository, serve_study

    if (repo is None) == (study_name is None):
        raise UsageError("give a model repository REPO or --study-name NAME (one of them)")
    if study_name is None and (trial is not None or storage is not None):
        raise UsageError("--trial and --storage choose a trial of a study: use them with --study-name")
    shapes = parse_shape_args(shape or [])
    if study_name is not None:
        serve_study(
            study_name,
            trial=trial,
            storage=storage,
            models=model,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            shapes=shapes,
            announce=typer.echo,
        )
    elif repo is not None:
        serve_repository(
            repo,
            models=model,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            shapes=shapes,
            announce=typer.echo,
        )


def _write_study_report(summary) -> None:
    """Write the study's report; a failure here is a warning, never a lost study."""
    try:
        import optuna

        from optimizer.paths import studies_dir
        from optimizer.report import write_report
        from optimizer.study.storage import open_storage

        study = optuna.load_study(study_name=summary.study_name, storage=open_storage(summary.storage_url))
        out = studies_dir() / summary.study_name / "report"
        paths = write_report(study, out, repository=summary.best_repository)
        typer.echo(f"report: {paths.html} (every trial: {paths.csv})")
    except Exception as exc:  # the study is safe in its database: say so and go on
        typer.echo(
            f"warning: could not write the report ({type(exc).__name__}: {exc}); "
            f"run optimize report --study-name {summary.study_name} later",
            err=True,
        )


@app.command()
def report(
    study_name: Annotated[str, typer.Option("--study-name", help="The study to report on.")],
    storage: Annotated[
        Optional[str], typer.Option(help="Optuna storage URL (default sqlite:///studies/NAME.db).")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Report directory (default studies/NAME/report).")
    ] = None,
) -> None:
    """Write the HTML report (opens offline) and the CSV of every trial of a study."""
    from optimizer.errors import StudyError
    from optimizer.paths import studies_dir
    from optimizer.report import write_report
    from optimizer.report.source import load_stored_study
    from optimizer.study.storage import count_finished

    study = load_stored_study(study_name, storage)
    if count_finished(study) == 0:
        raise StudyError(
            f"study {study_name!r} has no finished trial yet: run optimize study --study-name {study_name}"
        )
    paths = write_report(study, out or studies_dir() / study_name / "report")
    typer.echo(f"wrote {paths.html}")
    typer.echo(f"wrote {paths.csv}")


@app.command()
def dashboard(
    study_name: Annotated[
        Optional[str], typer.Option("--study-name", help="Open this study (studies/NAME.db).")
    ] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (all of its studies).")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    host: Annotated[
        str, typer.Option(help="Address to listen on; other than loopback, anyone can reach it.")
    ] = "127.0.0.1",
) -> None:
    """Start optuna-dashboard on a study's storage and print its URL; Ctrl-C stops it."""
    from optimizer.report.dashboard import serve_dashboard
    from optimizer.report.source import storage_url_for

    url = storage_url_for(study_name, storage)
    serve_dashboard(
        url,
        host=host,
        port=port,
        study_name=study_name,
        announce=lambda link: typer.echo(f"optuna-dashboard: {link} (Ctrl-C to stop)"),
    )
    typer.echo("dashboard stopped")


@app.command()
def migrate(
    from_url: Annotated[str, typer.Option("--from", help="Storage URL to copy the study from.")],
    to_url: Annotated[str, typer.Option("--to", help="Storage URL to copy it into (e.g. postgresql://...).")],
    study_name: Annotated[
        Optional[str], typer.Option("--study-name", help="Default: the only study there.")
    ] = None,
) -> None:
    """Copy a study between storages, e.g. a laptop's SQLite study into the team's PostgreSQL."""
    from optimizer.study.storage import copy_study

    name = copy_study(from_url, to_url, study_name)
    typer.echo(f"copied study {name!r}")


@app.command()
def doctor() -> None:
    """Check what this machine can do: targets, execution providers, GPUs, perf_analyzer (with fixes)."""
    from optimizer.doctor import format_check, run_checks

    for check in run_checks():
        for line in format_check(check):
            typer.echo(line)


def _install_sigterm_handler() -> None:
    # SIGTERM (e.g. from a job scheduler) unwinds like Ctrl-C, so servers stop and trials are closed.
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _install_thread_excepthook() -> None:
    # A background thread's failure (e.g. Optuna's heartbeat when the database goes away) is reported
    # by the main thread in its own words; without --debug, keep the thread's traceback off the screen.
    def hook(args: threading.ExceptHookArgs) -> None:
        if _state["debug"]:
            threading.__excepthook__(args)
            return
        first = (str(args.exc_value).strip().splitlines() or [""])[0][:200]
        thread = args.thread.name if args.thread else "a background thread"
        typer.echo(f"warning: {thread} failed: {args.exc_type.__name__}: {first}", err=True)

    threading.excepthook = hook


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning our errors into one line and an exit code."""
    _install_sigterm_handler()
    _install_thread_excepthook()
    args = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = False
    if "--debug" in args:  # accepted anywhere on the line, not only before the command
        args.remove("--debug")
        _state["debug"] = True
    try:
        app(args=args, prog_name="optimize")  # Typer prints its own usage errors and exits
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OptimizeError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"Error: {exc.message}", err=True)
        return exc.exit_code
    except Exception as exc:  # a bug or an unexpected environment: still one line unless --debug
        if _state["debug"]:
            raise
        typer.echo(
            f"Error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
