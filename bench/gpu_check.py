"""The GPU half of the prepared device check (bench/gpu_check.sh): every GPU provider and precision
optimize renders, loaded into the embedded Triton on KIND_GPU instances and measured.

For the bundled example encoder and the test MLP, each of CUDA fp32, CUDA fp16 and (when TensorRT's
libraries load) TensorRT fp16 is rendered as a study renders it (render_trial_config: profile, caches,
warm-up), loaded, and measured at concurrency 1 and 8 in fixed windows; the load time (a TensorRT engine
build included), throughput, p99, the GPU memory the server's /metrics reports and the accuracy guard's
figures on the serving provider are written to OUT/providers.json. On a machine without a GPU it says so
and exits 3 without measuring anything.

    python bench/gpu_check.py --out bench/out/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from optimizer.config.render import to_dict, to_json
from optimizer.config.space import Candidate
from optimizer.measurement.builtin import LoadGenerator
from optimizer.measurement.levels import MeasureSettings
from optimizer.model import examples
from optimizer.model.accuracy import check_variant
from optimizer.model.intake import load_requests
from optimizer.model.libraries import gpu_libraries
from optimizer.model.providers import runnable_providers
from optimizer.model.variants import config_files, variant_path
from optimizer.paths import cache_dir
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.serving.gpu import detect_gpus
from optimizer.study.trial_rules import render_trial_config

WINDOW = MeasureSettings(warmup_s=1.0, window_s=2.0, max_window_s=4.0, min_requests=20, rule="fixed")
CASES = (("cuda", "fp32"), ("cuda", "fp16"), ("tensorrt", "fp16"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu-check"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    driver = detect_gpus()
    runnable = runnable_providers()
    found = {
        "gpus": [vars(device) for device in driver.devices],
        "driver": driver.version,
        "driver_cuda": driver.cuda,
        "source": driver.source,
        "libraries": gpu_libraries().to_dict(),
        "runnable_providers": list(runnable),
        "load": os.getloadavg(),
        "results": [],
    }
    print(json.dumps({k: v for k, v in found.items() if k != "results"}, indent=1), flush=True)
    if not driver.devices or "cuda" not in runnable:
        print("no GPU, or the CUDA provider does not load: nothing measured", flush=True)
        (args.out / "providers.json").write_text(json.dumps(found, indent=1))
        return 3
    models = {
        "encoder": (examples.example_model(cache_dir() / "examples"), dict(examples.EXAMPLE_SHAPES)),
        "mlp": (examples.build_mlp(cache_dir() / "examples" / "mlp.onnx"), {}),
    }
    with EmbeddedTriton() as server:
        for name, (path, shapes) in models.items():
            info, _, samples = load_requests(path, shapes, None, cache=cache_dir())
            for provider, precision in CASES:
                if provider not in runnable:
                    found["results"].append(
                        {
                            "model": name,
                            "provider": provider,
                            "precision": precision,
                            "skipped": "does not load here",
                        }
                    )
                    continue
                found["results"].append(_measure(server, name, info, samples, provider, precision))
                print(json.dumps(found["results"][-1]), flush=True)
                (args.out / "providers.json").write_text(json.dumps(found, indent=1))
    return 0


def _measure(server, name, info, samples, provider, precision) -> dict:
    candidate = Candidate(
        provider=provider, precision=precision, max_batch_size=8, preferred_batch_sizes=(8,)
    )
    result = {"model": name, "provider": provider, "precision": precision, "candidate": candidate.summary()}
    try:
        config = render_trial_config(info, candidate, name, samples)
        result["config"] = to_dict(config)
        if precision != "fp32" and provider == "cuda":  # the converted file, checked where it is served
            variant = variant_path(info, precision, cache_dir())
            result["accuracy"] = check_variant(
                info.path, variant, samples, precision, 0.01, provider
            ).to_dict()
        started = time.perf_counter()
        server.load_model(name, to_json(config), config_files(info, config, cache_dir()))
        result["load_s"] = round(time.perf_counter() - started, 2)
        generator = LoadGenerator(server.grpc_url, name, samples, WINDOW)
        for concurrency in (1, 8):
            level = generator.measure(concurrency)
            result[f"c{concurrency}"] = {
                "throughput": round(level.throughput, 1),
                "p99_ms": round(level.p99_ms, 2),
            }
        result["resources"] = server.resources()
    except Exception as exc:  # one case failing must not hide the others' figures
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return result


if __name__ == "__main__":
    sys.exit(main())
