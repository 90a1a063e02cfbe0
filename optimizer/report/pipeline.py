"""The pipeline figure: the model as given, ONNX Runtime tuned in process, Triton as given and Triton tuned.

The reference pipeline shows these side by side; the in-process figures come from the study's in-process
profile (:mod:`optimizer.model.profile`), the served ones from its baseline and exported trial (confirmed
means where the study confirmed them). :func:`pipeline_data` is pure, :func:`plot_pipeline` draws it, and
:mod:`optimizer.report.static` draws the same records as a PNG and an SVG, the picture people paste into a
ticket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from optimizer.model.profile import InprocessPoint, best_point

__all__ = [
    "PNG_NAME",
    "PipelineBar",
    "PipelineData",
    "pipeline_data",
    "plot_pipeline",
    "study_pipeline_data",
]

PNG_NAME = "pipeline.png"
PNG_SIZE = (1100, 520)


@dataclass(frozen=True)
class PipelineBar:
    label: str
    throughput: float
    detail: str  # what was measured: the variant, batch and threads, or the trial


@dataclass(frozen=True)
class PipelineData:
    bars: tuple[PipelineBar, ...]
    # per precision, (batch, best throughput over the thread counts) by ascending batch
    inprocess: tuple[tuple[str, tuple[tuple[int, float], ...]], ...]
    latency_budget_ms: float | None
    note: str  # why something is missing, "" when all is there


def pipeline_data(
    points: Sequence[InprocessPoint],
    *,
    skipped: str | None,
    baseline: tuple[float, int] | None,
    best: tuple[float, int] | None,
    latency_budget_ms: float | None,
) -> PipelineData:
    """The four bars and the in-process curves; ``baseline``/``best`` are (throughput, trial) served."""
    bars = []
    as_given = [p for p in points if p.precision == "fp32" and p.batch == 1]
    if as_given:
        default = max(as_given, key=lambda p: p.threads)  # ONNX Runtime's default: a thread per core
        bars.append(PipelineBar("as given, in process", default.throughput, "fp32, batch 1"))
    tuned = best_point(points, latency_budget_ms)
    if tuned is not None:
        bars.append(
            PipelineBar(
                "ONNX Runtime tuned, in process",
                tuned.throughput,
                f"{tuned.precision}, batch {tuned.batch}, {tuned.threads} thread(s)",
            )
        )
    for label, served in (("Triton as given", baseline), ("Triton tuned", best)):
        if served is not None:
            bars.append(PipelineBar(label, served[0], f"trial {served[1]}"))
    notes = []
    if skipped:
        notes.append(f"no in-process profile: {skipped}")
    elif not points:
        notes.append("no in-process profile recorded (a study from before it)")
    elif tuned is None:
        notes.append("no in-process point met the latency budget")
    return PipelineData(tuple(bars), _curves(points), latency_budget_ms, "; ".join(notes))


def _curves(points: Sequence[InprocessPoint]) -> tuple[tuple[str, tuple[tuple[int, float], ...]], ...]:
    best: dict[str, dict[int, float]] = {}
    for p in points:
        by_batch = best.setdefault(p.precision, {})
        by_batch[p.batch] = max(by_batch.get(p.batch, 0.0), p.throughput)
    return tuple((precision, tuple(sorted(by_batch.items()))) for precision, by_batch in best.items())


def plot_pipeline(data: PipelineData) -> go.Figure:
    """Left: in-process throughput per batch size and variant; right: the four bars."""
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.45, 0.55],
        subplot_titles=("In process, per batch size", "Given, ONNX Runtime tuned, Triton tuned"),
    )
    fig.update_layout(
        template="plotly_white",
        title="From the model as given to Triton tuned (inferences / s)",
        height=PNG_SIZE[1],
        margin={"l": 60, "r": 20, "t": 80, "b": 60},
    )
    for precision, curve in data.inprocess:
        fig.add_trace(
            go.Scatter(
                x=[batch for batch, _ in curve],
                y=[rate for _, rate in curve],
                name=f"{precision} in process",
                mode="lines+markers",
            ),
            1,
            1,
        )
    fig.add_trace(
        go.Bar(
            x=[bar.label.replace(", ", ",<br>") for bar in data.bars],
            y=[bar.throughput for bar in data.bars],
            text=[f"{bar.throughput:.0f}<br>{bar.detail.replace(', ', '<br>')}" for bar in data.bars],
            textposition="inside",
            textangle=0,
            showlegend=False,
            marker={"color": ["#9aa5b1", "#4c78a8", "#b0b0b0", "#f58518"][: len(data.bars)]},
        ),
        1,
        2,
    )
    batches = sorted({batch for _, curve in data.inprocess for batch, _ in curve})
    fig.update_xaxes(title_text="batch size", type="log", tickvals=batches, row=1, col=1)
    fig.update_xaxes(tickangle=0, row=1, col=2)
    fig.update_yaxes(title_text="inferences / s", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=2)
    return fig


def study_pipeline_data(
    attrs: Mapping, baseline: tuple[float, int] | None, best: tuple[float, int] | None
) -> PipelineData:
    """The pipeline data of a study from its attributes and its served baseline and best."""
    recorded = attrs.get("inprocess_profile") or {}
    points = [InprocessPoint.from_dict(p) for p in recorded.get("points", ())]
    budget = attrs.get("latency_budget_ms")
    return pipeline_data(
        points,
        skipped=recorded.get("skipped"),
        baseline=baseline,
        best=best,
        latency_budget_ms=float(budget) if budget is not None else None,
    )
