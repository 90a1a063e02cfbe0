"""A server's own /metrics: which GPUs it has and what it uses, read with prometheus_client's text parser.

Whether a server has GPUs is decided from what that server reports (its ``nv_gpu_*`` families carry
a ``gpu_uuid`` label per device), never from the machine optimize runs on.

Memory: Triton 2.51 reports CPU memory for the whole machine (``nv_cpu_memory_used_bytes``), not for
itself, so a server optimize runs as a child is also measured by the resident memory of its process
tree (tritonserver plus its backend stubs, which hold the model sessions): that is the per-config figure.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.request
from pathlib import Path

__all__ = [
    "METRICS_ERRORS",
    "describe_metrics_error",
    "fetch_metrics",
    "gpus_in_metrics",
    "memory_figure",
    "process_tree_rss_mb",
    "read_gpus",
    "resource_usage",
]

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
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return " ".join(str(reason).split())[:200]


MIB = 1024 * 1024
# /metrics family -> the name recorded on trials (bytes become MiB; GPU figures are summed over devices).
_USAGE = {
    "nv_cpu_memory_used_bytes": "cpu_memory_used_mb",
    "nv_cpu_memory_total_bytes": "cpu_memory_total_mb",
    "nv_cpu_utilization": "cpu_utilization",
    "nv_gpu_memory_used_bytes": "gpu_memory_used_mb",
    "nv_gpu_memory_total_bytes": "gpu_memory_total_mb",
    "nv_gpu_utilization": "gpu_utilization",
}


def resource_usage(text: str) -> dict[str, float]:
    """Memory (MiB) and utilisation (0-1) from a Triton /metrics text; GPU entries only when it has GPUs.

    GPU memory is the sum over the server's GPUs and GPU utilisation their mean.
    """
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        name = _USAGE.get(family.name)
        if name is not None:
            values.setdefault(name, []).extend(sample.value for sample in family.samples)
    usage = {}
    for name, samples in values.items():
        if not samples:
            continue
        total = sum(samples) if name.endswith("_mb") else sum(samples) / len(samples)
        usage[name] = round(total / MIB, 3) if name.endswith("_mb") else round(total, 4)
    if not usage.get("cpu_memory_total_mb"):  # Triton fills its CPU gauges at its first poll (~2 s)
        for name in ("cpu_memory_used_mb", "cpu_memory_total_mb", "cpu_utilization"):
            usage.pop(name, None)
    return usage


def process_tree_rss_mb(pid: int) -> float | None:
    """Resident memory (MiB) of ``pid`` and its process group (the server and its backend stubs).

    Backend stubs are the server's children and share its process group; None when ``pid`` is gone.
    """
    total_kib = 0
    found = False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(entry.name) != pid and int(fields[2]) != pid:
                continue
            total_kib += _rss_kib(entry)
            found = found or int(entry.name) == pid
        except (OSError, IndexError, ValueError):
            continue
    return round(total_kib / 1024, 3) if found else None


def _rss_kib(proc: Path) -> int:
    for line in (proc / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # a zombie has no resident memory


def memory_figure(usage: dict[str, float]) -> tuple[float, str] | None:
    """The memory a config needs (MiB) and where it comes from, or None when neither is known.

    The server's process-tree RSS when optimize runs the server (per config); otherwise /metrics'
    CPU memory in use, which in Triton 2.51 is the whole machine's.
    """
    if "server_rss_mb" in usage:
        return usage["server_rss_mb"], "server process-tree RSS"
    if "cpu_memory_used_mb" in usage:
        return usage["cpu_memory_used_mb"], "machine CPU memory in use (/metrics)"
    return None
