"""``run_study``: a study of one model or of several together, run by the one driver (driver.py).

One model's workload is :class:`optimizer.study.one_model.OneModel`, several models' (``settings.models``)
:class:`optimizer.study.joint.SeveralModels`; both go through :func:`optimizer.study.driver.drive`, so a
rule of the study (storage, sampler, workers, budget, the trial loop) holds for both.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from optimizer.config.space import space_from_dict
from optimizer.errors import StudyError
from optimizer.paths import studies_dir
from optimizer.serving.base import ServingTarget
from optimizer.study.driver import QuietReporter, Reporter, drive
from optimizer.study.joint import JointSummary, SeveralModels
from optimizer.study.one_model import OneModel
from optimizer.study.records import is_joint
from optimizer.study.results import StudySummary, best_trial
from optimizer.study.settings import SearchSettings, StudySettings
from optimizer.study.storage import count_finished, default_storage_url, open_storage

__all__ = ["QuietReporter", "Reporter", "cross_check_study", "run_study"]


def run_study(
    settings: StudySettings,
    reporter: Reporter | None = None,
    *,
    target: ServingTarget | None = None,
    storage: optuna.storages.BaseStorage | None = None,
) -> StudySummary | JointSummary:
    """Run (or resume) a study to its budget and export the best config.

    Args:
        settings: what to study and how; ``settings.models``: several models tuned together.
        reporter: told about each trial (default: nothing is shown).
        target: the server to measure on (default: a new embedded Triton). One that is already running
            is used as it is and left running (tests share one server); one that is not is started and
            stopped here.
        storage: an Optuna storage object to use instead of ``settings.storage`` (the replay benchmark
            passes an in-memory one: thousands of replayed trials, none worth a database).
    """
    workload = SeveralModels(settings, target) if settings.is_joint else OneModel(settings, target)
    return drive(workload, settings, reporter or QuietReporter(), target, storage)


def cross_check_study(
    study_name: str,
    engine: str = "perf_analyzer",
    reporter: Reporter | None = None,
    *,
    storage: str | None = None,
    output_dir: Path | None = None,
    input_data: Path | None = None,
    target: ServingTarget | None = None,
) -> StudySummary:
    """Measure a finished study's baseline and best with ``engine`` beside ours (``optimize cross-check``).

    The study is resumed as it was made (its model, shapes, space and latency budget, read from the
    study), with nothing left to run but the cross-check; its record joins the ``confirmation`` attribute.

    Raises:
        StudyError: no such study, or it has no feasible trial to cross-check.
    """
    out_dir = output_dir or studies_dir()
    url = storage or default_storage_url(out_dir, study_name)
    if storage is None and not (out_dir / f"{study_name}.db").is_file():
        raise StudyError(
            f"no study {study_name!r} in {out_dir}: give the name of a finished study (or --storage)"
        )
    attrs, finished, best = _stored_study(url, study_name)
    if is_joint(attrs):
        raise StudyError(
            f"study {study_name!r} tunes several models together: optimize cross-check measures one model's "
            "study (serve the joint best with optimize serve --study-name and run perf_analyzer per model)"
        )
    out_dir = Path(attrs.get("output_dir") or out_dir)
    if best is None:
        raise StudyError(
            f"study {study_name!r} has no feasible trial to cross-check: run it to its budget first"
        )
    settings = StudySettings(
        model_path=Path(attrs["model_path"]),
        shapes={name: tuple(dims) for name, dims in attrs.get("shapes", {}).items()},
        study_name=study_name,
        storage=url,
        output_dir=out_dir,
        budget=finished,
        latency_budget_ms=float(attrs["latency_budget_ms"]),
        space=space_from_dict(attrs["space"]),
        concurrency=tuple(attrs.get("concurrency_levels") or StudySettings().concurrency),
        input_data=input_data,
        accuracy_tolerance=float(attrs.get("accuracy_tolerance", StudySettings().accuracy_tolerance)),
        search=SearchSettings(confirm_finalists=0),  # the finalists' rounds, if any, are kept as they are
        confirm_with=engine,
    )
    return drive(OneModel(settings, target), settings, reporter or QuietReporter(), target)


def _stored_study(url: str, study_name: str):
    """A stored study's attributes, finished-trial count and exported trial (the database left as it is)."""
    storage = open_storage(url, create_dirs=False)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        return dict(study.user_attrs), count_finished(study), best_trial(study)
    except KeyError:
        raise StudyError(f"no study {study_name!r} in {url}: give the name of a finished study") from None
    finally:
        storage.engine.dispose()
