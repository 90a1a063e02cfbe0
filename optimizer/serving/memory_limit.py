"""A memory limit on the server optimize starts, as a pod's limit would hold it: a memory cgroup of its own.

``--memory-limit-mb N`` runs the server (and the backend stubs it starts, which hold the model
sessions) in a memory cgroup made under this process's own, with its limit at N MiB and no swap. A config
that needs more is killed by the kernel as it would be in production; the kernel counts each kill in the
cgroup (``oom_kill``), so the study can tell an out-of-memory death from a crash and mark the config
infeasible. cgroup v2 (``memory.max``, ``memory.events``) and v1 (``memory.limit_in_bytes``,
``memory.oom_control``) are both read; making a cgroup needs root or a delegated one (systemd).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from optimizer.errors import UsageError

__all__ = ["MemoryCgroup"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup() -> tuple[Path, str] | None:
    """This process's memory cgroup directory and its version ("v2" or "v1"); None when there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/"), "v1"
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            unified = (
                CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else CGROUP_ROOT / "unified"
            )
            return unified / path.lstrip("/"), "v2"
    return None


class MemoryCgroup:
    """A memory cgroup of ``limit_mb`` MiB for one server, made by :meth:`create` (checked at once, so a
    system that cannot limit the server's memory is said before any work); processes join it with
    :meth:`join`; :meth:`remove` once they have exited."""

    def __init__(self, limit_mb: float) -> None:
        own = _own_cgroup()
        if own is None:
            raise UsageError(self._cannot("this system shows no memory cgroup"))
        parent, self.version = own
        if not os.access(parent, os.W_OK):
            raise UsageError(self._cannot(f"{parent} is not writable"))
        self.limit_mb = limit_mb
        self.path = parent / f"optimize-server-{os.getpid()}-{id(self):x}"
        self._kills_seen = 0

    def create(self) -> None:
        try:
            self.path.mkdir(exist_ok=True)
            self._write_limits(int(self.limit_mb * 1024 * 1024))
        except OSError as exc:
            self.remove()
            raise UsageError(self._cannot(f"cannot make {self.path}: {exc.strerror or exc}")) from exc
        self._kills_seen = self.kills()

    @staticmethod
    def _cannot(why: str) -> str:
        return (
            f"--memory-limit-mb needs a memory cgroup optimize may create ({why}): run as root, in a "
            "delegated cgroup (systemd-run --user --scope -p Delegate=yes optimize ...), or leave the option "
            "out and give the server's container its memory limit"
        )

    def _write_limits(self, limit: int) -> None:
        if self.version == "v2":
            (self.path / "memory.max").write_text(str(limit))
            swap = self.path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
            return
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        swap = self.path / "memory.memsw.limit_in_bytes"  # memory plus swap: equal to it means no swap
        if swap.exists():
            try:
                swap.write_text(str(limit))
            except OSError:
                pass  # swap accounting off: nothing to limit

    def join(self) -> None:
        """Move the calling process into the cgroup (run in the server's child before it execs)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def kills(self) -> int:
        """How many processes the kernel has killed in the cgroup for its limit."""
        events = self.path / ("memory.events" if self.version == "v2" else "memory.oom_control")
        try:
            for line in events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def new_kills(self) -> int:
        """The kills since the last call."""
        total = self.kills()
        new, self._kills_seen = total - self._kills_seen, total
        return max(0, new)

    def remove(self, wait_s: float = 2.0) -> None:
        """Remove the cgroup once its processes have exited (killed stubs take a moment); nothing when
        it is gone already."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
