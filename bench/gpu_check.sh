#!/usr/bin/env bash
# The prepared device check of issue 29, for a machine with one NVIDIA GPU and no package registry, in at
# most 8 minutes; everything it sees goes to $OUT (default bench/out/gpu-check):
#   1. the wheels carried in pieces (bench/gpu_wheels.sh) checked against their sums and installed into a
#      venv that sees the machine's own packages (its nvidia-* CUDA wheels, cuDNN, NVML);
#   2. optimize doctor (driver, CUDA, compute capability, libraries, each mismatch and its fix);
#   3. bench/gpu_check.py: CUDA fp32 / fp16 and TensorRT fp16 (when its libraries load) on KIND_GPU
#      instances of the embedded Triton, each loaded and measured, with GPU memory;
#   4. a 6-trial study of the bundled example on the gpu space, its trials (GPU memory each) as JSON.
# Nothing here has run on a GPU yet (README "GPU status"). Run it from the repository root:
#   OUT=$OUT bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out/gpu-check}
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
started=$(date +%s)
step() { echo "== $(( $(date +%s) - started )) s: $*"; }

pieces=bench/gpu_wheels/pieces
venv=${GPU_VENV:-/tmp/gpu-check-venv}
if [ ! -x "$venv/bin/optimize" ]; then
    step "reassembling the wheels"
    (cd "$pieces" && grep 'part' SHA256SUMS | sha256sum --check --quiet) || { echo "a wheel piece is missing or damaged"; exit 2; }
    cat "$pieces"/wheels.tar.part* > /tmp/gpu-wheels.tar
    (cd /tmp && grep ' wheels.tar$' "$OLDPWD/$pieces/SHA256SUMS" | sed 's# wheels.tar$# gpu-wheels.tar#' | sha256sum --check --quiet) \
        || { echo "the reassembled tar does not match its sum"; exit 2; }
    rm -rf /tmp/gpu-wheels && mkdir -p /tmp/gpu-wheels && tar -C /tmp/gpu-wheels -xf /tmp/gpu-wheels.tar
    step "installing into $venv"
    "${GPU_PYTHON:-python3}" -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install --quiet --no-index --find-links /tmp/gpu-wheels/wheels -e . 'onnxruntime-gpu>=1.28' nvidia-ml-py \
        || { echo "install failed"; exit 2; }
fi
"$venv/bin/pip" list 2>/dev/null | grep -i -E 'onnxruntime|nvidia|tensorrt|numpy|pytriton' > "$out/packages.txt"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

step "optimize doctor"
timeout 120 "$venv/bin/optimize" doctor > "$out/doctor.txt" 2>&1; cat "$out/doctor.txt"

step "providers and precisions on KIND_GPU instances"
timeout 240 "$venv/bin/python" bench/gpu_check.py --out "$out"

step "a 6-trial study on the gpu space"
export OPTIMIZE_STUDIES_DIR="$out/studies"
timeout 240 "$venv/bin/optimize" study --space gpu --budget 6 --seed 0 --concurrency 1,4,16 \
    --window-s 1 --warmup-s 1 --stop-rule fixed --confirm 0 --study-name gpu \
    --storage "sqlite:///$out/gpu.db" > "$out/study.txt" 2>&1
echo "study exit code $?"; tail -30 "$out/study.txt"
"$venv/bin/python" - "$out" <<'PY'
import json, sys, optuna
out = sys.argv[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)
try:
    study = optuna.load_study(study_name="gpu", storage=f"sqlite:///{out}/gpu.db")
except Exception as exc:
    print(f"no study: {exc}")
    raise SystemExit(0)
keep = ("candidate", "throughput", "p99_ms", "load_s", "gpu_memory_mb", "gpu_memory_total_mb", "reason")
trials = [{"number": t.number, "state": t.state.name, **{k: t.user_attrs.get(k) for k in keep}} for t in study.trials]
json.dump({"attrs": {k: v for k, v in study.user_attrs.items() if k in ("hardware", "variants", "latency_budget_ms", "gpu_memory_idle_mb")}, "trials": trials}, open(f"{out}/study.json", "w"), indent=1, default=str)
for t in trials:
    print(t)
PY
step "done"
