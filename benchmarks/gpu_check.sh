#!/usr/bin/env bash
# One GPU check for the Triton fast path, sized for one device call (< 8 minutes in all):
#   1. kernel tests natively on CUDA, and end-to-end CUDA-path invariants (tests/cache/test_cuda_paths.py)
#      (pytest; without pytest, bench_kernels.py --check-only)
#   2. kernel benchmarks (correctness-gated; GB/s against measured copy bandwidths)
#   3. decode step time with CUDA graphs vs eager, dense and shadowkv, Llama-3.1-8B shapes
#   4. end-to-end decode throughput, dense vs shadowkv, Llama-3.1-8B shapes with random weights
# Every stage has its own timeout and the script goes on after a failure; logs and results land
# under $OUT (default ./gpu_out); a summary table is printed last.
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/shadowkv_triton_cache}"
unset TRITON_INTERPRET SHADOWKV_KERNELS
PY="${PYTHON:-python3}"
SUMMARY=()

stage() {  # stage NAME LIMIT_S CMD...: run with a timeout, log to $OUT/NAME.log, never abort
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local secs=$((SECONDS - t0)) state=ok
    [ $rc -ne 0 ] && state="FAIL rc=$rc"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && state="TIMEOUT after ${limit}s"
    tail -n 15 "$OUT/$name.log"
    SUMMARY+=("$(printf '| %-14s | %-22s | %5ss | %s |' "$name" "$state" "$secs" "$name.log")")
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())'
} >"$OUT/env.txt" 2>&1
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
cat "$OUT/env.txt"

if "$PY" -c 'import pytest' 2>/dev/null; then
    stage kernel_tests 140 "$PY" -m pytest tests/kernels tests/cache/test_cuda_paths.py -q -p no:cacheprovider -rfEs \
        --junitxml="$OUT/kernel_tests.xml"
else
    stage kernel_checks 130 "$PY" benchmarks/bench_kernels.py --check-only --out "$OUT/checks"
fi

stage kernel_bench 90 "$PY" benchmarks/bench_kernels.py --out "$OUT/kernels"

stage decode_modes 90 "$PY" benchmarks/decode_modes.py --arch llama-3.1-8b --context 4096 \
    --batches 1,8 --decode-steps 64 --out "$OUT/modes"

if [ -f benchmarks/throughput.py ]; then
    stage e2e_throughput 150 "$PY" benchmarks/throughput.py --arch llama-3.1-8b --contexts 16384 \
        --methods dense,shadowkv --batch 8 --decode-steps 32 --out "$OUT/e2e"
else
    SUMMARY+=("| e2e_throughput | skipped: no benchmarks/throughput.py | 0s | - |")
fi

echo
[ -f "$OUT/kernels/kernels.md" ] && sed -n '/^| op/,$p' "$OUT/kernels/kernels.md"
[ -f "$OUT/modes/decode_modes.md" ] && cat "$OUT/modes/decode_modes.md" && echo
[ -f "$OUT/e2e/throughput.md" ] && cat "$OUT/e2e/throughput.md"
echo
echo "GPU: ${GPU_NAME:-unknown}   results: $OUT"
echo "| stage          | result                 | time   | log |"
echo "|----------------|------------------------|--------|-----|"
printf '%s\n' "${SUMMARY[@]}"
