#!/bin/bash
# The checks that need a CUDA GPU in one run (CI has no GPU; these tests skip there): at most ~6.9 minutes on an H200
# (the part limits sum to 395 s, plus a few seconds of start-up).
# Most important first, each part under its own time limit; a part that fails or times out does not stop the next:
#   1. scripts/gpu_smoke.py (<= 55 s): every kernel family against a float64 reference, the dispatcher, a CUDA-graph
#      replay, torch.compile(mode="reduce-overhead"); compiles the kernels the benchmarks reuse;
#   2. benchmarks/bench_gpu.py (<= 80 s): per-layer GPU time vs cuBLAS -> gpu_kernels.{json,md,png};
#   3. benchmarks/bench_generate.py (<= 140 s): generate() tok/s, prefill, peak memory, dense vs hf_vq, eager and
#      compiled (static cache) -> generate_cuda.{json,md,png} (rows written as they are measured);
#   4. scripts/gpu_engine_timing.py (<= 35 s): k-means and the output-aware encoder on 7B-shaped layers;
#   4b. benchmarks/bench_train_step.py (<= 40 s): a BERT-base training step, dense vs compressed -> train_step_cuda;
#   5. the CUDA tests (<= 45 s, HF_VQ_TRITON_AUTOTUNE=0: fixed kernels, no timing): every kernel configuration
#      first, then compile / CUDA-graph tests, then the older kernel tests (what does not fit is cut, and says so).
# Everything is written flat under OUT_DIR (9 files: the seven above, log.txt with every part's output, summary.txt);
# a compact summary is printed at the end.
# Usage: bash scripts/gpu_checks.sh OUT_DIR        (default benchmarks/results/gpu)
set -u
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-benchmarks/results/gpu}")
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
: > "$LOG"
: > "$SUMMARY"
START=$(date +%s)

part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, output to the log, one summary line
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "===== $name (limit ${limit} s): $*" >> "$LOG"
    timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    local status="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMEOUT"
    [ $rc -ne 0 ] && [ "$status" = "ok" ] && status="FAILED"
    echo "$name: $status (rc $rc, $(( $(date +%s) - t0 )) s)" | tee -a "$SUMMARY"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | head -1
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1
} | tee -a "$SUMMARY"

part smoke 55 $PY scripts/gpu_smoke.py
part bench_gpu 80 $PY benchmarks/bench_gpu.py --out "$OUT/gpu_kernels" --batches 1 16 512
part bench_generate 140 $PY benchmarks/bench_generate.py --device cuda --out "$OUT/generate_cuda" --repeats 2
part engine 35 $PY scripts/gpu_engine_timing.py
part train_step 40 $PY benchmarks/bench_train_step.py --device cuda --out "$OUT/train_step_cuda"
part cuda_tests 45 env HF_VQ_TRITON_AUTOTUNE=0 $PY -m pytest -q -rs -p no:cacheprovider \
    tests/nn/test_triton_kernels.py tests/nn/test_compile.py tests/nn/test_kernels.py \
    tests/integrations/test_transformers.py -k "cuda or gpu or autotuned or triton_matches"

echo "total $(( $(date +%s) - START )) s" | tee -a "$SUMMARY"
echo
echo "----- smoke";          grep -a "^SMOKE" "$LOG" | cut -c1-240
echo "----- per layer (GPU us, cold L2)"
[ -f "$OUT/gpu_kernels.md" ] && grep -a "^| 2 bits\|^| 1 bit\|^| bar\|yes |\|NO |" "$OUT/gpu_kernels.md" | cut -d'|' -f2-12,14 | cut -c1-250
echo "----- generate()"
[ -f "$OUT/generate_cuda.md" ] && grep -a "^| dense\|^| hf_vq" "$OUT/generate_cuda.md" | cut -c1-200
echo "----- engine";         grep -a "^ENGINE" "$LOG" | cut -c1-240
echo "----- training step";  [ -f "$OUT/train_step_cuda.md" ] && grep -a "^| dense\|^| hf_vq" "$OUT/train_step_cuda.md"
echo "----- CUDA tests";     grep -aE "passed|failed|error" "$LOG" | grep -av "^SMOKE" | tail -3
echo "----- summary";        cat "$SUMMARY"
