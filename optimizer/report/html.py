"""The HTML report: one plotting function per figure (plotly), and one self-contained page.

The page embeds plotly.js once, so it opens offline and can be mailed as a single file. Everything
that comes from the model, the user or the study database is escaped (``html.escape``), in the page
and in the figures' labels alike.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from html import escape

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from optimizer.report.data import (
    ORT_TUNED,
    Curve,
    CurvesData,
    FailureRow,
    Headline,
    HistoryData,
    ImportanceData,
    PrecisionRow,
    ReportData,
    ScatterData,
    StudyInfo,
    TrialRecord,
)
from optimizer.report.pipeline import PNG_NAME, PipelineData, plot_pipeline
from optimizer.study.confirm import Finalist
from optimizer.study.crosscheck import DISAGREEMENT

__all__ = ["plot_curves", "plot_history", "plot_importances", "plot_scatter", "render_html"]

COLORS = {
    "baseline": "#7f7f7f",
    ORT_TUNED: "#ff7f0e",
    "best overall": "#1f77b4",
    "feasible": "#2ca02c",
    "infeasible": "#ff7f0e",
    "pruned": "#9467bd",
    "failed": "#d62728",
    "budget": "#d62728",
}
BUDGET_IN_VIEW = 3.0  # draw the latency budget when it is at most this many times the largest p99
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _num(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _layout(fig: go.Figure, title: str, height: int = 440) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01},
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        legend={"orientation": "h", "y": -0.18},
    )
    return fig


def _empty(fig: go.Figure, message: str) -> go.Figure:
    fig.add_annotation(
        text=_e(message),
        showarrow=False,
        x=0.5,
        y=0.5,
        xref="paper",
        yref="paper",
        font={"size": 16},
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


# --- figures -------------------------------------------------------------------------------------------


def plot_curves(data: CurvesData) -> go.Figure:
    """Throughput and p99 vs concurrency for the baseline, ONNX-Runtime-tuned and best trials."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.62, 0.38], vertical_spacing=0.06)
    _layout(fig, "Throughput vs client concurrency", height=560)
    if not data.curves:
        return _empty(fig, "no measured sweep yet")
    budget = data.latency_budget_ms
    for curve in data.curves:
        _add_curve(fig, curve, budget)
    p99_title = "p99 (ms)"
    if _in_view(budget, max(level.p99_ms for curve in data.curves for level in curve.levels)):
        fig.add_hline(
            y=budget,
            line={"color": COLORS["budget"], "dash": "dash"},
            row=2,
            col=1,
            annotation_text=f"latency budget {budget:g} ms",
            annotation_position="top left",
        )
    elif budget is not None:
        p99_title = f"p99 (ms; budget {budget:g} ms)"
    levels = sorted({level.concurrency for curve in data.curves for level in curve.levels})
    fig.update_xaxes(type="log", tickvals=levels, ticktext=[str(v) for v in levels])
    fig.update_xaxes(title_text="concurrent client requests (x: over the latency budget)", row=2, col=1)
    fig.update_yaxes(title_text="inferences / s", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text=p99_title, rangemode="tozero", row=2, col=1)
    return fig


def _add_curve(fig: go.Figure, curve: Curve, budget: float | None) -> None:
    """One curve's throughput (top panel) and p99 (bottom panel); crosses mark levels over the budget."""
    name = _e(f"{curve.label} (#{curve.trial})")
    over = [budget is not None and level.p99_ms > budget for level in curve.levels]
    marker = {
        "color": COLORS[curve.label],
        "size": 9,
        "symbol": ["x" if o else "circle" for o in over],
    }
    common = {
        "x": [level.concurrency for level in curve.levels],
        "name": name,
        "legendgroup": name,
        "marker": marker,
        "mode": "lines+markers",
        "hovertext": [f"{_e(curve.candidate)}<br>p99 {level.p99_ms:.1f} ms" for level in curve.levels],
    }
    fig.add_trace(go.Scatter(y=[level.throughput for level in curve.levels], **common), 1, 1)
    fig.add_trace(go.Scatter(y=[level.p99_ms for level in curve.levels], showlegend=False, **common), 2, 1)


def plot_scatter(data: ScatterData) -> go.Figure:
    """Throughput vs p99 of every measured trial by status, with the Pareto front and the budget."""
    fig = _layout(go.Figure(), "Throughput vs p99 latency, every trial")
    if not data.points:
        return _empty(fig, "no measured trial yet")
    for status in ("feasible", "infeasible", "pruned", "failed"):
        points = [p for p in data.points if p.status == status]
        if points:
            fig.add_trace(
                go.Scatter(
                    x=[p.p99_ms for p in points],
                    y=[p.throughput for p in points],
                    mode="markers",
                    name=status,
                    marker={"color": COLORS[status], "size": 10, "opacity": 0.8},
                    hovertext=[_e(f"#{p.trial} {p.candidate}") for p in points],
                )
            )
    by_trial = {p.trial: p for p in data.points}
    front = [by_trial[n] for n in data.pareto]
    fig.add_trace(
        go.Scatter(
            x=[p.p99_ms for p in front],
            y=[p.throughput for p in front],
            mode="lines+markers",
            name="Pareto front",
            line={"color": "#333", "shape": "hv", "dash": "dot"},
            marker={"symbol": "circle-open", "size": 16, "color": "#333", "line": {"width": 2}},
            hovertext=[_e(f"#{p.trial} {p.candidate}") for p in front],
        )
    )
    _mark_budget(fig, data.latency_budget_ms, max(p.p99_ms for p in data.points))
    if data.unmeasured:
        listed = ", ".join(f"#{n}" for n in data.unmeasured)
        fig.add_annotation(
            text=f"not measured (failed before any level): {listed}",
            showarrow=False,
            x=1,
            y=1.08,
            xref="paper",
            yref="paper",
            xanchor="right",
        )
    fig.update_xaxes(title_text="p99 latency (ms)", rangemode="tozero")
    fig.update_yaxes(title_text="inferences / s", rangemode="tozero")
    return fig


def _in_view(budget: float | None, largest_p99: float) -> bool:
    # A budget far beyond every measured p99 would squash the points into one edge: name it, do not draw it.
    return budget is not None and budget <= BUDGET_IN_VIEW * largest_p99


def _mark_budget(fig: go.Figure, budget: float | None, largest_p99: float) -> None:
    if budget is None:
        return
    if _in_view(budget, largest_p99):
        fig.add_vline(
            x=budget,
            line={"color": COLORS["budget"], "dash": "dash"},
            annotation_text=f"budget {budget:g} ms",
        )
    else:
        fig.add_annotation(
            text=f"latency budget {budget:g} ms: far right of every trial",
            showarrow=False,
            x=1,
            y=1.02,
            xref="paper",
            yref="paper",
            xanchor="right",
            font={"color": COLORS["budget"]},
        )


def plot_history(data: HistoryData) -> go.Figure:
    """Each trial's feasible throughput and the best so far, by trial number."""
    fig = _layout(go.Figure(), "Optimization history")
    if not data.trials:
        return _empty(fig, "no finished trial yet")
    feasible = [(n, v) for n, v in zip(data.trials, data.values) if v is not None]
    others = [(n, s) for n, s, v in zip(data.trials, data.statuses, data.values) if v is None]
    fig.add_trace(
        go.Scatter(
            x=[n for n, _ in feasible],
            y=[v for _, v in feasible],
            mode="markers",
            name="trial (feasible)",
            marker={"color": COLORS["feasible"], "size": 9},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=list(data.trials),
            y=list(data.best_so_far),
            mode="lines",
            name="best so far",
            line={"color": COLORS["best overall"], "shape": "hv", "width": 3},
        )
    )
    if others:
        fig.add_trace(
            go.Scatter(
                x=[n for n, _ in others],
                y=[0] * len(others),
                mode="markers",
                name="no feasible result",
                marker={
                    "symbol": "x",
                    "size": 9,
                    "color": [COLORS.get(s, "#999") for _, s in others],
                },
                hovertext=[_e(s) for _, s in others],
            )
        )
    fig.update_xaxes(title_text="trial", dtick=1 if len(data.trials) <= 20 else None)
    fig.update_yaxes(title_text="inferences / s", rangemode="tozero")
    return fig


def plot_importances(data: ImportanceData) -> go.Figure:
    """Parameter importances as horizontal bars, the most important on top."""
    fig = _layout(go.Figure(), "Parameter importances (for reaching the highest throughput)", height=360)
    if not data.params:
        return _empty(fig, data.note)
    fig.add_trace(
        go.Bar(
            x=list(data.importances)[::-1],
            y=[_e(p) for p in data.params][::-1],
            orientation="h",
            marker={"color": COLORS["best overall"]},
            name="importance",
        )
    )
    fig.update_xaxes(title_text="importance (sums to 1)", rangemode="tozero")
    fig.update_yaxes(automargin=True)
    fig.update_layout(showlegend=False)
    return fig


# --- the page ------------------------------------------------------------------------------------------


def render_html(data: ReportData) -> str:
    """The whole report as one self-contained HTML page (plotly.js embedded once).

    Args:
        data: The report's records, from :func:`optimizer.report.data.build_report_data`.

    Returns:
        The page's text.
    """
    figures = [
        ("curves", plot_curves(data.curves)),
        ("scatter", plot_scatter(data.scatter)),
        ("history", plot_history(data.history)),
        ("importances", plot_importances(data.importances)),
    ]
    if data.pipeline is not None and data.pipeline.bars:
        figures.append(("pipeline", plot_pipeline(data.pipeline)))
    divs = {
        name: fig.to_html(
            full_html=False, include_plotlyjs=(i == 0), config=_PLOT_CONFIG, div_id=f"fig-{name}"
        )
        for i, (name, fig) in enumerate(figures)
    }
    info = data.info
    body = [
        _header(info, data.trials),
        _headline(data.headline, info),
        _section("Throughput vs concurrency", _curves_note(data.curves), divs["curves"]),
        _pipeline_section(data.pipeline, divs.get("pipeline")),
        _section(
            "Every trial",
            "Circled: the Pareto front, no trial is both faster and lower in p99. As a picture: "
            '<a href="pareto.png">pareto.png</a> (<a href="pareto.svg">SVG</a>).',
            divs["scatter"],
        ),
        _section("Search", _e(data.importances.note), divs["history"] + divs["importances"]),
        _finalists_section(data),
        _plan_section(data),
        _cross_check_section(data),
        _section(
            "Top 10 configurations",
            "Each trial's own measurement (one window, or the mean of its two loads); the speed-up at the top "
            "is the headline, from the confirmed means when the study confirmed its finalists.",
            _top_table(data.top, data.headline),
        ),
        _section(
            "Precisions",
            "Best feasible throughput per precision, and its accuracy when measured.",
            _precision_table(data.precisions),
        ),
        _section("Pruned, infeasible and failed trials", "", _failure_table(data.failures)),
        _section("Environment", "", _environment(info)),
        (
            "<footer>Built by <code>optimize report</code> from the study database alone. "
            'Every trial, config field and measurement: <a href="trials.csv">trials.csv</a>.</footer>'
        ),
    ]
    title = _e(f"optimize report: {info.model_name} (study {info.name})")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def _pipeline_section(pipeline: PipelineData | None, div: str | None) -> str:
    note = (
        "In process: ONNX Runtime in this process before the server started, one batch at a time, the "
        "fastest variant, batch size and thread count whose batch takes no longer than the latency budget. "
        "Served: through Triton under the study's load, within the budget (confirmed means where confirmed). "
        f'The same figure is <a href="{PNG_NAME}">{PNG_NAME}</a> (and <a href="pipeline.svg">SVG</a>).'
    )
    if pipeline is None or div is None:
        missing = pipeline.note if pipeline is not None and pipeline.note else "nothing measured yet"
        return _section("From the model as given to Triton tuned", _e(missing), "")
    if pipeline.note:
        note += " " + _e(pipeline.note)
    return _section("From the model as given to Triton tuned", note, div)


def _section(title: str, note_html: str, content: str) -> str:
    note = f'<p class="note">{note_html}</p>' if note_html else ""
    return f"<section>\n<h2>{_e(title)}</h2>\n{note}\n{content}\n</section>"


def _header(info: StudyInfo, trials: Sequence[TrialRecord]) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in info.counts if n)
    budget = _num(info.latency_budget_ms, "g", " ms")
    return (
        f"<header><h1>{_e(info.model_name)} on Triton Inference Server</h1>"
        f'<p class="meta">study <b>{_e(info.name)}</b> · p99 latency budget <b>{_e(budget)}</b> · '
        f"{len(trials)} trials ({_e(counts or 'none yet')}) · Triton {_e(info.server_version or '?')} "
        f"({_e(info.target or '?')}) · model sha256 <code>{_e(info.model_sha256[:16])}</code></p></header>"
    )


def _card(label: str, value: str, detail: str) -> str:
    return (
        f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{_e(value)}</div>'
        f'<div class="detail">{_e(detail)}</div></div>'
    )


def _trial_card(label: str, trial: TrialRecord | None, confirmed: Finalist | None) -> str:
    """A trial's throughput: the confirmed mean when there is one (the speed-up's term), else its own."""
    if trial is None:
        return _card(label, "-", "no trial")
    if trial.throughput is None:
        return _card(label, "-", f"#{trial.number} {trial.candidate}: {trial.status}")
    where = f"at concurrency {trial.concurrency} · #{trial.number} {trial.candidate}"
    if confirmed is None:
        return _card(
            label,
            f"{trial.throughput:,.1f} inf/s",
            f"its trial's measurement, p99 {_num(trial.p99_ms)} ms {where}",
        )
    detail = (
        f"confirmed mean of {len(confirmed.throughput)} measurements (its trial's own: "
        f"{trial.throughput:,.1f} inf/s), median p99 {_num(statistics.median(confirmed.p99_ms))} ms {where}"
    )
    return _card(label, f"{confirmed.mean:,.1f} inf/s", detail)


def _headline(head: Headline, info: StudyInfo) -> str:
    ratio = f"{head.ratio:.2f}x" if head.ratio is not None else "-"
    cards = [
        _trial_card("Baseline (untuned)", head.baseline, head.baseline_confirmed),
        _trial_card("Best within the latency budget", head.best, head.best_confirmed),
        _card("Speed-up", ratio, f"best / baseline throughput ({head.ratio_basis})"),
    ]
    if head.baseline is None and head.best is None:
        command = f"optimize study --study-name {_e(info.name)}"
        detail = f'<p class="warn">No trial has finished yet: run <code>{command}</code>.</p>'
    elif head.best is None:
        detail = f'<p class="warn">No configuration met the {_e(_num(info.latency_budget_ms, "g"))} ms budget yet.</p>'
    else:
        detail = (
            f"<p>Best configuration, trial #{head.best.number} (<code>{_e(head.best.candidate)}</code>), "
            f"exported as a Triton model repository to <code>{_e(head.repository)}</code>; "
            f"<code>optimize export --study-name {_e(info.name)} --format azureml|kserve --out DIR</code> "
            f"adds deployment manifests.</p>\n<details open><summary>config.pbtxt</summary>"
            f"<pre>{_e(head.best_config)}</pre></details>"
        )
    return f'<section class="headline">\n<div class="cards">{"".join(cards)}</div>\n{detail}\n</section>'


def _curves_note(data: CurvesData) -> str:
    text = (
        f"<b>{_e(ORT_TUNED)}</b>: the best trial that changed only ONNX Runtime's knobs (provider, precision), "
        "with Triton's batching and instances left at the baseline's. Crosses: over the latency budget. "
        'As a picture: <a href="curves.png">curves.png</a> (<a href="curves.svg">SVG</a>).'
    )
    if data.missing and data.curves:
        text += " Not shown: " + "; ".join(_e(m) for m in data.missing) + "."
    return text


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="note">{_e(empty)}</p>'
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead>" if headers else ""
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _top_table(top: Sequence[TrialRecord], head: Headline) -> str:
    base = head.baseline.throughput if head.baseline else None
    rows = [
        [
            f"#{t.number}",
            _num(t.throughput),
            _num(t.p99_ms),
            _num(t.p50_ms),
            _e(t.concurrency),
            f"{t.throughput / base:.2f}x" if base and t.throughput else "-",
            f"<code>{_e(t.candidate)}</code>",
        ]
        for t in top
    ]
    # Each trial's own measurement: the headline's speed-up (above) is the confirmed one when there is one.
    headers = [
        "trial",
        "inf/s (trial's measurement)",
        "p99 ms",
        "p50 ms",
        "concurrency",
        "vs baseline's trial",
        "configuration",
    ]
    return _table(headers, rows, "No trial met the latency budget yet.")


def _finalists_section(data: ReportData) -> str:
    """Each finalist's measurements, its mean with the 95% interval, and which one was exported."""
    if not data.finalists:
        return ""
    baseline = (data.confirmed_baseline,) if data.confirmed_baseline else ()
    rows = [
        [
            f"#{f.trial}"
            + (" (exported)" if f.trial == data.chosen else "")
            + (" (baseline)" if f in baseline else ""),
            f"<code>{_e(f.candidate)}</code>",
            _e(f.load),
            _e(", ".join(f"{value:.1f}" for value in f.throughput))
            + (f" ({_e(f.failure)})" if f.failure else ""),
            _e(f"{f.mean:.1f}" + ("" if math.isnan(f.half_width) else f" ± {f.half_width:.1f}")),
            _num(statistics.median(f.p99_ms)),
        ]
        for f in dict.fromkeys((*data.finalists, *baseline))
    ]
    headers = ["trial", "configuration", "load", "inf/s per measurement", "mean ± 95%", "median p99 ms"]
    note = (
        "The best configs measured again before export, in alternating order; the first figure is the "
        "trial's own. The export is the highest mean whose median p99 is within the budget. The baseline is "
        "measured in the same rounds, so the speed-up compares means over as many loads."
    )
    return _section("Confirmed before export", _e(note), _table(headers, rows, ""))


def _plan_section(data: ReportData) -> str:
    """What one server carries under each config, and the servers a reference traffic needs."""
    plan = data.plan
    if plan is None:
        return ""
    rows = [
        [
            _e(s.capacity.role),
            f"#{s.capacity.trial}",
            f"<code>{_e(s.capacity.config)}</code>",
            _num(s.capacity.throughput_per_server),
            _num(s.capacity.usable(plan.headroom)),
            _num(s.capacity.p99_ms),
            _e(s.capacity.load),
            str(s.servers),
            _e(s.capacity.basis),
        ]
        for s in plan.sizings
    ]
    headers = [
        "role",
        "trial",
        "configuration",
        "inf/s per server (measured)",
        f"planned at {plan.headroom:.0%} headroom",
        "p99 ms",
        "load",
        f"servers for {plan.rps:,.0f} inf/s",
        "measured as",
    ]
    note = (
        f"Servers of the kind measured ({_e(plan.server)}), each planned at {1 - plan.headroom:.0%} of the "
        "throughput it sustained within the latency budget at the load where it was measured. "
        f"<code>optimize plan --study-name {_e(plan.study_name)} --rps N</code> sizes a fleet for your "
        "traffic, with costs and the memory fit; <code>optimize export --rps N</code> writes the replica "
        "count into the deployment files."
    )
    return _section("Capacity and servers needed", note, _table(headers, rows, ""))


def _cross_check_section(data: ReportData) -> str:
    """The baseline and the exported config as both engines measured them, disagreements over 10% marked."""
    if not data.cross_check:
        return ""
    engine = _e(data.cross_check_engine)

    def difference(value: float | None) -> str:
        if value is None or math.isinf(value):
            return "-"
        text = f"{value:+.0%}"
        return f'<span class="warn">{text}</span>' if abs(value) > DISAGREEMENT else text

    rows = [
        [
            _e(r.role) + (' <span class="warn">(disagree)</span>' if r.disagrees else ""),
            f"#{r.trial}",
            _e(r.load),
            _num(r.builtin_throughput),
            _num(r.other_throughput),
            difference(r.throughput_difference),
            _num(r.builtin_p99_ms),
            _num(r.other_p99_ms),
            difference(r.p99_difference),
        ]
        if not r.failure
        else [_e(r.role), f"#{r.trial}", _e(r.load), _e(f"not measured: {r.failure}"), "", "", "", "", ""]
        for r in data.cross_check
    ]
    headers = [
        "",
        "trial",
        "load",
        "inf/s builtin",
        f"inf/s {engine}",
        "difference",
        "p99 ms builtin",
        f"p99 ms {engine}",
        "difference",
    ]
    note = (
        f"The baseline and the exported config, each loaded once and measured at its load by the built-in "
        f"generator and by {data.cross_check_engine}, alternating which goes first. A difference over "
        f"{DISAGREEMENT:.0%} of {data.cross_check_engine}'s figure is marked."
    )
    return _section(f"Cross-checked with {data.cross_check_engine}", _e(note), _table(headers, rows, ""))


def _precision_table(rows: Sequence[PrecisionRow]) -> str:
    def ok(row: PrecisionRow) -> str:
        return {True: "ok", False: '<span class="warn">lost accuracy</span>', None: "not measured"}[
            row.accuracy_ok
        ]

    def figures(row: PrecisionRow) -> str:
        text = _e(", ".join(f"{k} {v}" for k, v in row.accuracy) or "-")
        return text + (f'<br><span class="note">{_e(row.accuracy_note)}</span>' if row.accuracy_note else "")

    cells = [
        [
            _e(r.precision),
            str(r.trials),
            f"#{r.best_trial}" if r.best_trial is not None else "-",
            _num(r.best_throughput),
            _num(r.p99_ms),
            figures(r),
            ok(r),
        ]
        for r in rows
    ]
    headers = [
        "precision",
        "trials",
        "best trial",
        "inf/s",
        "p99 ms",
        "accuracy figures",
        "accuracy",
    ]
    return _table(headers, cells, "No trial yet.")


def _failure_table(rows: Sequence[FailureRow]) -> str:
    cells = [
        [
            f"#{r.trial}",
            _e(r.status),
            f"<code>{_e(r.candidate)}</code>",
            _e(r.reason)
            + (
                f"<details><summary>server log</summary><pre>{_e(r.server_log)}</pre></details>"
                if r.server_log
                else ""
            ),
        ]
        for r in rows
    ]
    return _table(["trial", "status", "configuration", "reason"], cells, "None.")


def _environment(info: StudyInfo) -> str:
    def rows(pairs: Sequence[tuple[str, str]]) -> list[list[str]]:
        return [[_e(k), _e(v)] for k, v in pairs]

    return (
        "<h3>Hardware</h3>"
        + _table((), rows(info.hardware), "Not recorded.")
        + "<h3>Search space</h3>"
        + _table((), rows(info.space), "Not recorded.")
    )


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222;
       background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
header h1 { margin: 0 0 4px; font-size: 1.7em; }
.meta, .note { color: #555; }
section { background: #fff; border-radius: 8px; padding: 16px 20px; margin: 16px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); }
h2 { margin-top: 0; font-size: 1.25em; }
.cards { display: flex; gap: 16px; flex-wrap: wrap; }
.card { flex: 1 1 260px; border: 1px solid #e3e5e8; border-radius: 8px; padding: 12px 16px; }
.card .label { color: #555; font-size: .9em; }
.card .value { font-size: 1.9em; font-weight: 600; margin: 4px 0; }
.card .detail { color: #555; font-size: .85em; word-break: break-word; }
.warn { color: #b00020; font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-size: .92em; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #fafafa; }
td code, p code { background: #f1f3f5; padding: 1px 4px; border-radius: 3px; }
pre { background: #f1f3f5; padding: 12px; border-radius: 6px; overflow-x: auto; font-size: .85em; }
footer { color: #666; font-size: .9em; margin: 24px 0; }
"""
