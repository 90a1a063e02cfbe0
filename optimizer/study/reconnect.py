"""A study database that goes away for a while: a PostgreSQL server restarting under running workers.

Every call to a database server that fails because the server cannot be reached (refused, shut down,
the connection dropped) is tried again with a bounded backoff, 0.5 s doubling up to 5 s, until the
server answers or ``wait_s`` has passed since the outage began. The worker says so in one line when it
starts waiting and one when the database is back; meanwhile its measurement goes on, and the writes it
could not make (the trial's figures, its end, its heartbeat) are made when the server returns. Past the
limit the call raises :class:`StorageError` (exit 5): finished trials are in the database, and the same
command resumes.

A write that reached the database just before the connection broke is tried again: Optuna's writes of
attributes, parameters, values and heartbeats are upserts, so a second time changes nothing; ending a
trial a second time is an error Optuna raises, taken here as done when the trial holds the state asked
for. Creating a trial twice would leave one RUNNING with no worker and no heartbeat: the study fails such
an orphan once it is older than the heartbeat grace period (storage.recover_dead_local_trials).

SQLite is a file, not a server: its errors (a lock held too long, a full disk) are not waited out.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from optimizer.errors import StorageError
from optimizer.study.settings import DEFAULT_STORAGE_WAIT_S

__all__ = ["DEFAULT_STORAGE_WAIT_S", "PatientRDBStorage", "is_unreachable"]

FIRST_RETRY_S = 0.5
LONGEST_RETRY_S = 5.0

# The storage's calls that reach the database: Optuna's BaseStorage and BaseHeartbeat methods, and the
# private ones its _CachedStorage calls on the storage it wraps (an RDBStorage given to a study is wrapped).
_DATABASE_CALLS = (
    "_create_new_trial",
    "_get_trials",
    "_get_best_trial_id",
    "_set_trial_param",
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "get_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "get_best_trial",
    "_get_stale_trial_ids",
)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc``, or an error behind it, says the database server could not be reached."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (OperationalError, InterfaceError)):
            return True
        if isinstance(seen, DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(exc: BaseException) -> str:
    while exc.__cause__ is not None:  # Optuna's StorageInternalError says less than the driver's error
        exc = exc.__cause__
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


class _Outage:
    """The outage the storage's calls (from any thread) are waiting out: when it began, whether said."""

    def __init__(self, where: str, wait_s: float, notify: Callable[[str], None]) -> None:
        self.where, self.wait_s, self.notify = where, wait_s, notify
        self._lock = threading.Lock()
        self._since: float | None = None
        self._given_up = False

    def wait(self, exc: BaseException, attempt: int) -> None:
        """Sleep before the next try, or raise StorageError once the outage has lasted ``wait_s``."""
        with self._lock:
            now = time.monotonic()
            if self._since is None:
                self._since = now
                self.notify(
                    f"the study database {self.where} cannot be reached ({_first_line(exc)}): waiting up to "
                    f"{self.wait_s:g} s for it (--storage-wait-s); the trial in flight goes on"
                )
            if self._given_up or now - self._since >= self.wait_s:
                self._given_up = True  # every later call fails at once: one wait per outage, not one per call
                raise StorageError(
                    f"the study database {self.where} could not be reached for {now - self._since:.0f} s "
                    f"({_first_line(exc)}): finished trials are kept; bring it back and rerun the same "
                    "command (--storage-wait-s sets how long a worker waits)"
                ) from exc
            elapsed = now - self._since
        time.sleep(min(LONGEST_RETRY_S, FIRST_RETRY_S * 2**attempt, max(0.0, self.wait_s - elapsed)))

    def over(self) -> None:
        if self._since is None:  # the common case, without taking the lock
            return
        with self._lock:
            if self._since is not None:
                self.notify(f"the study database is back after {time.monotonic() - self._since:.0f} s")
            self._since, self._given_up = None, False


def _patient(method: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(method)
    def call(self: PatientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(method, *args, **kwargs)

    return call


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class PatientRDBStorage(RDBStorage):
    """An Optuna RDB storage that waits out its database server's outages (see the module docstring)."""

    def __init__(self, url: str, *, wait_s: float = DEFAULT_STORAGE_WAIT_S, where: str = "", **kwargs: Any):
        super().__init__(url, **kwargs)
        self._outage = _Outage(where or url, wait_s, _stderr)

    def set_wait(self, wait_s: float, notify: Callable[[str], None] | None = None) -> None:
        """How long to wait for the database, and where to say so (default: stderr)."""
        self._outage.wait_s = wait_s
        if notify is not None:
            self._outage.notify = notify

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                result = method(self, *args, **kwargs)
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                self._outage.wait(exc, attempt)
                attempt += 1
                continue
            self._outage.over()
            return result

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        first = True

        def once(storage: RDBStorage, *args: Any) -> bool:
            nonlocal first
            try:
                return RDBStorage.set_trial_state_values(storage, *args)
            except UpdateFinishedTrialError:
                # Tried again after a dropped connection: the first try may have ended the trial already.
                if not first and RDBStorage.get_trial(storage, trial_id).state == state:
                    return True
                raise
            finally:
                first = False

        return bool(self._call(once, trial_id, state, values))

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._call(RDBStorage.record_heartbeat, trial_id)
        except StorageError:
            # Optuna's heartbeat thread would print a traceback; the main thread meets the same error.
            if threading.current_thread() is threading.main_thread():
                raise


for _name in _DATABASE_CALLS:
    setattr(PatientRDBStorage, _name, _patient(getattr(RDBStorage, _name)))
