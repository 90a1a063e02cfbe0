"""The bundled Triton's version, for ``optimize --version`` without starting a server.

The bundle (nvidia-pytriton's ``tritonserver``) has no version flag; a running server reports it. The
embedded server records it when a study or doctor asks it, beside the bundle's package version, so
``--version`` says it at once afterwards and, before any server ran, says where it will be seen.
"""

from __future__ import annotations

import json
from importlib import metadata

from optimizer.paths import cache_dir

__all__ = ["bundled_triton", "remember_triton_version"]

_RECORD = "triton_version.json"


def _bundle() -> str | None:
    try:
        return metadata.version("nvidia-pytriton")
    except metadata.PackageNotFoundError:
        return None


def remember_triton_version(version: str) -> None:
    """Keep what the embedded server reported, for the bundle installed now (a best effort)."""
    try:
        path = cache_dir() / _RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"bundle": _bundle(), "triton": version}))
    except OSError:
        pass


def bundled_triton() -> str:
    """``bundled Triton 2.51.0 (nvidia-pytriton 0.7.0)``, or where the version will be seen."""
    bundle = _bundle()
    if bundle is None:
        return "no bundled Triton (nvidia-pytriton is not installed)"
    try:
        record = json.loads((cache_dir() / _RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("bundle") == bundle and record.get("triton"):
        return f"bundled Triton {record['triton']} (nvidia-pytriton {bundle})"
    return f"bundled Triton from nvidia-pytriton {bundle} (its version shows once it ran: optimize doctor)"
