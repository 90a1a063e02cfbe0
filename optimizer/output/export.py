"""Export: a trial's config and model file as a Triton model repository.

The repository is what a stock Triton with the native onnxruntime backend loads as is:
``<out>/<model>/config.pbtxt`` (protobuf text format) and ``<out>/<model>/1/<model file>``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from optimizer.config.render import to_pbtxt

__all__ = ["choose_trial", "export_from_storage", "load_stored_study", "write_repository"]


def write_repository(out_dir: Path, config: mc.ModelConfig, files: Mapping[str, Path]) -> Path:
    """Write ``<out_dir>/<config.name>/`` atomically (a crash never leaves half a repository)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / config.name
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{config.name}-"))
    try:
        (staging / "config.pbtxt").write_text(to_pbtxt(config))
        for relative, source in files.items():
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{config.name}-old-"))
            os.replace(target, old / config.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def export_from_storage(
    study_name: str, out_dir: Path, *, trial: int | None = None, storage: str | None = None
) -> Path:
    """Export trial ``trial`` (default: the best feasible) of a stored study; return the model directory."""
    from optimizer.study.run import export_trial

    study = load_stored_study(study_name, storage)
    return export_trial(study, choose_trial(study, trial), out_dir)


def load_stored_study(study_name: str, storage: str | None = None):
    """Open an existing study (default storage: ``studies/NAME.db``); a StudyError names what is missing."""
    import optuna

    from optimizer.errors import StudyError
    from optimizer.paths import check_name, studies_dir
    from optimizer.study.storage import default_storage_url, open_storage

    check_name(study_name, "study name")
    url = storage or default_storage_url(studies_dir(), study_name)
    if storage is None and not (studies_dir() / f"{study_name}.db").exists():
        raise StudyError(f"no study {study_name!r} in {studies_dir()}/: check --study-name or give --storage")
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(url, create_dirs=False))
    except KeyError as exc:
        raise StudyError(f"no study named {study_name!r} in {url}: check --study-name") from exc


def choose_trial(study, number: int | None = None):
    """Trial ``number`` if it was measured, or (None) the best feasible trial; StudyError otherwise."""
    from optimizer.errors import StudyError
    from optimizer.study.run import best_trial

    chosen = best_trial(study) if number is None else _trial_by_number(study, number)
    if chosen is None:
        raise StudyError(f"study {study.study_name!r} has no feasible completed trial to export")
    return chosen


def _trial_by_number(study, number: int):
    from optimizer.errors import StudyError

    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials or "config" not in trials[0].user_attrs:
        raise StudyError(f"study {study.study_name!r} has no measured trial {number}")
    return trials[0]
