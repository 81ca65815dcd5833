#!/bin/bash
# The checks that need a CUDA GPU, in one run (CI has no GPU; these tests skip there):
#   1. the CUDA tests (Triton kernels with fixed tiles, the autotuned kernel, k-means / AQ / permutation search
#      on CUDA, loading a compressed checkpoint onto the GPU);
#   2. benchmarks/bench_gpu.py  -> benchmarks/results/gpu_kernels.{json,md,png} (or $OUT/ when set);
#   3. the permutation search speed on the GPU -> permute_speed_<device>.{json,md}.
# Usage: bash scripts/gpu_checks.sh [OUT_DIR]     (about 2-3 minutes on an H200, plus AQLM's nvcc build)
set -u
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-benchmarks/results}")
mkdir -p "$OUT"
PY=${PYTHON:-python3}
HF_VQ_TRITON_AUTOTUNE=0 $PY -m pytest -q -rs tests/nn/test_kernels.py tests/codec/test_kmeans.py tests/codec/test_aq.py \
    tests/codec/test_permutation.py tests/integrations/test_transformers.py \
    -k "(cuda or gpu or autotuned or triton_matches) and not interpreter"
tests=$?
(cd benchmarks && $PY bench_gpu.py --out "$OUT/gpu_kernels")
(cd benchmarks && $PY bench_permute.py --only speed --numpy-from results/permute.json --out "$OUT/permute_speed_gpu")
exit $tests
