"""The one error hierarchy of `optimize`.

Every error a user can cause or fix derives from :class:`OptimizeError`: it carries a one-line message
that says what is wrong and what to do, and the exit code the CLI returns. Third-party exceptions are
translated into these at the boundary of the stage that calls the third party (``raise ... from exc``).

    OptimizeError
    ├── UsageError            bad command-line input (budget, shapes, names)
    ├── ModelError            model intake: missing file, not ONNX, unresolved dynamic dims
    ├── SpaceError            search space file: unknown keys, wrong types, empty ranges
    ├── StorageError          study database: bad URL, unreachable, mismatched study
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
