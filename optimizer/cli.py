"""The ``optimize`` command line.

Only ``main()`` turns errors into exit codes: an :class:`OptimizeError` (and a usage error of the parser)
prints one ``Error: …`` line and exits with its code; an unexpected exception is a bug: its traceback is
saved to a file whose path is printed, and it exits with :data:`BUG_EXIT_CODE`. ``--debug`` (anywhere on
the line) shows tracebacks instead. Heavy imports (optuna, onnx, tritonclient) happen inside the
commands, so ``optimize --help`` stays fast.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from optimizer.config.space import parse_starting_points
from optimizer.errors import OptimizeError, StudyError, UsageError
from optimizer.measurement.levels import DEFAULT_MAX_WINDOW_S, Engine, MeasureSettings, Protocol, StopRule
from optimizer.model.convert import Exporter
from optimizer.output.formats import ExportFormat
from optimizer.paths import cache_dir, studies_dir
from optimizer.study.settings import CrossCheckEngine, Sampler, SearchSettings

# Exit codes besides those of the OptimizeError subclasses (errors.py) and the parser's usage errors (2).
BUG_EXIT_CODE = 70  # EX_SOFTWARE: an unexpected exception, i.e. a bug in optimize
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C or SIGTERM

# Typer carries its own copy of click and exports only BadParameter; the parser's errors share its base.
_ClickException: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class Interrupted(OptimizeError):
    exit_code = INTERRUPTED_EXIT_CODE


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find the best Triton Inference Server configuration for an ONNX model.",
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

MODEL, SEARCH, MEASUREMENT, TARGET, SCALE_OUT = "Model", "Search", "Measurement", "Target", "Scale-out"
_DEFAULT_MEASURE = MeasureSettings()
TARGET_CHOICES = "embedded|local|docker|remote|replay:DIR"


StorageOption = Annotated[
    Optional[str], typer.Option(help="Optuna storage URL of the study (default sqlite:///studies/NAME.db).")
]
ShapeOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--shape",
        help="Shape of a dynamic input without the batch dim, NAME:D1,D2 (repeatable; with several --model, "
        "MODEL.NAME:D1,D2).",
        rich_help_panel=MODEL,
    ),
]


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show tracebacks instead of one-line errors (anywhere on the line)."),
    ] = False,
) -> None:
    _state["debug"] = debug


def _target_kind(value: str) -> str:
    """``--target``'s parser: a known kind (``replay`` takes ``:DIR``), checked before any work."""
    kind = value.partition(":")[0]
    if kind not in TARGET_CHOICES.replace(":DIR", "").split("|"):
        raise typer.BadParameter(f"{value!r} is not one of {TARGET_CHOICES.replace('|', ', ')}")
    return value


@app.command()
def convert(
    module: Annotated[
        str,
        typer.Argument(
            help="file.py:make_model, package.module:make_model, or a TorchScript / saved .pt file."
        ),
    ],
    input_spec: Annotated[
        list[str],
        typer.Option(
            "--input", help="NAME:D1,D2[:DTYPE] for each forward() argument, in order; dims of one sample."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The ONNX file to write.")] = Path("model.onnx"),
    exporter: Annotated[Exporter, typer.Option(help="PyTorch's exporter.")] = Exporter.dynamo,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's).")] = None,
) -> None:
    """Export a PyTorch module to ONNX with a dynamic batch, checked against PyTorch: the way into a study."""
    from optimizer.model.convert import convert_module, load_module, parse_inputs

    result = convert_module(
        load_module(module), parse_inputs(input_spec), out, exporter=exporter.value, opset=opset
    )
    typer.echo(
        f"wrote {result.path} ({result.exporter} exporter; inputs {', '.join(result.inputs)}; outputs "
        f"{', '.join(result.outputs)}; dynamic batch; ONNX Runtime within {result.max_abs_difference:.2g} of PyTorch)"
    )
    typer.echo(f"next: optimize study --model {result.path}")


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
    ctx: typer.Context,
    models: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--model",
            help="ONNX model (default: the bundled example); repeat it to tune several models together on "
            "one server (an ensemble's directory counts as one).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    traffic: Annotated[
        Optional[str],
        typer.Option(
            "--traffic",
            help="Several --model: each model's share of the requests, NAME=WEIGHT,... (default equal).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    models_file: Annotated[
        Optional[Path],
        typer.Option(
            "--models",
            help="Tune several models together on one server: a YAML file naming each model, its shapes, "
            "traffic share and latency budget.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    budget: Annotated[
        int, typer.Option(help="Total number of trials in the study.", rich_help_panel=SEARCH)
    ] = 40,
    latency_budget_ms: Annotated[
        Optional[str],
        typer.Option(
            "--latency-budget-ms",
            help="p99 latency budget in ms (default: 10x baseline p99); several --model: one number for "
            "all, or NAME=MS,...",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    space: Annotated[
        Optional[str],
        typer.Option(
            help="Search space: a name under spaces/ or a YAML path (default cpu; replay: its own).",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    study_name: Annotated[
        Optional[str],
        typer.Option("--study-name", help="Default: the model's file name.", rich_help_panel=SEARCH),
    ] = None,
    storage: Annotated[
        Optional[str],
        typer.Option(
            help="Optuna storage URL (default sqlite:///studies/NAME.db).", rich_help_panel=SCALE_OUT
        ),
    ] = None,
    shape: ShapeOption = None,
    input_data: Annotated[
        Optional[Path],
        typer.Option(
            "--input-data", help=".npz with one array per input (samples on axis 0).", rich_help_panel=MODEL
        ),
    ] = None,
    accuracy_tolerance: Annotated[
        float,
        typer.Option(
            "--accuracy-tolerance",
            help="Max 1 - cosine similarity of a fp16/int8 variant vs fp32.",
            rich_help_panel=MODEL,
        ),
    ] = 0.01,
    concurrency: Annotated[
        Optional[str], typer.Option(help="Concurrency levels, e.g. 1,2,4,8,16.", rich_help_panel=MEASUREMENT)
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampler seed.", rich_help_panel=SEARCH)] = None,
    sampler: Annotated[
        Sampler,
        typer.Option(
            help="tpe (Bayesian), random, or grid (every point of a space of listed values).",
            rich_help_panel=SEARCH,
        ),
    ] = Sampler.tpe,
    confirm: Annotated[
        int,
        typer.Option(
            min=0,
            help="Re-measure the top N configs side by side before exporting; export the best mean (0: off).",
            rich_help_panel=SEARCH,
        ),
    ] = SearchSettings().confirm_finalists,
    starting_points: Annotated[
        str,
        typer.Option(
            "--starting-points",
            help=(
                "Configs measured right after the baseline, comma-separated: variants (a batching config "
                "per provider x precision), batching, batching-lowp; 'none' for none."
            ),
            rich_help_panel=SEARCH,
        ),
    ] = ",".join(SearchSettings().starting_points) or "none",
    warm_start: Annotated[
        Optional[str],
        typer.Option(
            "--warm-start",
            help="A finished study of this model: its best configs are measured first.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    window_s: Annotated[
        float,
        typer.Option(
            "--window-s",
            help="Seconds measured per level (fixed rule) or the shortest window (ci).",
            rich_help_panel=MEASUREMENT,
        ),
    ] = _DEFAULT_MEASURE.window_s,
    warmup_s: Annotated[
        float,
        typer.Option(
            "--warmup-s",
            help="Longest warm-up per level; it ends sooner once the completion rate settles.",
            rich_help_panel=MEASUREMENT,
        ),
    ] = _DEFAULT_MEASURE.warmup_s,
    screen_s: Annotated[
        float,
        typer.Option(
            "--screen-s",
            help="Screening window per level; full windows only where the answer is (0: every level full).",
            rich_help_panel=MEASUREMENT,
        ),
    ] = _DEFAULT_MEASURE.screen_s,
    allow_shared_host: Annotated[
        bool,
        typer.Option(
            "--allow-shared-host",
            help="Let another worker of this study measure on this machine.",
            rich_help_panel=SCALE_OUT,
        ),
    ] = False,
    cpus: Annotated[
        Optional[str],
        typer.Option(help="Pin this worker and its server to cores, e.g. 0-3.", rich_help_panel=SCALE_OUT),
    ] = None,
    gpus: Annotated[
        Optional[str],
        typer.Option(help="GPUs this worker's server may use, e.g. 0,1.", rich_help_panel=SCALE_OUT),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="Triton to tune: embedded (bundled), local (--triton-binary), docker, remote (--url), "
            "or replay:DIR (a recorded surface, no server).",
            parser=_target_kind,
            metavar=f"[{TARGET_CHOICES}]",
            rich_help_panel=TARGET,
        ),
    ] = "embedded",
    triton_binary: Annotated[
        Optional[Path],
        typer.Option(
            "--triton-binary",
            help="local: tritonserver to run (default: the one on PATH).",
            rich_help_panel=TARGET,
        ),
    ] = None,
    backend_directory: Annotated[
        Optional[Path],
        typer.Option(
            "--backend-directory",
            help="local: its backends (default: next to its bin/).",
            rich_help_panel=TARGET,
        ),
    ] = None,
    docker_image_tag: Annotated[
        Optional[str],
        typer.Option(
            "--docker-image-tag",
            help="docker: nvcr.io/nvidia/tritonserver:TAG-py3 (24.10).",
            rich_help_panel=TARGET,
        ),
    ] = None,
    url: Annotated[
        Optional[str],
        typer.Option(help="remote: HOST:PORT of the server's gRPC endpoint.", rich_help_panel=TARGET),
    ] = None,
    metrics_url: Annotated[
        Optional[str],
        typer.Option(
            "--metrics-url", help="remote: its /metrics URL, to see its GPUs.", rich_help_panel=TARGET
        ),
    ] = None,
    ssl_root_cert: Annotated[
        Optional[Path],
        typer.Option(
            "--ssl-root-cert",
            help="remote: PEM of the CA of the server's TLS certificate.",
            rich_help_panel=TARGET,
        ),
    ] = None,
    ssl_client_cert: Annotated[
        Optional[Path],
        typer.Option(
            "--ssl-client-cert", help="remote: PEM client certificate (mutual TLS).", rich_help_panel=TARGET
        ),
    ] = None,
    ssl_client_key: Annotated[
        Optional[Path],
        typer.Option(
            "--ssl-client-key", help="remote: PEM key of --ssl-client-cert.", rich_help_panel=TARGET
        ),
    ] = None,
    header: Annotated[
        Optional[list[str]],
        typer.Option(
            "--header", help="remote: KEY:VALUE sent with every call (repeatable).", rich_help_panel=TARGET
        ),
    ] = None,
    load_generator: Annotated[
        Engine,
        typer.Option(
            "--load-generator",
            help="builtin (asyncio, one process) or perf_analyzer (Triton's).",
            rich_help_panel=MEASUREMENT,
        ),
    ] = Engine.builtin,
    confirm_with: Annotated[
        Optional[CrossCheckEngine],
        typer.Option(
            "--confirm-with",
            help="Also measure the baseline and the best with perf_analyzer; flag a difference over 10%.",
            rich_help_panel=MEASUREMENT,
        ),
    ] = None,
    protocol: Annotated[
        Protocol, typer.Option(help="Protocol of the measured requests.", rich_help_panel=MEASUREMENT)
    ] = Protocol.grpc,
    request_rate: Annotated[
        Optional[str],
        typer.Option(
            "--request-rate",
            help="Open loop: Poisson arrivals at these rates/s, e.g. 50,100,200.",
            rich_help_panel=MEASUREMENT,
        ),
    ] = None,
    stop_rule: Annotated[
        StopRule,
        typer.Option(
            "--stop-rule",
            help="ci: stop a window once throughput and p99 are pinned; fixed: --window-s.",
            rich_help_panel=MEASUREMENT,
        ),
    ] = StopRule.ci,
    max_window_s: Annotated[
        Optional[float],
        typer.Option(
            "--max-window-s",
            help=f"Longest window per level (default: max({DEFAULT_MAX_WINDOW_S:g}, 4 x --window-s)).",
            rich_help_panel=MEASUREMENT,
        ),
    ] = None,
    throughput_ci: Annotated[
        float,
        typer.Option(
            "--throughput-ci",
            help="ci: throughput known within this fraction (95%).",
            rich_help_panel=MEASUREMENT,
        ),
    ] = _DEFAULT_MEASURE.throughput_ci,
    p99_ci: Annotated[
        float,
        typer.Option(
            "--p99-ci", help="ci: p99 known within this fraction (95%).", rich_help_panel=MEASUREMENT
        ),
    ] = _DEFAULT_MEASURE.p99_ci,
    max_memory_mb: Annotated[
        Optional[float],
        typer.Option(
            "--max-memory-mb",
            help="Constraint: the server's process-tree RSS (MiB) under load.",
            rich_help_panel=MEASUREMENT,
        ),
    ] = None,
) -> None:
    """Run (or resume) the Bayesian study and export the best configuration."""
    model = models[0] if models else None
    from optimizer.config.space import load_space
    from optimizer.measurement.joint_replay import JointReplayTarget
    from optimizer.measurement.replay import ReplayTarget
    from optimizer.measurement.sweep import DEFAULT_LEVELS, parse_levels, parse_rates
    from optimizer.model.intake import parse_shape_args
    from optimizer.study.progress import RichReporter, print_summary
    from optimizer.study.run import run_study
    from optimizer.study.settings import StudySettings
    from optimizer.study.storage import parse_cpus
    from optimizer.study.targets import check_target_options, make_target, parse_headers

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
    joint_recording = isinstance(server, JointReplayTarget)
    if traffic is not None and not joint_recording and models_file is None and len(models or []) < 2:
        raise UsageError("--traffic splits the load between several models: give --model twice or more")
    if joint_recording or models_file is not None or len(models or []) > 1 or _one_ensemble(models):
        _refuse_single_model_options(ctx)
        if isinstance(server, ReplayTarget):
            raise UsageError(
                "this recording (--target replay:) is of one model: tune several models on a server, or "
                "replay a joint recording (bench/record_joint_surface.py)"
            )
        if isinstance(server, JointReplayTarget):
            given = {"--model": models, "--models": models_file, "--shape": shape, "--input-data": input_data}
            entries = _replayed_models(server, given, traffic, latency_budget_ms)
            space = space or str(server.surface.space_path)
        else:
            entries = _several_models(
                models_file, models or [], traffic, latency_budget_ms, shape, input_data
            )
        scale_out = {
            "allow_shared_host": allow_shared_host,
            "cpus": parse_cpus(cpus) if cpus else frozenset(),
        }
        scale_out["accuracy_tolerance"] = accuracy_tolerance
        window = {"window_s": window_s, "warmup_s": warmup_s}
        given_window = {name: value for name, value in window.items() if _given(ctx, name)}
        _joint_study(
            entries, budget, space or "cpu", study_name, storage, seed, given_window, scale_out, server
        )
        return
    # A recording answers for its own model and space only.
    replayed = server.surface if isinstance(server, ReplayTarget) else None
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
        latency_budget_ms=_one_budget(latency_budget_ms),
        space=space,
        study_name=study_name,
        storage=storage,
        shapes=parse_shape_args(shape or []),
        concurrency=parse_levels(concurrency) if concurrency else DEFAULT_LEVELS,
        seed=seed,
        sampler=sampler.value,
        search=SearchSettings(
            confirm_finalists=confirm, starting_points=parse_starting_points(starting_points)
        ),
        warm_start=warm_start,
        measure=MeasureSettings.with_window(
            window_s,
            max_window_s,
            warmup_s=warmup_s,
            screen_s=screen_s,
            rule=stop_rule.value,
            throughput_ci=throughput_ci,
            p99_ci=p99_ci,
        ),
        input_data=input_data,
        accuracy_tolerance=accuracy_tolerance,
        allow_shared_host=allow_shared_host,
        cpus=parse_cpus(cpus) if cpus else frozenset(),
        gpus=gpus,
        load_generator=load_generator.value,
        confirm_with=confirm_with.value if confirm_with else None,
        protocol=protocol.value,
        request_rates=parse_rates(request_rate) if request_rate else (),
        max_memory_mb=max_memory_mb,
    )
    try:
        with RichReporter() as reporter:
            summary = run_study(settings, reporter, target=server)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: finished trials are kept; rerun the same command to resume") from None
    print_summary(summary)
    _write_study_report(summary.study_name, summary.storage_url, summary.best_repository)
    if summary.best is None:
        raise _no_feasible(summary)


def _one_ensemble(models: list[Path] | None) -> bool:
    """One --model that is an ensemble: tuned as its steps, by the joint study."""
    from optimizer.model.ensemble import is_ensemble_path

    return len(models or []) == 1 and is_ensemble_path(models[0])  # type: ignore[index]


# One model's study options a joint study does not take (it measures shared fixed windows at 1, 2, 4, 8
# clients per model): refused when given, never silently ignored.
SINGLE_MODEL_OPTIONS = (
    "concurrency",
    "request_rate",
    "sampler",
    "confirm",
    "starting_points",
    "warm_start",
    "screen_s",
    "gpus",
    "load_generator",
    "confirm_with",
    "protocol",
    "stop_rule",
    "max_window_s",
    "throughput_ci",
    "p99_ci",
    "max_memory_mb",
)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set option ``name`` (on the command line or through its environment variable),
    whatever its value: a value equal to the default counts as given."""
    source = ctx.get_parameter_source(name)  # Click's ParameterSource (Typer vendors Click: read its name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _refuse_single_model_options(ctx: typer.Context) -> None:
    """Options of one model's study that a joint study does not take: refused when set, never ignored."""
    for name in SINGLE_MODEL_OPTIONS:
        if _given(ctx, name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} is an option of one model's study: several models are measured in shared fixed "
                "windows (--window-s, --warmup-s) at 1, 2, 4, 8 clients per model; drop it"
            )


def _several_models(
    models_file: Path | None,
    models: list[Path],
    traffic: str | None,
    budgets: str | None,
    shape: list[str] | None,
    input_data: Path | None,
):
    """The models of a joint study: from ``--models FILE``, or from ``--model`` given twice or more."""
    from optimizer.model.intake import parse_shape_args
    from optimizer.study.mix import load_models_file, models_from_flags

    if models_file is None:
        if input_data is not None:
            raise UsageError("give each model's --input-data in a models file (--models FILE)")
        return models_from_flags(models, parse_shape_args(shape or []), traffic, budgets)
    given = {
        "--model": models,
        "--traffic": traffic,
        "--shape": shape,
        "--input-data": input_data,
        "--latency-budget-ms": budgets,
    }
    stray = next((flag for flag, value in given.items() if value), None)
    if stray:
        raise UsageError(
            f"--models takes each model's path, shapes, input data and budget from the file: drop {stray}"
        )
    return load_models_file(models_file)


def _replayed_models(server, given: dict, traffic: str | None, budgets: str | None):
    """The models of a joint recording, in its traffic mix, each with its recorded budget unless given."""
    from optimizer.measurement.mixed import shares_of
    from optimizer.study.mix import models_from_flags

    surface = server.surface
    names = surface.model_names
    stray = next((flag for flag, value in given.items() if value), None)
    if stray:
        raise UsageError(
            f"a joint recording replays the models it recorded ({', '.join(names)}): drop {stray}"
        )
    shapes = {f"{name}.{tensor}": dims for name in names for tensor, dims in surface.shapes(name).items()}
    recorded_mix = ",".join(f"{name}={weight:g}" for name, weight in surface.traffic.items())
    entries = models_from_flags(
        [surface.model_path(name) for name in names], shapes, traffic or recorded_mix, budgets
    )
    server.check_traffic(shares_of({entry.name: entry.traffic for entry in entries}))
    recorded = surface.latency_budgets_ms
    return tuple(
        replace(entry, latency_budget_ms=recorded[entry.name]) if entry.latency_budget_ms is None else entry
        for entry in entries
    )


def _one_budget(text: str | None) -> float | None:
    """One model's ``--latency-budget-ms`` (checked for being positive with the other settings)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            f"--latency-budget-ms must be a positive number of milliseconds, got {text!r}"
        ) from None


def _joint_study(
    entries,
    budget: int,
    space: str,
    study_name: str | None,
    storage: str | None,
    seed: int | None,
    window: dict[str, float],
    scale_out: dict,
    server=None,
) -> None:
    """``optimize study --models FILE`` (or ``--model`` twice): the models tuned together, the best joint
    config exported.

    Every model is measured in one fixed window per level (they must overlap); ``window`` holds the
    ``window_s`` and ``warmup_s`` the user gave, which replace the joint study's own (the window extends
    to 3x while a model has too few requests).
    ``scale_out``: ``allow_shared_host``, ``cpus`` and ``accuracy_tolerance``, as for one model;
    ``server``: the ``--target`` (None: the embedded Triton).
    """
    from optimizer.study.joint import JOINT_MEASURE, JointSettings, run_joint_study
    from optimizer.study.progress import RichReporter, print_joint_summary

    measure = JOINT_MEASURE
    if "window_s" in window:
        measure = replace(measure, window_s=window["window_s"], max_window_s=3 * window["window_s"])
    if "warmup_s" in window:
        measure = replace(measure, warmup_s=window["warmup_s"])
    settings = JointSettings(
        models=entries,
        budget=budget,
        space=space,
        study_name=study_name,
        storage=storage,
        seed=seed,
        measure=measure,
        **scale_out,
    )
    try:
        with RichReporter() as reporter:
            summary = run_joint_study(settings, reporter, target=server)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: finished trials are kept; rerun the same command to resume") from None
    print_joint_summary(summary)
    _write_study_report(summary.study_name, summary.storage_url, summary.repository)
    if summary.best_trial is None:
        raise StudyError(
            f"no joint configuration kept every model within its budget in {summary.finished} trials: "
            "raise the budgets (--latency-budget-ms, or the models file) with a new --study-name, or widen "
            "the space"
        )


def _no_feasible(summary) -> OptimizeError:
    return StudyError(
        f"no configuration met the {summary.latency_budget_ms:g} ms latency budget in {summary.finished} trials: "
        "raise --latency-budget-ms (with a new --study-name) or widen the space"
    )


@app.command()
def confirm(
    study_name: Annotated[str, typer.Option("--study-name", help="The finished study to cross-check.")],
    storage: StorageOption = None,
    engine: Annotated[
        CrossCheckEngine, typer.Option("--with", help="The load generator that measures beside ours.")
    ] = CrossCheckEngine.perf_analyzer,
    input_data: Annotated[
        Optional[Path], typer.Option("--input-data", help="The .npz the study was measured with, if any.")
    ] = None,
) -> None:
    """Measure a study's baseline and best with perf_analyzer beside the built-in generator."""
    from optimizer.study.progress import RichReporter, print_summary
    from optimizer.study.run import cross_check_study

    with RichReporter() as reporter:
        summary = cross_check_study(
            study_name, engine.value, reporter, storage=storage, input_data=input_data
        )
    print_summary(summary)
    _write_study_report(summary.study_name, summary.storage_url, summary.best_repository)


@app.command()
def export(
    study_name: Annotated[str, typer.Option("--study-name", help="The study to export from.")],
    out: Annotated[Path, typer.Option("--out", help="Directory of the model repository to write.")],
    trial: Annotated[Optional[int], typer.Option(help="Trial number (default: the best feasible).")] = None,
    storage: StorageOption = None,
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="triton: the model repository; azureml / kserve: the repository under OUT/models "
            "plus deployment manifests.",
        ),
    ] = ExportFormat.triton,
) -> None:
    """Write a trial's config and model file as a Triton model repository (and deployment manifests)."""
    from optimizer.output.deploy import export_deployment

    deployment = export_deployment(study_name, out, fmt=fmt.value, trial=trial, storage=storage)
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
    storage: StorageOption = None,
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


def _write_study_report(study_name: str, storage_url: str, repository: Path | None) -> None:
    """Write the study's report; a failure here is a warning, never a lost study."""
    try:
        import optuna

        from optimizer.report import write_report
        from optimizer.study.storage import open_storage

        study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
        out = studies_dir() / study_name / "report"
        paths = write_report(study, out, repository=repository)
        typer.echo(f"report: {paths.html} (every trial: {paths.csv})")
        _say_png(paths)
    except Exception as exc:  # the study is safe in its database: say so and go on
        typer.echo(
            f"warning: could not write the report ({type(exc).__name__}: {exc}); "
            f"run optimize report --study-name {study_name} later",
            err=True,
        )


@app.command()
def report(
    study_name: Annotated[str, typer.Option("--study-name", help="The study to report on.")],
    storage: StorageOption = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Report directory (default studies/NAME/report).")
    ] = None,
) -> None:
    """Write the HTML report (opens offline) and the CSV of every trial of a study."""
    from optimizer.report import write_report
    from optimizer.study.storage import count_finished, load_stored_study

    study = load_stored_study(study_name, storage)
    if count_finished(study) == 0:
        raise StudyError(
            f"study {study_name!r} has no finished trial yet: run optimize study --study-name {study_name}"
        )
    paths = write_report(study, out or studies_dir() / study_name / "report")
    typer.echo(f"wrote {paths.html}")
    typer.echo(f"wrote {paths.csv}")
    _say_png(paths)


def _say_png(paths) -> None:
    if paths.png is not None:
        typer.echo(f"pipeline figure: {paths.png}")
    elif paths.png_note:
        typer.echo(paths.png_note)


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
    from optimizer.study.storage import storage_url_for

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
    """Entry point: run the CLI, turning errors into one line and an exit code (see the README's table)."""
    _install_sigterm_handler()
    _install_thread_excepthook()
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:  # accepted anywhere on the line: move it where the root callback reads it
        args.remove("--debug")
        args.insert(0, "--debug")
    _state["debug"] = False
    try:
        code = app(args=args, prog_name="optimize", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except _ClickException as exc:  # the parser's own usage errors: bad choice, unknown option, ...
        message = exc.format_message()
        if message:  # empty when it already printed the help (no arguments)
            typer.echo(f"Error: {message}", err=True)
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("Error: interrupted", err=True)
        return INTERRUPTED_EXIT_CODE
    except OptimizeError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"Error: {exc.message}", err=True)
        return exc.exit_code
    except Exception as exc:  # a bug, or an environment nobody foresaw: say so, keep the traceback
        if _state["debug"]:
            raise
        report = _save_traceback(exc)
        typer.echo(
            f"Error: internal error {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
            f"- a bug in optimize; the traceback is in {report} (please attach it to an issue)",
            err=True,
        )
        return BUG_EXIT_CODE


def _save_traceback(exc: BaseException) -> Path:
    """Write ``exc``'s traceback to a file under the cache (``crashes/``); its path, or a note if that failed."""
    text = "".join(traceback.format_exception(exc))
    try:
        folder = cache_dir() / "crashes"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = folder / f"{stamp}-{os.getpid()}.txt"
        path.write_text(f"optimize {' '.join(sys.argv[1:])}\n\n{text}")
        return path
    except OSError:
        return Path("(unwritable cache: rerun with --debug)")


if __name__ == "__main__":
    sys.exit(main())
