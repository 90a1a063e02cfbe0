"""``optimize doctor``: what this machine can do, each missing piece with its fix.

Every check is a small function returning a :class:`Check`; :func:`run_checks` runs them all and
never raises, so the command always prints the whole picture. The checks try things for real where
that is cheap (the embedded server is started, the Docker daemon pinged, providers loaded in a session).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.errors import OptimizeError
from optimizer.measurement.perf_analyzer import find_perf_analyzer, install_command
from optimizer.model.libraries import GpuLibraries, gpu_libraries
from optimizer.model.providers import ORT_NAMES, runnable_providers
from optimizer.serving.docker import DockerUnreachable, connect
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.serving.gpu import PROC_NVIDIA, detect_gpus, gpu_mismatches
from optimizer.serving.local import find_backend_directory, find_binary

__all__ = ["Check", "format_check", "run_checks"]


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it is usable, what was seen, how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def check_embedded() -> Check:

    try:
        with EmbeddedTriton(startup_timeout=60.0) as server:
            version = server.server_version()
    except OptimizeError as exc:
        return Check(
            "target embedded",
            False,
            exc.message.splitlines()[0],
            "pip install nvidia-pytriton==0.7.0 into this environment (Linux x86_64, Python 3.10-3.13)",
        )
    return Check("target embedded", True, f"bundled Triton {version} started and stopped on 127.0.0.1")


def check_local() -> Check:

    fix = (
        "install Triton Inference Server (or run inside nvcr.io/nvidia/tritonserver:<tag>-py3) and put "
        "tritonserver on PATH, or pass --triton-binary PATH"
    )
    try:
        binary = find_binary()
    except OptimizeError:
        return Check("target local", False, "no tritonserver on PATH", fix)
    try:
        backends = find_backend_directory(binary)
    except OptimizeError as exc:
        return Check("target local", False, exc.message, "pass --backend-directory DIR")
    return Check("target local", True, f"{binary} with backends {backends}")


def check_docker() -> Check:

    try:
        client = connect()
    except DockerUnreachable as exc:
        return Check(
            "target docker", False, exc.problem, f"{exc.fix}; GPUs also need the NVIDIA Container Toolkit"
        )
    try:
        version = client.version().get("Version", "unknown")
    finally:
        client.close()
    return Check("target docker", True, f"Docker daemon {version} reachable")


def check_remote() -> Check:
    return Check(
        "target remote",
        True,
        "any Triton reachable over gRPC with --model-control-mode=explicit (checked when a study starts)",
    )


_PROVIDER_FIXES = {
    "openvino": "install onnxruntime-openvino in place of onnxruntime-gpu",
    "cuda": "needs an NVIDIA GPU with its driver (and onnxruntime-gpu)",
    "tensorrt": "needs an NVIDIA GPU, its driver and the TensorRT libraries (and onnxruntime-gpu)",
}


def check_providers() -> Check:

    runnable = runnable_providers()
    missing = [name for name in ORT_NAMES if name not in runnable]
    detail = f"run here: {', '.join(runnable)}"
    if missing:
        detail += f"; not here: {', '.join(missing)}"
    fix = "; ".join(f"{name}: {_PROVIDER_FIXES[name]}" for name in missing if name in _PROVIDER_FIXES)
    return Check("execution providers", True, detail, fix)


def check_gpus(nvml: Any = None, proc: Path = PROC_NVIDIA) -> Check:
    """The driver, the CUDA it runs and each GPU's compute capability (NVML, else /proc/driver/nvidia)."""
    driver = detect_gpus(nvml, proc)
    if not driver.devices:
        fix = "GPU spaces need an NVIDIA GPU and its driver; CPU spaces work without"
        return Check("GPUs", False, "none seen (NVML, /proc/driver/nvidia)", fix)
    cuda = f", CUDA {driver.cuda[0]}.{driver.cuda[1]}" if driver.cuda else ""
    gpus = "; ".join(
        f"GPU {d.index}: {d.name}"
        + (
            f" (compute capability {d.compute_capability[0]}.{d.compute_capability[1]})"
            if d.compute_capability
            else ""
        )
        for d in driver.devices
    )
    return Check("GPUs", True, f"driver {driver.version or '?'}{cuda} ({driver.source}); {gpus}")


def check_gpu_libraries(
    nvml: Any = None, proc: Path = PROC_NVIDIA, libraries: GpuLibraries | None = None
) -> Check:
    """ONNX Runtime's CUDA build, cuDNN and TensorRT against the driver and the GPUs; each mismatch with
    the command that fixes it."""
    driver = detect_gpus(nvml, proc)
    libraries = gpu_libraries() if libraries is None else libraries
    if not driver.devices:
        return Check("GPU libraries", True, "no GPU here: not needed")
    found = (
        ", ".join(f"{name} {version}" for name, version in libraries.packages.items()) or "no nvidia-* wheels"
    )
    detail = f"onnxruntime-gpu {libraries.onnxruntime or 'missing'} (CUDA {libraries.onnxruntime_cuda or '?'}); {found}"
    problems = gpu_mismatches(driver, libraries)
    if not problems:
        return Check("GPU libraries", True, detail)
    return Check(
        "GPU libraries",
        False,
        detail + "; " + "; ".join(problem for problem, _ in problems),
        "; ".join(dict.fromkeys(f"`{fix}`" for _, fix in problems)),
    )


def check_perf_analyzer() -> Check:
    try:
        return Check("perf_analyzer", True, str(find_perf_analyzer()))
    except OptimizeError:
        return Check("perf_analyzer", False, "not found", f"`{' '.join(install_command())}`")


CHECKS: tuple[Callable[[], Check], ...] = (
    check_embedded,
    check_local,
    check_docker,
    check_remote,
    check_providers,
    check_gpus,
    check_gpu_libraries,
    check_perf_analyzer,
)


def run_checks(checks: tuple[Callable[[], Check], ...] = CHECKS) -> list[Check]:
    """Every check's result; a check that fails unexpectedly is reported, never raised."""
    results = []
    for check in checks:
        try:
            results.append(check())
        except Exception as exc:  # noqa: BLE001 - the doctor reports everything it can
            name = check.__name__.removeprefix("check_").replace("_", " ")
            results.append(Check(name, False, f"the check itself failed: {type(exc).__name__}: {exc}"))
    return results


def format_check(check: Check) -> list[str]:
    """The lines printed for one check: ``ok``/``missing``, its name and detail, then its fix."""
    lines = [f"{'ok' if check.ok else 'missing':<8} {check.name:<20} {check.detail}"]
    if check.fix:
        lines.append(f"{'':<8} {'':<20} fix: {check.fix}")
    return lines
