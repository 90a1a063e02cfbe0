"""A rendered config written out as a Triton model repository: ``<out>/<model>/config.pbtxt`` + its files.

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
from optimizer.errors import disk_full, is_disk_full

__all__ = ["write_repository"]


def write_repository(out_dir: Path, config: mc.ModelConfig, files: Mapping[str, Path]) -> Path:
    """Write ``<out_dir>/<config.name>/`` atomically (a crash never leaves half a repository)."""
    target = out_dir / config.name
    text = to_pbtxt(config)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{config.name}-"))
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(out_dir, _size(text, files)) from exc
        raise
    try:
        (staging / "config.pbtxt").write_text(text)
        for relative, source in files.items():
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{config.name}-old-"))
            os.replace(target, old / config.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, target)
    except OSError as exc:
        if is_disk_full(exc):  # the staging copy goes; a previous repository at target is untouched
            shutil.rmtree(staging, ignore_errors=True)
            raise disk_full(target, _size(text, files)) from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _size(config_text: str, files: Mapping[str, Path]) -> int:
    return len(config_text.encode()) + sum(source.stat().st_size for source in files.values())
