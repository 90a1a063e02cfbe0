#!/usr/bin/env bash
# Prepare what bench/gpu_check.sh installs on a GPU machine that cannot reach a package registry: every
# wheel optimize needs for Python 3.12 on x86_64 Linux (onnxruntime-gpu for CUDA 13, the bundled Triton,
# and the pure-Python rest), in one tar split into pieces of at most 60 MiB, with their sha256.
#
#   bench/gpu_wheels.sh            # writes bench/gpu_wheels/pieces/wheels.tar.part00 ... and SHA256SUMS
#
# Carry the pieces one per device call (a call carries at most 64 MiB; a warm machine keeps what an earlier
# call left in ignored folders), then run bench/gpu_check.sh there: it checks the sums and reassembles.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/gpu_wheels
python=${PYTHON:-.venv/bin/python}
rm -rf "$out" && mkdir -p "$out/wheels" "$out/pieces"
platforms=()
for tag in manylinux_2_35_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 linux_x86_64 any; do
    platforms+=(--platform "$tag")
done
# The lent GPU machine has Python 3.12 and CUDA 13 wheels (shared/GPU-NOTES.md): onnxruntime-gpu 1.31 is
# built for CUDA 13; the nvidia-* libraries are already there, so only optimize's own requirements travel.
"$python" -m pip download --quiet --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" "${platforms[@]}" \
    --dest "$out/wheels" . 'onnxruntime-gpu>=1.28' 'nvidia-ml-py>=12' 'setuptools>=77' wheel  # wheel, setuptools: to build optimize itself
tar -C "$out" -cf "$out/wheels.tar" wheels
split --bytes=60M --numeric-suffixes=0 --suffix-length=2 "$out/wheels.tar" "$out/pieces/wheels.tar.part"
(cd "$out/pieces" && sha256sum wheels.tar.part* > SHA256SUMS && sha256sum ../wheels.tar | sed 's#\.\./##' >> SHA256SUMS)
rm -rf "$out/wheels" "$out/wheels.tar"
echo "$(ls "$out/pieces"/wheels.tar.part* | wc -l) pieces, $(du -sh "$out/pieces" | cut -f1) in $out/pieces"
