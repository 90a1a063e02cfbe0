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
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from optimizer.errors import PerfAnalyzerError
from optimizer.measurement.levels import LevelResult, MeasureSettings
from optimizer.paths import cache_dir
from optimizer.serving.statistics import ServerBreakdown

__all__ = [
    "PerfAnalyzerLoadGenerator",
    "ensure_perf_analyzer",
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


def perf_analyzer_args(
    model: str,
    grpc_url: str,
    *,
    concurrency: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
    input_data: str | Path | None = None,
    request_rate: float | None = None,
    protocol: str = "grpc",
) -> list[str]:
    """The perf_analyzer arguments (without the program) that load ``model`` like a study does.

    ``grpc_url`` is the address for ``protocol`` (``host:port``). ``input_data`` is ``"zero"``,
    ``"random"`` (perf_analyzer's default, whose integers are anywhere in the type's range: out of bounds
    for token ids) or a JSON file from ``write_input_data``. A ``request_rate`` replaces the closed loop
    by Poisson arrivals at that many requests per second.
    """
    args = ["-m", model, "-u", grpc_url, "-i", protocol]
    if request_rate is None:
        args += ["--concurrency-range", str(concurrency)]
    else:
        args += ["--request-rate-range", f"{request_rate:g}", "--request-distribution", "poisson"]
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


def ensure_perf_analyzer() -> Path:
    """The perf_analyzer binary, installed into the cache first when none is found.

    Raises:
        PerfAnalyzerError: none was found and installing one failed.
    """
    try:
        return find_perf_analyzer()
    except PerfAnalyzerError:
        return install_perf_analyzer()


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
    request_rate: float | None = None,
    protocol: str = "grpc",
) -> LevelResult:
    """Measure ``model`` at one concurrency (or ``request_rate``) with perf_analyzer; return its figures.

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
                model,
                grpc_url,
                concurrency=concurrency,
                shapes=shapes,
                input_data=input_data,
                request_rate=request_rate,
                protocol=protocol,
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
    if request_rate is None:
        match = [r for r in results if r.concurrency == concurrency]
    else:
        match = [
            r for r in results if r.request_rate is not None and abs(r.request_rate - request_rate) < 1e-6
        ]
    if not match:
        load = f"concurrency {concurrency}" if request_rate is None else f"request rate {request_rate:g}"
        raise PerfAnalyzerError(f"perf_analyzer's CSV has no row for {load}")
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


def parse_csv(text: str) -> list[LevelResult]:
    """perf_analyzer's ``-f`` CSV (latencies in µs) as results in milliseconds, one per level.

    The first column is ``Concurrency``, or ``Request Rate`` in request-rate mode.

    Raises:
        PerfAnalyzerError: a column we need is missing or a value is not a number.
    """
    rows = list(csv.DictReader(io.StringIO(text)))
    needed = (
        "Concurrency or Request Rate",
        "Inferences/Second",
        "p50 latency",
        "p95 latency",
        "p99 latency",
    )
    try:
        return [
            LevelResult(
                concurrency=int(row["Concurrency"]) if "Request Rate" not in row else 0,
                throughput=float(row["Inferences/Second"]),
                p50_ms=float(row["p50 latency"]) / 1000,
                p95_ms=float(row["p95 latency"]) / 1000,
                p99_ms=float(row["p99 latency"]) / 1000,
                requests=0,  # perf_analyzer reports rates, not counts
                duration_s=0.0,
                request_rate=float(row["Request Rate"]) if "Request Rate" in row else None,
                server=_server_columns(row),
            )
            for row in rows
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise PerfAnalyzerError(
            f"perf_analyzer's CSV lacks a column or number ({exc}); it needs the columns {', '.join(needed)}"
        ) from exc


_SERVER_COLUMNS = ("Server Queue", "Server Compute Input", "Server Compute Infer", "Server Compute Output")


def _server_columns(row: Mapping[str, str]) -> ServerBreakdown | None:
    """The server-side averages perf_analyzer reports (µs), or None when its CSV lacks them."""
    if not all(row.get(column) for column in _SERVER_COLUMNS):
        return None
    queue, compute_input, infer, output = (float(row[column]) / 1000 for column in _SERVER_COLUMNS)
    return ServerBreakdown(
        requests=0,  # perf_analyzer's CSV gives averages, not counts
        executions=0,
        request_ms=queue + compute_input + infer + output,
        queue_ms=queue,
        compute_input_ms=compute_input,
        compute_infer_ms=infer,
        compute_output_ms=output,
    )


class PerfAnalyzerLoadGenerator:
    """perf_analyzer as the study's load generator: one run per level, its CSV read back.

    It sends the study's own requests (``write_input_data``). Its stability rule (3 windows of
    ``window_s`` in a row within a percentage) is tried at 10%, then 25% and 50%, because on a noisy
    machine 10% may never settle; the percentage that settled is recorded as the level's uncertainty.
    """

    STABILITY = (10.0, 25.0, 50.0)

    def __init__(
        self,
        url: str,
        model_name: str,
        samples: Sequence[Mapping[str, np.ndarray]],
        settings: MeasureSettings,
        *,
        batched: bool,
        protocol: str = "grpc",
        mode: str = "concurrency",
        headers: Mapping[str, str] | None = None,
        resources: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.samples = list(samples)
        self.settings = settings
        self.batched = batched
        self.protocol = protocol
        self.mode = mode
        self.headers = dict(headers or {})
        self.resources = resources

    def run_levels(self, levels: Sequence[float], on_level) -> list:
        """Measure ``levels`` in order; ``on_level(index, result)`` returns False to stop the sweep."""
        results = []
        with tempfile.TemporaryDirectory(prefix="optimize-perf-data-") as tmp:
            data = write_input_data(Path(tmp) / "requests.json", self.samples, batched=self.batched)
            for index, level in enumerate(levels):
                results.append(self._level(level, data))
                if not on_level(index, results[-1]):
                    break
        return results

    def measure(self, level: float):
        return self.run_levels([level], lambda index, result: False)[0]

    def _level(self, level: float, data: Path) -> LevelResult:
        started = time.perf_counter()
        result, stability, resources = self._settled(level, data)
        return replace(
            result,
            uncertainty={"stability_pct": stability, "settled": stability == self.STABILITY[0]},
            resources=resources,
            measure_s=time.perf_counter() - started,
        )

    def _settled(self, level: float, data: Path):
        """perf_analyzer's result at the first stability percentage that settles, and the resources seen."""
        for stability in self.STABILITY:
            try:
                result, resources = self._run(level, data, stability)
                return result, stability, resources
            except PerfAnalyzerError as exc:
                if "no stable measurement" not in exc.message or stability == self.STABILITY[-1]:
                    raise
        raise AssertionError("unreachable")

    def _run(self, level: float, data: Path, stability: float):
        interval_ms = max(100, int(self.settings.window_s * 1000))
        extra = [arg for key, value in self.headers.items() for arg in ("-H", f"{key}:{value}")]
        rate = float(level) if self.mode == "request_rate" else None
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(
                run_perf_analyzer,
                self.model_name,
                self.url,
                concurrency=int(level) if rate is None else 1,
                input_data=data,
                measurement_interval_ms=interval_ms,
                stability_percentage=stability,
                extra_args=extra,
                request_rate=rate,
                protocol=self.protocol,
            )
            # Sample the server under load: after perf_analyzer's first two windows, if it still runs.
            time.sleep(2 * interval_ms / 1000)
            resources = self.resources() if self.resources else None
            return running.result(), resources
