#!/usr/bin/env bash
# Everything issues 4 and 13.5 need from a GPU, in one device-machine call of at most 570 s (the script keeps to
# $GPU_SESSION_BUDGET_S, default 570, so that the call's 600 s limit never cuts a stage off mid-way):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
# 0. from the start, in the background (nice): the 20b-shaped checkpoint, written once to the machine's local disk
#    ($GPTOSS_DECODE_CHECKPOINT, default /tmp/gptoss-bench/20b-hf: 13.8 GB, neither in the repo nor in $OUT, whose
#    files travel back; 865 CPU-s on the 2-core dev box, so about 1-2 min on the device machine's 16 cores),
# 1. the kernel tests against the kernels compiled for this GPU (GPTOSS_KERNEL_TEST_DEVICE=cuda: the same tests that
#    run through the interpreter on CPU machines), 2. benchmarks/kernels.py (MoE and decode attention timings, HBM
#    bandwidth against memset and peak, speed-up over the torch reference, each checked against it),
# 3. benchmarks/gpu_decode.py: the engine serving that checkpoint on this GPU, decode tokens/s at batch 1 and 64
#    against the weight-bandwidth roofline, 4. the sm_90a register / spill table, with whatever time is left (it
#    needs no GPU: RESULTS.md has it from a CPU machine).
# Logs and figures land in $OUT (env.txt, checkpoint.log, kernel-tests.log, kernels.md/json, decode.md/json,
# ptxas.md); copy the tables into benchmarks/RESULTS.md with the GPU's name. No Ray or gRPC is needed there.
# On a warm machine a rerun of some stages only: GPU_SESSION_STAGES="decode" bash benchmarks/gpu_session.sh
# (the checkpoint in /tmp is reused).
#
#   bash benchmarks/gpu_session.sh --smoke   # any machine, CPU only, in under a minute: the same stages at tiny
#                                            # shapes (kernels.py --smoke, gpu_decode.py --smoke); CI runs it
#                                            # (tests/test_gpu_decode_script.py). Kernel tests and ptxas are skipped:
#                                            # the test suite runs them on CPU anyway.
set -uo pipefail
SMOKE=0
[[ ${1:-} == --smoke ]] && SMOKE=1
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GPTOSS_NO_PROGRESS=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PY:-python3}
STAGES=${GPU_SESSION_STAGES:-tests bench decode ptxas}
deadline=$((SECONDS + ${GPU_SESSION_BUDGET_S:-570}))
status=0

# seconds a stage may take: at most $1, leaving $2 for the stages after it (0: no time left, skip it)
limit() {
    local left=$((deadline - SECONDS - $2))
    ((left < 10)) && left=0
    echo $((left < $1 ? left : $1))
}
wants() { [[ " $STAGES " == *" $1 "* ]]; }
skipped() { echo "   skipped: no time left in the budget"; status=1; }

if ((SMOKE)); then
    SMOKE_ARGS=(--smoke)
    CKPT=${GPTOSS_DECODE_CHECKPOINT:-${TMPDIR:-/tmp}/gptoss-bench/tiny-hf}
else
    SMOKE_ARGS=()
    CKPT=${GPTOSS_DECODE_CHECKPOINT:-/tmp/gptoss-bench/20b-hf}
fi

writer=""
if wants decode; then  # the checkpoint is written while the kernel stages run (they use one CPU core or so)
    nice -n 19 timeout $((deadline - SECONDS)) $PY benchmarks/gpu_decode.py "${SMOKE_ARGS[@]}" --prepare \
        --checkpoint "$CKPT" >"$OUT/checkpoint.log" 2>&1 &
    writer=$!
fi

$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee "$OUT/env.txt"
((SMOKE)) || nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 \
    | tee -a "$OUT/env.txt"
mkdir -p "$(dirname "$CKPT")" && df -h "$(dirname "$CKPT")" 2>&1 | tee -a "$OUT/env.txt"  # room for the checkpoint?

if wants tests && ((!SMOKE)); then
    echo "== kernel tests on the GPU"
    t=$(limit 200 320)
    if ((t)); then
        GPTOSS_KERNEL_TEST_DEVICE=cuda timeout "$t" $PY -m pytest -q -p no:cacheprovider tests/kernels 2>&1 \
            | tee "$OUT/kernel-tests.log" || status=1
    else skipped; fi
fi

if wants bench; then
    echo "== kernel benchmarks"
    t=$(limit 240 170)
    if ((t)); then
        timeout "$t" $PY benchmarks/kernels.py "${SMOKE_ARGS[@]}" --json "$OUT/kernels.json" 2>&1 \
            | tee "$OUT/kernels.md" || status=1
    else skipped; fi
fi

if wants decode; then
    echo "== decode throughput of the served engine (checkpoint $CKPT)"
    t=$(limit 240 0)
    stop=$((SECONDS + t))
    while kill -0 "$writer" 2>/dev/null && ((SECONDS < stop)); do sleep 1; done
    if kill -0 "$writer" 2>/dev/null; then
        echo "   the checkpoint was not written in time (see checkpoint.log)"; kill "$writer"; status=1
    elif ! wait "$writer"; then
        echo "   writing the checkpoint failed:"; cat "$OUT/checkpoint.log"; status=1
    elif t=$(limit $((stop - SECONDS)) 0); ((t)); then
        cat "$OUT/checkpoint.log"
        timeout "$t" $PY benchmarks/gpu_decode.py "${SMOKE_ARGS[@]}" --checkpoint "$CKPT" --json "$OUT/decode.json" \
            2>&1 | tee "$OUT/decode.md" || status=1
    else skipped; fi
fi

if wants ptxas && ((!SMOKE)); then
    echo "== ptxas (sm_90a)"
    t=$(limit 60 0)
    if ((t)); then
        timeout "$t" $PY benchmarks/kernels.py --ptxas 2>&1 | tee "$OUT/ptxas.md" || status=1
    else skipped; fi
fi
exit $status
