"""The study database: opening storages, the study's identity, counting and recovering trials.

The database is the single source of truth. Each trial stores its rendered config, its raw sweep
and the worker that ran it; the study stores the model hash, the latency budget, the resolved space,
the server version, the target and the hardware. A study is resumed only with the same model and
latency budget.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any

from optimizer.errors import StorageError

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "count_finished",
    "count_running",
    "default_storage_url",
    "open_storage",
    "recover_dead_local_trials",
    "worker_id",
]

HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 60
SQLITE_TIMEOUT_S = 60


def default_storage_url(studies_dir: Path, study_name: str) -> str:
    return f"sqlite:///{studies_dir / study_name}.db"


def open_storage(url: str, *, create_dirs: bool = True):  # -> optuna.storages.RDBStorage
    """An Optuna RDB storage with heartbeats, so a trial whose worker died never stays RUNNING."""
    import optuna
    from optuna.storages import RDBStorage

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if create_dirs and str(path) not in ("", ":memory:"):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create the study directory {str(path.parent)!r}: {exc.strerror}") from exc
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    elif "://" not in url:
        raise StorageError(
            f"storage URL {url!r} is malformed: use e.g. sqlite:///studies/name.db or postgresql://user@host/db"
        )
    try:
        with warnings.catch_warnings():
            # Heartbeats are "experimental" in Optuna 5.0 yet documented as the way to recover trials.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=GRACE_PERIOD_S,
                heartbeat_stale_trial_callback=_retry_callback(),
            )
    except Exception as exc:  # sqlalchemy ArgumentError / OperationalError / missing driver
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open study storage {_redact(url)!r}: {detail[:300]}") from exc
    finally:
        optuna.logging.set_verbosity(optuna.logging.ERROR)


def _retry_callback():
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=2)


def _redact(url: str) -> str:
    # Never echo a password from a database URL.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
    return url


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _finished_states():
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def count_finished(study) -> int:
    """Trials that count toward the budget: completed, pruned, or failed with a recorded reason.

    A trial that failed because its worker died (no reason recorded) is retried, so it does not count.
    """
    from optuna.trial import TrialState

    count = 0
    for trial in study.get_trials(deepcopy=False, states=_finished_states()):
        if trial.state != TrialState.FAIL or "reason" in trial.user_attrs:
            count += 1
    return count


def count_running(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_local_trials(study) -> list[int]:
    """Fail and re-enqueue RUNNING trials whose worker on this host is gone; return their numbers.

    Heartbeats do the same after a grace period for workers anywhere; on this host the check is exact
    and immediate, so a rerun after a crash does not wait.
    """
    from optuna.trial import TrialState

    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            _retry_callback()(study, study._storage.get_trial(trial._trial_id))
            recovered.append(trial.number)
    return recovered
