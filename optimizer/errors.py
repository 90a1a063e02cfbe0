"""The one error hierarchy of `optimize`.

Every error a user can cause or fix derives from :class:`OptimizeError`: it carries a one-line message
that says what is wrong and what to do, and the exit code the CLI returns. Third-party exceptions are
translated into these at the boundary of the stage that calls the third party (``raise ... from exc``).

    OptimizeError
    ├── UsageError            bad command-line input (budget, shapes, names)
    ├── ModelError            model intake: missing file, not ONNX, unresolved dynamic dims
    ├── SpaceError            search space file: unknown keys, wrong types, empty ranges
    ├── StorageError          study database: bad URL, unreachable, mismatched study
    │   └── DiskFullError     no space left where a database, cache or output is written
    ├── StudyError            the study as a whole: no feasible trial, impossible latency budget
    ├── ServerError           the serving target
    │   ├── ServerStartError  the server did not become ready
    │   ├── ServerDiedError   the server process died (a trial-level fault when it can be restarted)
    │   ├── ConfigRejected    the server refused a model configuration (a trial-level fault)
    │   └── InferenceError    a request failed or timed out (a trial-level fault)
    └── PerfAnalyzerError     perf_analyzer (the reference load generator) missing, failing or unreadable
"""

from __future__ import annotations

__all__ = [
    "ConfigRejected",
    "DiskFullError",
    "InferenceError",
    "ModelError",
    "OptimizeError",
    "PerfAnalyzerError",
    "ServerDiedError",
    "ServerError",
    "ServerStartError",
    "SpaceError",
    "StorageError",
    "StudyError",
    "UsageError",
    "disk_full",
    "full_path",
    "is_disk_full",
]


class OptimizeError(Exception):
    """Root of all errors reported to the user as one line and an exit code."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(OptimizeError):
    exit_code = 2


class ModelError(OptimizeError):
    exit_code = 3


class SpaceError(OptimizeError):
    exit_code = 4


class StorageError(OptimizeError):
    exit_code = 5


class DiskFullError(StorageError):
    """A write ran out of space (ENOSPC, a quota): what was written is beside its final name, never
    half in place, so the previous file there and the study's finished trials are intact."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, or SQLite's own words for it) says the disk or a quota is full."""
    import errno
    import shutil

    if isinstance(exc, shutil.Error):  # copytree's errors, one (source, destination, why) per file
        return any(
            f"[Errno {errno.ENOSPC}]" in str(row) or f"[Errno {errno.EDQUOT}]" in str(row)
            for row in exc.args[0]
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "database or disk is full" in str(exc)


def full_path(exc: BaseException) -> str | None:
    """The file a full-disk error names (for copytree's errors, the first destination)."""
    import shutil

    if isinstance(exc, shutil.Error) and exc.args and exc.args[0]:
        return str(exc.args[0][0][1])
    if isinstance(exc, OSError):
        return exc.filename2 or exc.filename
    return None


def disk_full(
    path: object,
    needed_bytes: int | None = None,
    kept: str = "nothing half-written was left in place",
) -> DiskFullError:
    """The one line for a full disk at ``path``: how much it needs (when known), how much is free, and
    what was ``kept``."""
    import shutil
    from pathlib import Path

    where = Path(str(path))
    existing = next((p for p in (where, *where.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    needs = f"it needs about {_mib(needed_bytes)}, " if needed_bytes else ""
    return DiskFullError(
        f"no space left on the device of {str(where)!r}: {needs}{_mib(free)} free; free space there or "
        f"write elsewhere (--out, --storage, OPTIMIZE_CACHE_DIR); {kept}"
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


class StudyError(OptimizeError):
    exit_code = 6


class ServerError(OptimizeError):
    exit_code = 7


class ServerStartError(ServerError):
    pass


class ServerDiedError(ServerError):
    pass


class ConfigRejected(ServerError):
    pass


class InferenceError(ServerError):
    pass


class PerfAnalyzerError(OptimizeError):
    exit_code = 8
