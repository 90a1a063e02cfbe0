"""The rules every study's trial follows, one model or several: what a failed trial is, a server that
crashed or hung (restarted), a load that ran out of memory (infeasible), a GPU server whose memory did
not come back after an unload (restarted), how a trial's config is rendered (TensorRT's profile, warm-up
and engine cache) and which GPUs it names.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import optuna

from optimizer.config.render import render_config, tensorrt_cache_dir
from optimizer.config.space import Candidate
from optimizer.errors import ConfigRejected, OptimizeError, ServerDiedError
from optimizer.model.intake import ModelInfo, shapes_from_samples
from optimizer.paths import cache_dir
from optimizer.serving.base import ServingTarget

# The latency constraint's name (Optuna's constraints: feasible iff <= 0), shared with trial.py.
LATENCY_CONSTRAINT = "latency_budget"

__all__ = [
    "MemoryExhausted",
    "TrialFailed",
    "config_gpus",
    "first_line",
    "gpu_memory_returned",
    "infeasible_for_memory",
    "memory_exhausted",
    "refuse_unserved",
    "render_trial_config",
    "server_fault",
    "tensorrt_engines",
]


class TrialFailed(Exception):
    """A trial-level fault: recorded on the trial with its reason; the study goes on.

    ``transient`` marks faults of the moment (a crash, a hang) rather than of the config: another
    proposal of the same config is measured again instead of inheriting the failure. ``crashed``: the
    server died (rather than hung or refused requests).
    """

    def __init__(
        self, reason: str, *, transient: bool = False, server_log: str = "", crashed: bool = False
    ) -> None:
        super().__init__(reason)
        self.transient = transient
        self.server_log = server_log  # the server's log tail when the server crashed or hung
        self.crashed = crashed


SERVER_LOG_LINES = 40  # of the server's log kept with a trial it failed


# The end of the server's log kept with a failed trial: its last lines and a crash's stack.
SERVER_LOG_KEPT_CHARS = 6000


def record_failure(trial, failure: TrialFailed) -> None:
    """``failure`` on the trial: its reason, whether it was of the moment, and the server's log tail."""
    trial.set_user_attr("reason", str(failure))
    if failure.transient:
        trial.set_user_attr("transient_fault", True)
    if failure.server_log:
        trial.set_user_attr("server_log", failure.server_log[-SERVER_LOG_KEPT_CHARS:])


# How a load that ran out of memory reads: CUDA, ONNX Runtime's arena, TensorRT.
_OUT_OF_MEMORY = (
    "out of memory",
    "failed to allocate memory",
    "could not be allocated",
    "cudaerrormemoryallocation",
)


class MemoryExhausted(Exception):
    """A config whose load ran the server out of memory: infeasible (what the machine holds), not failed."""

    def __init__(self, reason: str, *, server_log: str = "") -> None:
        super().__init__(reason)
        self.server_log = server_log


def infeasible_for_memory(trial, exc: MemoryExhausted) -> optuna.TrialPruned:
    """The config needs more memory than the server has: infeasible with its reason (and the log of a
    server the kernel killed); every study's rule."""
    trial.set_user_attr("feasible", False)
    trial.set_user_attr("reason", f"infeasible: {exc}")
    if exc.server_log:
        trial.set_user_attr("server_log", exc.server_log[-SERVER_LOG_KEPT_CHARS:])
    return optuna.TrialPruned(str(exc))


def _killed_for_memory(target: ServingTarget) -> str | None:
    """What to say when the kernel killed a process of the server for the memory limit optimize set."""
    kills = target.memory_kills()
    if not kills:
        return None
    limit = getattr(target, "memory_limit_mb", None)
    return (
        f"out of memory: the kernel killed {kills} process(es) of the server (the server or a backend stub, "
        f"which holds a model instance) at its memory limit" + (f" of {limit:g} MiB" if limit else "")
    )


def memory_exhausted(target: ServingTarget, when: str, exc: ConfigRejected, note) -> MemoryExhausted | None:
    """``exc`` as an exhausted memory, the server restarted so the next trial starts with its memory back
    (a failed load can leave it held); None when the load failed for another reason."""
    killed = _killed_for_memory(target)
    if killed is None and not any(marker in exc.message.lower() for marker in _OUT_OF_MEMORY):
        return None
    reason = f"memory exhausted {when}: {killed or first_line(exc.message)}"
    if target.capabilities.can_restart:
        note(f"{reason}: restarting the server so the next trial starts with its memory back")
        target.restart()
    return MemoryExhausted(reason)


# How far over its idle figure a GPU server's memory may stay once its models are unloaded: CUDA's
# libraries keep their modules and handles loaded, a leak keeps the arena (gigabytes).
GPU_MEMORY_SLACK_MB = 1024.0
GPU_MEMORY_SLACK_SHARE = 0.05  # of the GPUs' total, when that is more
GPU_MEMORY_RETURN_S = 10.0  # how long an unload's memory has to come back


def gpu_memory_returned(target: ServingTarget, names: Sequence[str], idle_mb: float, note) -> None:
    """Unload ``names`` and check the GPU memory comes back to the idle figure; restart the server when it
    does not (the ONNX Runtime backend is known to keep it after an unload), so the next trial starts
    with its memory back instead of inheriting the last config's. Every study's rule on a GPU server."""
    if not target.capabilities.can_restart:
        return
    try:
        for name in names:
            target.unload_model(name)
    except OptimizeError as exc:
        note(f"unloading the last config failed ({first_line(str(exc))}): restarting the server")
        target.restart()
        return
    deadline = time.monotonic() + GPU_MEMORY_RETURN_S
    while True:
        figures = target.resources()
        used = figures.get("gpu_memory_used_mb")
        slack = max(GPU_MEMORY_SLACK_MB, GPU_MEMORY_SLACK_SHARE * figures.get("gpu_memory_total_mb", 0.0))
        if used is None or used <= idle_mb + slack:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    note(
        f"the GPU memory did not come back after unloading the last config ({used - idle_mb:.0f} MiB over "
        f"the idle {idle_mb:.0f} MiB): restarting the server"
    )
    target.restart()


def refuse_unserved(trial, candidate: Candidate, refused: frozenset[tuple[str, str]], who: str = "") -> None:
    """End ``trial`` as infeasible, before anything loads, when its precision was refused by the accuracy
    guard on its provider only (``refused``: (precision, provider) pairs; a GPU space's fp16 may pass on
    CUDA and fail in TensorRT's FP16 mode). ``who``: the model, in a study of several.

    Raises:
        optuna.TrialPruned: the pair is refused.
    """
    if (candidate.precision, candidate.provider) not in refused:
        return
    reason = f"{who}{candidate.precision} on {candidate.provider} broke the accuracy guard: not served"
    trial.set_user_attr("feasible", False)
    trial.set_user_attr("reason", f"infeasible: {reason}")
    trial.set_constraint(LATENCY_CONSTRAINT, 1.0)
    raise optuna.TrialPruned(reason)


def tensorrt_engines(config) -> frozenset[Path]:
    """The engine files in a TensorRT config's engine cache (none for any other config)."""
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        folder = accelerator.parameters.get("trt_engine_cache_path")
        if accelerator.name == "tensorrt" and folder and Path(folder).is_dir():
            return frozenset(Path(folder).glob("*.engine"))
    return frozenset()


def render_trial_config(
    info: ModelInfo, candidate: Candidate, model_name: str, samples: list, gpus: tuple[int, ...] = ()
):
    """A trial's config, as every study renders it: a TensorRT candidate gets its optimization profile
    and warm-up from the requests' shapes, and its engines and timing cache in this machine's cache;
    ``gpus`` (see :func:`config_gpus`) go into a GPU provider's instance group."""
    shapes = shapes_from_samples(info, samples)
    engine_cache = None
    if candidate.provider == "tensorrt":
        engine_cache = str(tensorrt_cache_dir(cache_dir(), info, candidate, shapes))
    return render_config(
        info,
        candidate,
        model_name=model_name,
        engine_cache_dir=engine_cache,
        request_shapes=shapes,
        gpus=gpus,
    )


def config_gpus(gpus: str | None, target: ServingTarget) -> tuple[int, ...]:
    """The GPUs each config names: ``--gpus`` for a server optimize does not start (a remote one); none
    for one it starts, which sees only those GPUs already (numbered from 0 there)."""
    if not gpus or target.capabilities.picks_gpus:
        return ()
    return tuple(int(index) for index in gpus.split(","))


def server_fault(target: ServingTarget, when: str, exc: Exception, note) -> TrialFailed | MemoryExhausted:
    """A crash or hang of the server (or requests failing ``when``) as a failed trial, the server
    restarted so later trials are unaffected; the rule of every study's trials. When the kernel killed a
    process of the server at the memory limit optimize set, the config is infeasible instead (it needs
    more memory than the server is given), the server restarted all the same.

    Raises:
        ServerDiedError: the target cannot be restarted by optimize (a remote server): the study ends.
    """
    alive = _still_alive(target)
    detail = first_line(exc.message if isinstance(exc, OptimizeError) else str(exc))
    status = None if alive else target.exit_status()
    reason = (
        f"{detail} {when}" if alive else f"the server crashed {when}" + (f" ({status})" if status else "")
    )
    log = target.log_tail(SERVER_LOG_LINES)  # before the restart: a new server starts a new log
    last = _last_words(log)
    if last:
        reason += f"; its log ended: {last}"
    if not target.capabilities.can_restart:
        raise ServerDiedError(f"{reason}; the {target.name} server cannot be restarted by optimize") from exc
    killed = _killed_for_memory(target)
    if killed is not None:
        reason = f"memory exhausted {when}: {killed} ({reason})"
    note(f"{reason}: restarting the server")
    target.restart()
    if killed is not None:
        return MemoryExhausted(reason, server_log=log)
    return TrialFailed(reason, transient=True, server_log=log, crashed=not alive)


def _last_words(log: str) -> str:
    """The server log's last line that says something (Triton ends a crash with its signal or error)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:240] if lines else ""


def _still_alive(target, settle_s: float = 2.0) -> bool:
    # A killed server closes its sockets a moment before the kernel reports it dead: look twice.
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        if not target.is_alive():
            return False
        time.sleep(0.1)
    return target.is_alive()


def first_line(text: str) -> str:
    text = (text or "").strip()
    return text.splitlines()[0][:300] if text else "unknown error"
