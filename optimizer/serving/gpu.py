"""The machine's NVIDIA GPUs, found without ``nvidia-smi``, and what will not run on them.

GPUs are read through NVML (``nvidia-ml-py``), or, where NVML cannot load (a container without the
driver's ``utility`` capability), from ``/proc/driver/nvidia``. :func:`gpu_mismatches` holds them
against the GPU libraries pip installed (:mod:`optimizer.model.libraries`) and says what will fail and
the command that fixes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.model.libraries import GpuLibraries

__all__ = ["GpuDevice", "GpuDriver", "detect_gpus", "gpu_mismatches"]

PROC_NVIDIA = Path("/proc/driver/nvidia")
# The drivers each CUDA major needs (CUDA's release notes: 12.x >= 525.60.13, 13.x >= 580.65.06).
MIN_DRIVER = {12: (525, 60), 13: (580, 65)}
# cuDNN 9 for CUDA 13 (and cuDNN 9.11+ for CUDA 12) runs on compute capability 7.5 and newer; a V100
# (7.0) needs the CUDA 12 build with cuDNN below 9.11. TensorRT 10.5+ dropped Volta.
CUDA13_MIN_CAPABILITY = (7, 5)
CU12_INSTALL = "pip install 'optimize[gpu-cu12]'"
CU13_INSTALL = "pip install 'optimize[gpu-cu13]'"
VOLTA_INSTALL = "pip install 'optimize[gpu-cu12]' 'nvidia-cudnn-cu12<9.11'"


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    compute_capability: tuple[int, int] | None = None
    memory_mib: int | None = None


@dataclass(frozen=True)
class GpuDriver:
    """The NVIDIA driver and its devices; ``source`` says how they were read (None: no driver seen)."""

    version: str | None = None
    cuda: tuple[int, int] | None = None  # the newest CUDA the driver runs
    devices: tuple[GpuDevice, ...] = ()
    source: str | None = None  # "nvml" or "/proc/driver/nvidia"

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", self.version or ""))


def detect_gpus(nvml: Any = None, proc: Path = PROC_NVIDIA) -> GpuDriver:
    """The driver and GPUs: NVML first (``nvml``: the ``pynvml`` module, imported when None), else
    ``/proc/driver/nvidia``; an empty :class:`GpuDriver` when neither shows a driver."""
    try:
        return _from_nvml(nvml if nvml is not None else _import_nvml())
    except Exception:  # NVML missing, or its library cannot load or initialise: read /proc instead
        return _from_proc(proc)


def _import_nvml() -> Any:
    import pynvml  # nvidia-ml-py

    return pynvml


def _from_nvml(nvml: Any) -> GpuDriver:
    nvml.nvmlInit()
    try:
        version = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = nvml.nvmlSystemGetCudaDriverVersion()  # e.g. 12040 for 12.4
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle).total
            name = _text(nvml.nvmlDeviceGetName(handle))
            devices.append(GpuDevice(index, name, (int(major), int(minor)), int(memory) >> 20))
        return GpuDriver(version, (cuda // 1000, cuda % 1000 // 10), tuple(devices), "nvml")
    finally:
        nvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _from_proc(proc: Path) -> GpuDriver:
    """``version`` ("NVRM version: ... Kernel Module  550.54.15 ...") and ``gpus/*/information``
    ("Model: NVIDIA H100 80GB HBM3"); the CUDA version and compute capability are not there."""
    try:
        text = (proc / "version").read_text()
    except OSError:
        return GpuDriver()
    found = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", text)
    devices = []
    for index, info in enumerate(sorted((proc / "gpus").glob("*/information"))):
        model = re.search(r"^Model:\s*(.+)$", info.read_text(), re.MULTILINE)
        devices.append(GpuDevice(index, model.group(1).strip() if model else "NVIDIA GPU"))
    return GpuDriver(found.group(1) if found else None, None, tuple(devices), str(proc))


# --- what will fail, and the fix -----------------------------------------------------------------------


def gpu_mismatches(
    driver: GpuDriver, libraries: GpuLibraries, *, tensorrt: bool = True
) -> list[tuple[str, str]]:
    """Each reason the CUDA (or TensorRT) provider will not load here, with the command that fixes it."""
    if not driver.devices:
        return [
            (
                "no NVIDIA GPU or driver seen (NVML and /proc/driver/nvidia)",
                "GPU spaces need an NVIDIA GPU and its driver; CPU spaces work without",
            )
        ]
    problems: list[tuple[str, str]] = []
    cuda_major = libraries.cuda_major
    if libraries.onnxruntime is None or cuda_major is None:
        problems.append(("onnxruntime-gpu is not installed (or not a CUDA build)", CU12_INSTALL))
        return problems
    old = [d for d in driver.devices if d.compute_capability and d.compute_capability < CUDA13_MIN_CAPABILITY]
    if cuda_major >= 13 and old:
        problems.append(
            (
                f"{old[0].name} (compute capability {'.'.join(map(str, old[0].compute_capability or ()))}) cannot run "
                f"onnxruntime-gpu {libraries.onnxruntime}, built for CUDA {libraries.onnxruntime_cuda} (cuDNN 9 for CUDA 13 needs 7.5 or newer)",
                f"pip uninstall -y onnxruntime-gpu && {VOLTA_INSTALL}",
            )
        )
    needed = MIN_DRIVER.get(cuda_major)
    if needed and driver.version and driver.version_tuple[:2] < needed:
        fix = (
            f"pip uninstall -y onnxruntime-gpu && {CU12_INSTALL}"
            if cuda_major >= 13
            else "upgrade the NVIDIA driver"
        )
        problems.append(
            (
                f"driver {driver.version} is older than CUDA {cuda_major} needs ({'.'.join(map(str, needed))}) for "
                f"onnxruntime-gpu {libraries.onnxruntime}",
                fix,
            )
        )
    install = CU13_INSTALL if cuda_major >= 13 else CU12_INSTALL
    if libraries.major_of("nvidia-cudnn-cu12", "nvidia-cudnn-cu13") is None:
        problems.append((f"cuDNN 9 for CUDA {cuda_major} is not installed", install))
    if tensorrt:
        trt = libraries.major_of(f"tensorrt-cu{cuda_major}-libs")
        if trt is None:
            problems.append(
                (
                    "TensorRT libraries are not installed (the tensorrt provider needs them)",
                    f"pip install 'optimize[trt-cu{cuda_major}]'",
                )
            )
        elif trt != 10:
            problems.append(
                (
                    f"TensorRT {trt}.x is installed; ONNX Runtime's TensorRT provider links TensorRT 10 (libnvinfer.so.10)",
                    f"pip install 'tensorrt-cu{cuda_major}-libs>=10,<11'",
                )
            )
    return problems
