#!/usr/bin/env bash
# Issue 8's GPU measurements, for a lent GPU machine (its own python3 with torch + CUDA + Triton;
# the repo run with PYTHONPATH=., not .venv). Each step has its own time limit so a hang in one
# cannot eat the session's device time, and every log and JSON lands in $OUT (default ./gpu-out),
# which the device tool brings back. The steps take about 12-15 minutes in all on an H100 (each
# is capped; a device call is capped at 10 minutes), so run them in four calls:
#
#     bash benchmarks/gpu_issue8.sh tests kernels           # correctness, the b1 roofline (<= 500 s)
#     bash benchmarks/gpu_issue8.sh experimental unfused fp8  # opt-in kernels, fusion A/B, fp8 KV
#     bash benchmarks/gpu_issue8.sh cublas throughput       # cuBLAS A/B, throughput vs transformers
#     bash benchmarks/gpu_issue8.sh host int4               # host work per step; 4-bit weights
#
# (no argument runs every step). tests: the CUDA/Triton correctness tests (LoRA's too: adapters
# have never run on a GPU; its CPU tests run again there, a minute). kernels: `bench
# kernels` on the Llama-3.2-1B shape with the fused single-row kernels and the Triton GEMV (the
# batch-1 roofline, against transformers, logits checked). unfused: the same with
# LENGTHWISE_FUSED=0 (Triton GEMVs, elementwise kernels separate: the fusion's A/B). experimental:
# the two opt-in kernels, their GPU tests then `bench kernels`: LENGTHWISE_GEMV_SPLITK=1 (split-K
# GEMV configurations autotuned beside the others: see the o_proj/down_proj rows) and
# LENGTHWISE_ATTN_FUSED_REDUCE=1 (split decode attention combined in one launch: the attention
# row); off by default until this measures them: make each the default if it wins. cublas: with
# LENGTHWISE_GEMV=0 (cuBLAS for single rows, nothing fused). throughput: `bench throughput` on a
# synthetic workload against transformers' static batching at its best of batch 32, 64 and 128
# (a sweep in the same run, so the ratio is not against a batch size we chose; REPEATS=N runs
# every engine N times interleaved and reports the median: a call of its own) (alpaca-lengths lives in ../shared,
# which the device machine does not get: copy dev.jsonl into the ignored gpu-data/, carry that
# folder with the call and set ALPACA=gpu-data/dev.jsonl; never commit it). host: the engine's host
# work per decode step on this machine's CPU (benchmarks/host_overhead.py, the replay stubbed), to
# set beside the GPU's step times. int4: the W4A16 kernel's GPU tests (GPTQ/AWQ checkpoints on
# CUDA, graphed decode) and `bench kernels --quantization int4` (the batch-1 step on 4-bit
# projections: set decode_b1_ms beside the kernels step's bfloat16 one; the "(4-bit)" rows are
# the kernel against the dense rows' cuBLAS/GEMV on the same shapes). fp8: `bench kernels
# --kv-cache-dtype fp8` (the Triton kernels over a float8 KV cache: set the attention rows and
# decode_b1_ms beside the bfloat16 cache's; its correctness tests run in the tests step). Record
# what it measures in docs/benchmarks.md, "CUDA".
set -u
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH=. LENGTHWISE_CACHE="${LENGTHWISE_CACHE:-/tmp/lwcache}"
PY="${PYTHON:-python3}"

step() {  # step NAME LIMIT_S CMD...: run CMD with a time limit, log to $OUT/NAME.log, go on on failure
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests kernels experimental unfused fp8 cublas throughput host int4)
KERNELS=(-m lengthwise.cli bench kernels --model llama-1b --device cuda --dtype bfloat16)
for s in "${STEPS[@]}"; do
    case "$s" in
    tests) step tests 420 "$PY" -m pytest -q -rs -p no:cacheprovider \
        tests/test_cuda_graph.py tests/test_ops_triton.py tests/test_dtypes_devices.py tests/test_lora.py \
        tests/test_pia.py ;;
    kernels) step kernels 200 "$PY" "${KERNELS[@]}" --compare-transformers --check --json "$OUT/k1b.json" ;;
    experimental)  # their correctness tests first (GEMVs, attention, batch-1 decode, graphs)
        export LENGTHWISE_GEMV_SPLITK=1 LENGTHWISE_ATTN_FUSED_REDUCE=1
        step experimental_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_triton.py \
            -k "gemv or attention or single_row or async or graphs"
        step kernels_experimental 150 "$PY" "${KERNELS[@]}" --json "$OUT/k1b_experimental.json"
        unset LENGTHWISE_GEMV_SPLITK LENGTHWISE_ATTN_FUSED_REDUCE ;;
    unfused) LENGTHWISE_FUSED=0 step kernels_unfused 120 "$PY" "${KERNELS[@]}" --json "$OUT/k1b_unfused.json" ;;
    fp8) step kernels_fp8 120 "$PY" "${KERNELS[@]}" --kv-cache-dtype fp8 --json "$OUT/k1b_fp8.json" ;;
    cublas) LENGTHWISE_GEMV=0 step kernels_cublas 120 "$PY" "${KERNELS[@]}" --json "$OUT/k1b_cublas.json" ;;
    throughput)
        if [ -n "${ALPACA:-}" ]; then
            WORKLOAD=(--workload alpaca-lengths --data "$ALPACA")
        else
            WORKLOAD=(--workload synthetic --seed 0)
        fi
        step throughput 420 "$PY" -m lengthwise.cli bench throughput --model llama-1b --device cuda \
            --dtype bfloat16 --engines lengthwise,transformers --batch-size 32,64,128 "${WORKLOAD[@]}" \
            --num-requests 128 --repeats "${REPEATS:-1}" --json "$OUT/tp1b.json" ;;
    host)
        DATA=()
        [ -n "${ALPACA:-}" ] && DATA=(--data "$ALPACA")
        step host 120 "$PY" benchmarks/host_overhead.py --rows 1,64,128,256 --repeats 1 ${DATA[@]+"${DATA[@]}"} --out "$OUT/host" ;;
    int4)
        step int4_tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_int4.py tests/test_ops_triton.py \
            -k "cuda or triton_kernel or bench_kernels or int4_linear or quantized_moe or odd_widths"
        step kernels_int4 200 "$PY" "${KERNELS[@]}" --quantization int4 --json "$OUT/k1b_int4.json" ;;
    *) echo "unknown step $s (tests, kernels, experimental, unfused, fp8, cublas, throughput, host, int4)" >&2; exit 2 ;;
    esac
done
