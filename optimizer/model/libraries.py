"""The GPU libraries pip installed, and the library path that lets ONNX Runtime find them.

The CUDA, cuDNN and TensorRT libraries come as wheels (``nvidia-*``, ``tensorrt-cu1x-libs``) whose shared
objects carry no RUNPATH: ONNX Runtime's CUDA and TensorRT providers find them only on the library path,
which the loader reads once, when a process starts. :func:`library_environment` is that path for the
processes optimize starts (the provider probe, the Triton server and the backend stubs it runs);
:func:`preload_gpu_libraries` loads them into this process (the accuracy guard's GPU sessions), where the
path can no longer change; :func:`gpu_libraries` says which versions are installed, for ``optimize doctor``
and the study's record.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import re
import site
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "GpuLibraries",
    "gpu_libraries",
    "library_environment",
    "preload_gpu_libraries",
    "preload_gpu_libraries_once",
    "wheel_library_dirs",
]


def _site_dirs() -> list[Path]:
    dirs = [Path(p) for p in (*site.getsitepackages(), site.getusersitepackages())]
    dirs += [Path(p) for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def wheel_library_dirs(site_dirs: Iterable[Path] | None = None) -> list[Path]:
    """The folders holding the GPU wheels' shared objects: ``nvidia/<library>/lib`` (CUDA 12 wheels,
    cuDNN), ``nvidia/cu13/lib`` (CUDA 13's unsuffixed wheels) and ``tensorrt_libs`` (TensorRT)."""
    found: list[Path] = []
    for root in _site_dirs() if site_dirs is None else site_dirs:
        candidates = sorted((root / "nvidia").glob("*/lib")) + [root / "tensorrt_libs"]
        found += [d for d in candidates if d.is_dir() and any(d.glob("*.so*"))]
    return list(dict.fromkeys(found))


def library_environment(
    environ: Mapping[str, str] | None = None, site_dirs: Iterable[Path] | None = None
) -> dict[str, str]:
    """``LD_LIBRARY_PATH`` for a process that loads ONNX Runtime's CUDA or TensorRT provider: the GPU
    wheels' folders first, then what the environment had (the loader reads it once, at process start)."""
    environ = os.environ if environ is None else environ
    existing = [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    wheels = [str(d) for d in wheel_library_dirs(site_dirs)]
    path = list(dict.fromkeys(wheels + existing))
    return {"LD_LIBRARY_PATH": os.pathsep.join(path)} if path else {}


# TensorRT's libraries that ONNX Runtime's TensorRT provider links (by soname): loaded first, by full path,
# the provider's own load finds them already in the process (the loader matches a loaded soname).
_TENSORRT_SONAMES = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")


def preload_gpu_libraries(site_dirs: Iterable[Path] | None = None, runtime: Any = None) -> list[str]:
    """Load the GPU wheels' libraries into this process, before a CUDA or TensorRT session is made here:
    CUDA and cuDNN through ``onnxruntime.preload_dlls()`` (ONNX Runtime >= 1.21, the documented way), and
    TensorRT's, which it does not cover, by full path. What was loaded (TensorRT's paths; "cuda, cudnn"
    when ``preload_dlls`` ran); nothing on a CPU build. A library that fails to load is left: the session
    then falls back to the CPU, which the accuracy guard records. ``runtime``: the onnxruntime module
    (imported when None).
    """
    loaded: list[str] = []
    if runtime is None:
        runtime = importlib.import_module("onnxruntime")
    preload = getattr(runtime, "preload_dlls", None)
    if preload is not None and "CUDAExecutionProvider" in runtime.get_available_providers():
        try:
            preload(directory="")  # "": the nvidia-* wheels first, then the default library path
            loaded.append("cuda, cudnn")
        except (OSError, RuntimeError):
            pass
    for folder in wheel_library_dirs(site_dirs):
        for soname in _TENSORRT_SONAMES:
            if (folder / soname).is_file():
                try:
                    ctypes.CDLL(str(folder / soname), mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                loaded.append(str(folder / soname))
    return loaded


@functools.lru_cache(maxsize=1)
def preload_gpu_libraries_once() -> tuple[str, ...]:
    """:func:`preload_gpu_libraries` for this process, once: a library stays loaded, a second scan of the
    site folders would find nothing new."""
    return tuple(preload_gpu_libraries())


@dataclass(frozen=True)
class GpuLibraries:
    """The GPU stack pip installed: versions by distribution, and ONNX Runtime's own build."""

    onnxruntime: str | None = None  # onnxruntime-gpu's version
    onnxruntime_cuda: str | None = None  # the CUDA it was built for (build_and_package_info)
    packages: Mapping[str, str] = field(default_factory=dict)  # nvidia-* and tensorrt-* wheels

    def major_of(self, *names: str) -> int | None:
        """The major version of the first of ``names`` installed."""
        version = next((self.packages[n] for n in names if n in self.packages), None)
        return int(version.split(".")[0]) if version else None

    @property
    def cuda_major(self) -> int | None:
        return int(self.onnxruntime_cuda.split(".")[0]) if self.onnxruntime_cuda else None

    def to_dict(self) -> dict[str, Any]:
        return {"onnxruntime": self.onnxruntime, "onnxruntime_cuda": self.onnxruntime_cuda, **self.packages}


_GPU_PACKAGE = re.compile(
    r"^(nvidia-(cuda-runtime|cudnn|cublas|cufft|curand|cuda-nvrtc)(-cu1\d)?|tensorrt-cu1\d-libs)$"
)


def gpu_libraries(distributions: Iterable[Any] | None = None, build_info: Any = None) -> GpuLibraries:
    """What the environment holds (``distributions``: importlib.metadata's, read when None;
    ``build_info``: ``onnxruntime.capi.build_and_package_info``, imported when None)."""
    packages = {}
    onnxruntime = None
    for dist in metadata.distributions() if distributions is None else distributions:
        name = (dist.metadata["Name"] or "").lower()
        if name == "onnxruntime-gpu":
            onnxruntime = dist.version
        elif _GPU_PACKAGE.match(name):
            packages[name] = dist.version
    cuda = _onnxruntime_cuda(build_info) if onnxruntime is not None else None
    return GpuLibraries(onnxruntime, cuda, dict(sorted(packages.items())))


def _onnxruntime_cuda(build_info: Any) -> str | None:
    if build_info is None:
        try:
            from onnxruntime.capi import build_and_package_info as module
        except ImportError:
            return None
        build_info = module
    return getattr(build_info, "cuda_version", None) or None
