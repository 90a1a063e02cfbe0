"""The CSV of a study: one row per trial, its measurements and its config fields as columns."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Mapping
from typing import Any

import pandas as pd

from optimizer.study.confirm import Finalist
from optimizer.study.results import confirmed_baseline, finalists

__all__ = ["MEASUREMENTS", "flatten_config", "trials_frame"]

# Trial user attributes copied as columns, in this order.
MEASUREMENTS = (
    "baseline",
    "feasible",
    "candidate",
    "throughput",
    "p99_ms",
    "p50_ms",
    "concurrency",
    "request_rate",
    "memory_mb",
    "reason",
    "load_s",
    "engine_build_s",  # TensorRT trials whose load built an engine
    "gpu_memory_mb",
    "trial_s",
    "measure_s",
    "client_cpu_ms",
)
# The confirmation's figures of a finalist or the baseline (empty for other trials): the headline's terms.
CONFIRMED = ("confirmed_mean", "confirmed_throughputs", "confirmed_p99_median_ms")
# The best level's records, flattened into prefixed columns (uncertainty.p99_ci, server.queue_ms, ...).
_LEVEL_RECORDS = ("uncertainty", "server", "resources")
# Inputs and outputs are the model's, the same on every trial: they would only widen the table.
_SKIPPED_CONFIG_FIELDS = ("input", "output")


def trials_frame(study: Any) -> pd.DataFrame:
    """Every trial of ``study`` as one row.

    Columns: ``number``, ``state``, the measurements (``throughput``, ``p99_ms``, ...: the trial's own),
    the confirmation's (``confirmed_mean``, ``confirmed_throughputs`` as ``a;b;c`` with the trial's own
    first, ``confirmed_p99_median_ms``) for the trials it re-measured, ``sweep`` (JSON),
    ``constraint.<name>``, ``param.<name>`` and ``config.<field>`` for every config field, nested
    fields joined with dots (``config.dynamic_batching.max_queue_delay_microseconds``).

    Args:
        study: An ``optuna.Study``.

    Returns:
        A DataFrame with one row per trial, ordered by trial number (empty, with the fixed columns,
        for a study without trials).
    """
    confirmed = {f.trial: f for f in (*finalists(study), confirmed_baseline(study)) if f is not None}
    rows = [
        {**_row(trial), **_confirmed(confirmed.get(trial.number))}
        for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    ]
    fixed = [
        "number",
        "state",
        "value",
        *MEASUREMENTS,
        *CONFIRMED,
        "sweep",
        "datetime_start",
        "datetime_complete",
    ]
    frame = pd.DataFrame(rows)
    for column in fixed:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype="object")
    return frame[fixed + sorted(c for c in frame.columns if c not in fixed)]


def _confirmed(finalist: Finalist | None) -> dict[str, Any]:
    if finalist is None:
        return {}
    return {
        "confirmed_mean": round(finalist.mean, 3),
        "confirmed_throughputs": ";".join(f"{v:g}" for v in finalist.throughput),
        "confirmed_p99_median_ms": round(statistics.median(finalist.p99_ms), 3),
    }


def _row(trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value,
        **{key: attrs.get(key) for key in MEASUREMENTS},
        "sweep": json.dumps(attrs["sweep"]) if "sweep" in attrs else None,
        "datetime_start": trial.datetime_start,
        "datetime_complete": trial.datetime_complete,
    }
    row.update({f"constraint.{k}": v for k, v in (getattr(trial, "constraints", None) or {}).items()})
    row.update({f"param.{k}": v for k, v in trial.params.items()})
    config = {k: v for k, v in (attrs.get("config") or {}).items() if k not in _SKIPPED_CONFIG_FIELDS}
    row.update(dict(flatten_config(config, "config")))
    for record in _LEVEL_RECORDS:
        if attrs.get(record):
            row.update(dict(flatten_config(attrs[record], record)))
    return row


def flatten_config(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Flatten a JSON config: dicts and lists of dicts by key or index, lists of scalars as ``a;b``.

    An empty dict (e.g. dynamic batching with every field at its default) stays a ``{}`` cell.

    >>> dict(flatten_config({"instance_group": [{"count": 2}], "batching": {"sizes": [8, 4]}}, "c"))
    {'c.instance_group.0.count': 2, 'c.batching.sizes': '8;4'}
    """
    if isinstance(value, Mapping) and not value:
        yield prefix, "{}"
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from flatten_config(item, f"{prefix}.{key}")
    elif isinstance(value, list) and any(isinstance(item, (Mapping, list)) for item in value):
        for index, item in enumerate(value):
            yield from flatten_config(item, f"{prefix}.{index}")
    elif isinstance(value, list):
        yield prefix, ";".join(str(item) for item in value)
    else:
        yield prefix, value
