#!/usr/bin/env bash
# The GPU check: correctness and the measurements that need a GPU, sized for ONE device call.
#
#   stage        predicted  limit  what
#   e2e_122k        130 s   200 s  HEADLINE. Llama-3.1-8B shapes (random weights), 122880-token
#                                  prompts (synthetic K/V), dense at its max batch vs ShadowKV at
#                                  its max batch, selection driven to 70 % hits (labelled) and by
#                                  the query; 256 timed steps; ms/step, tok/s, memory of both pools
#   kernel_tests     80 s   120 s  tests/kernels + tests/cache/test_cuda_paths.py natively (CUDA
#                                  graphs, pinned zero-copy tier, fetch stream; varlen_attention's
#                                  Triton kernel vs the reference at Llama-3.1-8B shapes, 4
#                                  segments up to 4000 keys); cold Triton cache
#   decode_modes     30 s    50 s  CUDA graphs vs eager step time, 4K context, batch 1 and 8
#   kernel_bench     25 s    45 s  each kernel vs its memory roofline (rows written as measured)
#   e2e_16k          30 s    50 s  real prefills at 16K: prefill time, TTFT, SVD share of prefill
#   prefill_pack     20 s    40 s  16 prompts of 512 tokens: one ragged forward vs one forward each
#                                  (the scheduler before), dense and ShadowKV, same run
#   mixed_step       25 s    45 s  8 decoding requests + 16 prompts of 256 tokens, one a step:
#                                  decode rows and prompt in one forward vs the decode's graph
#                                  then the prompt's forward, dense and ShadowKV, same run
#   shared_doc       60 s   100 s  one 122880-token document, B requests each with its own 64-token
#                                  question (prefix sharing): dense and ShadowKV with their own
#                                  prompts (synthetic K/V, the baseline, same run) vs each with
#                                  the document shared (prefilled once by the model): max batch
#                                  (up to 32), tok/s, memory; 8 timed steps
#   e2e_122k_fp8     90 s   120 s  the headline again with fp8 values (value_dtype=fp8): dense
#                                  (its baseline, same run) vs ShadowKV fp8 at its larger max
#                                  batch, 70 % hits driven; last, so a timeout loses only itself
#   total           490 s   770 s  (plus the machine's start, outside this script; the limits
#                                  sum past one 600 s call only if several stages hang)
#
# Every stage runs under `timeout -s INT` (Python stops with KeyboardInterrupt and keeps what it
# wrote) with PYTHONUNBUFFERED=1; the script goes on after a failure. After every stage it prints
# a summary and refreshes ONE archive, $OUT/gpu_check.tgz (logs, JSON/markdown results, env), and
# $OUT/summary.md: two files, within what a device call brings back. It uses the machine's own
# python/torch/triton (never scripts/setup.sh) and needs neither gguf nor fastapi.
#
#   OUT=$OUT bash benchmarks/gpu_check.sh                          # on the GPU machine
#   OUT=$OUT STAGES="e2e_122k kernel_tests" bash benchmarks/gpu_check.sh
#   HOST_GB=64 OUT=... bash benchmarks/gpu_check.sh                # host value tier, GiB
#   SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/g bash benchmarks/gpu_check.sh   # CPU, tiny, < 2 min
#
# Host tier: the headline needs about 96 GiB of pinned host memory for ShadowKV's values (a
# 122K-token sequence holds 8 GiB of bf16 values; 96 GiB + the auto-sized device tier admit ~19
# sequences). HOST_GB defaults to 96 GiB capped at 75 % of MemTotal; /proc/meminfo is logged, and
# a warning says when RAM is below the plan (on some machines MemTotal starts low and grows).
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT="${OUT:-$REPO/gpu_out}"
WORK="${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/shadowkv_triton_cache}"
PY="${PYTHON:-python3}"
SMOKE="${SMOKE:-0}"
ALL_STAGES="e2e_122k kernel_tests decode_modes kernel_bench e2e_16k prefill_pack mixed_step"
ALL_STAGES="$ALL_STAGES shared_doc"
STAGES="${STAGES:-$ALL_STAGES e2e_122k_fp8}"
SUMMARY="$WORK/summary.md"
START=$SECONDS

if [ "$SMOKE" = 1 ]; then
    # Every stage end to end on a tiny random config on the CPU: the plumbing, not the numbers.
    export TRITON_INTERPRET=1
    ARCH=tiny DEVICE="--device cpu" LONG=512 SHORT=256 STEPS=4 MODES_CTX=256 PLAN_GB=0.01
    KNOBS="--sparse-budget 64 --outlier-chunks 2 --cache-memory-gb 0.05 --max-batch 6"
    KERNEL_TESTS="tests/cache/test_cuda_paths.py tests/kernels/test_varlen_attention.py"
    KERNEL_TESTS="$KERNEL_TESTS tests/kernels/test_triton_kernels.py::test_dispatch_modes"
    BENCH_FLAGS="--smoke --ops select_chunks,gather_values"
    PACK="--prompts 4 --prompt-tokens 64 --repeats 1 --cache-memory-gb 0.05"
    MIXED="--decodes 2 --prompts 2 --prompt-tokens 64 --repeats 1 --cache-memory-gb 0.05"
    MEM_TOTAL_GB=0
else
    unset TRITON_INTERPRET SHADOWKV_KERNELS
    ARCH=llama-3.1-8b DEVICE="" LONG=122880 SHORT=16384 STEPS=256 MODES_CTX=4096 PLAN_GB=96
    KNOBS=""
    KERNEL_TESTS="tests/kernels tests/cache/test_cuda_paths.py"
    BENCH_FLAGS=""
    PACK="--prompts 16 --prompt-tokens 512 --cache-memory-gb 8"
    MIXED="--decodes 8 --prompts 16 --prompt-tokens 256 --repeats 3 --cache-memory-gb 8"
    MEM_TOTAL_GB=$(awk '/MemTotal/ {printf "%d", $2 / 1048576}' /proc/meminfo)
fi
if [ -z "${HOST_GB:-}" ]; then
    HOST_GB=$PLAN_GB
    CAP=$(awk -v t="$MEM_TOTAL_GB" 'BEGIN {printf "%d", t * 0.75}')
    [ "$SMOKE" != 1 ] && [ "$CAP" -lt "$HOST_GB" ] && HOST_GB=$CAP
fi

{
    echo "date: $(date -u +%FT%TZ)  smoke: $SMOKE  host tier: ${HOST_GB} GiB (plan ${PLAN_GB})"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
        --format=csv 2>/dev/null || echo "nvidia-smi: none"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
    for m in gguf fastapi transformers; do
        "$PY" -c "import $m" >/dev/null 2>&1 && echo "$m: yes" || echo "$m: missing"
    done
    grep -E 'MemTotal|MemAvailable|MemFree' /proc/meminfo
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"
if [ "$SMOKE" != 1 ] && [ "$MEM_TOTAL_GB" -lt $((PLAN_GB + 16)) ]; then
    echo "WARNING: MemTotal is ${MEM_TOTAL_GB} GiB, below the ${PLAN_GB} GiB host tier the" \
         "headline plans for (+16 GiB); ShadowKV's batch at 122K will be smaller" \
         "(set HOST_GB to override)" | tee -a "$WORK/env.txt"
fi
{
    echo "# gpu_check $(date -u +%FT%TZ) smoke=$SMOKE host_tier=${HOST_GB}GiB"
    echo
    echo "| stage | result | seconds | limit |"
    echo "|---|---|---|---|"
} >"$SUMMARY"

pack() {  # refresh the one archive and the summary in $OUT
    cp "$SUMMARY" "$OUT/summary.md"
    tar czf "$OUT/gpu_check.tgz.tmp" -C "$WORK" . 2>/dev/null && \
        mv "$OUT/gpu_check.tgz.tmp" "$OUT/gpu_check.tgz"
}

show() {  # the tables a stage left behind
    for f in "$@"; do [ -f "$f" ] && { echo "--- $f"; cat "$f"; }; done
}

stage() {  # stage NAME LIMIT_S CMD...: timed, logged, never aborts the script
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    # The limits are the GPU plan's; a smoke run on a loaded CPU (CI, shared VMs) checks the
    # plumbing, not the timing, so it gets ten times as long before a stage counts as hung.
    [ "$SMOKE" = 1 ] && limit=$((limit * 10))
    echo "=== $name (limit ${limit}s, at $((SECONDS - START))s): $*"
    local t0=$SECONDS
    timeout -s INT -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$? secs=$((SECONDS - t0)) state=ok
    [ $rc -ne 0 ] && state="FAIL rc=$rc"
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && state="TIMEOUT"
    tail -n 12 "$WORK/$name.log"
    echo "| $name | $state | $secs | $limit |" >>"$SUMMARY"
    pack
    echo "--- summary after $name ($((SECONDS - START))s in all)"
    cat "$SUMMARY"
}

stage e2e_122k 200 "$PY" benchmarks/throughput.py --arch "$ARCH" $DEVICE --contexts "$LONG" \
    --methods dense,shadowkv --batch auto --decode-steps "$STEPS" --prefill synthetic \
    --hit-rates 0.7,query --host-memory-gb "$HOST_GB" --out "$WORK/e2e_122k" $KNOBS
show "$WORK/e2e_122k/throughput.md"

stage kernel_tests 120 "$PY" -m pytest $KERNEL_TESTS -q -p no:cacheprovider -rfEs \
    --junitxml="$WORK/kernel_tests.xml"

# Small host tiers where the batch is small (the auto size plans for max_num_seqs sequences).
stage decode_modes 50 "$PY" benchmarks/decode_modes.py --arch "$ARCH" $DEVICE \
    --context "$MODES_CTX" --batches 1,8 --decode-steps $((STEPS / 4 > 4 ? STEPS / 4 : 4)) \
    --prefill synthetic --host-memory-gb 4 --out "$WORK/modes" \
    $( [ "$SMOKE" = 1 ] && echo "--sparse-budget 64 --outlier-chunks 2 --cache-memory-gb 0.05" )
show "$WORK/modes/decode_modes.md"

stage kernel_bench 45 "$PY" benchmarks/bench_kernels.py $BENCH_FLAGS --out "$WORK/kernels"

stage e2e_16k 50 "$PY" benchmarks/throughput.py --arch "$ARCH" $DEVICE --contexts "$SHORT" \
    --methods dense,shadowkv --batch 4 --decode-steps $((STEPS / 16 > 4 ? STEPS / 16 : 4)) \
    --host-memory-gb 4 --out "$WORK/e2e_16k" $KNOBS $( [ "$SMOKE" = 1 ] || echo "--max-batch 8" )
show "$WORK/e2e_16k/throughput.md"

stage prefill_pack 40 "$PY" benchmarks/prefill_pack.py --arch "$ARCH" $DEVICE $PACK \
    --out "$WORK/pack"
show "$WORK/pack/prefill_pack.md"

stage mixed_step 45 "$PY" benchmarks/mixed_step.py --arch "$ARCH" $DEVICE --methods dense,shadowkv \
    $MIXED --out "$WORK/mixed"
show "$WORK/mixed/mixed_step.md"

stage shared_doc 100 "$PY" benchmarks/throughput.py --arch "$ARCH" $DEVICE --contexts "$LONG" \
    --methods dense,shadowkv --decode-steps $((STEPS / 32 > 4 ? STEPS / 32 : 4)) \
    --prefill synthetic --shared-document 64 --host-memory-gb "$HOST_GB" --out "$WORK/shared_doc" \
    $KNOBS $( [ "$SMOKE" = 1 ] || echo "--max-batch 32" )
show "$WORK/shared_doc/throughput.md"

stage e2e_122k_fp8 120 "$PY" benchmarks/throughput.py --arch "$ARCH" $DEVICE --contexts "$LONG" \
    --methods dense,shadowkv:value_dtype=fp8 --batch auto --decode-steps "$((STEPS / 2))" \
    --prefill synthetic --hit-rates 0.7 --host-memory-gb "$HOST_GB" --out "$WORK/e2e_122k_fp8" \
    $KNOBS
show "$WORK/e2e_122k_fp8/throughput.md"

echo
echo "=== done in $((SECONDS - START))s; results: $OUT/gpu_check.tgz (from $WORK)"
show "$WORK/e2e_122k/throughput.md"
cat "$SUMMARY"
