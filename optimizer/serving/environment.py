"""What machine a study ran on: recorded with every study so its numbers can be read in context."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["available_cores", "hardware"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: ``--cpus`` pinning and cgroup cpusets count)."""
    return len(os.sched_getaffinity(0))


def hardware() -> dict[str, Any]:
    """CPU model, cores, memory, and the NVIDIA GPUs and driver (NVML, or /proc/driver/nvidia)."""
    from optimizer.serving.gpu import detect_gpus

    gpus = detect_gpus()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": [device.name for device in gpus.devices] or None,
        "gpu_driver": gpus.version,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
