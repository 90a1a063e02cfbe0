"""The GPU environment without a GPU: wheel libraries put on the library path, NVML and /proc detection,
and doctor's message and fix for each mismatch between the driver, the GPUs and the installed libraries.

The wheel layout, NVML and /proc are faked here (files under tmp_path, an object with NVML's functions);
the library path is checked in the real embedded Triton's processes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from procs import children

from optimizer import doctor
from optimizer.config.render import render_config, to_json
from optimizer.config.space import Candidate
from optimizer.model import libraries
from optimizer.model.intake import inspect_model
from optimizer.model.libraries import GpuLibraries, gpu_libraries, library_environment, wheel_library_dirs
from optimizer.serving.embedded import EmbeddedTriton, bundle_environment
from optimizer.serving.environment import hardware
from optimizer.serving.gpu import GpuDevice, GpuDriver, detect_gpus, gpu_mismatches


def _wheels(site: Path) -> dict[str, Path]:
    """A site-packages holding the GPU wheels' layout: CUDA 12 (per library), CUDA 13 (nvidia/cu13), TensorRT."""
    files = {
        "cudart12": site / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12",
        "cudnn": site / "nvidia" / "cudnn" / "lib" / "libcudnn.so.9",
        "cu13": site / "nvidia" / "cu13" / "lib" / "libcublas.so.13",
        "tensorrt": site / "tensorrt_libs" / "libnvinfer.so.10",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (site / "nvidia" / "headers_only" / "lib").mkdir(parents=True)  # a lib/ without libraries
    return {name: path.parent for name, path in files.items()}


def test_the_wheels_library_folders_are_found_and_put_first_on_the_library_path(tmp_path):
    dirs = _wheels(tmp_path)
    assert set(wheel_library_dirs([tmp_path])) == set(dirs.values())
    environment = library_environment({"LD_LIBRARY_PATH": "/opt/mine"}, [tmp_path])
    path = environment["LD_LIBRARY_PATH"].split(":")
    assert set(path[:-1]) == {str(d) for d in dirs.values()} and path[-1] == "/opt/mine"
    assert library_environment({}, [tmp_path / "empty"]) == {}  # nothing to add, nothing written


@pytest.mark.server
def test_the_embedded_server_and_its_backend_stubs_get_the_wheels_libraries(tmp_path, monkeypatch, models):
    dirs = _wheels(tmp_path)
    monkeypatch.setattr(libraries, "_site_dirs", lambda: [tmp_path])
    assert str(dirs["cudnn"]) in bundle_environment()["LD_LIBRARY_PATH"]
    info = inspect_model(models["mlp"])
    with EmbeddedTriton() as server:
        config = render_config(info, Candidate(max_batch_size=4), model_name="mlp")
        server.load_model("mlp", to_json(config), {"1/model.onnx": info.path})
        stubs = children(server.pid)
        assert stubs, "a loaded model runs in a backend stub process"
        for pid in [server.pid, *stubs]:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            library_path = next(v for v in environ if v.startswith(b"LD_LIBRARY_PATH=")).decode()
            assert str(dirs["tensorrt"]) in library_path and str(dirs["cu13"]) in library_path


def _nvml(*, fail: bool = False, capability=(7, 0), driver="550.54.15", cuda=12040):
    def init():
        if fail:
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    return SimpleNamespace(
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: driver.encode(),  # older bindings return bytes
        nvmlSystemGetCudaDriverVersion=lambda: cuda,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: f"handle{index}",
        nvmlDeviceGetCudaComputeCapability=lambda handle: capability,
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(total=16 << 30),
        nvmlDeviceGetName=lambda handle: "Tesla V100-SXM2-16GB",
    )


def _proc(root: Path) -> Path:
    (root / "gpus" / "0000:00:1e.0").mkdir(parents=True)
    (root / "version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
        "GCC version:  gcc version 12.2.0\n"
    )
    (root / "gpus" / "0000:00:1e.0" / "information").write_text("Model: \t\t NVIDIA A10G\nIRQ: \t\t 42\n")
    return root


def test_nvml_gives_the_driver_the_cuda_it_runs_and_each_gpus_compute_capability(tmp_path):
    driver = detect_gpus(_nvml(), tmp_path / "no-proc")
    assert driver == GpuDriver(
        "550.54.15", (12, 4), (GpuDevice(0, "Tesla V100-SXM2-16GB", (7, 0), 16384),), "nvml"
    )


def test_without_nvml_the_driver_and_gpus_are_read_from_proc(tmp_path):
    driver = detect_gpus(_nvml(fail=True), _proc(tmp_path))
    assert driver.version == "535.183.01" and driver.source == str(tmp_path)
    assert [d.name for d in driver.devices] == ["NVIDIA A10G"] and driver.cuda is None
    assert detect_gpus(_nvml(fail=True), tmp_path / "none") == GpuDriver()  # no driver at all


CU13 = GpuLibraries("1.31.1", "13.0", {"nvidia-cudnn-cu13": "9.27.0", "tensorrt-cu13-libs": "10.13.0"})
CU12 = GpuLibraries("1.26.0", "12.9", {"nvidia-cudnn-cu12": "9.10.2", "tensorrt-cu12-libs": "10.9.0"})


def _gpu(capability=(9, 0), driver="580.82.07") -> GpuDriver:
    return GpuDriver(driver, (13, 0), (GpuDevice(0, "NVIDIA H100", capability),), "nvml")


def test_a_matching_machine_has_no_mismatch():
    assert gpu_mismatches(_gpu(), CU13) == []
    assert gpu_mismatches(_gpu((7, 0), "535.183.01"), CU12) == []  # a V100 on the CUDA 12 build


@pytest.mark.parametrize(
    ("driver", "libs", "problem", "fix"),
    [
        (_gpu((7, 0), "580.82.07"), CU13, "compute capability 7.0", "'nvidia-cudnn-cu12<9.11'"),
        (
            _gpu((8, 0), "535.183.01"),
            CU13,
            "driver 535.183.01 is older than CUDA 13 needs",
            "optimize[gpu-cu12]",
        ),
        (
            _gpu(),
            GpuLibraries("1.31.1", "13.0", {"tensorrt-cu13-libs": "10.13.0"}),
            "cuDNN 9",
            "optimize[gpu-cu13]",
        ),
        (
            _gpu(),
            GpuLibraries("1.31.1", "13.0", {"nvidia-cudnn-cu13": "9.27.0"}),
            "TensorRT libraries",
            "optimize[trt-cu13]",
        ),
        (
            _gpu(),
            GpuLibraries("1.31.1", "13.0", {"nvidia-cudnn-cu13": "9.27.0", "tensorrt-cu13-libs": "11.4.0"}),
            "TensorRT 11.x",
            "'tensorrt-cu13-libs>=10,<11'",
        ),
        (_gpu(), GpuLibraries(), "onnxruntime-gpu is not installed", "optimize[gpu-cu12]"),
    ],
)
def test_each_mismatch_says_what_fails_and_the_command_that_fixes_it(driver, libs, problem, fix):
    problems = gpu_mismatches(driver, libs)
    assert any(problem in text and fix in command for text, command in problems), problems


def test_doctor_reports_the_gpus_and_each_library_mismatch_with_its_fix(tmp_path):
    gpus = doctor.check_gpus(_nvml(), tmp_path)
    assert gpus.ok and "driver 550.54.15, CUDA 12.4 (nvml)" in gpus.detail
    assert "GPU 0: Tesla V100-SXM2-16GB (compute capability 7.0)" in gpus.detail
    libs = doctor.check_gpu_libraries(_nvml(driver="580.82.07", cuda=13000), tmp_path, CU13)
    assert not libs.ok and "compute capability 7.0" in libs.detail
    assert (
        "`pip uninstall -y onnxruntime-gpu && pip install 'optimize[gpu-cu12]' 'nvidia-cudnn-cu12<9.11'`"
        in libs.fix
    )
    none = doctor.check_gpus(_nvml(fail=True), tmp_path / "none")
    assert not none.ok and "none seen" in none.detail and none.fix


def test_the_installed_libraries_are_read_from_the_environments_distributions():
    dists = [
        SimpleNamespace(metadata={"Name": "onnxruntime-gpu"}, version="1.31.1"),
        SimpleNamespace(metadata={"Name": "nvidia-cudnn-cu13"}, version="9.27.0.42"),
        SimpleNamespace(metadata={"Name": "tensorrt-cu13-libs"}, version="10.13.3"),
        SimpleNamespace(metadata={"Name": "nvidia-cuda-runtime"}, version="13.0.96"),
        SimpleNamespace(metadata={"Name": "numpy"}, version="1.26.4"),
    ]
    found = gpu_libraries(dists, SimpleNamespace(cuda_version="13.0"))
    assert found.onnxruntime == "1.31.1" and found.cuda_major == 13
    assert found.packages == {
        "nvidia-cuda-runtime": "13.0.96",
        "nvidia-cudnn-cu13": "9.27.0.42",
        "tensorrt-cu13-libs": "10.13.3",
    }
    here = gpu_libraries()  # this machine: onnxruntime-gpu, no nvidia wheels
    assert here.onnxruntime and here.onnxruntime_cuda


def test_a_study_records_the_gpus_it_saw_none_here():
    recorded = hardware()
    assert recorded["gpu"] is None and "gpu_driver" in recorded


def test_the_accuracy_guards_process_loads_the_wheels_libraries_itself(tmp_path):
    """The study's own process cannot change its library path once started: CUDA and cuDNN are loaded
    through onnxruntime.preload_dlls (stood in for here), TensorRT's libraries by full path."""
    import shutil

    trt = tmp_path / "tensorrt_libs"
    trt.mkdir()
    # A real shared object under TensorRT's soname (the wheel's own is 1 GB): the loader maps it by path.
    shutil.copy("/usr/lib/x86_64-linux-gnu/libz.so.1", trt / "libnvinfer.so.10")
    calls: list[dict] = []
    gpu_build = SimpleNamespace(
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        preload_dlls=lambda **options: calls.append(options),
    )
    loaded = libraries.preload_gpu_libraries([tmp_path], runtime=gpu_build)
    assert calls == [{"directory": ""}]  # the nvidia-* wheels first, then the default path
    assert loaded == ["cuda, cudnn", str(trt / "libnvinfer.so.10")]
    assert str(trt / "libnvinfer.so.10") in Path("/proc/self/maps").read_text()

    cpu_build = SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"], preload_dlls=None)
    assert libraries.preload_gpu_libraries([tmp_path / "none"], runtime=cpu_build) == []
