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
import sys
import threading
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from optimizer import interrupts
from optimizer.errors import OptimizeError, StudyError, UsageError, disk_full, full_path, is_disk_full
from optimizer.measurement.levels import DEFAULT_MAX_WINDOW_S, Engine, MeasureSettings, Protocol, StopRule
from optimizer.model.convert import Exporter
from optimizer.output.formats import ExportFormat
from optimizer.paths import cache_dir, studies_dir
from optimizer.serving import TARGET_KINDS
from optimizer.study.settings import CrossCheckEngine, Sampler, SearchSettings, StudySettings

# Exit codes besides those of the OptimizeError subclasses (errors.py) and the parser's usage errors (2).
BUG_EXIT_CODE = 70  # EX_SOFTWARE: an unexpected exception, i.e. a bug in optimize
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C or SIGTERM

# Typer carries its own copy of click and exports only BadParameter; the parser's errors share its base.
_ClickException: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class Interrupted(OptimizeError):
    exit_code = INTERRUPTED_EXIT_CODE


app = typer.Typer(
    add_completion=True,  # --install-completion and --show-completion (bash, zsh, fish, PowerShell)
    no_args_is_help=True,
    help="Find the best Triton Inference Server configuration for an ONNX model.",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}

MODEL, SEARCH, MEASUREMENT, TARGET, SCALE_OUT = "Model", "Search", "Measurement", "Target", "Scale-out"
TARGET_CHOICES = "|".join(kind + (":DIR" if kind == "replay" else "") for kind in TARGET_KINDS)
# The study's defaults are the settings' (study/settings.py); the command line shows them as its choices.
_DEFAULT_SAMPLER = Sampler(StudySettings.sampler)
_DEFAULT_ENGINE = Engine(StudySettings.load_generator)
_DEFAULT_PROTOCOL = Protocol(StudySettings.protocol)
_DEFAULT_RULE = StopRule(MeasureSettings.rule)
_DEFAULT_STARTING_POINTS = ",".join(SearchSettings.starting_points) or "none"


# The plan's traffic options, shared by `plan` and `export` (output/plan.py sizes both).
AverageRpsOption = Annotated[
    Optional[float],
    typer.Option(
        "--average-rps", help="Traffic on average: the servers an autoscaler keeps at least, and the cost."
    ),
]
HeadroomOption = Annotated[
    float, typer.Option(help="Share of each server's measured throughput kept spare (0.3: plan at 70%).")
]
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
OneModelShapeOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--shape",
        help="Shape of a dynamic input without the batch dim, NAME:D1,D2 (repeatable).",
        rich_help_panel=MODEL,
    ),
]


def _print_version(asked: bool) -> None:
    if asked:
        from optimizer.serving.bundle_version import bundled_triton

        typer.echo(f"optimize {_package_version()}; {bundled_triton()}")
        raise typer.Exit()


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("optimize")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show tracebacks instead of one-line errors (anywhere on the line)."),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print optimize's version and the bundled Triton's, and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    _state["debug"] = debug


def _target_kind(value: str) -> str:
    """``--target``'s parser: a known kind (``replay`` takes ``:DIR``), checked before any work."""
    kind = value.partition(":")[0]
    if kind not in TARGET_KINDS:
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
    model: Annotated[
        Optional[Path], typer.Argument(help="The ONNX model file (default: the bundled example).")
    ] = None,
    shape: OneModelShapeOption = None,
) -> None:
    """Show a model's inputs and outputs, its batch dimension and the shapes a study would send."""
    from rich.markup import escape
    from rich.table import Table

    from optimizer.model import examples
    from optimizer.model.intake import inspect_model, parse_shape_args, resolve_shapes
    from optimizer.study.progress import readable_console

    bundled = cache_dir() / "examples"
    path = model or examples.example_model(bundled)
    info = inspect_model(path, cache=cache_dir())
    given = {**examples.example_shapes(path, bundled), **parse_shape_args(shape or [])}
    console = readable_console()
    table = Table(title=f"{info.source_path}  (opset {info.opset}, sha256 {info.sha256[:12]})")
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


# The options of `optimize study`, each declared once; the study reads them through study/options.py.
_Model = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--model",
        help="ONNX model (default: the bundled example); repeat it to tune several models together on "
        "one server (an ensemble's directory counts as one).",
        rich_help_panel=MODEL,
    ),
]
_Traffic = Annotated[
    Optional[str],
    typer.Option(
        "--traffic",
        help="Several --model: each model's share of the requests, NAME=WEIGHT,... (default equal).",
        rich_help_panel=MODEL,
    ),
]
_ModelsFile = Annotated[
    Optional[Path],
    typer.Option(
        "--models",
        help="Tune several models together on one server: a YAML file naming each model, its shapes, "
        "traffic share and latency budget.",
        rich_help_panel=MODEL,
    ),
]
_Budget = Annotated[int, typer.Option(help="Total number of trials in the study.", rich_help_panel=SEARCH)]
_LatencyBudgetMs = Annotated[
    Optional[str],
    typer.Option(
        "--latency-budget-ms",
        help="p99 latency budget in ms (default: 10x baseline p99); several --model: one number for "
        "all, or NAME=MS,...",
        rich_help_panel=SEARCH,
    ),
]
_Space = Annotated[
    Optional[str],
    typer.Option(
        help="Search space: a name under spaces/ or a YAML path (default cpu; replay: its own).",
        rich_help_panel=SEARCH,
    ),
]
_StudyName = Annotated[
    Optional[str],
    typer.Option("--study-name", help="Default: the model's file name.", rich_help_panel=SEARCH),
]
_Storage = Annotated[
    Optional[str],
    typer.Option(help="Optuna storage URL (default sqlite:///studies/NAME.db).", rich_help_panel=SCALE_OUT),
]
_InputData = Annotated[
    Optional[Path],
    typer.Option(
        "--input-data", help=".npz with one array per input (samples on axis 0).", rich_help_panel=MODEL
    ),
]
_AccuracyTolerance = Annotated[
    float,
    typer.Option(
        "--accuracy-tolerance",
        help="Max 1 - cosine similarity of a fp16/int8 variant vs fp32.",
        rich_help_panel=MODEL,
    ),
]
_AccuracyData = Annotated[
    Optional[Path],
    typer.Option(
        "--accuracy-data",
        help=".npz the accuracy metrics run on: one array per input (samples on axis 0), labels under other "
        "names.",
        rich_help_panel=MODEL,
    ),
]
_AccuracyMetric = Annotated[
    Optional[list[str]],
    typer.Option(
        "--accuracy-metric",
        help="top1_agreement, top1_accuracy, squad_exact_match, squad_f1, pooled_cosine, max_abs_error, or "
        "module:function (repeatable).",
        rich_help_panel=MODEL,
    ),
]
_AccuracyGoal = Annotated[
    Optional[list[str]],
    typer.Option(
        "--accuracy-goal",
        help="NAME>=0.99 (a floor) or NAME>=-1% / NAME>=fp32-0.5 (at most that far below fp32); decides "
        "instead of --accuracy-tolerance (repeatable).",
        rich_help_panel=MODEL,
    ),
]
_Concurrency = Annotated[
    Optional[str],
    typer.Option(
        help="Concurrency levels, e.g. 1,2,4,8,16 (default 1,2,4,8,16,32,64; several models: 1,2,4,8 each).",
        rich_help_panel=MEASUREMENT,
    ),
]
_Seed = Annotated[Optional[int], typer.Option(help="Sampler seed.", rich_help_panel=SEARCH)]
_Sampler = Annotated[
    Sampler,
    typer.Option(
        help="tpe (Bayesian), random, or grid (every point of a space of listed values).",
        rich_help_panel=SEARCH,
    ),
]
_Confirm = Annotated[
    int,
    typer.Option(
        min=0,
        help="Re-measure the top N configs side by side before exporting; export the best mean (0: off).",
        rich_help_panel=SEARCH,
    ),
]
_StartingPoints = Annotated[
    str,
    typer.Option(
        "--starting-points",
        help=(
            "Configs measured right after the baseline, comma-separated: variants (a batching config "
            "per provider x precision), batching, batching-lowp; 'none' for none."
        ),
        rich_help_panel=SEARCH,
    ),
]
_WarmStart = Annotated[
    Optional[str],
    typer.Option(
        "--warm-start",
        help="A finished study of this model: its best configs are measured first.",
        rich_help_panel=SEARCH,
    ),
]
_WindowS = Annotated[
    float,
    typer.Option(
        "--window-s",
        help="Seconds measured per level (fixed rule) or the shortest window (ci).",
        rich_help_panel=MEASUREMENT,
    ),
]
_WarmupS = Annotated[
    float,
    typer.Option(
        "--warmup-s",
        help="Longest warm-up per level; it ends sooner once the completion rate settles.",
        rich_help_panel=MEASUREMENT,
    ),
]
_ScreenS = Annotated[
    float,
    typer.Option(
        "--screen-s",
        help="Screening window per level; full windows only where the answer is (0: every level full).",
        rich_help_panel=MEASUREMENT,
    ),
]
_AllowSharedHost = Annotated[
    bool,
    typer.Option(
        "--allow-shared-host",
        help="Let another worker of this study measure on this machine.",
        rich_help_panel=SCALE_OUT,
    ),
]
_StorageWaitS = Annotated[
    float,
    typer.Option(
        "--storage-wait-s",
        min=0,
        help="How long a worker waits for a database server that went away (a restart) before it stops.",
        rich_help_panel=SCALE_OUT,
    ),
]
_Cpus = Annotated[
    Optional[str],
    typer.Option(help="Pin this worker and its server to cores, e.g. 0-3.", rich_help_panel=SCALE_OUT),
]
_Gpus = Annotated[
    Optional[str],
    typer.Option(help="GPUs this worker's server may use, e.g. 0,1.", rich_help_panel=SCALE_OUT),
]
_Target = Annotated[
    str,
    typer.Option(
        help="Triton to tune: embedded (bundled), local (--triton-binary), docker, remote (--url), "
        "or replay:DIR (a recorded surface, no server).",
        parser=_target_kind,
        metavar=f"[{TARGET_CHOICES}]",
        rich_help_panel=TARGET,
    ),
]
_MemoryLimitMb = Annotated[
    Optional[float],
    typer.Option(
        "--memory-limit-mb",
        min=1,
        help="embedded, local: run the server in a memory cgroup this size, as a pod's limit (root).",
        rich_help_panel=TARGET,
    ),
]
_TritonBinary = Annotated[
    Optional[Path],
    typer.Option(
        "--triton-binary",
        help="local: tritonserver to run (default: the one on PATH).",
        rich_help_panel=TARGET,
    ),
]
_BackendDirectory = Annotated[
    Optional[Path],
    typer.Option(
        "--backend-directory",
        help="local: its backends (default: next to its bin/).",
        rich_help_panel=TARGET,
    ),
]
_DockerImageTag = Annotated[
    Optional[str],
    typer.Option(
        "--docker-image-tag",
        help="docker: the TAG of NVIDIA's tritonserver image (nvcr.io, TAG-py3; default 24.10).",
        rich_help_panel=TARGET,
    ),
]
_Url = Annotated[
    Optional[str],
    typer.Option(help="remote: HOST:PORT of the server's gRPC endpoint.", rich_help_panel=TARGET),
]
_MetricsUrl = Annotated[
    Optional[str],
    typer.Option("--metrics-url", help="remote: its /metrics URL, to see its GPUs.", rich_help_panel=TARGET),
]
_SslRootCert = Annotated[
    Optional[Path],
    typer.Option(
        "--ssl-root-cert",
        help="remote: PEM of the CA of the server's TLS certificate.",
        rich_help_panel=TARGET,
    ),
]
_SslClientCert = Annotated[
    Optional[Path],
    typer.Option(
        "--ssl-client-cert", help="remote: PEM client certificate (mutual TLS).", rich_help_panel=TARGET
    ),
]
_SslClientKey = Annotated[
    Optional[Path],
    typer.Option("--ssl-client-key", help="remote: PEM key of --ssl-client-cert.", rich_help_panel=TARGET),
]
_Header = Annotated[
    Optional[list[str]],
    typer.Option(
        "--header", help="remote: KEY:VALUE sent with every call (repeatable).", rich_help_panel=TARGET
    ),
]
_LoadGenerator = Annotated[
    Engine,
    typer.Option(
        "--load-generator",
        help="builtin (asyncio, one process) or perf_analyzer (Triton's).",
        rich_help_panel=MEASUREMENT,
    ),
]
_ConfirmWith = Annotated[
    Optional[CrossCheckEngine],
    typer.Option(
        "--confirm-with",
        help="Also measure the baseline and the best with perf_analyzer; flag a difference over 10%.",
        rich_help_panel=MEASUREMENT,
    ),
]
_Protocol = Annotated[
    Protocol, typer.Option(help="Protocol of the measured requests.", rich_help_panel=MEASUREMENT)
]
_RequestRate = Annotated[
    Optional[str],
    typer.Option(
        "--request-rate",
        help="Open loop: Poisson arrivals at these rates/s, e.g. 50,100,200.",
        rich_help_panel=MEASUREMENT,
    ),
]
_StopRule = Annotated[
    StopRule,
    typer.Option(
        "--stop-rule",
        help="ci: stop a window once throughput and p99 are pinned; fixed: --window-s.",
        rich_help_panel=MEASUREMENT,
    ),
]
_MaxWindowS = Annotated[
    Optional[float],
    typer.Option(
        "--max-window-s",
        help=f"Longest window per level (default: max({DEFAULT_MAX_WINDOW_S:g}, 4 x --window-s)).",
        rich_help_panel=MEASUREMENT,
    ),
]
_ThroughputCi = Annotated[
    float,
    typer.Option(
        "--throughput-ci",
        help="ci: throughput known within this fraction (95%).",
        rich_help_panel=MEASUREMENT,
    ),
]
_P99Ci = Annotated[
    float,
    typer.Option("--p99-ci", help="ci: p99 known within this fraction (95%).", rich_help_panel=MEASUREMENT),
]
_MaxMemoryMb = Annotated[
    Optional[float],
    typer.Option(
        "--max-memory-mb",
        help="Constraint: the server's process-tree RSS (MiB) under load.",
        rich_help_panel=MEASUREMENT,
    ),
]

_MaxGpuMemoryMb = Annotated[
    Optional[float],
    typer.Option(
        "--max-gpu-memory-mb",
        help="Constraint: the GPU memory the server uses under load, over its GPUs (MiB, from its /metrics).",
        rich_help_panel=MEASUREMENT,
    ),
]
# Options of `optimize study` read by the command itself once the study has ended, not by the study.
AFTER_STUDY_OPTIONS = ("mlflow_uri",)
_MlflowUri = Annotated[
    Optional[str],
    typer.Option(
        "--mlflow-uri",
        help="Log the study to MLflow at this tracking URI (a folder, sqlite:///..., a server): one run, each "
        "trial a child run, the best config, report and repository as artifacts (the mlflow extra).",
    ),
]


@app.command()
def study(
    ctx: typer.Context,
    model: _Model = None,
    traffic: _Traffic = None,
    models_file: _ModelsFile = None,
    budget: _Budget = StudySettings.budget,
    latency_budget_ms: _LatencyBudgetMs = None,
    space: _Space = None,
    study_name: _StudyName = None,
    storage: _Storage = None,
    shape: ShapeOption = None,
    input_data: _InputData = None,
    accuracy_tolerance: _AccuracyTolerance = StudySettings.accuracy_tolerance,
    accuracy_data: _AccuracyData = None,
    accuracy_metric: _AccuracyMetric = None,
    accuracy_goal: _AccuracyGoal = None,
    concurrency: _Concurrency = None,
    seed: _Seed = None,
    sampler: _Sampler = _DEFAULT_SAMPLER,
    confirm: _Confirm = SearchSettings.confirm_finalists,
    starting_points: _StartingPoints = _DEFAULT_STARTING_POINTS,
    warm_start: _WarmStart = None,
    window_s: _WindowS = MeasureSettings.window_s,
    warmup_s: _WarmupS = MeasureSettings.warmup_s,
    screen_s: _ScreenS = MeasureSettings.screen_s,
    allow_shared_host: _AllowSharedHost = StudySettings.allow_shared_host,
    storage_wait_s: _StorageWaitS = StudySettings.storage_wait_s,
    cpus: _Cpus = None,
    gpus: _Gpus = None,
    target: _Target = "embedded",
    triton_binary: _TritonBinary = None,
    memory_limit_mb: _MemoryLimitMb = None,
    backend_directory: _BackendDirectory = None,
    docker_image_tag: _DockerImageTag = None,
    url: _Url = None,
    metrics_url: _MetricsUrl = None,
    ssl_root_cert: _SslRootCert = None,
    ssl_client_cert: _SslClientCert = None,
    ssl_client_key: _SslClientKey = None,
    header: _Header = None,
    load_generator: _LoadGenerator = _DEFAULT_ENGINE,
    confirm_with: _ConfirmWith = None,
    protocol: _Protocol = _DEFAULT_PROTOCOL,
    request_rate: _RequestRate = None,
    stop_rule: _StopRule = _DEFAULT_RULE,
    max_window_s: _MaxWindowS = None,
    throughput_ci: _ThroughputCi = MeasureSettings.throughput_ci,
    p99_ci: _P99Ci = MeasureSettings.p99_ci,
    max_memory_mb: _MaxMemoryMb = None,
    max_gpu_memory_mb: _MaxGpuMemoryMb = None,
    mlflow_uri: _MlflowUri = None,
) -> None:
    """Run (or resume) the Bayesian study and export the best configuration."""
    from optimizer.study.options import study_request
    from optimizer.study.progress import RichReporter, print_any_summary
    from optimizer.study.run import run_study

    given = {
        name: value
        for name, value in ctx.params.items()
        if _given(ctx, name) and name not in AFTER_STUDY_OPTIONS
    }
    if mlflow_uri is not None:
        _check_mlflow()  # before any trial: a missing extra is said now, not after an hour
    settings, server = study_request(given)
    try:
        with RichReporter() as reporter:
            summary = run_study(settings, reporter, target=server)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: finished trials are kept; rerun the same command to resume") from None
    try:
        print_any_summary(summary)
        _print_config_to_log(summary.best_repository)
        _write_study_report(summary.study_name, summary.storage_url, summary.best_repository)
        if mlflow_uri is not None:
            _log_to_mlflow(summary.study_name, summary.storage_url, summary.best_repository, mlflow_uri)
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted after the study finished (it is kept, its best config exported): rerun the same "
            "command to write the report"
        ) from None
    if summary.nothing_feasible:
        raise StudyError(summary.nothing_feasible)


def _check_mlflow() -> None:
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise UsageError("--mlflow-uri needs MLflow: pip install 'optimize[mlflow]' (or mlflow itself)")


def _log_to_mlflow(study_name: str, storage_url: str, repository: Path | None, uri: str) -> None:
    """Log the finished study to MLflow; a failure is a warning: the study is safe in its database."""
    try:
        from optimizer.output.mlflow_log import log_study
        from optimizer.study.storage import stored_study

        with stored_study(study_name, storage_url) as study:
            run_id = log_study(
                study, uri, report_dir=studies_dir() / study_name / "report", repository=repository
            )
        typer.echo(f"mlflow: run {run_id} at {uri}")
    except Exception as exc:
        typer.echo(
            f"warning: could not log to MLflow at {uri} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "rerun the same command to log it (the study runs nothing more)",
            err=True,
        )


def _print_config_to_log(repository: Path | None) -> None:
    """Where the output is a file or a CI log, the exported config.pbtxt itself, whole: what was chosen
    (its queue delay, its instances) can be read there without the study's folder."""
    if repository is None or sys.stdout.isatty():
        return
    for config in sorted(Path(repository).glob("**/config.pbtxt")):
        typer.echo(f"exported {config}:\n{config.read_text().rstrip()}")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set option ``name`` (on the command line or through its environment variable),
    whatever its value: a value equal to the default counts as given."""
    source = ctx.get_parameter_source(name)  # Click's ParameterSource (Typer vendors Click: read its name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@app.command()
def plan(
    study_name: Annotated[
        str, typer.Option("--study-name", help="The study whose measurements size the fleet.")
    ],
    rps: Annotated[
        float, typer.Option("--rps", help="The traffic to serve at the peak, inferences per second.")
    ],
    average_rps: AverageRpsOption = None,
    latency_budget_ms: Annotated[
        Optional[float], typer.Option("--latency-budget-ms", help="p99 budget (default: the study's).")
    ] = None,
    headroom: HeadroomOption = 0.3,
    price_per_hour: Annotated[
        Optional[float],
        typer.Option(
            "--price-per-hour", help="Price of one server per hour: cost per hour and per million inferences."
        ),
    ] = None,
    server_memory_gb: Annotated[
        Optional[float],
        typer.Option(
            "--server-memory-gb", help="Memory of a server for the memory fit (default: the study machine's)."
        ),
    ] = None,
    server_gpu_memory_gb: Annotated[
        Optional[float],
        typer.Option("--server-gpu-memory-gb", help="Memory of a server's GPU (default: the GPU measured)."),
    ] = None,
    trial: Annotated[
        Optional[int], typer.Option(help="The config to plan for (default: the exported one).")
    ] = None,
    storage: StorageOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON, for scripts.")] = False,
) -> None:
    """How many servers a traffic target needs (best, Pareto alternatives, baseline), from measured figures."""
    import json

    from optimizer.output.plan import make_plan, plan_lines, plan_table
    from optimizer.study.progress import readable_console
    from optimizer.study.storage import load_stored_study

    study = load_stored_study(study_name, storage)
    made = make_plan(
        study,
        rps,
        average_rps=average_rps,
        latency_budget_ms=latency_budget_ms,
        headroom=headroom,
        price_per_hour=price_per_hour,
        server_memory_gb=server_memory_gb,
        server_gpu_memory_gb=server_gpu_memory_gb,
        exported=trial,
    )
    if as_json:
        typer.echo(json.dumps(made.to_dict(), indent=2))
        return
    console = readable_console()
    lines = plan_lines(made)
    console.print(lines[0])
    console.print(plan_table(made))
    for line in lines[1:]:
        console.print(line)


@app.command("cross-check")
def cross_check(
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


# Its name before it was named for what it does (``confirm`` also names the study's re-measured finalists).
app.command("confirm", hidden=True, help="Alias of cross-check.")(cross_check)


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
    rps: Annotated[
        Optional[float],
        typer.Option(
            "--rps", help="Peak traffic (inf/s) to size the replicas for, from the study's figures."
        ),
    ] = None,
    average_rps: AverageRpsOption = None,
    headroom: HeadroomOption = 0.3,
    instance_type: Annotated[
        Optional[str],
        typer.Option(
            "--instance-type", help="Azure ML VM size (default: the smallest with the study's cores)."
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="k8s-workers: how many workers (pods, one per node) run the study.")
    ] = 4,
    image: Annotated[
        Optional[str], typer.Option(help="k8s-workers: the worker image (see the Dockerfile written).")
    ] = None,
    model_url: Annotated[
        Optional[str],
        typer.Option(
            "--model-url",
            help="k8s-workers: fetch the model from this URL (default: the PVC optimize-models).",
        ),
    ] = None,
) -> None:
    """Write a trial as a Triton model repository (and deployment manifests), or a study's k8s workers."""
    from optimizer.output.deploy import export_deployment
    from optimizer.output.workers import export_workers

    if fmt == ExportFormat.k8s_workers:
        for path in export_workers(
            study_name, out, storage=storage, workers=workers, image=image, model_url=model_url
        ):
            typer.echo(f"wrote {path}")
        return
    deployment = export_deployment(
        study_name,
        out,
        fmt=fmt.value,
        trial=trial,
        storage=storage,
        rps=rps,
        average_rps=average_rps,
        headroom=headroom,
        instance_type=instance_type,
    )
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
    shape: OneModelShapeOption = None,
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


def _say_capacity(study) -> None:
    """The servers a reference traffic needs, tuned and untuned (optimize plan sizes for the user's)."""
    from optimizer.output.plan import capacity_line

    line = capacity_line(study)
    if line is not None:
        typer.echo(line)


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
        _say_capacity(study)
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
    """Where the static figures are (PNG and SVG), and why the pipeline figure is missing if it is."""
    if paths.figures:
        names = ", ".join(dict.fromkeys(p.stem for p in paths.figures))
        typer.echo(f"figures (PNG and SVG): {names} in {paths.figures[0].parent}")
    if paths.png is None and paths.png_note:
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
    # SIGTERM (e.g. from a job scheduler) unwinds like Ctrl-C, so servers stop and trials are closed.
    interrupts.install()
    _install_thread_excepthook()
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:  # accepted anywhere on the line: move it where the root callback reads it
        args.remove("--debug")
        args.insert(0, "--debug")
    _state["debug"] = False
    try:
        code = _command().main(args=args, prog_name="optimize", standalone_mode=False)
        interrupts.raise_if_requested()  # one swallowed where it landed: the command still ends as asked
        if code == INTERRUPTED_EXIT_CODE:  # Typer's own answer to a Ctrl-C no command caught: say it too
            typer.echo("Error: interrupted", err=True)
        return code if isinstance(code, int) else 0
    except _ClickException as exc:  # the parser's own usage errors: bad choice, unknown option, ...
        message = exc.format_message()
        if message:  # empty when it already printed the help (no arguments)
            typer.echo(f"Error: {_in_our_words(message, exc, args)}", err=True)
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
        if is_disk_full(exc):  # a full disk where no stage said where: the file the system named
            full = disk_full(full_path(exc) or cache_dir())
            typer.echo(f"Error: {full.message}", err=True)
            return full.exit_code
        report = _save_traceback(exc)
        typer.echo(
            f"Error: internal error {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
            f"- a bug in optimize; the traceback is in {report} (please attach it to an issue)",
            err=True,
        )
        return BUG_EXIT_CODE


# The types in --help as the user's words (the annotations read <int>, <list[Path]>, <bool>).
_PLAIN_TYPES = {int: "INTEGER", float: "NUMBER", str: "TEXT", Path: "PATH"}


def _command() -> Any:
    """The click command of ``app``, its options' types named in words: INTEGER, NUMBER, TEXT, PATH (a
    repeatable option's help says so), nothing for a flag; choices keep their list."""
    command = typer.main.get_command(app)
    commands = [command, *getattr(command, "commands", {}).values()]
    for each in commands:  # the parser makes --help itself, when asked for it: a flag, no type
        each.get_help_option = _flag_help(each.get_help_option)
    for param in (param for c in commands for param in c.params):
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None or param.metavar is not None or descriptor.is_choice:
            continue
        annotation = descriptor.annotation
        if getattr(annotation, "__origin__", None) is list:
            (annotation,) = annotation.__args__
        if annotation is bool:
            param.metavar = ""
        elif annotation in _PLAIN_TYPES and param.param_type_name == "option":
            param.metavar = _PLAIN_TYPES[annotation]
        elif annotation in _PLAIN_TYPES:  # an argument: its name in the usage line, its type in the table
            param.metavar = param.name.upper()
            param.display_type_rich = lambda ctx, word=_PLAIN_TYPES[annotation]: word
    return command


def _flag_help(make: Any) -> Any:
    def help_option(ctx: Any) -> Any:
        option = make(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return help_option


# The validation library's phrases, as this tool says them (a value is quoted from the command line).
_VALIDATION_WORDS = {
    "Input should be a valid integer": "{value} is not a whole number",
    "Input should be a valid number": "{value} is not a number",
    "Input should be a valid boolean": "{value} is not true or false",
}


def _in_our_words(message: str, exc: Exception, args: list[str]) -> str:
    """A parser message without the validation library's wording: "Value error, " dropped, and "Input
    should be a valid integer, unable to parse ..." said as "'three' is not a whole number"."""
    message = message.replace("Value error, ", "")
    option = next(iter(getattr(getattr(exc, "param", None), "opts", []) or []), None)
    for phrase, ours in _VALIDATION_WORDS.items():
        if phrase in message and option:
            value = _value_of(option, args)
            head = message.split(":")[0]  # "Invalid value for '--budget'"
            return f"{head}: {ours.format(value=repr(value) if value is not None else 'the value')}"
    return message


def _value_of(option: str, args: list[str]) -> str | None:
    """What the command line gave ``option`` (its last use: a later one wins)."""
    value = None
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


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
