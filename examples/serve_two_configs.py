"""Serve one ONNX model through the embedded Triton with two configurations in turn.

    .venv/bin/python examples/serve_two_configs.py [MODEL.onnx --shape NAME:DIMS ...]

Without arguments it uses the bundled example encoder. It starts the embedded Triton, loads the model
with the untuned config, hot-reloads it with a batched multi-instance config (no restart), and after
each load compares the served outputs with a direct ONNX Runtime run, printing the reload time and the
largest difference it saw.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from optimizer.config.render import render_config, to_json
from optimizer.config.space import Candidate
from optimizer.model import examples
from optimizer.model.intake import inspect_model, parse_shape_args, resolve_shapes, synthetic_inputs
from optimizer.paths import cache_dir
from optimizer.serving.embedded import EmbeddedTriton

CONFIGS = {
    "untuned": Candidate(),
    "batched": Candidate(
        max_batch_size=8,
        preferred_batch_sizes=(8, 4),
        max_queue_delay_us=1000,
        instance_count=2,
        intra_op_threads=1,
    ),
}


def served_outputs(server: EmbeddedTriton, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for input_name, array in feeds.items():
        tensor = grpcclient.InferInput(input_name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(name, inputs)
    outputs = {
        output["name"]: result.as_numpy(output["name"])
        for output in result.get_response(as_json=True)["outputs"]
    }
    client.close()
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--shape", action="append", default=[])
    args = parser.parse_args()
    if args.model is None:
        model_path, shapes = examples.example_model(cache_dir() / "examples"), dict(examples.EXAMPLE_SHAPES)
    else:
        model_path, shapes = args.model, parse_shape_args(args.shape)
    info = inspect_model(model_path, cache=cache_dir())
    shapes = resolve_shapes(info, shapes)
    session = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    with EmbeddedTriton() as server:
        print(
            f"Triton {server.server_version()} ready on {server.grpc_url} in {time.perf_counter() - started:.1f} s"
        )
        for label, candidate in CONFIGS.items():
            config = render_config(info, candidate, model_name="model")
            seconds = server.load_model("model", to_json(config), {"1/model.onnx": info.path})
            worst = 0.0
            for batch in (1, 2) if info.batching and candidate.max_batch_size >= 2 else (1,):
                feeds = synthetic_inputs(info, shapes, batch, seed=batch)
                direct = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
                served = served_outputs(server, "model", feeds)
                worst = max(worst, *(float(np.max(np.abs(served[n] - direct[n]))) for n in direct))
            print(
                f"{label:8} {candidate.summary():55} load {seconds:.2f} s, served vs direct max |diff| {worst:.3g}"
            )


if __name__ == "__main__":
    main()
