#!/usr/bin/env bash
# The GPU checks of a session lent a CUDA machine, in one run (about 8 minutes on an H200; the second run of
# 2026-11-29 took 3.6 minutes with a 10-s case budget that skipped the MusicGen-small rows):
#   1. the environment (GPU, driver, torch, triton);
#   2. the kernels' tests compiled for CUDA (TRITON_INTERPRET=0: the Triton device is the GPU), the int8 kernel's
#      whole test file, the quantized LM's;
#   3. bench/gpu_check.py: the CUDA-graph decode step gives the eager loop's codes (float and int8);
#   4. bench/generate.py's GPU rows: transformers vs our delay loop (eager, CUDA graph; fp32 and int8 weights),
#      tiny and MusicGen-small sizes at batch 1, 10 s;
#   5. bench/mmd.py's GPU rows (N up to 16k).
# Results land in bench/results/*-cuda.json and, when $OUT is set (the device tool), in $OUT too.
# Usage: bash bench/gpu_check.sh        (from the repository root, with a python3 that has torch + CUDA)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
status=0
step() { echo "== $*"; }

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; nothing checked (run it on a GPU machine)"
    exit 0
fi

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

step "kernel tests on CUDA"
timeout 180 python3 -m pytest -q -n 8 -p no:cacheprovider -k "triton or cuda or compile" tests/test_attention.py \
    tests/test_sampling.py tests/test_step_input.py tests/test_cross_entropy.py tests/test_mmd.py tests/test_vq.py \
    tests/test_int8_linear.py tests/test_quantize.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25 || status=1

step "CUDA-graph decode vs eager"
timeout 90 python3 bench/gpu_check.py || status=1
cp bench/results/gpu_check-cuda.json "$OUT"/ 2>/dev/null

step "generation bench (GPU rows)"
timeout 330 python3 bench/generate.py --check --models tiny small --batches 1 --frames 500 --repeats 3 \
    --max-seconds 40 --impls transformers ours-delay ours-delay-compiled ours-delay-int8 ours-delay-int8-compiled \
    --out "$OUT/generate-cuda.json" || status=1
step "MMD bench (GPU rows)"
timeout 120 python3 bench/mmd.py --sizes 1024 4096 16384 --dims 32 128 --out "$OUT/mmd-cuda.json" || status=1
exit $status
