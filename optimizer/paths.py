"""Where `optimize` keeps its files, and the name rules that keep them inside those places."""

from __future__ import annotations

import os
import re
from pathlib import Path

from optimizer.errors import UsageError

__all__ = ["cache_dir", "check_name", "studies_dir"]

# Names become directory names and Triton model names: keep them to a portable, traversal-free set.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def cache_dir() -> Path:
    """The cache for the prepared Triton bundle and derived model files (never next to the user's)."""
    root = os.environ.get("OPTIMIZE_CACHE_DIR")
    if root:
        path = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg) if xdg else Path.home() / ".cache") / "optimize"
    path.mkdir(parents=True, exist_ok=True)
    return path


def studies_dir() -> Path:
    """Default home of study databases and outputs: ``./studies`` under the working directory."""
    return Path(os.environ.get("OPTIMIZE_STUDIES_DIR", "studies"))


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is safe as a file and model name, else raise a UsageError."""
    if not _NAME_PATTERN.match(value) or ".." in value:
        raise UsageError(
            f"{what} {value!r} is not allowed: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return value
