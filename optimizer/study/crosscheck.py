"""The cross-check: the baseline and the exported config measured by Triton's perf_analyzer beside ours.

``optimize`` is a measuring instrument, and users trust its figures when Triton's own tool agrees. After
the confirmation, the baseline and the exported trial are loaded once each and measured at their load by
the built-in generator and by perf_analyzer, alternating which engine goes first so that drift within a
load does not favour one. The figures join the study attribute ``confirmation``::

    {"engine": "perf_analyzer",
     "baseline": {"trial": 0, "load": "concurrency 1",
                  "builtin": {"throughput": ..., "p99_ms": ...}, "perf_analyzer": {...}},
     "best": {...the same...},
     "disagreements": ["best: throughput differs by 12% (builtin 180.1, perf_analyzer 160.4 inf/s)"]}

A difference over 10% (of perf_analyzer's figure) in throughput or p99 is a disagreement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial

from optimizer.measurement.levels import LevelResult
from optimizer.study.confirm import CONFIRMATION, RemeasureFailed, load_label
from optimizer.study.results import best_trial
from optimizer.study.settings import CROSS_CHECK_ENGINES

__all__ = [
    "DISAGREEMENT",
    "CrossCheckRow",
    "cross_check_rows",
    "cross_check",
    "disagreements",
    "needs_cross_check",
    "stored_cross_check",
]

DISAGREEMENT = 0.10
_FIGURES = (("throughput", "inf/s"), ("p99_ms", "ms"))

Measure = Callable[[FrozenTrial, tuple[str, ...]], list[LevelResult]]


def stored_cross_check(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The study's cross-check record (the ``confirmation`` attribute), or None when it has none."""
    record = attrs.get(CONFIRMATION) or {}
    return record if record.get("engine") in CROSS_CHECK_ENGINES and "best" in record else None


def needs_cross_check(attrs: Mapping[str, Any], engine: str | None, best: FrozenTrial | None) -> bool:
    """Whether ``engine`` still has to cross-check ``best`` (none yet, another engine, or a new best)."""
    if engine not in CROSS_CHECK_ENGINES or best is None:
        return False
    stored = stored_cross_check(attrs)
    return stored is None or stored["engine"] != engine or stored["best"].get("trial") != best.number


def cross_check(subjects: Sequence[tuple[str, FrozenTrial]], measure: Measure, engine: str) -> dict[str, Any]:
    """Measure each (role, trial) with the built-in generator and ``engine``; the record's new keys.

    A trial measured under two roles (the baseline is the best) is measured once. ``measure`` loads a
    trial's config and measures it with the engines given, in that order.
    """
    record: dict[str, Any] = {"engine": engine}
    done: dict[int, dict[str, Any]] = {}
    for index, (role, trial) in enumerate(subjects):
        if trial.number not in done:
            order = ("builtin", engine) if index % 2 == 0 else (engine, "builtin")
            done[trial.number] = _measured(trial, order, measure)
        record[role] = done[trial.number]
    record["disagreements"] = disagreements(record, engine)
    return record


def cross_check_study_step(study, measure: Measure, engine: str | None, note: Callable[[str], None]) -> None:
    """Measure the study's baseline and exported trial with ``engine`` beside ours; store the record.

    Nothing to do when no engine is asked for, no trial is feasible, or this best was checked already.
    """
    best = best_trial(study)
    if not needs_cross_check(study.user_attrs, engine, best):
        return
    assert best is not None and engine is not None  # needs_cross_check says so
    baseline = next(
        (
            t
            for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("baseline") and "config" in t.user_attrs
        ),
        None,
    )
    subjects = [("baseline", baseline), ("best", best)] if baseline is not None else [("best", best)]
    note(f"cross-checking {' and '.join(role for role, _ in subjects)} with {engine}")
    record = cross_check(subjects, measure, engine)
    for line in record["disagreements"]:
        note(f"{engine} disagrees: {line}")
    study.set_user_attr(CONFIRMATION, {**(study.user_attrs.get(CONFIRMATION) or {}), **record})


def _measured(trial: FrozenTrial, order: tuple[str, ...], measure: Measure) -> dict[str, Any]:
    entry: dict[str, Any] = {"trial": trial.number, "load": load_label(trial)}
    try:
        levels = measure(trial, order)
    except RemeasureFailed as exc:
        entry["failure"] = str(exc)
        return entry
    for engine, level in zip(order, levels, strict=True):
        entry[engine] = {"throughput": round(level.throughput, 3), "p99_ms": round(level.p99_ms, 3)}
    return entry


def disagreements(record: Mapping[str, Any], engine: str) -> list[str]:
    """One line per figure where the built-in generator and ``engine`` differ by over ``DISAGREEMENT``."""
    lines = []
    for role in ("baseline", "best"):
        entry = record.get(role) or {}
        ours, theirs = entry.get("builtin"), entry.get(engine)
        if not ours or not theirs:
            continue
        for figure, unit in _FIGURES:
            difference = relative_difference(ours[figure], theirs[figure])
            if abs(difference) > DISAGREEMENT:
                lines.append(
                    f"{role}: {figure.replace('_ms', '')} differs by {difference:+.0%} "
                    f"(builtin {ours[figure]:.1f}, {engine} {theirs[figure]:.1f} {unit})"
                )
    return lines


def relative_difference(ours: float, theirs: float) -> float:
    """(ours - theirs) / theirs; 0 when both are 0."""
    if theirs == 0:
        return 0.0 if ours == 0 else float("inf")
    return (ours - theirs) / theirs


@dataclass(frozen=True)
class CrossCheckRow:
    """One cross-checked trial as the summary and the report show it (None: not measured)."""

    role: str
    trial: int
    load: str
    builtin_throughput: float | None
    other_throughput: float | None
    builtin_p99_ms: float | None
    other_p99_ms: float | None
    failure: str | None

    @property
    def throughput_difference(self) -> float | None:
        return _difference(self.builtin_throughput, self.other_throughput)

    @property
    def p99_difference(self) -> float | None:
        return _difference(self.builtin_p99_ms, self.other_p99_ms)

    @property
    def disagrees(self) -> bool:
        return any(
            d is not None and abs(d) > DISAGREEMENT for d in (self.throughput_difference, self.p99_difference)
        )


def cross_check_rows(record: Mapping[str, Any]) -> list[CrossCheckRow]:
    """The baseline's and the best's rows of a stored cross-check record."""
    engine = record["engine"]
    rows = []
    for role in ("baseline", "best"):
        entry = record.get(role)
        if not entry:
            continue
        ours, theirs = entry.get("builtin") or {}, entry.get(engine) or {}
        rows.append(
            CrossCheckRow(
                role=role,
                trial=int(entry["trial"]),
                load=str(entry.get("load", "")),
                builtin_throughput=ours.get("throughput"),
                other_throughput=theirs.get("throughput"),
                builtin_p99_ms=ours.get("p99_ms"),
                other_p99_ms=theirs.get("p99_ms"),
                failure=entry.get("failure"),
            )
        )
    return rows


def _difference(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or theirs is None else relative_difference(ours, theirs)
