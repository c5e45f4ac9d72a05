#!/usr/bin/env bash
# The GPU check, in one go (about 8 minutes on an H100/H200): the kernel tests compiled for
# the GPU (no interpreter), the token-loss benchmark at the GPU shapes (N=16384, V=128256 bf16;
# fused-linear N=8192, H=4096, V=128256 bf16) against eager PyTorch, torch.compile and Liger
# (when liger_kernel imports), and the stage-1 step on the GPU. Tables and raw JSON go to
# $OUT (default: gpu-check/), one file per part, with the device's name.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, sku-fast installed
#     OUT=/tmp/x bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"

"$PYTHON" - <<'EOF' || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 2; }
import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cuda {torch.version.cuda}")
import triton
print(f"triton {triton.__version__}")
EOF
"$PYTHON" -c "import torch; print(torch.cuda.get_device_name())" > "$OUT/device.txt"

status=0
run() {  # name, timeout in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - started))s; log: $OUT/$name.log"
    tail -n 3 "$OUT/$name.log"
    [ $rc -eq 0 ] || status=1
}

# 1. correctness on the GPU: the kernels are compiled, not interpreted (conftest.py sets
#    TRITON_INTERPRET only when no GPU is present)
run kernel-tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_token_loss_kernel.py tests/test_ops.py tests/test_fused_linear.py

# 2. speed and memory at the GPU shapes, every variant side by side
run token-loss-bench 300 "$PYTHON" -m pytest -q -p no:cacheprovider benchmarks/bench_token_loss.py \
    --benchmark-only --benchmark-columns=min,mean,rounds \
    --benchmark-json="$OUT/token_loss.json"

# 3. the stage-1 step of the trainer on the GPU
run stage1-bench 120 "$PYTHON" -m pytest -q -p no:cacheprovider benchmarks/bench_stage1.py \
    --benchmark-only --benchmark-columns=min,mean,rounds \
    --benchmark-json="$OUT/stage1.json"

"$PYTHON" benchmarks/summarize.py "$OUT" > "$OUT/summary.md" && cat "$OUT/summary.md"
exit $status
