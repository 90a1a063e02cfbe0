"""What a study records, and the one place that reads the records of studies made by earlier versions.

A record is renamed, or split into one attribute per worker or per model, as optimize evolves; a study
made by an earlier version must still resume, report and export. Each reader here returns the current
shape whatever version wrote it, so the rest of the package reads one shape only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BUDGET_ATTR",
    "CONFIG_DIGEST",
    "WORKER_PREFIX",
    "baseline_rounds",
    "config_digest_of",
    "is_joint",
    "joint_budgets",
    "not_measured",
    "workers_of",
]

CONFIG_DIGEST = "config_digest"  # a trial's rendered config, as config.render.config_digest
BUDGET_ATTR = "latency_budget_ms:"  # + a model's name: its p99 budget in a joint study
WORKER_PREFIX = "worker:"  # + a worker's id: its host, pid and pinning


def config_digest_of(attrs: Mapping[str, Any]) -> str | None:
    """The digest of a trial's config (earlier versions stored it as ``config_key``)."""
    return attrs.get(CONFIG_DIGEST, attrs.get("config_key"))


def is_joint(attrs: Mapping[str, Any]) -> bool:
    """Whether a stored study tunes several models together (one model's records its ``model_sha256``)."""
    return "models" in attrs and "model_sha256" not in attrs


def joint_budgets(attrs: Mapping[str, Any]) -> dict[str, float]:
    """Each model's p99 budget in a joint study, by model name.

    One attribute per model: workers settling the budgets of a new study at once never overwrite each
    other's, as they could rewriting one dict (earlier versions' ``latency_budgets_ms``).
    """
    budgets = dict(attrs.get("latency_budgets_ms", {}))
    budgets.update(
        {key[len(BUDGET_ATTR) :]: value for key, value in attrs.items() if key.startswith(BUDGET_ATTR)}
    )
    return {name: float(ms) for name, ms in budgets.items()}


def workers_of(attrs: Mapping[str, Any]) -> dict[str, dict]:
    """Every worker a study recorded, by id (one attribute each; earlier versions' one ``workers`` dict)."""
    workers = dict(attrs.get("workers", {}))
    workers.update(
        {key[len(WORKER_PREFIX) :]: value for key, value in attrs.items() if key.startswith(WORKER_PREFIX)}
    )
    return workers


def not_measured(attrs: Mapping[str, Any]) -> bool:
    """A finished trial that measured nothing: a repeat of a measured config, a proposal past the budget,
    or (earlier versions) a joint proposal over the cores, redrawn."""
    return bool({"same_config_as", "surplus", "oversubscribed"} & set(attrs))


def baseline_rounds(confirmation: Mapping[str, Any]) -> dict | None:
    """The baseline's rounds in a ``confirmation`` record (a study confirmed before the cross-check existed
    kept them under ``baseline``, where the cross-check now keeps its own figures)."""
    if confirmation.get("baseline_rounds"):
        return dict(confirmation["baseline_rounds"])
    if "throughput" in (confirmation.get("baseline") or {}):
        return dict(confirmation["baseline"])
    return None
