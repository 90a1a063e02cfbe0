"""The ``optimize`` command line.

Only ``main()`` turns errors into exit codes: an :class:`OptimizeError` prints one ``Error: …`` line
and exits with its code (``--debug`` shows the traceback). Heavy imports (optuna, onnx, tritonclient)
happen inside the commands, so ``optimize --help`` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
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

    from optimizer.intake import inspect_model, parse_shape_args, resolve_shapes
    from optimizer.paths import cache_dir

    info = inspect_model(model, cache=cache_dir())
    given = parse_shape_args(shape or [])
    console = Console()
    table = Table(title=f"{info.source_path.name}  (opset {info.opset}, sha256 {info.sha256[:12]})")
    for column in ("", "name", "dtype", "dims"):
        table.add_column(column)
    for kind, specs in (("input", info.inputs), ("output", info.outputs)):
        for spec in specs:
            table.add_row(kind, escape(spec.name), spec.dtype, escape("[" + ", ".join(str(d) for d in spec.dims) + "]"))
    console.print(table)
    console.print(f"batch dimension: {'dynamic (first axis)' if info.batching else 'none: max_batch_size 0'}")
    for note in info.notes:
        console.print(f"note: {note}")
    shapes = resolve_shapes(info, given)
    console.print("request shapes: " + ", ".join(f"{n}:{','.join(map(str, d))}" for n, d in shapes.items()))


@app.command()
def study(
    model: Annotated[Optional[Path], typer.Option("--model", help="ONNX model (default: the bundled example).")] = None,
    budget: Annotated[int, typer.Option(help="Total number of trials in the study.")] = 40,
    latency_budget_ms: Annotated[
        Optional[float], typer.Option("--latency-budget-ms", help="p99 latency budget (default: 10x baseline p99).")
    ] = None,
    space: Annotated[str, typer.Option(help="Search space: a name under spaces/ or a YAML path.")] = "cpu",
    study_name: Annotated[Optional[str], typer.Option("--study-name", help="Default: the model's file name.")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (default sqlite:///studies/NAME.db).")] = None,
    shape: ShapeOption = None,
    input_data: Annotated[
        Optional[Path], typer.Option("--input-data", help=".npz with one array per input (samples on axis 0).")
    ] = None,
    accuracy_tolerance: Annotated[
        float, typer.Option("--accuracy-tolerance", help="Max 1 - cosine similarity of a fp16/int8 variant vs fp32.")
    ] = 0.01,
    concurrency: Annotated[Optional[str], typer.Option(help="Concurrency levels, e.g. 1,2,4,8,16.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampler seed.")] = None,
    window_s: Annotated[float, typer.Option("--window-s", help="Seconds measured per concurrency level.")] = 2.0,
    warmup_s: Annotated[float, typer.Option("--warmup-s", help="Warm-up seconds per concurrency level.")] = 0.5,
    allow_shared_host: Annotated[
        bool, typer.Option("--allow-shared-host", help="Let another worker of this study measure on this machine.")
    ] = False,
    cpus: Annotated[Optional[str], typer.Option(help="Pin this worker and its server to cores, e.g. 0-3.")] = None,
    gpus: Annotated[Optional[str], typer.Option(help="GPUs this worker's server may use, e.g. 0,1.")] = None,
) -> None:
    """Run (or resume) the Bayesian study and export the best configuration."""
    from optimizer.intake import parse_shape_args
    from optimizer.loadgen import MeasureSettings
    from optimizer.measure import DEFAULT_LEVELS, parse_levels
    from optimizer.progress import RichReporter, print_summary
    from optimizer.storage import parse_cpus
    from optimizer.study import StudySettings, run_study

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
        measure=MeasureSettings(warmup_s=warmup_s, window_s=window_s, min_requests=30, max_window_s=4 * window_s),
        input_data=input_data,
        accuracy_tolerance=accuracy_tolerance,
        allow_shared_host=allow_shared_host,
        cpus=parse_cpus(cpus) if cpus else frozenset(),
        gpus=gpus,
    )
    try:
        with RichReporter() as reporter:
            summary = run_study(settings, reporter)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: finished trials are kept; rerun the same command to resume") from None
    print_summary(summary)
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
) -> None:
    """Write a trial's config and model file as a Triton model repository."""
    from optimizer.export import export_from_storage

    path = export_from_storage(study_name, out, trial=trial, storage=storage)
    typer.echo(f"wrote {path}")


@app.command()
def migrate(
    from_url: Annotated[str, typer.Option("--from", help="Storage URL to copy the study from.")],
    to_url: Annotated[str, typer.Option("--to", help="Storage URL to copy it into (e.g. postgresql://...).")],
    study_name: Annotated[Optional[str], typer.Option("--study-name", help="Default: the only study there.")] = None,
) -> None:
    """Copy a study between storages, e.g. a laptop's SQLite study into the team's PostgreSQL."""
    from optimizer.storage import copy_study

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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning our errors into one line and an exit code."""
    _install_sigterm_handler()
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
        typer.echo(f"Error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
