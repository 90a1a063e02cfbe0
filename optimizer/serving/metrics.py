"""A server's own /metrics: which GPUs it has, read with prometheus_client's text parser.

Whether a server has GPUs is decided from what that server reports (its ``nv_gpu_*`` families carry
a ``gpu_uuid`` label per device), never from the machine optimize runs on.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.request

__all__ = ["METRICS_ERRORS", "describe_metrics_error", "fetch_metrics", "gpus_in_metrics", "read_gpus"]

GPU_METRIC_PREFIX = "nv_gpu_"
# What reading a metrics URL can raise: unreachable (OSError, urllib's errors included), not HTTP at
# all (HTTPException), not Prometheus text (ValueError).
METRICS_ERRORS = (OSError, http.client.HTTPException, ValueError)


def gpus_in_metrics(text: str) -> tuple[str, ...]:
    """The GPU UUIDs named by the ``nv_gpu_*`` samples of a Prometheus text exposition, sorted."""
    from prometheus_client.parser import text_string_to_metric_families

    found: set[str] = set()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(GPU_METRIC_PREFIX):
            continue
        for sample in family.samples:
            found.add(sample.labels.get("gpu_uuid") or sample.labels.get("gpu") or "unknown")
    return tuple(sorted(found))


def fetch_metrics(url: str, *, timeout: float = 5.0, context: ssl.SSLContext | None = None) -> str:
    """The text at ``url``. Raises one of METRICS_ERRORS when it cannot be read."""
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310 - the user's URL
        return response.read().decode("utf-8", errors="replace")


def read_gpus(
    url: str, *, timeout: float = 5.0, context: ssl.SSLContext | None = None
) -> tuple[str, ...] | None:
    """The GPUs the server at ``url`` reports; None when its metrics cannot be read or parsed."""
    try:
        return gpus_in_metrics(fetch_metrics(url, timeout=timeout, context=context))
    except METRICS_ERRORS:
        return None


def describe_metrics_error(exc: Exception) -> str:
    """A short reason for one of METRICS_ERRORS."""
    if isinstance(exc, http.client.HTTPException):
        return "the answer is not HTTP"
    if isinstance(exc, ValueError):
        return "the answer is not Prometheus metrics text"
    reason = getattr(exc, "reason", None) or exc
    return " ".join(str(reason).split())[:200]
