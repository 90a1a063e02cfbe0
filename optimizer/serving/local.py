"""The local serving target: the user's own ``tritonserver`` binary with its own backends.

Run exactly like the embedded server (loopback, free ports, explicit model control, readiness
deadline, log kept, clean stop, crash noticed), but with the binary the user deploys — typically
``/opt/tritonserver/bin/tritonserver`` inside NVIDIA's container, whose native onnxruntime backend
then serves the trials.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optimizer.errors import ServerStartError
from optimizer.serving.process import TritonProcess

__all__ = ["DEFAULT_BACKEND_DIRECTORY", "LocalTriton", "find_backend_directory", "find_binary"]

DEFAULT_BACKEND_DIRECTORY = Path("/opt/tritonserver/backends")


def find_binary(binary: Path | str | None = None) -> Path:
    """``binary`` checked to be an executable file, or ``tritonserver`` from PATH.

    Raises:
        ServerStartError: the file is missing or not executable, or nothing is on PATH.
    """
    if binary is None:
        found = shutil.which("tritonserver")
        if found is None:
            raise ServerStartError(
                "no tritonserver on PATH: pass --triton-binary PATH, or use --target embedded (bundled server)"
            )
        return Path(found)
    path = Path(binary).expanduser()
    if not path.is_file():
        raise ServerStartError(f"--triton-binary {str(path)!r} does not exist or is not a file")
    if not os.access(path, os.X_OK):
        raise ServerStartError(f"--triton-binary {str(path)!r} is not executable: chmod +x it")
    return path


def find_backend_directory(binary: Path, backend_directory: Path | str | None = None) -> Path:
    """The backends of ``binary``'s install (``<install>/backends``), else /opt/tritonserver/backends.

    Raises:
        ServerStartError: the given directory, or every place looked in, does not exist.
    """
    if backend_directory is not None:
        path = Path(backend_directory).expanduser()
        if not path.is_dir():
            raise ServerStartError(f"--backend-directory {str(path)!r} is not a directory")
        return path
    install = binary.resolve().parent.parent  # <install>/bin/tritonserver
    candidates = [install / "backends", DEFAULT_BACKEND_DIRECTORY]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = " or ".join(str(c) for c in candidates)
    raise ServerStartError(
        f"no backends directory for {binary} (looked in {looked}): pass --backend-directory"
    )


class LocalTriton(TritonProcess):
    """A ``tritonserver`` binary of the user's install as a child process on loopback.

    Args:
        binary: the executable (default: ``tritonserver`` on PATH).
        backend_directory: default the install's ``backends`` next to ``bin``, else
            /opt/tritonserver/backends.
        environment: variables set over this process's environment for the server (e.g. an
            ``LD_LIBRARY_PATH`` the install needs).
        **options: :class:`TritonProcess`'s keyword arguments (workdir, host, ports, ...).
    """

    name = "local"

    def __init__(
        self,
        binary: Path | str | None = None,
        backend_directory: Path | str | None = None,
        *,
        environment: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        found = find_binary(binary)
        super().__init__(
            found, find_backend_directory(found, backend_directory), environment=environment, **options
        )
