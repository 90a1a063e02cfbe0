"""What the user sees while a study runs: a progress bar, one line per trial, and the final table."""

from __future__ import annotations

import math
import statistics

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from optimizer.study.confirm import Finalist
from optimizer.study.crosscheck import DISAGREEMENT, cross_check_rows
from optimizer.study.results import JointSummary, StudySummary, TrialReport

__all__ = ["RichReporter", "print_any_summary", "print_joint_summary", "print_summary", "readable_console"]

# Output that goes to a file or a CI log is not cut at a terminal's 80 columns: tables take the width of
# their content and lines are not wrapped (the exported config's summary stays whole and greppable).
LOG_WIDTH = 400


def readable_console(stderr: bool = False) -> Console:
    """A console for a terminal as it is; for a file or a pipe, one wide enough for every table."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=LOG_WIDTH)


class RichReporter:
    """Progress bar with trials done / budget, the current trial's config and the best so far."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or readable_console(stderr=True)
        # In a log the bar is noise (and Rich ends it with a blank line): only the per-trial lines go there.
        self._live = self.console.is_terminal
        self._progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=True,
        )
        self._task: TaskID | None = None
        self._best: float | None = None

    def __enter__(self) -> RichReporter:
        if self._live:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live:
            self._progress.stop()

    def note(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/dim]")

    def trial_started(self, number: int, summary: str, done: int, budget: int) -> None:
        if self._task is None:
            self._task = self._progress.add_task("", total=budget)
        best = f"best {self._best:.1f} inf/s" if self._best is not None else "no feasible trial yet"
        self._progress.update(
            self._task, completed=done, total=budget, description=f"#{number} {summary} | {best}"
        )

    def trial_finished(self, report: TrialReport, best_throughput: float | None) -> None:
        self._best = best_throughput
        if self._task is not None:
            self._progress.advance(self._task)
        self.console.print(format_trial(report))


# The headline's figures: each trial's own measurement is one draw; the confirmation's mean is the headline.
CONFIRMED_COLUMN = "confirmed mean (inf/s)"


def format_trial(report: TrialReport) -> str:
    head = f"#{report.number:<3} {report.summary}"
    timing = f" ({report.timing})" if report.timing else ""
    if report.state == "complete":
        return f"{head} -> {report.throughput:.1f} inf/s, p99 {report.p99_ms:.1f} ms at {report.load}{timing}"
    return f"{head} -> {report.state}: {report.reason}{timing}"


def finalists_table(summary: StudySummary) -> Table:
    """Each finalist's measurements (its trial's first), their mean and 95% interval; the exported one marked."""
    table = Table(title="confirmed before export: the top configs re-measured, interleaved")
    for column in (
        "",
        "trial",
        "config",
        "load",
        "throughput (inf/s) per measurement",
        "mean ± 95%",
        "p99 median (ms)",
    ):
        table.add_column(column)
    chosen = summary.best.number if summary.best is not None else None
    rows = [*summary.finalists, *([summary.confirmed_baseline] if summary.confirmed_baseline else [])]
    for finalist in dict.fromkeys(rows):  # the baseline once, also when it is a finalist
        spread = "" if math.isnan(finalist.half_width) else f" ± {finalist.half_width:.1f}"
        table.add_row(
            _finalist_role(finalist, chosen, summary.confirmed_baseline),
            f"#{finalist.trial}",
            finalist.candidate,
            finalist.load,
            ", ".join(f"{value:.1f}" for value in finalist.throughput)
            + (f" ({finalist.failure})" if finalist.failure else ""),
            f"{finalist.mean:.1f}{spread}",
            f"{statistics.median(finalist.p99_ms):.1f}",
        )
    return table


def cross_check_table(record: dict) -> Table:
    """The baseline and the best as the built-in generator and perf_analyzer measured them, side by side."""
    engine = record["engine"]
    table = Table(title=f"cross-check: the built-in generator and {engine} on the same load")
    for column in (
        "",
        "trial",
        "load",
        "inf/s builtin",
        f"inf/s {engine}",
        "diff",
        "p99 builtin",
        f"p99 {engine}",
        "diff",
    ):
        table.add_column(column)
    for row in cross_check_rows(record):
        if row.failure:
            table.add_row(f"{row.role} #{row.trial}", row.load, f"not measured: {row.failure}", *[""] * 5)
            continue
        table.add_row(
            f"{row.role} #{row.trial}" + (" [yellow]![/yellow]" if row.disagrees else ""),
            row.load,
            _figure(row.builtin_throughput),
            _figure(row.other_throughput),
            _percent(row.throughput_difference),
            _figure(row.builtin_p99_ms),
            _figure(row.other_p99_ms),
            _percent(row.p99_difference),
        )
    return table


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isinf(value) else f"{value:+.0%}"


def _finalist_role(finalist: Finalist, chosen: int | None, baseline: Finalist | None) -> str:
    roles = ["exported" if finalist.trial == chosen else "", "baseline" if finalist == baseline else ""]
    return ", ".join(role for role in roles if role)


def print_summary(summary: StudySummary, console: Console | None = None) -> None:
    """Baseline vs best, counts of pruned and failed trials with reasons, and where the outputs are."""
    console = console or readable_console()
    trials = (
        f"{summary.finished}/{summary.budget} trials"
        if summary.finished <= summary.budget
        else f"{summary.finished} trials (more than this run's --budget {summary.budget})"
    )
    table = Table(
        title=f"study {summary.study_name}: {trials}, latency budget {summary.latency_budget_ms:g} ms"
    )
    confirmed = {"baseline": summary.confirmed_baseline, "best": summary.confirmed_best}
    shown = any(confirmed.values())
    columns = (
        "",
        "throughput (inf/s, its trial)",
        *((CONFIRMED_COLUMN,) if shown else ()),
        "p99 (ms)",
        "load",
    )
    for column in (*columns, "config"):
        table.add_column(column)
    for label, report in (("baseline", summary.baseline), ("best", summary.best)):
        finalist = confirmed[label]
        mean = (_figure(finalist.mean if finalist else None),) if shown else ()
        if report is None:
            table.add_row(label, "-", *mean, "-", "-", "no feasible trial")
        elif report.throughput is None:
            table.add_row(label, "-", *mean, "-", "-", f"{report.summary} ({report.state}: {report.reason})")
        else:
            table.add_row(
                label,
                f"{report.throughput:.1f}",
                *mean,
                f"{report.p99_ms:.1f}",
                report.load,
                report.summary,
            )
    console.print(table)
    if summary.finalists:
        console.print(finalists_table(summary))
    if summary.cross_check:
        console.print(cross_check_table(summary.cross_check))
        for line in summary.cross_check.get("disagreements", []):
            console.print(f"[yellow]disagreement over {DISAGREEMENT:.0%}[/yellow]: {line}")
    if summary.speed_up_terms is not None:
        best, baseline, basis = summary.speed_up_terms
        console.print(
            f"speed-up over baseline: {best / baseline:.2f}x ({basis}: {best:.1f} / {baseline:.1f} inf/s)"
        )
    if summary.precisions:
        console.print("per precision (best served, accuracy against fp32 on your metrics):")
        for line in summary.precisions:
            console.print(f"  {line}")
    console.print(f"pruned: {summary.pruned}, failed: {summary.failed}")
    for reason in summary.reasons[:20]:
        console.print(f"  {reason}")
    fit = summary.gpu_fit
    if fit is not None and fit.copies is not None:
        console.print(
            f"GPU memory: the best config takes {fit.per_copy_mb:.0f} MiB under load; {fit.copies} copies fit "
            f"in the {fit.total_mb:.0f} MiB beside the {fit.idle_mb:.0f} MiB already in use"
        )
    if summary.best_repository:
        console.print(f"best model repository: {summary.best_repository}")
    console.print(f"study database: {summary.storage_url}")


def print_any_summary(summary: StudySummary | JointSummary, console: Console | None = None) -> None:
    """The end of a study of one model or of several."""
    if isinstance(summary, JointSummary):
        print_joint_summary(summary, console)
    else:
        print_summary(summary, console)


def print_joint_summary(summary: JointSummary, console: Console | None = None) -> None:
    """A joint study's end: the mix's throughput, baseline vs best; each model's figures and budget."""
    console = console or readable_console()
    ratio = ""
    if summary.best_throughput and summary.baseline_throughput:
        ratio = (
            f", {summary.best_throughput / summary.baseline_throughput:.2f}x the untuned models side by side"
        )
    best = f"{summary.best_throughput:.1f}" if summary.best_throughput else "none within every budget"
    base = f"{summary.baseline_throughput:.1f}" if summary.baseline_throughput else "none within every budget"
    console.print(
        f"study {summary.study_name}: {summary.finished} trials; requests/s in the traffic mix: "
        f"baseline {base}, best {best} (trial {summary.best_trial}){ratio}"
    )
    if summary.per_model:
        table = Table(title="the best joint config, per model")
        for column in ("model", "throughput (inf/s)", "p99 (ms)", "budget (ms)", "config"):
            table.add_column(column)
        for name, figures in summary.per_model.items():
            table.add_row(
                name,
                f"{figures['throughput']:.1f}",
                f"{figures['p99_ms']:.1f}",
                f"{figures['budget_ms']:g}",
                figures["candidate"],
            )
        console.print(table)
        console.print(f"why it stopped there: {summary.bound_by}")
        console.print(f"repository with every model: {summary.best_repository}")
