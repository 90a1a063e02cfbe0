"""Finding a stored study for the commands that only read it (``report``, ``dashboard``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimizer.errors import StudyError, UsageError

__all__ = ["load_stored_study", "storage_url_for"]


def storage_url_for(study_name: str | None, storage: str | None) -> str:
    """The storage URL to read: ``storage`` if given, else the default SQLite file of ``study_name``.

    Raises:
        UsageError: if neither is given, or the name is not a valid study name.
        StudyError: if the default SQLite file, or the file of a ``sqlite:///`` URL, does not exist.
    """
    from optimizer.paths import check_name, studies_dir
    from optimizer.study.storage import default_storage_url

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


def load_stored_study(study_name: str, storage: str | None = None) -> Any:
    """Open the existing study ``study_name`` (an ``optuna.Study``) without creating anything.

    Raises:
        StudyError: if there is no such study (a clear one-line message).
        StorageError: if the storage cannot be opened.
    """
    import optuna

    from optimizer.study.storage import open_storage

    url = storage_url_for(study_name, storage)
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(url, create_dirs=False))
    except KeyError as exc:
        raise StudyError(f"no study named {study_name!r} in that storage: check --study-name") from exc
