"""Shared fixtures: real ONNX models built by the tests, a private cache, one real embedded Triton."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import optuna
import pytest

from optimizer.cli import main
from optimizer.model import examples
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.run import run_study
from optimizer.study.settings import SearchSettings
from studies import FAST_CLI, FinishedStudy, RejectingTarget, study_settings


@pytest.fixture(scope="session", autouse=True)
def _private_dirs(tmp_path_factory: pytest.TempPathFactory):
    """Keep the tests' cache and studies out of the user's home and working directory."""
    cache = tmp_path_factory.mktemp("cache")
    studies = tmp_path_factory.mktemp("studies")
    saved = {key: os.environ.get(key) for key in ("OPTIMIZE_CACHE_DIR", "OPTIMIZE_STUDIES_DIR")}
    os.environ["OPTIMIZE_CACHE_DIR"] = str(cache)
    os.environ["OPTIMIZE_STUDIES_DIR"] = str(studies)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real models: mlp, cnn, encoder (int64 tokens, dynamic sequence), fixed-batch mlp, multi-dtype."""
    root = tmp_path_factory.mktemp("models")
    return {
        "mlp": examples.build_mlp(root / "mlp.onnx"),
        "cnn": examples.build_cnn(root / "cnn.onnx"),
        "encoder": examples.build_encoder(root / "encoder.onnx", hidden=64, layers=2, heads=4, ffn=128),
        "fixed": examples.build_fixed_batch_mlp(root / "fixed.onnx"),
        "multi": examples.build_multi_dtype(root / "multi.onnx"),
    }


@pytest.fixture(scope="session")
def triton():
    """One real embedded Triton shared by the serving tests and by the studies that leave it intact.

    ``run_study`` uses a running server as it is and leaves it running; tests that kill, hang or count
    the memory of a server start their own.
    """
    with EmbeddedTriton() as server:
        yield server


@pytest.fixture(scope="session")
def mixed_study(models, triton, tmp_path_factory) -> FinishedStudy:
    """A real five-trial study of the MLP whose third config Triton rejects: complete trials, one failed,
    and its two best configs confirmed (measured once more each) before export.

    The study, report, export and confirmation tests read it; none of them changes it.
    """
    root = tmp_path_factory.mktemp("mixed")
    # One load per trial (no second loads), so the third load is the third trial's.
    confirmed = SearchSettings(confirm_finalists=2, confirm_rounds=1, second_load_margin=None)
    settings = study_settings(models["mlp"], root, budget=5, study_name="mixed", seed=3, search=confirmed)
    summary = run_study(settings, target=RejectingTarget(triton))
    study = optuna.load_study(study_name="mixed", storage=f"sqlite:///{root}/mixed.db")
    return FinishedStudy(root, study, summary=summary)


@pytest.fixture(scope="session")
def tight_study(models, tmp_path_factory) -> FinishedStudy:
    """``optimize study`` with a budget nothing meets (0.001 ms): two infeasible trials, exit code and stderr."""
    root = tmp_path_factory.mktemp("tight")
    args = [
        "study",
        "--model",
        str(models["mlp"]),
        "--budget",
        "2",
        "--latency-budget-ms",
        "0.001",
        "--seed",
        "1",
    ]
    args += ["--study-name", "tight", "--storage", f"sqlite:///{root}/tight.db", *FAST_CLI]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(args)
    study = optuna.load_study(study_name="tight", storage=f"sqlite:///{root}/tight.db")
    return FinishedStudy(root, study, exit_code=code, stderr=stderr.getvalue())
