#!/usr/bin/env bash
# Everything issue 4 needs from a GPU, in one device-machine call (about 6 minutes on an H200):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=540)
# 1. the kernel tests against the kernels compiled for this GPU (GPTOSS_KERNEL_TEST_DEVICE=cuda: the same tests that
#    run through the interpreter on CPU machines), 2. benchmarks/kernels.py (MoE and decode attention timings, HBM
#    bandwidth against memset and peak, speed-up over the torch reference, each checked against it), 3. the sm_90a
#    register / spill table. Logs and figures land in $OUT (kernel-tests.log, kernels.md, kernels.json, ptxas.md);
#    copy the tables into benchmarks/RESULTS.md with the GPU's name. No Ray or gRPC is needed there.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GPTOSS_NO_PROGRESS=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PY:-python3}
status=0

$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|',
torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee -a "$OUT/env.txt"

echo "== kernel tests on the GPU"
GPTOSS_KERNEL_TEST_DEVICE=cuda timeout 200 $PY -m pytest -q -p no:cacheprovider tests/kernels 2>&1 \
    | tee "$OUT/kernel-tests.log" || status=1

echo "== kernel benchmarks"
timeout 240 $PY benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.md" || status=1

echo "== ptxas (sm_90a)"
timeout 60 $PY benchmarks/kernels.py --ptxas 2>&1 | tee "$OUT/ptxas.md" || status=1
exit $status
