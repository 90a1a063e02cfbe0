"""The report of a joint study (several models on one server): per-model figures, and whose budget bound it.

``joint_report_data`` turns the study into records (pure); ``plot_joint_history`` and
``plot_joint_models`` draw them; ``render_joint_html`` lays out the page and ``joint_trials_frame`` the
CSV, one row per trial with each model's throughput, p99 and config as columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from optuna.trial import TrialState
from plotly.subplots import make_subplots

from optimizer.report.html import _CSS, _PLOT_CONFIG, COLORS, _card, _e, _layout, _num, _section, _table
from optimizer.study.records import joint_budgets

__all__ = [
    "JointReportData",
    "JointTrial",
    "joint_report_data",
    "joint_trials_frame",
    "plot_joint_history",
    "plot_joint_models",
    "render_joint_html",
]


@dataclass(frozen=True)
class JointTrial:
    """One trial of a joint study: the mix's figure and each model's at the level it was scored at."""

    number: int
    status: str  # "feasible", "infeasible", "pruned", "failed", "running"
    baseline: bool
    mix_throughput: float | None  # requests/s the server sustained in the traffic mix
    throughput: Mapping[str, float] = field(default_factory=dict)  # per model, inferences/s
    p99_ms: Mapping[str, float] = field(default_factory=dict)
    clients: int | None = None  # the level's closed-loop clients, shared by the models in the mix
    candidates: Mapping[str, str] = field(default_factory=dict)  # per tuned model (ensemble steps too)
    reason: str = ""
    bound_by: tuple[str, ...] = ()  # the models whose budget ended the sweep


@dataclass(frozen=True)
class JointReportData:
    study_name: str
    models: tuple[str, ...]  # what the traffic goes to (models and ensembles)
    budgets_ms: Mapping[str, float]
    traffic: Mapping[str, float]
    ensembles: Mapping[str, tuple[str, ...]]  # ensemble -> its steps
    trials: tuple[JointTrial, ...]
    best: JointTrial | None
    baseline: JointTrial | None  # the untuned models side by side, feasible or not (its figures are shown)

    @property
    def ratio(self) -> float | None:
        baseline = self.baseline
        if (
            self.best is None
            or baseline is None
            or baseline.status != "feasible"
            or not baseline.mix_throughput
        ):
            return None
        return (self.best.mix_throughput or 0.0) / baseline.mix_throughput


# --- data (pure) ---------------------------------------------------------------------------------------


def joint_report_data(study: Any) -> JointReportData:
    """The report's records, read from the study's attributes and trials alone."""
    attrs = study.user_attrs
    traffic = dict(attrs.get("traffic", {}))
    trials = tuple(_trial(t) for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number))
    measured = [t for t in trials if t.status == "feasible"]
    return JointReportData(
        study_name=study.study_name,
        models=tuple(traffic),
        budgets_ms=joint_budgets(attrs),
        traffic=traffic,
        ensembles={name: tuple(steps) for name, steps in attrs.get("ensembles", {}).items()},
        trials=trials,
        best=max(measured, key=lambda t: t.mix_throughput or 0.0, default=None),
        baseline=next((t for t in trials if t.baseline and t.throughput), None),
    )


def _trial(trial: Any) -> JointTrial:
    attrs = trial.user_attrs
    level = attrs.get("best_level") or (attrs.get("levels") or [None])[-1] or {}
    figures = level.get("models", {})
    return JointTrial(
        number=trial.number,
        status=_status(trial),
        baseline=bool(attrs.get("baseline")),
        mix_throughput=attrs.get("throughput") if attrs.get("feasible") else level.get("mix_throughput"),
        throughput={name: f["throughput"] for name, f in figures.items()},
        p99_ms={name: f["p99_ms"] for name, f in figures.items()},
        clients=_clients(level.get("clients")),
        candidates=dict(attrs.get("candidates", {})),
        reason=attrs.get("reason", ""),
        bound_by=tuple(attrs.get("bound_by", ())),
    )


def _clients(stored: Any) -> int | None:
    # Studies before shared clients recorded each model's own clients: their sum is the level's.
    return sum(stored.values()) if isinstance(stored, dict) else stored


def _status(trial: Any) -> str:
    if trial.state == TrialState.COMPLETE:
        return "feasible" if trial.user_attrs.get("feasible") else "infeasible"
    if trial.state == TrialState.PRUNED:
        return "infeasible" if trial.user_attrs.get("feasible") is False else "pruned"
    return "failed" if trial.state == TrialState.FAIL else "running"


def joint_trials_frame(study: Any) -> pd.DataFrame:
    """Every trial as one row: ``mix_throughput``, ``clients``, ``<model>.throughput``, ``<model>.p99_ms``,
    ``<model>.budget_ms``, ``<tuned model>.candidate``, ``bound_by``, ``reason`` and ``param.<name>``."""
    data = joint_report_data(study)
    params = {t.number: t.params for t in study.get_trials(deepcopy=False)}
    rows = []
    for trial in data.trials:
        row: dict[str, Any] = {
            "number": trial.number,
            "state": trial.status,
            "baseline": trial.baseline,
            "mix_throughput": trial.mix_throughput,
            "clients": trial.clients,
        }
        for name in data.models:
            row[f"{name}.throughput"] = trial.throughput.get(name)
            row[f"{name}.p99_ms"] = trial.p99_ms.get(name)
            row[f"{name}.budget_ms"] = data.budgets_ms.get(name)
        row.update({f"{name}.candidate": text for name, text in trial.candidates.items()})
        row["bound_by"] = ";".join(trial.bound_by)
        row["reason"] = trial.reason
        row.update({f"param.{name}": value for name, value in sorted(params[trial.number].items())})
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["number", "state", "mix_throughput"])


# --- figures -------------------------------------------------------------------------------------------


def plot_joint_history(data: JointReportData) -> go.Figure:
    """Requests/s in the traffic mix per trial (feasible and not), and the best so far."""
    fig = go.Figure()
    for status in ("feasible", "infeasible"):
        shown = [t for t in data.trials if t.status == status and t.mix_throughput is not None]
        fig.add_trace(
            go.Scatter(
                x=[t.number for t in shown],
                y=[t.mix_throughput for t in shown],
                mode="markers",
                name=status,
                marker={"color": COLORS[status], "size": 9},
                text=[_hover(t) for t in shown],
                hoverinfo="text",
            )
        )
    best, xs, ys = 0.0, [], []
    for trial in data.trials:
        if trial.status == "feasible" and trial.mix_throughput is not None:
            best = max(best, trial.mix_throughput)
            xs.append(trial.number)
            ys.append(best)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"shape": "hv"}, name="best so far"))
    fig.update_xaxes(title="trial")
    fig.update_yaxes(title="requests/s in the traffic mix")
    return _layout(fig, "Search: what the mix sustained, trial by trial")


def _hover(trial: JointTrial) -> str:
    lines = [f"#{trial.number}: {_num(trial.mix_throughput)} req/s in the mix, {trial.clients} clients"]
    lines += [f"{n}: {trial.throughput[n]:.1f}/s, p99 {trial.p99_ms[n]:.1f} ms" for n in trial.throughput]
    return "<br>".join(lines)


def plot_joint_models(data: JointReportData) -> go.Figure:
    """Each model's throughput, and its p99 against its budget: the baseline beside the best."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("throughput (inf/s)", "p99 (ms) and budget"))
    for label, trial, color in (
        ("baseline", data.baseline, COLORS["baseline"]),
        ("best", data.best, COLORS["best overall"]),
    ):
        if trial is None:
            continue
        names = list(data.models)
        fig.add_trace(
            go.Bar(x=names, y=[trial.throughput.get(n) for n in names], name=label, marker_color=color),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Bar(
                x=names,
                y=[trial.p99_ms.get(n) for n in names],
                name=label,
                marker_color=color,
                showlegend=False,
            ),
            row=1,
            col=2,
        )
    fig.add_trace(
        go.Scatter(
            x=list(data.models),
            y=[data.budgets_ms.get(n) for n in data.models],
            mode="markers",
            marker={"symbol": "line-ew-open", "size": 40, "color": COLORS["budget"]},
            name="budget",
        ),
        row=1,
        col=2,
    )
    fig.update_layout(barmode="group")
    return _layout(fig, "Per model, at the level each trial was scored at")


# --- the page ------------------------------------------------------------------------------------------


def render_joint_html(data: JointReportData, repository: str = "") -> str:
    """The joint study's report as one self-contained HTML page."""
    figures = [("history", plot_joint_history(data)), ("models", plot_joint_models(data))]
    divs = {
        name: fig.to_html(
            full_html=False, include_plotlyjs=(i == 0), config=_PLOT_CONFIG, div_id=f"fig-{name}"
        )
        for i, (name, fig) in enumerate(figures)
    }
    body = [
        _header(data),
        _headline(data, repository),
        _section("The best joint config, per model", _bound_note(data.best), _model_table(data)),
        _section("Search", "", divs["history"]),
        _section("Per model", "Bars: each model's figures; red marks: its p99 budget.", divs["models"]),
        _section("Every trial", "", _trials_table(data)),
        "<footer>Built by <code>optimize report</code> from the study database alone. "
        'Every trial and measurement: <a href="trials.csv">trials.csv</a>.</footer>',
    ]
    title = _e(f"optimize report: {', '.join(data.models)} (study {data.study_name})")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def _header(data: JointReportData) -> str:
    mix = ", ".join(f"{name} {weight:g}" for name, weight in data.traffic.items())
    budgets = ", ".join(f"{name} {_num(data.budgets_ms.get(name), 'g', ' ms')}" for name in data.models)
    ensembles = "".join(
        f" · ensemble <b>{_e(name)}</b> = {_e(' → '.join(steps))}" for name, steps in data.ensembles.items()
    )
    return (
        f"<header><h1>{_e(', '.join(data.models))} on one Triton Inference Server</h1>"
        f'<p class="meta">study <b>{_e(data.study_name)}</b> · traffic mix <b>{_e(mix)}</b> · p99 budgets '
        f"<b>{_e(budgets)}</b>{ensembles} · {len(data.trials)} trials</p></header>"
    )


def _headline(data: JointReportData, repository: str) -> str:
    def card(label: str, trial: JointTrial | None) -> str:
        if trial is None or trial.status != "feasible":
            detail = trial.reason if trial is not None else "no trial within every budget"
            return _card(label, "-", detail)
        return _card(
            label, f"{trial.mix_throughput:,.1f} req/s", f"in the traffic mix · trial #{trial.number}"
        )

    ratio = f"{data.ratio:.2f}x" if data.ratio is not None else "-"
    cards = [
        card("Baseline (each model untuned, side by side)", data.baseline),
        card("Best within every budget", data.best),
        _card("Speed-up", ratio, "best / baseline requests/s in the mix"),
    ]
    where = f"<p>Every model of the best trial, exported as one repository: <code>{_e(repository)}</code></p>"
    return f'<section class="headline">\n<div class="cards">{"".join(cards)}</div>\n{where if repository else ""}\n</section>'


def _bound_note(best: JointTrial | None) -> str:
    if best is None:
        return "No joint config kept every model within its budget yet."
    bound = f" (bound by {', '.join(best.bound_by)})" if best.bound_by else ""
    return _e(f"Why the best trial's sweep stopped where it did: {best.reason}{bound}.")


def _model_table(data: JointReportData) -> str:
    best = data.best
    if best is None:
        return ""
    base = data.baseline
    rows = []
    for name in data.models:
        steps = data.ensembles.get(name, (name,))
        config = "; ".join(
            f"{step}: {best.candidates.get(step, '?')}"
            if name in data.ensembles
            else best.candidates.get(step, "?")
            for step in steps
        )
        rows.append(
            [
                _e(name),
                _num(best.throughput.get(name)),
                _num(best.p99_ms.get(name)),
                _num(data.budgets_ms.get(name), "g"),
                _num(base.throughput.get(name)) if base else "-",
                f"<code>{_e(config)}</code>",
            ]
        )
    headers = [
        "model",
        "throughput (inf/s)",
        "p99 (ms)",
        "budget (ms)",
        "baseline (inf/s)",
        "config",
    ]
    return _table(headers, rows, "no feasible trial")


def _trials_table(data: JointReportData) -> str:
    rows = [
        [
            f"#{t.number}" + (" (baseline)" if t.baseline else ""),
            _e(t.status),
            _num(t.mix_throughput),
            _e(", ".join(f"{n} {t.throughput[n]:.1f}/s p99 {t.p99_ms[n]:.1f} ms" for n in t.throughput)),
            _e(t.reason),
        ]
        for t in data.trials
    ]
    return _table(
        ["trial", "status", "req/s in the mix", "per model", "why the sweep stopped"], rows, "no trial yet"
    )
