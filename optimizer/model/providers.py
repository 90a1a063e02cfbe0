"""Which execution providers really run here: probed by creating a session, not by a name list.

``onnxruntime.get_available_providers()`` lists CUDA and TensorRT whenever the GPU build is installed,
even on a machine without a GPU; only a session that keeps the provider proves it loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache

from optimizer.errors import SpaceError
from optimizer.model.libraries import library_environment

__all__ = ["ORT_NAMES", "check_providers", "runnable_providers"]

ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

_INSTALL_HINTS = {
    "openvino": "install onnxruntime-openvino in place of onnxruntime/onnxruntime-gpu",
    "cuda": "needs an NVIDIA GPU with its driver and onnxruntime-gpu",
    "tensorrt": "needs an NVIDIA GPU, TensorRT libraries and onnxruntime-gpu",
}


_PROBE = """
import json, sys
import onnxruntime as ort
from onnx import TensorProto, helper

graph = helper.make_graph(
    [helper.make_node("Relu", ["x"], ["y"])], "probe",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 9
runnable = []
for name in json.loads(sys.argv[1]):
    if name not in ort.get_available_providers():
        continue
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[name])
    except Exception:
        continue
    if name in session.get_providers():
        runnable.append(name)
print(json.dumps(runnable))
"""


@lru_cache(maxsize=1)
def runnable_providers() -> tuple[str, ...]:
    """Our names (cpu, openvino, cuda, tensorrt) of the providers that load in a real session.

    The probe runs in a child process: a provider that fails to load prints pages of library errors,
    and some leave state behind in the process that tried them.
    """
    result = subprocess.run(  # noqa: S603 - argument list, never a shell
        [sys.executable, "-c", _PROBE, json.dumps(list(ORT_NAMES.values()))],
        env={**os.environ, **library_environment()},  # the GPU wheels' libraries, as the server gets them
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    try:
        loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return ("cpu",)
    return tuple(name for name, ort_name in ORT_NAMES.items() if ort_name in loaded) or ("cpu",)


def _space_hint(runnable: tuple[str, ...]) -> str:
    if "cuda" in runnable or "tensorrt" in runnable:
        return "--space gpu"
    return "--space cpu, or a space file listing only those under execution_providers"


def check_providers(requested: tuple[str, ...], runnable: tuple[str, ...] | None = None) -> None:
    """Raise SpaceError naming what is available when a space asks for a provider that does not run."""
    runnable = runnable_providers() if runnable is None else runnable
    missing = [name for name in requested if name not in runnable]
    if missing:
        name = missing[0]
        raise SpaceError(
            f"execution provider {name!r} does not run on this machine ({_INSTALL_HINTS.get(name, '')}); "
            f"available here: {', '.join(runnable)}: use a space of those ({_space_hint(runnable)})"
        )
