#!/usr/bin/env bash
# Every GPU check of issue 14 in one go, on one CUDA device (8 minutes on an H100 in session 16:
# the correctness parts 1, 3 and 4 run side by side, then the timed parts one after another,
# each alone on the machine):
#   1. the optimizer matrix (tests/test_optim_matrix.py, tests/test_flat.py) on CUDA, eagerly,
#      and a compiled (Triton) subset
#   2. optimizer step time, BERT-base shapes (110M), against torch fused AdamW; then (--passes)
#      each flat pass timed between two waits for the device: what a pass costs per array
#   3. DeepSpeed on one CUDA device against the float64 reference (benchmarks/gpu_check.py:
#      ZeRO-2 / ZeRO-1 / stage 0 fp32, bf16, fp16 with DeepSpeed's loss scaler, autocast)
#   4. the user's pretraining route (launch/pretrain_bert.sh, 1 rank, bf16 / fp16 ZeRO-2, phase 1 then
#      phase 2 with the optimizer state carried; benchmarks/pretrain_route.py), then (bf16) SQuAD
#      fine-tuning and scoring of phase 2's export with launch/run_squad.sh; and BERT-large
#      phase-1 sequences/s with LAMB and VRLAMB
#   5. optimizer step time, BERT-large shapes (340M)
#   6. DeepSpeed's FusedLamb in the step timings (it builds a CUDA op, about a minute on an H100;
#      FUSED_LAMB=0 leaves it out)
#   7. what compiling (Triton) costs a fresh process: VRLAMB's first steps on BERT-base with an
#      empty and a warm Inductor cache (benchmarks/first_step.py); only with FIRST_STEP=1 or
#      PARTS naming it (measured in session 11; about 80 s)
#   8. (part megatron_cuda) the Megatron-core parity and optimizer save/resume on one device with
#      NCCL (tests/test_megatron_gpu.py), where megatron-core is installed
# Each part has its own time limit (T_* variables, seconds) and log; a part that fails or
# runs out of time does not stop the others. PARTS (space-separated part names, as printed
# after '==') runs only those parts, e.g. to split the checks over two calls of a lease.
# Without CUDA it runs the CPU-capable part (1, on the CPU) and says what it skipped.
#
#   bash benchmarks/gpu_check.sh [OUT]        (OUT defaults to results/gpu)
#
# On a lent machine without DeepSpeed, carry the wheels benchmarks/gpu_wheels.sh makes.
set -u
OUT=${1:-results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()

part() {  # part NAME LIMIT COMMAND...: run, log to OUT/NAME.log, show the end of the log
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then
        echo "== $name: not in PARTS, skipped"
        return 0
    fi
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - t0)) s"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
    [ -z "${PART_RC:-}" ] || echo "$rc" >"$OUT/$name.rc"  # for side's caller: a background part's status
    [ "$rc" -eq 0 ] || failed+=("$name")
}

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: running the optimizer matrix on the CPU."
    echo "skipped (need CUDA): the CUDA matrix, GPU step timings, DeepSpeed on CUDA, BERT-large throughput, first-step compile times"
    part optim_matrix_cpu "${T_MATRIX:-900}" $PY -m pytest -q -p no:cacheprovider \
        tests/test_optim_matrix.py tests/test_flat.py tests/test_grad_scaler.py
    [ ${#failed[@]} -eq 0 ] || { echo "FAILED: ${failed[*]}"; exit 1; }
    exit 0
fi

nvidia-smi >"$OUT/nvidia_smi.txt" 2>&1
# The correctness parts are small on a GPU and independent: they run side by side (their
# summaries are printed when all are done; SIDE_BY_SIDE=0 runs them one after another). The
# timed parts then run alone, one after another.
side_names=()
side() {  # side NAME LIMIT COMMAND...: part, in the background unless SIDE_BY_SIDE=0
    if [ "${SIDE_BY_SIDE:-1}" != 1 ]; then
        part "$@"
        return
    fi
    rm -f "$OUT/$1.rc"
    PART_RC=1 part "$@" >"$OUT/$1.summary" 2>&1 &
    side_names+=("$1")
}
side optim_matrix_cuda "${T_MATRIX:-240}" env VRGD_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider \
    tests/test_optim_matrix.py tests/test_flat.py tests/test_grad_scaler.py tests/test_sharded_params.py -k "not compile"
side optim_matrix_cuda_compiled "${T_COMPILED:-120}" env VRGD_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider \
    tests/test_optim_matrix.py tests/test_flat.py -k "compile and (VRLAMB or VRAdamW or LAMB or run_pass)"
side deepspeed_routes "${T_DEEPSPEED:-180}" $PY -m benchmarks.gpu_check --out "$OUT"
side pretrain_route "${T_PRETRAIN:-300}" $PY -m benchmarks.pretrain_route --precision bf16 --squad --out "$OUT"
side pretrain_route_fp16 "${T_PRETRAIN:-300}" $PY -m benchmarks.pretrain_route --precision fp16 --out "$OUT"
if $PY -c "import megatron.core" >/dev/null 2>&1; then
    side megatron_cuda "${T_MEGATRON:-240}" $PY -m pytest -q -p no:cacheprovider -rs tests/test_megatron_gpu.py
else
    echo "== megatron_cuda: skipped, megatron-core is not installed (benchmarks/gpu_wheels.sh brings it)"
fi
wait
for name in "${side_names[@]}"; do
    cat "$OUT/$name.summary"
    rm -f "$OUT/$name.summary"
    if [ -f "$OUT/$name.rc" ]; then  # absent: not in PARTS
        [ "$(cat "$OUT/$name.rc")" = 0 ] || failed+=("$name")
        rm -f "$OUT/$name.rc"
    fi
done
fused=()
[ "${FUSED_LAMB:-1}" = 1 ] && fused=(--fused-lamb)
# DeepSpeed 0.19.8's op builder reads each TORCH_CUDA_ARCH_LIST entry as int.int and fails on
# an arch-specific suffix ("9.0a": "invalid literal for int() with base 10: '0a'"), which is
# how CUDA images for Hopper set it; its FusedLamb builds with the plain entry.
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    export TORCH_CUDA_ARCH_LIST=$(echo "$TORCH_CUDA_ARCH_LIST" | sed -E 's/([0-9]+\.[0-9]+)[a-z]+/\1/g')
fi
part optim_step_base "${T_BASE:-240}" $PY -m benchmarks.optim_step --device cuda --model base --steps 8 \
    --passes --out "$OUT/optim_step_base" "${fused[@]}"
part bert_large "${T_BERT:-120}" $PY -m benchmarks.bert_throughput --device cuda --size large \
    --micro-batch 64 --accum 2 --steps 5 --out "$OUT"
part optim_step_large "${T_LARGE:-150}" $PY -m benchmarks.optim_step --device cuda --model large --steps 5 \
    --passes --out "$OUT/optim_step_large" "${fused[@]}"
if [ "${FIRST_STEP:-0}" = 1 ] || [[ " ${PARTS:-} " == *" first_step "* ]]; then
    part first_step "${T_FIRST:-180}" $PY -m benchmarks.first_step --device cuda --out "$OUT/first_step"
else
    echo "== first_step: left out (FIRST_STEP=1 or PARTS=first_step runs it, about 80 s on an H100)"
fi
[ ${#failed[@]} -eq 0 ] || { echo "FAILED or out of time: ${failed[*]}"; exit 1; }
echo "all parts passed"
