"""Reports people read and share, rebuilt from the study database alone.

``build_report_data`` turns a study into small records (:mod:`optimizer.report.data`),
:mod:`optimizer.report.html` draws them into one self-contained HTML page, and
:mod:`optimizer.report.csv` lays every trial out as a row. ``write_report`` writes both files; a joint
study (several models on one server) gets its own page and CSV (:mod:`optimizer.report.joint`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from optimizer.errors import disk_full, is_disk_full
from optimizer.paths import studies_dir
from optimizer.report.csv import trials_frame
from optimizer.report.data import ReportData, build_report_data
from optimizer.report.html import render_html
from optimizer.report.joint import joint_report_data, joint_trials_frame, render_joint_html
from optimizer.report.pipeline import PNG_NAME
from optimizer.report.static import write_figures
from optimizer.study.records import is_joint

__all__ = [
    "CSV_NAME",
    "HTML_NAME",
    "ReportData",
    "ReportPaths",
    "build_report_data",
    "write_report",
]

HTML_NAME = "report.html"
CSV_NAME = "trials.csv"


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    csv: Path
    png: Path | None = None  # the pipeline figure, when the study has its figures
    png_note: str | None = None  # why there is no pipeline figure
    figures: tuple[Path, ...] = ()  # every static figure written (PNG and SVG; see report/static.py)


def write_report(study: Any, out_dir: Path, *, repository: Path | None = None) -> ReportPaths:
    """Write ``report.html``, ``trials.csv`` and the static figures for ``study`` into ``out_dir``.

    ``out_dir`` is created if missing. The figures (``pipeline``, ``curves``, ``pareto``, each PNG and SVG)
    are drawn by matplotlib, no browser needed; a figure without data (the pipeline without an
    in-process profile) is left out, and ``png_note`` says why the pipeline figure is missing.

    Each file is written to a temporary name and moved into place, so a crash never leaves half a report.

    Args:
        study: An ``optuna.Study`` written by ``optimize study`` (an empty one gives an empty report).
        out_dir: The report's directory.
        repository: Where the best trial's model repository was exported (shown in the headline);
            default ``studies/<study>/best/<model>``.

    Returns:
        The paths of the files.
    """

    try:
        return _write_report(study, out_dir, repository)
    except OSError as exc:
        if is_disk_full(exc):  # each file is written beside its name: the previous report stays whole
            raise disk_full(out_dir, REPORT_BYTES) from exc
        raise


# What a report takes on disk, about: the HTML with plotly.js embedded (~5 MB), the CSV and six figures.
REPORT_BYTES = 6 * 2**20


def _write_report(study: Any, out_dir: Path, repository: Path | None) -> ReportPaths:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(html=out_dir / HTML_NAME, csv=out_dir / CSV_NAME)
    if is_joint(study.user_attrs):
        where = repository or studies_dir() / study.study_name / "best"
        _write_atomically(paths.html, render_joint_html(joint_report_data(study), str(where)))
        _write_atomically(paths.csv, joint_trials_frame(study).to_csv(index=False))
        return paths
    data = build_report_data(study, repository=repository)
    _write_atomically(paths.html, render_html(data))
    _write_atomically(paths.csv, trials_frame(study).to_csv(index=False))
    figures = write_figures(data, out_dir)
    png = out_dir / PNG_NAME
    if png in figures:
        return replace(paths, png=png, figures=figures)
    why = data.pipeline.note if data.pipeline is not None and data.pipeline.note else "nothing measured yet"
    return replace(paths, png_note=f"no pipeline figure: {why}", figures=figures)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
