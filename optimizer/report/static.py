"""Static figures, PNG and SVG, drawn with matplotlib: the pictures people paste into a ticket or a slide.

matplotlib because it is the field's default for static images: it rasterises with its own Agg renderer
(no browser, no display, no network, nothing to install beyond the wheel), writes PNG and SVG from one
figure, and every ML team already has it. The interactive HTML report keeps plotly; these files show the
same records (:mod:`optimizer.report.data`):

- ``pipeline``: the model as given and ONNX Runtime tuned in process, Triton as given and Triton tuned;
- ``curves``: throughput and p99 against client concurrency for the baseline, ONNX Runtime tuned and the best;
- ``pareto``: every measured trial's throughput against its p99, with the Pareto front and the budget.

Each file carries its figures as text too: the PNG in its ``Description`` text chunk, the SVG as text
elements (``svg.fonttype: none``), so what a picture shows can be searched and checked.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from optimizer.report.data import CurvesData, ReportData, ScatterData
from optimizer.report.pipeline import PipelineData

__all__ = ["FIGURE_NAMES", "write_figures"]

FIGURE_NAMES = ("pipeline", "curves", "pareto")
SIZE_IN = (11.0, 5.2)  # inches at 100 dpi: 1100 x 520 pixels, the size of the HTML's figures
BAR_COLOURS = ("#9aa5b1", "#4c78a8", "#b0b0b0", "#f58518")


def write_figures(data: ReportData, out_dir: Path) -> tuple[Path, ...]:
    """Draw every figure ``data`` has data for into ``out_dir`` as ``<name>.png`` and ``<name>.svg``.

    Each file is written beside its final name and moved into place, so a crash or a full disk never
    leaves half a picture where a previous one was.

    Returns:
        The files written, PNG before SVG, in :data:`FIGURE_NAMES` order.
    """
    drawers: dict[str, Callable[[], tuple[object, str] | None]] = {
        "pipeline": lambda: _pipeline(data.pipeline, data.info.model_name),
        "curves": lambda: _curves(data.curves, data.info.model_name),
        "pareto": lambda: _pareto(data.scatter, data.info.model_name),
    }
    written: list[Path] = []
    for name in FIGURE_NAMES:
        drawn = drawers[name]()
        if drawn is None:
            continue
        figure, description = drawn
        for suffix in (".png", ".svg"):
            written.append(_save(figure, out_dir / f"{name}{suffix}", description))
    return tuple(written)


def _save(figure, path: Path, description: str) -> Path:
    import matplotlib

    title = figure.get_suptitle() if hasattr(figure, "get_suptitle") else ""
    metadata = {"Title": title, "Description": description}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=path.suffix)
    os.close(fd)
    try:
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "optimize"}):
            figure.savefig(tmp, format=path.suffix[1:], dpi=100, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _figure(title: str, columns: int):
    """A figure of ``columns`` panels side by side, drawn off-screen (no pyplot, no global state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE_IN, layout="constrained")
    figure.suptitle(title)
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _pipeline(pipeline: PipelineData | None, model: str) -> tuple[object, str] | None:
    if pipeline is None or not pipeline.bars:
        return None
    figure, (left, right) = _figure(f"{model}: from the model as given to Triton tuned (inferences / s)", 2)
    for precision, curve in pipeline.inprocess:
        left.plot([b for b, _ in curve], [r for _, r in curve], marker="o", label=f"{precision} in process")
    batches = sorted({batch for _, curve in pipeline.inprocess for batch, _ in curve})
    if batches:
        left.set_xscale("log", base=2)
        left.set_xticks(batches, [str(b) for b in batches])
        left.legend(loc="best", fontsize="small")
    left.set(title="In process, per batch size", xlabel="batch size", ylabel="inferences / s")
    left.set_ylim(bottom=0)
    labels = [
        bar.label.replace(", ", "\n").replace("Runtime tuned", "Runtime\ntuned") for bar in pipeline.bars
    ]
    rates = [bar.throughput for bar in pipeline.bars]
    bars = right.bar(labels, rates, color=BAR_COLOURS[: len(rates)])
    right.bar_label(bars, [f"{bar.throughput:,.1f}\n{bar.detail}" for bar in pipeline.bars], fontsize="small")
    right.set(title="Given, ONNX Runtime tuned, Triton tuned")
    right.tick_params(axis="x", labelsize="small")
    right.set_ylim(0, max(rates) * 1.25)
    description = "; ".join(
        f"{bar.label}: {bar.throughput:.1f} inf/s ({bar.detail})" for bar in pipeline.bars
    )
    return figure, description


def _curves(curves: CurvesData, model: str) -> tuple[object, str] | None:
    if not curves.curves:
        return None
    figure, (left, right) = _figure(f"{model}: throughput and p99 vs client concurrency", 2)
    parts = []
    for curve in curves.curves:
        name = f"{curve.label} (#{curve.trial})"
        x = [level.concurrency for level in curve.levels]
        left.plot(x, [level.throughput for level in curve.levels], marker="o", label=name)
        right.plot(x, [level.p99_ms for level in curve.levels], marker="o", label=name)
        peak = max(curve.levels, key=lambda level: level.throughput, default=None)
        if peak is not None:
            parts.append(f"{name}: up to {peak.throughput:.1f} inf/s at concurrency {peak.concurrency}")
    if curves.latency_budget_ms is not None:
        right.axhline(curves.latency_budget_ms, color="#d62728", linestyle="--", label="latency budget")
    levels = sorted({level.concurrency for curve in curves.curves for level in curve.levels})
    for axes, ylabel in ((left, "inferences / s"), (right, "p99 (ms)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.set(xlabel="client concurrency", ylabel=ylabel)
        axes.set_ylim(bottom=0)
        axes.legend(loc="best", fontsize="small")
    return figure, "; ".join(parts)


def _pareto(scatter: ScatterData, model: str) -> tuple[object, str] | None:
    if not scatter.points:
        return None
    figure, (axes,) = _figure(f"{model}: every trial, throughput vs p99 (circled: the Pareto front)", 1)
    for status in sorted({p.status for p in scatter.points}):
        points = [p for p in scatter.points if p.status == status]
        axes.scatter([p.p99_ms for p in points], [p.throughput for p in points], label=status, alpha=0.8)
    front = sorted((p for p in scatter.points if p.trial in scatter.pareto), key=lambda p: p.p99_ms)
    axes.plot(
        [p.p99_ms for p in front],
        [p.throughput for p in front],
        marker="o",
        markersize=12,
        markerfacecolor="none",
        color="black",
        label="Pareto front",
    )
    for point in front:
        axes.annotate(
            f"#{point.trial} {point.throughput:,.1f}",
            (point.p99_ms, point.throughput),
            xytext=(8, -4),
            textcoords="offset points",
            fontsize="small",
        )
    if scatter.latency_budget_ms is not None:
        axes.axvline(scatter.latency_budget_ms, color="#d62728", linestyle="--", label="latency budget")
    axes.set(xlabel="p99 (ms)", ylabel="inferences / s")
    axes.set_ylim(bottom=0)
    axes.legend(loc="best", fontsize="small")
    description = "Pareto front: " + "; ".join(
        f"#{p.trial} {p.throughput:.1f} inf/s at p99 {p.p99_ms:.1f} ms ({p.candidate})" for p in front
    )
    return figure, description
