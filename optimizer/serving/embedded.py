"""The embedded serving target: the Triton Inference Server bundled in the nvidia-pytriton wheel.

``prepare_bundle()`` copies the bundled server, its Python backend, the stub for the running Python
and our Python-based ``onnxruntime`` backend into the cache once. ``EmbeddedTriton`` runs that server
with :class:`~optimizer.serving.process.TritonProcess` (loopback, free ports, explicit model control,
readiness deadline, log kept, clean stop, crash noticed, never outliving the CLI).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from optimizer.errors import ServerStartError
from optimizer.model.libraries import library_environment
from optimizer.paths import cache_dir
from optimizer.serving.bundle_version import remember_triton_version
from optimizer.serving.process import STARTUP_TIMEOUT_S, TritonProcess

__all__ = ["STARTUP_TIMEOUT_S", "EmbeddedTriton", "bundle_environment", "prepare_bundle"]

BACKEND_SOURCE = Path(__file__).parent / "backends" / "onnxruntime" / "model.py"
AUTO_COMPLETE_OFF = "--disable-auto-complete-config"


def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError(
            "the embedded Triton needs the nvidia-pytriton package: pip install nvidia-pytriton==0.7.0"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _bundle_key(source: Path) -> str:
    digest = hashlib.sha256()
    digest.update(BACKEND_SOURCE.read_bytes())
    digest.update(str(source.resolve()).encode())
    digest.update(str((source / "bin" / "tritonserver").stat().st_mtime_ns).encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


def prepare_bundle(root: Path | None = None) -> Path:
    """A runnable copy of the bundled Triton with our backend, made once per version; return its path."""
    source = _pytriton_dir() / "tritonserver"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerStartError(f"the bundled Triton has no Python backend stub for Python {python_version}")
    bundle = (root or cache_dir()) / "triton" / _bundle_key(source)
    if (bundle / "bin" / "tritonserver").is_file():
        return bundle
    bundle.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=bundle.parent, prefix=".staging-"))
    try:
        shutil.copytree(
            source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("python_backend_stubs")
        )
        shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
        (staging / "backends" / "onnxruntime").mkdir(parents=True, exist_ok=True)
        shutil.copy2(BACKEND_SOURCE, staging / "backends" / "onnxruntime" / "model.py")
        os.replace(staging, bundle)  # atomic: concurrent workers never see half a bundle
    except OSError:
        if not (bundle / "bin" / "tritonserver").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return bundle


def bundle_environment() -> dict[str, str]:
    """Variables the bundled server needs over this process's environment (libraries, ``python``)."""
    libs = _pytriton_dir().parent / "nvidia_pytriton.libs"
    # The GPU wheels' libraries (CUDA, cuDNN, TensorRT) for the backend stubs' ONNX Runtime, which
    # inherit the server's environment; then whatever the user's environment had.
    ld_path = library_environment().get("LD_LIBRARY_PATH", "")
    # The backend stub runs `python` from PATH to find its packages: make it this environment's.
    scripts = sysconfig.get_path("scripts")
    return {
        "LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(libs), ld_path) if p),
        "PATH": os.pathsep.join([scripts, str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


class EmbeddedTriton(TritonProcess):
    """The bundled Triton as a child process, bound to loopback, with explicit model control.

    Takes :class:`TritonProcess`'s keyword arguments (workdir, host, ports, model_repository,
    startup_timeout, extra_args); the binary, backends and environment are the prepared bundle's.
    """

    name = "embedded"

    def server_version(self) -> str:
        version = super().server_version()
        remember_triton_version(version)  # for `optimize --version`
        return version

    def __init__(self, **options: Any) -> None:
        bundle = prepare_bundle()
        # Our onnxruntime backend has no auto_complete_config, yet with auto-complete on, Triton starts a
        # backend stub at every load only to ask it (the stub imports onnxruntime): 1.2 s of each 1.35-s
        # load (bench/load_time.py). Every config optimize loads, or exports, is complete without it.
        options["extra_args"] = (AUTO_COMPLETE_OFF, *options.get("extra_args", ()))
        super().__init__(
            bundle / "bin" / "tritonserver",
            bundle / "backends",
            environment=bundle_environment(),
            **options,
        )
