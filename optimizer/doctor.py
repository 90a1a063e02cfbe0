"""``optimize doctor``: what this machine can do, each missing piece with its fix.

Every check is a small function returning a :class:`Check`; :func:`run_checks` runs them all and
never raises, so the command always prints the whole picture. The checks try things for real where
that is cheap (the embedded server is started, the Docker daemon pinged, providers loaded in a session).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from optimizer.errors import OptimizeError
from optimizer.measurement.perf_analyzer import find_perf_analyzer, install_command
from optimizer.model.providers import ORT_NAMES, runnable_providers
from optimizer.serving.docker import DockerUnreachable, connect
from optimizer.serving.embedded import EmbeddedTriton
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


def check_gpus() -> Check:
    smi = shutil.which("nvidia-smi")
    fix = "GPU spaces need an NVIDIA GPU and its driver (nvidia-smi); CPU spaces work without"
    if smi is None:
        return Check("GPUs", False, "none seen (nvidia-smi not found)", fix)
    try:
        result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("GPUs", False, f"nvidia-smi failed: {exc}", fix)
    gpus = [line.strip() for line in result.stdout.splitlines() if line.startswith("GPU")]
    if result.returncode != 0 or not gpus:
        reason = (result.stderr or result.stdout).strip().splitlines()[:1]
        return Check("GPUs", False, f"nvidia-smi sees none ({reason[0] if reason else 'no output'})", fix)
    return Check("GPUs", True, "; ".join(gpus))


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
