#!/usr/bin/env bash
# The GPU checks of the scaling-out work, for a machine with at least two CUDA GPUs (and
# `pip install deepspeed`). Not run by its author: no GPU machine was available; on CPUs the
# same runs are tests/test_distributed.py.
#
#   bash examples/gpu_check.sh            # about 5 minutes
#
# 1. DDP, FSDP2 and ZeRO-3 each train LoRA and --full on a tiny random Llama with two GPUs in
#    bf16 (the example configurations with --num_processes 2), and the stage-1 results of
#    FSDP2 and ZeRO-3 are compared with DDP's (bf16 compute: expect ~1e-2 relative, not 1e-4);
# 2. benchmarks/bench_scale.py measures a two-process --full step on a SmolLM2-135M-shaped
#    model under each engine: peak host RSS and peak GPU memory per process.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ACCELERATE=${ACCELERATE:-accelerate}
out=$(mktemp -d)
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

"$PYTHON" -c 'import sys; from pathlib import Path; from tiny_models import tiny_model_dir; tiny_model_dir(Path(sys.argv[1]))' "$out/model"
for config in ddp fsdp deepspeed-zero3; do
    engine=${config%-zero3}
    "$ACCELERATE" launch --config_file "examples/$config.yaml" --num_processes 2 \
        --mixed_precision bf16 tests/distributed_runs.py "$engine" "$out/model" \
        "$out/$engine" lora,full
    cat "$out/$engine"/full.rank*.json; echo
done
"$PYTHON" - "$out" <<'PY'
import sys
from pathlib import Path

from safetensors.torch import load_file

out = Path(sys.argv[1])
for name, file in (("lora", "adapter/adapter_model.safetensors"), ("full", "model/model.safetensors")):
    ddp = load_file(out / "ddp" / name / "stage1" / file)
    for engine in ("fsdp", "deepspeed"):
        other = load_file(out / engine / name / "stage1" / file)
        worst = max(float((other[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)) for k, v in ddp.items())
        print(f"{name} {engine} vs ddp: largest difference {worst:.2e} of the tensor's largest value")
PY
for config in ddp fsdp deepspeed-zero3; do
    SKU_BENCH_ACCELERATE_CONFIG="examples/$config.yaml" SKU_BENCH_MIXED_PRECISION=bf16 \
        "$PYTHON" -m pytest -q -p no:cacheprovider benchmarks/bench_scale.py --benchmark-only -s \
        | grep -E "rank [01]:"
done
echo "outputs in $out"
