"""Export: a stored study's trial as a Triton model repository (the deployment manifests: :mod:`.deploy`)."""

from __future__ import annotations

from pathlib import Path

from optimizer.errors import StudyError
from optimizer.study.results import best_trial, export_trial
from optimizer.study.storage import load_stored_study

__all__ = ["choose_trial", "export_from_storage"]


def export_from_storage(
    study_name: str, out_dir: Path, *, trial: int | None = None, storage: str | None = None
) -> Path:
    """Export trial ``trial`` (default: the best feasible) of a stored study; return the model directory."""
    study = load_stored_study(study_name, storage)
    return export_trial(study, choose_trial(study, trial), out_dir)


def choose_trial(study, number: int | None = None):
    """Trial ``number`` if it was measured, or (None) the best feasible trial; StudyError otherwise."""
    chosen = best_trial(study) if number is None else _trial_by_number(study, number)
    if chosen is None:
        raise StudyError(f"study {study.study_name!r} has no feasible completed trial to export")
    return chosen


def _trial_by_number(study, number: int):
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials or not ({"config", "configs"} & set(trials[0].user_attrs)):
        raise StudyError(f"study {study.study_name!r} has no measured trial {number}")
    return trials[0]
