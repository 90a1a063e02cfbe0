"""perf_analyzer, Triton's reference load generator: find it, run it, read its CSV.

The binary that runs here is the one in the ``tritonclient==2.51.0`` wheel (newer ``perf-analyzer``
wheels need glibc 2.38). That wheel cannot join our environment: its ``grpc`` extra pins
``protobuf<5`` while onnx needs protobuf 6. So it is installed on its own, without dependencies,
into the cache (``install_perf_analyzer``), or found on ``PATH`` / in this environment's scripts.
It links ``libcudart.so.12`` and ``libb64.so.0d``: the nvidia-pytriton wheel we already depend on
carries both (under hashed names), so a cache directory of symlinks put on ``LD_LIBRARY_PATH``
lets it run with nothing from the system. ``nvidia-cuda-runtime-cu12`` is used when installed.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimizer.errors import PerfAnalyzerError
from optimizer.paths import cache_dir

__all__ = [
    "PerfResult",
    "find_perf_analyzer",
    "install_perf_analyzer",
    "parse_csv",
    "perf_analyzer_args",
    "perf_analyzer_environment",
    "run_perf_analyzer",
    "write_input_data",
]

TRITONCLIENT_WITH_BINARY = "tritonclient==2.51.0"
RUN_TIMEOUT_S = 600.0
# Shared libraries the binary links, and the nvidia-pytriton copies that stand in for them.
_SHIMS = {"libcudart.so.12": "libcudart-*.so.12*", "libb64.so.0d": "libb64-*.so.0d"}


@dataclass(frozen=True)
class PerfResult:
    """One concurrency level as perf_analyzer measured it (client-side latencies)."""

    concurrency: int
    throughput: float  # inferences per second
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float


def perf_analyzer_args(
    model: str,
    grpc_url: str,
    *,
    concurrency: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
    input_data: str | Path | None = None,
) -> list[str]:
    """The perf_analyzer arguments (without the program) that load ``model`` like a study does.

    ``input_data`` is ``"zero"``, ``"random"`` (perf_analyzer's default, whose integers are anywhere in
    the type's range: out of bounds for token ids) or a JSON file from ``write_input_data``.
    """
    args = ["-m", model, "-u", grpc_url, "-i", "grpc", "--concurrency-range", str(concurrency)]
    for name, dims in (shapes or {}).items():
        args += ["--shape", f"{name}:{','.join(str(d) for d in dims)}"]
    if input_data is not None:
        args += ["--input-data", str(input_data)]
    return args


def write_input_data(path: Path, samples: Sequence[Mapping[str, np.ndarray]], *, batched: bool) -> Path:
    """Write ``samples`` (one request each, batch of 1 when ``batched``) as perf_analyzer's --input-data JSON.

    perf_analyzer then sends exactly the requests a study sends, in turn, instead of random data.
    """
    data = [
        {
            name: {
                "content": array.reshape(-1).tolist(),
                "shape": list(array.shape[1:] if batched else array.shape),
            }
            for name, array in sample.items()
        }
        for sample in samples
    ]
    path.write_text(json.dumps({"data": data}))
    return path


def tool_dir() -> Path:
    """Where ``install_perf_analyzer`` puts the tritonclient 2.51.0 wheel (binary in ``bin/``)."""
    return cache_dir() / "tools" / TRITONCLIENT_WITH_BINARY.replace("==", "-")


def install_command() -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--target",
        str(tool_dir()),
        TRITONCLIENT_WITH_BINARY,
    ]


def find_perf_analyzer() -> Path:
    """The perf_analyzer binary: on PATH, in this environment's scripts, or installed in the cache.

    Raises:
        PerfAnalyzerError: none was found; the message gives the command that installs one.
    """
    on_path = shutil.which("perf_analyzer")
    candidates = [Path(on_path)] if on_path else []
    candidates += [
        Path(sysconfig.get_path("scripts")) / "perf_analyzer",
        tool_dir() / "bin" / "perf_analyzer",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise PerfAnalyzerError(
        "perf_analyzer not found: install the binary of the tritonclient 2.51.0 wheel with "
        f"`{' '.join(install_command())}` (without its dependencies, which clash with ours), "
        "or put a perf_analyzer on PATH"
    )


def install_perf_analyzer() -> Path:
    """Install the tritonclient 2.51.0 wheel (no dependencies) into the cache; return its binary."""
    try:
        subprocess.run(install_command(), check=True, capture_output=True, text=True)  # noqa: S603
    except subprocess.CalledProcessError as exc:
        raise PerfAnalyzerError(
            f"installing {TRITONCLIENT_WITH_BINARY} failed: {_last_lines(exc.stderr)}"
        ) from exc
    return find_perf_analyzer()


def perf_analyzer_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ours) with the directories holding libcudart.so.12 and libb64.so.0d first."""
    env = dict(os.environ if base is None else base)
    dirs = [str(d) for d in (_cuda_runtime_dir(), _shim_dir()) if d is not None]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*dirs, *filter(None, [env.get("LD_LIBRARY_PATH", "")])])
    return env


def _cuda_runtime_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return lib if (lib / "libcudart.so.12").exists() else None


def _shim_dir() -> Path | None:
    """A cache directory of symlinks to nvidia-pytriton's copies of the libraries, or None."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(list(spec.submodule_search_locations)[0]).parent / "nvidia_pytriton.libs"
    shims = cache_dir() / "tools" / "perf_analyzer-libs"
    shims.mkdir(parents=True, exist_ok=True)
    for soname, pattern in _SHIMS.items():
        matches = sorted(libs.glob(pattern))
        link = shims / soname
        if not matches or (link.is_symlink() and Path(os.readlink(link)) == matches[0]):
            continue
        staging = shims / f".{soname}.{os.getpid()}"
        staging.unlink(missing_ok=True)
        staging.symlink_to(matches[0])
        os.replace(staging, link)  # atomic: a concurrent run never sees a missing link
    return shims


def run_perf_analyzer(
    model: str,
    grpc_url: str,
    *,
    concurrency: int,
    shapes: Mapping[str, Sequence[int]] | None = None,
    input_data: str | Path | None = None,
    measurement_interval_ms: int = 5000,
    stability_percentage: float = 10.0,
    max_trials: int = 10,
    extra_args: Sequence[str] = (),
    timeout_s: float = RUN_TIMEOUT_S,
) -> PerfResult:
    """Measure ``model`` at one concurrency with perf_analyzer; return its figures.

    perf_analyzer repeats windows of ``measurement_interval_ms`` until ``3`` in a row agree within
    ``stability_percentage`` (throughput and average latency), at most ``max_trials`` windows.

    Raises:
        PerfAnalyzerError: the binary is missing or cannot start, the measurement never settled, or
            its CSV is unreadable; the message quotes perf_analyzer's own last lines.
    """
    binary = find_perf_analyzer()
    with tempfile.TemporaryDirectory(prefix="optimize-perf-") as tmp:
        report = Path(tmp) / "report.csv"
        args = [
            str(binary),
            *perf_analyzer_args(
                model, grpc_url, concurrency=concurrency, shapes=shapes, input_data=input_data
            ),
            "--measurement-interval",
            str(measurement_interval_ms),
            "--stability-percentage",
            f"{stability_percentage:g}",
            "--max-trials",
            str(max_trials),
            "-f",
            str(report),
            *extra_args,
        ]
        try:
            done = subprocess.run(  # noqa: S603 - argument list, never a shell
                args,
                check=False,
                env=perf_analyzer_environment(),
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as exc:
            raise PerfAnalyzerError(f"perf_analyzer did not finish in {timeout_s:g} s") from exc
        if done.returncode != 0 or not report.is_file():
            raise PerfAnalyzerError(_failure_message(done.returncode, done.stdout + done.stderr))
        results = parse_csv(report.read_text())
    match = [r for r in results if r.concurrency == concurrency]
    if not match:
        raise PerfAnalyzerError(f"perf_analyzer's CSV has no row for concurrency {concurrency}")
    return match[0]


def _failure_message(code: int, output: str) -> str:
    if "error while loading shared libraries" in output:
        missing = output.split("error while loading shared libraries:", 1)[1].split(":", 1)[0].strip()
        return (
            f"perf_analyzer cannot start: {missing} is missing (install nvidia-cuda-runtime-cu12 for "
            "libcudart.so.12, or Debian's libb64-0d for libb64.so.0d)"
        )
    if "GLIBC_" in output and "not found" in output:
        return (
            "this perf_analyzer needs a newer glibc than this machine's: use the tritonclient 2.51.0 "
            f"wheel's instead, `{' '.join(install_command())}`"
        )
    if "stable measurement" in output:
        return (
            f"perf_analyzer found no stable measurement (exit {code}): its windows disagreed by more than "
            "--stability-percentage; raise it or the measurement interval"
        )
    return f"perf_analyzer failed (exit {code}): {_last_lines(output)}"


def _last_lines(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "no output"


def parse_csv(text: str) -> list[PerfResult]:
    """perf_analyzer's ``-f`` CSV (latencies in µs) as results in milliseconds, one per concurrency.

    Raises:
        PerfAnalyzerError: a column we need is missing or a value is not a number.
    """
    rows = list(csv.DictReader(io.StringIO(text)))
    needed = (
        "Concurrency",
        "Inferences/Second",
        "p50 latency",
        "p90 latency",
        "p95 latency",
        "p99 latency",
    )
    try:
        return [
            PerfResult(
                concurrency=int(row["Concurrency"]),
                throughput=float(row["Inferences/Second"]),
                p50_ms=float(row["p50 latency"]) / 1000,
                p90_ms=float(row["p90 latency"]) / 1000,
                p95_ms=float(row["p95 latency"]) / 1000,
                p99_ms=float(row["p99 latency"]) / 1000,
            )
            for row in rows
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise PerfAnalyzerError(
            f"perf_analyzer's CSV lacks a column or number ({exc}); it needs the columns {', '.join(needed)}"
        ) from exc
