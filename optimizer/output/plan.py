"""The hardware a traffic target needs, from what the study measured.

A plan answers "how many servers of the kind the study ran on does this traffic need?" for the exported
config, the other configs on the Pareto front (fewer, busier servers against more, lighter ones) and the
untuned baseline. It reads the study database alone and uses **measured** figures only: a config's
throughput per server is the highest throughput it sustained with its p99 within the latency budget, at a
load where it was measured (a level of its sweep, or the confirmation's mean at the trial's load), never
an extrapolation past the loads measured.

Sizing: each server is planned to run at ``1 - headroom`` of its measured throughput (30% spare by
default: bursts, a server lost, the drift a shared machine shows), so ``servers = ceil(rps / (throughput
x (1 - headroom)))``. Memory fit divides a server's memory by the resident memory the server process tree
had under the config's load (and the GPUs' by the config's GPU memory, where a GPU study recorded it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from optuna.trial import TrialState

from optimizer.errors import StudyError, UsageError
from optimizer.study.records import is_joint
from optimizer.study.results import best_trial, confirmed_baseline, finalists

__all__ = [
    "DEFAULT_HEADROOM",
    "Capacity",
    "MemoryFit",
    "Plan",
    "Sizing",
    "capacities",
    "capacity_of",
    "make_plan",
]

DEFAULT_HEADROOM = 0.3  # the share of each server's measured throughput kept spare
PARETO_ALTERNATIVES = 4  # the Pareto-front configs shown beside the best, fastest first


@dataclass(frozen=True)
class Capacity:
    """What one server of the measured kind sustains under one config, within the latency budget."""

    trial: int
    role: str  # "best" (the exported trial), "pareto" or "baseline"
    config: str  # the config's one-line summary
    throughput_per_server: float  # inf/s, measured with p99 within the budget
    p99_ms: float  # at that load
    load: str  # where it was measured: "concurrency 8" or "request rate 200/s"
    concurrency: int | None  # the requests in flight per server at that load (closed-loop studies)
    basis: str  # "confirmed mean of 3 measurements" or "its trial's measurement"
    memory_mb: float | None  # the server process tree's resident memory under that load
    gpu_memory_mb: float | None = None  # the GPUs' memory in use under that load (GPU studies)

    def usable(self, headroom: float) -> float:
        """The throughput a server is planned to carry: its measured throughput less the headroom."""
        return self.throughput_per_server * (1.0 - headroom)

    def servers(self, rps: float, headroom: float) -> int:
        return max(1, math.ceil(rps / self.usable(headroom) - 1e-9))


@dataclass(frozen=True)
class Sizing:
    """One config's share of the plan: its capacity and the servers (and cost) the traffic needs."""

    capacity: Capacity
    servers: int  # at the peak (--rps)
    servers_at_average: int | None  # at --average-rps, with autoscaling
    cost_per_hour: float | None  # at the peak's servers
    cost_per_million: float | None  # per million inferences at the average (or peak) traffic

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self.capacity)
        record.update(
            servers=self.servers,
            servers_at_average=self.servers_at_average,
            cost_per_hour=_round(self.cost_per_hour),
            cost_per_million=_round(self.cost_per_million),
        )
        record["throughput_per_server"] = round(self.capacity.throughput_per_server, 3)
        return record


@dataclass(frozen=True)
class MemoryFit:
    """How many copies of the best config one server's memory holds."""

    memory_mb: float  # one copy: the server process tree under the best config's load
    server_memory_mb: float  # the server's memory (the study machine's unless given)
    gpu_memory_mb: float | None = None
    server_gpu_memory_mb: float | None = None

    @property
    def copies(self) -> int:
        return int(self.server_memory_mb // self.memory_mb) if self.memory_mb > 0 else 0

    @property
    def gpu_copies(self) -> int | None:
        if not self.gpu_memory_mb or not self.server_gpu_memory_mb:
            return None
        return int(self.server_gpu_memory_mb // self.gpu_memory_mb)


@dataclass(frozen=True)
class Plan:
    study_name: str
    rps: float
    average_rps: float | None
    latency_budget_ms: float
    headroom: float
    price_per_hour: float | None
    server: str  # the kind of server measured: "2 cores, 23.5 GiB (AMD EPYC)"
    sizings: tuple[Sizing, ...]  # best first, then the Pareto alternatives, then the baseline
    memory: MemoryFit | None
    models: tuple[str, ...] = ()  # a joint study: the models the repository serves together
    notes: tuple[str, ...] = field(default=())

    def role(self, role: str) -> Sizing | None:
        return next((s for s in self.sizings if s.capacity.role == role), None)

    def to_dict(self) -> dict[str, Any]:
        memory = None
        if self.memory is not None:
            memory = {
                **asdict(self.memory),
                "copies": self.memory.copies,
                "gpu_copies": self.memory.gpu_copies,
            }
        return {
            "study": self.study_name,
            "rps": self.rps,
            "average_rps": self.average_rps,
            "latency_budget_ms": self.latency_budget_ms,
            "headroom": self.headroom,
            "price_per_hour": self.price_per_hour,
            "server": self.server,
            "candidates": [{**s.to_dict()} for s in self.sizings],
            "memory_fit": memory,
            "models": list(self.models),
            "notes": list(self.notes),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# --- capacities from the study's records ---------------------------------------------------------------


def _level_load(level: Mapping[str, Any]) -> str:
    if level.get("request_rate") is not None:
        return f"request rate {level['request_rate']:g}/s"
    return f"concurrency {level.get('concurrency')}"


def _trial_load(attrs: Mapping[str, Any]) -> str:
    if attrs.get("request_rate") is not None:
        return f"request rate {attrs['request_rate']:g}/s"
    return f"concurrency {attrs.get('concurrency')}"


def capacity_of(trial, role: str, budget_ms: float, confirmed: Mapping[int, Any]) -> Capacity | None:
    """``trial``'s capacity within ``budget_ms`` (None: no load it was measured at met the budget).

    The trial's own figure at its own load (its precise measurement, the mean of its two loads where it
    had two), or the confirmation's mean where the study re-measured it there. Only when a budget other
    than the study's leaves that load over budget does a lighter level of its sweep count, with the
    figures of that level's screening window.
    """
    attrs = trial.user_attrs
    load, throughput, p99 = _trial_load(attrs), attrs.get("throughput"), attrs.get("p99_ms")
    concurrency = attrs.get("concurrency") if attrs.get("request_rate") is None else None
    mix = attrs.get("best_level")
    if p99 is None and mix:  # a joint trial: the mix's requests/s, every model's p99 within its own budget
        p99 = max((m.get("p99_ms") or 0.0 for m in (mix.get("models") or {}).values()), default=None)
        concurrency = mix.get("clients")
        load = f"{concurrency} clients in the mix"

    def capacity(throughput: float, p99: float, load: str, concurrency: int | None, basis: str) -> Capacity:
        return Capacity(
            trial.number,
            role,
            str(attrs.get("candidate", "")),
            float(throughput),
            float(p99),
            load,
            concurrency,
            basis,
            attrs.get("memory_mb"),
            attrs.get("gpu_memory_mb"),
        )

    if throughput is None or p99 is None:
        return None
    if p99 > budget_ms:
        levels = [
            lv
            for lv in attrs.get("sweep") or []
            if lv.get("p99_ms") is not None and lv["p99_ms"] <= budget_ms
        ]
        level = max(levels, key=lambda lv: lv["throughput"], default=None)
        if level is None:
            return None
        return capacity(
            level["throughput"],
            level["p99_ms"],
            _level_load(level),
            level.get("concurrency"),
            "its sweep's screening window at that load",
        )
    basis = "its trial's measurement"
    finalist = confirmed.get(trial.number)
    if finalist is not None and finalist.load == load and finalist.failure is None:
        if statistics.median(finalist.p99_ms) <= budget_ms:
            throughput, p99 = finalist.mean, statistics.median(finalist.p99_ms)
            basis = f"confirmed mean of {len(finalist.throughput)} measurements"
    return capacity(throughput, p99, load, concurrency, basis)


def capacities(study, budget_ms: float | None = None, exported: int | None = None) -> tuple[Capacity, ...]:
    """The best (or ``exported``) trial's capacity, its Pareto alternatives' and the baseline's.

    Raises:
        StudyError: when no trial met the budget.
    """
    budget = _budget(study, budget_ms)
    confirmed = {f.trial: f for f in (*finalists(study), confirmed_baseline(study)) if f is not None}
    measured = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "same_config_as" not in t.user_attrs and t.user_attrs.get("throughput") is not None
    ]
    best = (
        best_trial(study) if exported is None else next((t for t in measured if t.number == exported), None)
    )
    if exported is not None and best is None:
        raise StudyError(f"study {study.study_name!r} has no measured trial {exported} to plan for")
    baseline = next((t for t in measured if t.user_attrs.get("baseline")), None)
    result: list[Capacity] = []
    best_capacity = capacity_of(best, "best", budget, confirmed) if best is not None else None
    if best_capacity is None and exported is not None:
        raise StudyError(
            f"trial {exported} met the {budget:g} ms latency budget at no load it was measured at: "
            "plan for another --trial"
        )
    if best_capacity is None:  # a budget the exported config cannot meet: the fastest config that did
        within = [c for c in (capacity_of(t, "best", budget, confirmed) for t in measured) if c is not None]
        best_capacity = max(within, key=lambda c: c.throughput_per_server, default=None)
        best = next((t for t in measured if best_capacity and t.number == best_capacity.trial), None)
    if best_capacity is None:
        raise StudyError(
            f"study {study.study_name!r} has no feasible trial within a {budget:g} ms latency budget to plan "
            "from: run the study (or give a larger --latency-budget-ms)"
        )
    result.append(best_capacity)
    others = [
        c
        for c in (
            capacity_of(t, "pareto", budget, confirmed)
            for t in measured
            if t is not best and t is not baseline
        )
        if c is not None
    ]
    result.extend(_pareto(best_capacity, others)[:PARETO_ALTERNATIVES])
    baseline_capacity = capacity_of(baseline, "baseline", budget, confirmed) if baseline is not None else None
    if baseline_capacity is not None and baseline is not best:
        result.append(baseline_capacity)
    return tuple(result)


def _pareto(best: Capacity, others: Sequence[Capacity]) -> list[Capacity]:
    """Configs no other config (the best included) beats on both throughput and p99, fastest first; one
    per config summary (the same config measured twice counts once)."""
    everyone = [best, *others]
    front = [
        c
        for c in others
        if not any(
            o is not c
            and o.throughput_per_server >= c.throughput_per_server
            and o.p99_ms <= c.p99_ms
            and (o.throughput_per_server > c.throughput_per_server or o.p99_ms < c.p99_ms)
            for o in everyone
        )
    ]
    seen = {best.config}
    unique = []
    for capacity in sorted(front, key=lambda c: -c.throughput_per_server):
        if capacity.config not in seen:
            seen.add(capacity.config)
            unique.append(capacity)
    return unique


def _budget(study, budget_ms: float | None) -> float:
    if budget_ms is not None:
        if budget_ms <= 0:
            raise UsageError(f"--latency-budget-ms must be above 0, got {budget_ms:g}")
        if is_joint(study.user_attrs):
            raise UsageError(
                "a study of several models has a latency budget per model: leave out --latency-budget-ms"
            )
        return budget_ms
    if is_joint(study.user_attrs):
        return math.inf  # each joint trial's figure is already within every model's budget
    budget = study.user_attrs.get("latency_budget_ms")
    if budget is None:
        raise StudyError(f"study {study.study_name!r} has no latency budget yet: run the study first")
    return float(budget)


# --- the plan ------------------------------------------------------------------------------------------


def make_plan(
    study,
    rps: float,
    *,
    average_rps: float | None = None,
    latency_budget_ms: float | None = None,
    headroom: float = DEFAULT_HEADROOM,
    price_per_hour: float | None = None,
    server_memory_gb: float | None = None,
    server_gpu_memory_gb: float | None = None,
    exported: int | None = None,
) -> Plan:
    """Size a fleet for ``rps`` inferences/s from ``study``'s measured figures.

    Raises:
        UsageError: for a traffic target, headroom, price or memory that cannot be planned for.
        StudyError: when the study has no feasible trial within the budget.
    """
    _check_inputs(rps, average_rps, headroom, price_per_hour, server_memory_gb, server_gpu_memory_gb)
    budget = _budget(study, latency_budget_ms)
    sizings = tuple(
        _size(c, rps, average_rps, headroom, price_per_hour)
        for c in capacities(study, latency_budget_ms, exported)
    )
    hardware = study.user_attrs.get("hardware") or {}
    return Plan(
        study_name=study.study_name,
        rps=rps,
        average_rps=average_rps,
        latency_budget_ms=budget,
        headroom=headroom,
        price_per_hour=price_per_hour,
        server=_server_text(hardware, study.user_attrs),
        sizings=sizings,
        memory=_memory_fit(study, sizings[0].capacity, server_memory_gb, server_gpu_memory_gb),
        models=tuple(study.user_attrs.get("models") or ()) if is_joint(study.user_attrs) else (),
        notes=_notes(study, sizings),
    )


def _check_inputs(
    rps: float,
    average_rps: float | None,
    headroom: float,
    price: float | None,
    memory_gb: float | None,
    gpu_memory_gb: float | None,
) -> None:
    if not rps > 0:
        raise UsageError(f"--rps must be above 0 (inferences per second at the peak), got {rps:g}")
    if average_rps is not None and not 0 < average_rps <= rps:
        raise UsageError(f"--average-rps must be above 0 and at most --rps ({rps:g}), got {average_rps:g}")
    if not 0 <= headroom < 1:
        raise UsageError(f"--headroom must be at least 0 and below 1 (0.3 keeps 30% spare), got {headroom:g}")
    if price is not None and price < 0:
        raise UsageError(f"--price-per-hour must be 0 or more, got {price:g}")
    for name, value in (("--server-memory-gb", memory_gb), ("--server-gpu-memory-gb", gpu_memory_gb)):
        if value is not None and value <= 0:
            raise UsageError(f"{name} must be above 0, got {value:g}")


def _size(
    capacity: Capacity, rps: float, average: float | None, headroom: float, price: float | None
) -> Sizing:
    servers = capacity.servers(rps, headroom)
    at_average = capacity.servers(average, headroom) if average is not None else None
    cost = price * servers if price is not None else None
    per_million = None
    if price is not None:  # the servers running for the traffic they carry: at the average with autoscaling
        hourly_servers, hourly_rps = (
            (at_average, average) if at_average is not None and average else (servers, rps)
        )
        per_million = price * hourly_servers / (hourly_rps * 3600) * 1e6
    return Sizing(capacity, servers, at_average, cost, per_million)


def _memory_fit(
    study, best: Capacity, memory_gb: float | None, gpu_memory_gb: float | None
) -> MemoryFit | None:
    """Copies of the best config in a server's memory (the study machine's unless given), and in its
    GPU's (the GPU the study measured on unless given)."""
    if not best.memory_mb:
        return None
    hardware = study.user_attrs.get("hardware") or {}
    server_mb = memory_gb * 1024 if memory_gb is not None else (hardware.get("memory_gib") or 0) * 1024
    if not server_mb:
        return None
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == best.trial)
    gpu_total = (
        gpu_memory_gb * 1024 if gpu_memory_gb is not None else trial.user_attrs.get("gpu_memory_total_mb")
    )
    return MemoryFit(best.memory_mb, server_mb, best.gpu_memory_mb, gpu_total)


def _server_text(hardware: Mapping[str, Any], attrs: Mapping[str, Any]) -> str:
    """The kind of server measured: the cores the study ran on (its pinning counted), memory, CPU, GPUs."""
    cores = attrs.get("cpu_cores") or hardware.get("cores")
    parts = [
        f"{cores} cores" if cores else "",
        f"{hardware['memory_gib']:g} GiB" if hardware.get("memory_gib") else "",
    ]
    text = ", ".join(p for p in parts if p) or "the study's machine"
    kind = " + ".join([*([hardware["cpu"]] if hardware.get("cpu") else []), *(hardware.get("gpu") or [])])
    return f"{text} ({kind})" if kind else text


def _notes(study, sizings: Sequence[Sizing]) -> tuple[str, ...]:
    notes = []
    if not any(s.capacity.role == "baseline" for s in sizings):
        notes.append(
            "the untuned baseline met no latency budget at any load measured: it cannot serve this traffic"
        )
    best = sizings[0]
    exported = best_trial(study)
    if exported is not None and exported.number != best.capacity.trial:
        notes.append(
            f"the exported #{exported.number} met this latency budget at no load measured: #{best.capacity.trial} "
            f"is the fastest config that did (export it with --trial {best.capacity.trial})"
        )
    fewer = [s for s in sizings if s.capacity.role == "pareto" and s.servers < best.servers]
    if fewer:
        lighter = min(fewer, key=lambda s: s.servers)
        notes.append(
            f"within this budget #{lighter.capacity.trial} needs fewer servers ({lighter.servers}) than the "
            f"exported #{best.capacity.trial} ({best.servers}): export it with --trial "
            f"{lighter.capacity.trial}, or tune for this budget in a study with --latency-budget-ms"
        )
    target = study.user_attrs.get("target")
    if target and not str(target).startswith("embedded") and target != "local":
        notes.append(f"measured on the {target} target: the servers are of that machine's kind")
    return tuple(notes)


# --- the plan as the user reads it ---------------------------------------------------------------------


def plan_lines(plan: Plan) -> list[str]:
    """The lines around the table: the traffic asked for, tuned against untuned, memory, notes."""
    traffic = f"{plan.rps:,.0f} inf/s at the peak" + (
        f" ({plan.average_rps:,.0f} on average)" if plan.average_rps is not None else ""
    )
    budget = (
        "every model's latency budget"
        if math.isinf(plan.latency_budget_ms)
        else f"p99 within {plan.latency_budget_ms:g} ms"
    )
    lines = [
        f"plan for study {plan.study_name}: {traffic}, {budget}, {plan.headroom:.0%} headroom per server; "
        f"servers of the kind measured: {plan.server}"
    ]
    best, baseline = plan.role("best"), plan.role("baseline")
    if best is not None and baseline is not None:
        lines.append(
            f"the untuned config would need {baseline.servers} server(s), the tuned one {best.servers}"
            + (f" ({baseline.servers - best.servers} fewer)" if best.servers < baseline.servers else "")
        )
    if plan.memory is not None:
        fit = plan.memory
        lines.append(
            f"memory: a server of the best config holds {fit.memory_mb:,.0f} MiB resident under its load: "
            f"{fit.copies} copies fit in {fit.server_memory_mb / 1024:g} GiB"
            + (f" (the {len(plan.models)} models of the joint repository together)" if plan.models else "")
            + (
                f"; {fit.gpu_copies} copies in the GPU's {fit.server_gpu_memory_mb / 1024:g} GiB"
                if fit.gpu_copies is not None and fit.server_gpu_memory_mb
                else ""
            )
        )
    lines.extend(f"note: {note}" for note in plan.notes)
    return lines


def plan_table(plan: Plan) -> Any:
    """A rich table: one row per config, the servers the traffic needs and what they cost."""
    from rich.table import Table

    table = Table(title="servers needed, from the study's measured figures")
    priced = plan.price_per_hour is not None
    columns = [
        "role",
        "trial",
        "config",
        "inf/s per server (measured)",
        "planned per server",
        "p99 (ms)",
        "load",
        "servers",
        *(["at average"] if plan.average_rps is not None else []),
        *(["cost/hour", "cost/M inf"] if priced else []),
        "measured as",
    ]
    for column in columns:
        table.add_column(column)
    for sizing in plan.sizings:
        c = sizing.capacity
        table.add_row(
            c.role,
            f"#{c.trial}",
            c.config,
            f"{c.throughput_per_server:,.1f}",
            f"{c.usable(plan.headroom):,.1f}",
            f"{c.p99_ms:.1f}",
            c.load,
            str(sizing.servers),
            *([str(sizing.servers_at_average)] if plan.average_rps is not None else []),
            *([f"{sizing.cost_per_hour:,.2f}", f"{sizing.cost_per_million:,.4f}"] if priced else []),
            c.basis,
        )
    return table


REFERENCE_RPS = 1000.0  # the traffic the summary and the report size for, when none was asked


def capacity_line(study) -> str | None:
    """One line for the study's summary: what a server carries tuned and untuned, and the servers
    ``REFERENCE_RPS`` would need (None: nothing feasible to plan from)."""
    try:
        plan = make_plan(study, REFERENCE_RPS)
    except (StudyError, UsageError):
        return None
    best, baseline = plan.role("best"), plan.role("baseline")
    assert best is not None  # make_plan raises without one
    untuned = (
        f"; untuned {baseline.capacity.throughput_per_server:,.1f} inf/s: {baseline.servers} server(s)"
        if baseline is not None
        else "; the untuned config met the budget at no load measured"
    )
    return (
        f"capacity per server ({plan.server}), {REFERENCE_RPS:,.0f} inf/s at {plan.headroom:.0%} headroom: "
        f"tuned {best.capacity.throughput_per_server:,.1f} inf/s: {best.servers} server(s){untuned}; "
        f"for your traffic: optimize plan --study-name {study.study_name} --rps N"
    )
