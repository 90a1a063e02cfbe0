"""The study database: opening storages, the study's identity, counting and recovering trials.

The database is the single source of truth. Each trial stores its rendered config, its raw sweep
and the worker that ran it; the study stores the model hash, the latency budget, the resolved space,
the server version, the target and the hardware. A study is resumed only with the same model and
latency budget.
"""

from __future__ import annotations

import os
import random
import socket
import sqlite3
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from optimizer.errors import StorageError, StudyError, UsageError
from optimizer.paths import check_name, studies_dir
from optimizer.study.reconnect import PatientRDBStorage
from optimizer.study.records import WORKER_PREFIX, not_measured, workers_of

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "count_finished",
    "count_running",
    "default_storage_url",
    "fail_stale",
    "open_storage",
    "stored_study",
    "recover_dead_local_trials",
    "worker_id",
]

HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 60
SQLITE_TIMEOUT_S = 60
# A PostgreSQL server that accepts the connection but never answers (stopped, overloaded) fails the
# connect in this long instead of hanging it; keepalives notice a peer host that vanished mid-query.
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
SCHEMA_RACE_RETRIES = 4


def default_storage_url(studies_dir: Path, study_name: str) -> str:
    return f"sqlite:///{studies_dir / study_name}.db"


def open_storage(url: str, *, create_dirs: bool = True):  # -> optuna.storages.RDBStorage
    """An Optuna RDB storage with heartbeats, so a trial whose worker died never stays RUNNING."""

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if create_dirs and str(path) not in ("", ":memory:"):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"cannot create the study directory {str(path.parent)!r}: {exc.strerror}"
                ) from exc
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
        if path.is_file() and path.stat().st_size > 0:
            _check_sqlite_file(path)
    elif url.startswith("postgresql"):
        given = _url_query(url)  # what the user's URL sets wins: connect_args would override it
        engine_kwargs["connect_args"] = {k: v for k, v in POSTGRES_CONNECT_ARGS.items() if k not in given}
        # After a server restart the pooled connections are dead: test each before use.
        engine_kwargs["pool_pre_ping"] = True
    elif "://" not in url:
        raise StorageError(
            f"storage URL {url!r} is malformed: use e.g. sqlite:///studies/name.db or postgresql://user@host/db"
        )
    try:
        for attempt in range(SCHEMA_RACE_RETRIES):
            try:
                return _rdb_storage(url, engine_kwargs)
            except Exception as exc:
                # Workers starting together on a fresh database race to create Optuna's tables; the
                # losers see a duplicate-key error and find the tables made on a second look.
                if attempt == SCHEMA_RACE_RETRIES - 1 or not _is_schema_race(exc):
                    raise
                time.sleep(0.5 + random.random())
    except Exception as exc:  # sqlalchemy ArgumentError / OperationalError / missing driver
        if "no longer compatible with the table schema" in str(exc):
            raise StorageError(
                f"the study storage {_redact(url)!r} was written by a newer Optuna than this one "
                f"({optuna.__version__}): upgrade (pip install -U optuna optimize); nothing was changed"
            ) from exc
        raise StorageError(f"cannot open study storage {_redact(url)!r}: {_detail(exc)[:300]}") from exc
    finally:
        optuna.logging.set_verbosity(optuna.logging.ERROR)


def _check_sqlite_file(path: Path) -> None:
    """Refuse, before Optuna writes a thing, a file that is not a readable SQLite database, or one that
    holds another program's tables (Optuna would add its own beside them)."""
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {
                row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            connection.execute("PRAGMA quick_check(1)").fetchone()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        raise StorageError(
            f"{str(path)!r} is not a readable SQLite database ({exc}): damaged by a crash or a full disk, or "
            f"not a database; restore it from a backup, or save what can be read with `sqlite3 {path} "
            f'".recover" | sqlite3 recovered.db`; nothing was written to it'
        ) from exc
    if tables and "studies" not in tables:
        named = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
        raise StorageError(
            f"{str(path)!r} holds another program's tables ({named}), not a study: give a study database "
            "(another --storage); nothing was written to it"
        )


def _url_query(url: str) -> Mapping[str, Any]:
    """The options in a database URL's query string (none when it does not parse: the open reports it)."""
    try:
        return make_url(url).query
    except ArgumentError:
        return {}


def _detail(exc: Exception) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _rdb_storage(url: str, engine_kwargs: dict[str, Any]):

    with warnings.catch_warnings():
        # Heartbeats are "experimental" in Optuna 5.0 yet documented as the way to recover trials.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # A database server may restart under a running study: its calls wait it out (reconnect.py).
        kind = RDBStorage if url.startswith("sqlite") else partial(PatientRDBStorage, where=_redact(url))
        return kind(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=GRACE_PERIOD_S,
            heartbeat_stale_trial_callback=_retry_callback(),
        )


def _is_schema_race(exc: Exception) -> bool:
    text = str(exc).lower()
    return "duplicate key" in text or "already exists" in text or "uniqueviolation" in text


def _retry_callback():

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=2)


def fail_stale(study) -> None:
    """Fail (and re-enqueue) trials whose worker's heartbeat went stale; nothing without heartbeats."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)


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


def worker_seed(seed: int | None, *, per_worker: bool) -> int | None:
    """The sampler's seed: workers joining one study must not replay each other's proposals."""
    if seed is None or not per_worker:
        return seed
    return (seed + zlib.crc32(worker_id().encode())) % 2**31


def create_or_join(storage, study_name: str, pruner=None) -> tuple[optuna.Study, bool]:
    """Create the study (maximising), or join it; also say whether this worker created it.

    Raises:
        StorageError: the database refused (read-only, unreachable, not an Optuna database).
    """
    try:
        study = optuna.create_study(
            storage=storage, study_name=study_name, direction="maximize", pruner=pruner
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=study_name, storage=storage, pruner=pruner), False
    except Exception as exc:
        raise StorageError(f"cannot create or open study {study_name!r}: {_detail(exc)}") from exc


def _finished_states():

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def count_finished(study) -> int:
    """Measured trials, which count toward the budget: completed, pruned, or failed with a reason.

    A trial that failed because its worker died (no reason recorded) is retried, so it does not count;
    nor does a proposal of a config that was already measured (it reused that measurement).
    """

    count = 0
    for trial in study.get_trials(deepcopy=False, states=_finished_states()):
        if not_measured(trial.user_attrs):
            continue
        if trial.state != TrialState.FAIL or "reason" in trial.user_attrs:
            count += 1
    return count


def is_surplus(trial, budget: int) -> bool:
    """Whether earlier trials already fill the study's budget: finished ones, and running ones of lower number.

    Two workers can pass the budget check at the same moment; counting only lower-numbered running
    trials makes them agree: the lower number runs, the higher one steps back (not measured, not
    counted), so the study ends at exactly its budget.
    """
    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    earlier = sum(1 for t in running if t.number < trial.number)
    return count_finished(trial.study) + earlier >= budget


def count_running(study) -> int:

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
    and immediate, so a rerun after a crash does not wait. A trial that recorded no worker is recovered
    when no other worker of the study may be alive.
    """

    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        if not worker:
            # It never recorded its worker (the database stopped taking writes, the worker died at once, or
            # a trial created twice over a dropped connection), so it has no heartbeat either and would run
            # forever: it is an orphan when no other worker of the study may still be running it, or once
            # it is older than the grace period (a worker records itself in its trial's first second).
            if _another_worker_may_run(study, host) and not _older_than_grace(trial):
                continue
        else:
            worker_host, _, pid = worker.rpartition(":")
            if worker_host != host or not pid.isdigit() or _pid_alive(int(pid)):
                continue
        if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            _retry_callback()(study, study._storage.get_trial(trial._trial_id))
            recovered.append(trial.number)
    return recovered


def _older_than_grace(trial) -> bool:
    started = trial.datetime_start
    return started is not None and (datetime.now() - started).total_seconds() > GRACE_PERIOD_S


def _another_worker_may_run(study, host: str) -> bool:
    """Whether a worker of ``study`` other than this one may be alive (one on another host always may)."""
    me = worker_id()
    for name, other in workers_of(study.user_attrs).items():
        if name == me:
            continue
        if other.get("host") != host or _pid_alive(int(other.get("pid", 0))):
            return True
    return False


def register_worker(study, settings) -> bool:
    """Record this worker in the study; return True when it joins a study other workers have run.

    Workers that share a machine disturb each other's measurements, so a second live worker on this host
    is refused unless both are pinned to disjoint CPU sets (or GPU sets) or ``allow_shared_host`` is set.
    """

    host, me = socket.gethostname(), worker_id()
    workers = workers_of(study.user_attrs)
    mine = {"host": host, "pid": os.getpid(), "cpus": sorted(settings.cpus), "gpus": settings.gpus}
    for name, other in workers.items():
        if name == me or other.get("host") != host or not _pid_alive(int(other.get("pid", 0))):
            continue
        if not (settings.allow_shared_host or _pinned_apart(mine, other)):
            raise StudyError(
                f"another worker of study {study.study_name!r} runs on this host (pid {other['pid']}): workers "
                "sharing a machine disturb each other's measurements; pin each to separate cores with --cpus "
                "(or GPUs with --gpus), or pass --allow-shared-host"
            )
    joined = any(name != me for name in workers)
    # One attribute per worker: workers joining at the same moment would each overwrite a shared dict.
    study.set_user_attr(WORKER_PREFIX + me, mine)
    return joined


def _pinned_apart(mine: dict, other: dict) -> bool:
    cpus_apart = bool(mine["cpus"]) and bool(other.get("cpus")) and not set(mine["cpus"]) & set(other["cpus"])
    gpus_apart = (
        bool(mine["gpus"])
        and bool(other.get("gpus"))
        and not (set(str(mine["gpus"]).split(",")) & set(str(other["gpus"]).split(",")))
    )
    return cpus_apart or gpus_apart


def parse_cpus(text: str) -> frozenset[int]:
    """``"0-3,6"`` -> {0, 1, 2, 3, 6}, checked against the cores this process may use."""

    cpus: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise UsageError(f"--cpus {text!r} must list cores like 0-3,6") from None
    usable = os.sched_getaffinity(0)
    if not cpus or not cpus <= usable:
        raise UsageError(
            f"--cpus {text!r} names cores this machine does not offer (usable: {sorted(usable)})"
        )
    return frozenset(cpus)


def copy_study(from_url: str, to_url: str, study_name: str | None = None) -> str:
    """Copy a study between storages (e.g. a laptop's SQLite into the team's PostgreSQL); return its name."""

    source = open_storage(from_url, create_dirs=False)
    try:
        names = [s.study_name for s in optuna.get_all_study_summaries(source, include_best_trial=False)]
        if study_name is None:
            if len(names) != 1:
                raise StorageError(
                    f"{_redact(from_url)!r} holds {len(names)} studies ({', '.join(names)}): choose one with --study-name"
                )
            study_name = names[0]
        elif study_name not in names:
            raise StorageError(
                f"no study {study_name!r} in {_redact(from_url)!r} (it holds: {', '.join(names) or 'none'})"
            )
        target = open_storage(to_url)
        try:
            optuna.copy_study(from_study_name=study_name, from_storage=source, to_storage=target)
        except optuna.exceptions.DuplicatedStudyError as exc:
            raise StorageError(
                f"{_redact(to_url)!r} already has a study named {study_name!r}: nothing was copied"
            ) from exc
        finally:
            target.engine.dispose()
    finally:
        source.engine.dispose()
    return study_name


def storage_url_for(study_name: str | None, storage: str | None) -> str:
    """The storage URL to read: ``storage`` if given, else the default SQLite file of ``study_name``.

    Raises:
        UsageError: if neither is given, or the name is not a valid study name.
        StudyError: if the default SQLite file, or the file of a ``sqlite:///`` URL, does not exist.
    """
    if storage is None and study_name is None:
        raise UsageError("give --study-name NAME (for studies/NAME.db) or --storage URL")
    if study_name is not None:
        check_name(study_name, "study name")
    if storage is None:
        if not (studies_dir() / f"{study_name}.db").exists():
            raise StudyError(
                f"no study {study_name!r} in {studies_dir()}/: check --study-name or give --storage"
            )
        return default_storage_url(studies_dir(), str(study_name))
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).is_file():
        raise StudyError(
            f"the study database {storage[len('sqlite:///') :]!r} does not exist: check --storage"
        )
    return storage


def load_stored_study(study_name: str, storage: str | None = None) -> optuna.Study:
    """Open the existing study ``study_name`` (an ``optuna.Study``) without creating anything.

    Raises:
        StudyError: if there is no such study (a clear one-line message).
        StorageError: if the storage cannot be opened.
    """
    return _load(study_name, open_storage(storage_url_for(study_name, storage), create_dirs=False))


def _load(study_name: str, rdb) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study_name, storage=rdb)
    except KeyError as exc:
        raise StudyError(f"no study named {study_name!r} in that storage: check --study-name") from exc


@contextmanager
def stored_study(study_name: str, storage: str | None = None) -> Iterator[optuna.Study]:
    """:func:`load_stored_study`, its database connections closed on leaving (a PostgreSQL server
    would otherwise keep them until the garbage collector runs)."""
    rdb = open_storage(storage_url_for(study_name, storage), create_dirs=False)
    try:
        yield _load(study_name, rdb)
    finally:
        rdb.engine.dispose()
