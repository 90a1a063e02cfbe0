"""Shared fixtures: real ONNX models built by the tests, a private cache, one real embedded Triton."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from optimizer.model import examples


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
    """One real embedded Triton shared by the serving tests (tests that break it use their own)."""
    from optimizer.serving.embedded import EmbeddedTriton

    with EmbeddedTriton() as server:
        yield server
