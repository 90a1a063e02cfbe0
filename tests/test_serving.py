"""The embedded Triton and the onnxruntime backend, against the real server."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from procs import group_members, listening_addresses

from optimizer.config.render import render_config, to_json
from optimizer.config.space import Candidate
from optimizer.errors import ConfigRejected, ServerDiedError
from optimizer.model.intake import inspect_model, synthetic_inputs
from optimizer.serving.control import load_files
from optimizer.serving.embedded import EmbeddedTriton

pytestmark = pytest.mark.server

BATCHED = Candidate(max_batch_size=8, preferred_batch_sizes=(8, 4), max_queue_delay_us=2000, instance_count=2)


def _serve(server: EmbeddedTriton, path: Path, candidate: Candidate, name: str, *, cache: Path | None = None):
    info = inspect_model(path, cache=cache)
    config = render_config(info, candidate, model_name=name)
    seconds = server.load_model(name, to_json(config), {"1/model.onnx": info.path})
    return info, seconds


def _infer(
    server: EmbeddedTriton, name: str, feeds: dict[str, np.ndarray], outputs: list[str]
) -> dict[str, np.ndarray]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for input_name, array in feeds.items():
        tensor = grpcclient.InferInput(input_name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(name, inputs)
    client.close()
    return {output: result.as_numpy(output) for output in outputs}


def _direct(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _max_difference(served: dict[str, np.ndarray], direct: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, expected in direct.items():
        assert served[name].shape == expected.shape, name
        assert served[name].dtype == expected.dtype, name
        worst = max(
            worst, float(np.max(np.abs(served[name].astype(np.float64) - expected.astype(np.float64))))
        )
    return worst


# --- lifecycle ---------------------------------------------------------------------------------------------


def test_server_listens_only_on_loopback_and_stops_with_its_stubs(models):
    server = EmbeddedTriton()
    with server:
        assert server.server_version() == "2.51.0"
        for port in server.ports.values():
            assert listening_addresses(port) == {"127.0.0.1"}
        _serve(server, models["mlp"], Candidate(instance_count=2), "mlp")  # starts backend stub processes
        pgid = server.pid
        assert len(group_members(pgid)) >= 2  # the server and its stubs share one process group
    assert not server.is_alive()
    assert group_members(pgid) == []
    assert not server.log_path.exists() or True  # the workdir is removed with the server


def test_killed_server_is_noticed_and_restart_serves_again(models):
    with EmbeddedTriton() as server:
        _serve(server, models["mlp"], Candidate(), "mlp")
        os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while server.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.is_alive()
        with pytest.raises(ServerDiedError):
            _serve(server, models["mlp"], Candidate(), "mlp")
        server.restart()
        _serve(server, models["mlp"], Candidate(), "mlp")
        feeds = {"x": np.ones((1, 64), np.float32)}
        assert _infer(server, "mlp", feeds, ["logits"])["logits"].shape == (1, 10)


def test_port_in_use_gives_a_clear_error():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedTriton(http_port=port, grpc_port=port + 1, metrics_port=port + 2)
        with pytest.raises(Exception) as raised:
            server.start()
        assert f"port {port}" in str(raised.value) and "in use" in str(raised.value)


# --- correctness of served outputs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "shapes"),
    [
        ("mlp", {"x": (64,)}),
        ("cnn", {"image": (3, 32, 32)}),
        ("encoder", {"input_ids": (16,), "attention_mask": (16,)}),
        ("multi", {"a": (8,), "b": (8,), "c": (8,)}),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_served_outputs_equal_direct_onnxruntime(triton, models, model, shapes, batch):
    info, _ = _serve(triton, models[model], BATCHED, model)
    feeds = synthetic_inputs(info, shapes, batch, seed=batch)
    served = _infer(triton, model, feeds, [o.name for o in info.outputs])
    assert _max_difference(served, _direct(models[model], feeds)) <= 1e-5


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(triton, models):
    import tritonclient.grpc.aio as aioclient
    from tritonclient.grpc import InferInput

    info, _ = _serve(
        triton, models["encoder"], Candidate(max_batch_size=8, max_queue_delay_us=20000), "encoder_b"
    )
    samples = [
        synthetic_inputs(info, {"input_ids": (12,), "attention_mask": (12,)}, 1, seed=s) for s in range(8)
    ]

    async def send_all():
        client = aioclient.InferenceServerClient(triton.grpc_url)
        calls = []
        for feeds in samples:
            inputs = []
            for name, array in feeds.items():
                tensor = InferInput(name, list(array.shape), "INT64")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            calls.append(client.infer("encoder_b", inputs))
        results = await asyncio.gather(*calls)
        # Triton counts a request after its response is sent: read the statistics once all eight are in
        # (its JSON leaves out a count that is still zero).
        deadline = time.monotonic() + 10
        while True:
            stats = await client.get_inference_statistics("encoder_b", as_json=True)
            if int(stats["model_stats"][0].get("inference_count", 0)) >= 8 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await client.close()
        return results, stats

    results, stats = asyncio.run(send_all())
    for feeds, result in zip(samples, results):
        expected = _direct(models["encoder"], feeds)["pooled"]
        assert np.max(np.abs(result.as_numpy("pooled") - expected)) <= 1e-5
    model_stats = stats["model_stats"][0]
    assert int(model_stats["inference_count"]) == 8
    assert int(model_stats["execution_count"]) < 8  # the dynamic batcher grouped requests


def test_fixed_batch_model_is_served_with_a_dynamic_batch(triton, models, tmp_path):
    info, _ = _serve(triton, models["fixed"], BATCHED, "fixed", cache=tmp_path)
    assert info.batching and info.notes and info.path.parent != models["fixed"].parent
    feeds = synthetic_inputs(info, {"x": (64,)}, 3, seed=1)
    served = _infer(triton, "fixed", feeds, ["logits"])["logits"]
    for row in range(3):
        expected = _direct(models["fixed"], {"x": feeds["x"][row : row + 1]})["logits"]
        assert np.max(np.abs(served[row : row + 1] - expected)) <= 1e-5


def test_model_without_batch_dimension_is_served_with_max_batch_size_zero(triton, models):
    info, _ = _serve(triton, models["fixed"], Candidate(), "nobatch")  # no cache: no conversion
    assert not info.batching
    assert triton.control.model_config("nobatch").get("max_batch_size", 0) == 0
    feeds = synthetic_inputs(info, {"x": (1, 64)}, 1)
    assert (
        _max_difference(_infer(triton, "nobatch", feeds, ["logits"]), _direct(models["fixed"], feeds)) <= 1e-5
    )


# --- hot reload -------------------------------------------------------------------------------------------------


def test_hot_reload_changes_instances_batching_and_threads_without_restart(triton, models, capsys):
    pid = triton.pid
    steps = [
        Candidate(),
        Candidate(max_batch_size=8, preferred_batch_sizes=(8,), max_queue_delay_us=500, instance_count=2),
        Candidate(max_batch_size=4, instance_count=3, intra_op_threads=1),
    ]
    seconds = []
    for candidate in steps:
        info, took = _serve(triton, models["mlp"], candidate, "reload")
        seconds.append(took)
        served = triton.control.model_config("reload")
        assert served["instance_group"][0]["count"] == candidate.instance_count
        assert served.get("max_batch_size") == candidate.max_batch_size
        assert ("dynamic_batching" in served) == candidate.dynamic_batching
        threads = served.get("parameters", {}).get("intra_op_thread_count", {}).get("string_value")
        assert threads == (str(candidate.intra_op_threads) if candidate.intra_op_threads else None)
        feeds = synthetic_inputs(info, {"x": (64,)}, min(2, candidate.max_batch_size))
        assert (
            _max_difference(_infer(triton, "reload", feeds, ["logits"]), _direct(models["mlp"], feeds))
            <= 1e-5
        )
    assert triton.pid == pid
    with capsys.disabled():
        print(f"\nreload seconds: {', '.join(f'{s:.2f}' for s in seconds)}")


def test_rejected_config_raises_with_tritons_message_and_old_config_keeps_serving(triton, models):
    info, _ = _serve(triton, models["mlp"], Candidate(max_batch_size=4), "reject")
    config = render_config(info, Candidate(max_batch_size=4, preferred_batch_sizes=(4,)), model_name="reject")
    config.dynamic_batching.preferred_batch_size[:] = [64]  # above max_batch_size: Triton refuses it
    with pytest.raises(ConfigRejected, match="preferred size must be <= max batch size"):
        triton.load_model("reject", to_json(config), {"1/model.onnx": info.path})
    feeds = synthetic_inputs(info, {"x": (64,)}, 1)
    assert _infer(triton, "reject", feeds, ["logits"])["logits"].shape == (1, 10)


def test_model_that_fails_to_initialise_is_rejected_with_the_backend_error(triton, models):
    info = inspect_model(models["mlp"])
    config = render_config(info, Candidate(precision="int8"), model_name="noinit")  # no int8 file placed
    with pytest.raises(ConfigRejected, match="model.int8.onnx"):
        triton.load_model("noinit", to_json(config), {"1/model.onnx": info.path})


def test_unavailable_execution_provider_is_rejected_not_silently_cpu(triton, models):
    info = inspect_model(models["mlp"])
    config = render_config(info, Candidate(provider="cuda"), model_name="gpu_on_cpu")
    config.instance_group[0].kind = config.instance_group[
        0
    ].KIND_CPU  # no GPU here: ask the CPU instance for CUDA
    config.optimization.execution_accelerators.cpu_execution_accelerator.add(name="openvino")
    del config.optimization.execution_accelerators.gpu_execution_accelerator[:]
    with pytest.raises(ConfigRejected, match="OpenVINOExecutionProvider"):
        triton.load_model("gpu_on_cpu", to_json(config), {"1/model.onnx": info.path})


def test_model_files_travel_in_the_load_request(triton, models):
    info = inspect_model(models["mlp"])
    config = render_config(info, Candidate(), model_name="remote_files")
    triton.control.load("remote_files", to_json(config), files=load_files({"1/model.onnx": info.path}))
    assert not (triton.model_repository / "remote_files").exists()
    feeds = synthetic_inputs(info, {"x": (64,)}, 1)
    assert (
        _max_difference(_infer(triton, "remote_files", feeds, ["logits"]), _direct(models["mlp"], feeds))
        <= 1e-5
    )
