"""Runs of `run_unlearn` under `accelerate launch` with two CPU processes, for
tests/test_distributed.py (and, on GPUs, examples/gpu_check.sh).

    python distributed_runs.py ENGINE MODEL_DIR OUT NAME[,NAME...] [--interrupt | --resume]

ENGINE is "ddp", "fsdp" or "deepspeed". accelerate enables FSDP and DeepSpeed only on
accelerators, so on a CPU this script builds the Accelerator those launches give on GPUs: for
"fsdp" (launched with --multi_gpu) a CPU Accelerator marked FSDP2 with the plugin that
`--use_fsdp --fsdp_version 2` gives, which torch's fully_shard runs with gloo; for "deepspeed"
(launched with --use_deepspeed --zero_stage 3) accelerate starts DeepSpeed's gloo backend
itself but counts one process, so the counts are set from torch.distributed. With CUDA
present the launcher's own Accelerator is used unchanged.

Each NAME of SCENARIOS is one run into OUT/NAME; every process writes OUT/NAME.rank<i>.json
(which engine held the weights, how, and how many of them it held) and, for "ddp", its copy
of the trained weights. `--interrupt` stops the runs whose name ends in "-cut" at step 3 as
Ctrl-C would (a KeyboardInterrupt on every process); `--resume` continues them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# contrast 0: one stage-1 run per scenario (the safe twin is the same training again)
COMMON = dict(steps=3, lora_r=4, lora_alpha=8, max_length=64, batch_size=1, seed=0, contrast=0.0)
PER_SAMPLE = dict(random_disassociation=False, preservation_divergence=False)
SCENARIOS = {
    "lora": dict(lora=True, lr=1e-2),
    "full": dict(lora=False, lr=1e-3, max_grad_norm=1.0),
    "lora-per-sample": dict(lora=True, lr=1e-2, **PER_SAMPLE),
    "full-per-sample": dict(lora=False, lr=1e-3, **PER_SAMPLE),
    "lora-accum-per-sample": dict(lora=True, lr=1e-2, grad_accum=2, **PER_SAMPLE),
    "resume": dict(lora=True, lr=1e-2, lora_dropout=0.1, checkpoint_every=2, steps=4),
    "full-resume": dict(lora=False, lr=1e-3, checkpoint_every=2, steps=4),
}
SCENARIOS |= {f"{name}-cut": SCENARIOS[name] for name in ("resume", "full-resume")}


def settings(name: str, **overrides) -> dict:
    return {**COMMON, **SCENARIOS[name], **overrides}


def fsdp_on_cpu(config):
    """The Accelerator `accelerate launch --use_fsdp --fsdp_version 2` would build on GPUs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
    )
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=config.grad_accum,
        step_scheduler_with_optimizer=False,
    )
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def deepspeed_on_cpu(config):
    """The Accelerator `accelerate launch --use_deepspeed` gives on GPUs, on a CPU."""
    import os

    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum, step_scheduler_with_optimizer=False
    )
    counts = {
        "num_processes": dist.get_world_size(),
        "process_index": dist.get_rank(),
        "local_process_index": int(os.environ["LOCAL_RANK"]),
    }
    PartialState._shared_state.update(counts)
    AcceleratorState._shared_state.update(counts)
    return accelerator


def main(engine: str, model_dir: str, out: Path, names: list[str], flag: str | None) -> None:
    import torch
    from accelerate import PartialState

    from sku_fast.unlearn import pipeline
    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.engines import end_processes
    from sku_fast.unlearn.fullstate import full_parameter

    if engine in ("fsdp", "deepspeed") and not torch.cuda.is_available():
        pipeline.make_accelerator = fsdp_on_cpu if engine == "fsdp" else deepspeed_on_cpu
    trained = []
    original_train = pipeline.train

    def capture(model, *args, **kwargs):  # keep each process's trained model
        trained.append(model)
        return original_train(model, *args, **kwargs)

    pipeline.train = capture

    def interrupt(step, record):
        if step == 3:
            raise KeyboardInterrupt

    for name in names:
        resume = flag == "--resume"
        config = UnlearnConfig(
            model=model_dir, out=str(out / name), resume=resume, **settings(name)
        )
        on_step = interrupt if flag == "--interrupt" and name.endswith("-cut") else None
        trained.clear()
        pipeline.run_unlearn(config, progress=False, on_step=on_step)
        model, rank = trained[0], PartialState().process_index  # after run_unlearn made it
        first = model.trainable[0][1]
        kind = type(first).__name__ if not hasattr(first, "ds_id") else "zero3"
        report = {
            "engine": model.engine,
            "processes": PartialState().num_processes,
            "parameter": kind,
            "local_elements": sum(
                (p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)).numel()
                for _, p in model.trainable
            ),
        }
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(report))
        if engine == "ddp":
            from safetensors.torch import save_file

            weights = {n: full_parameter(p, keep=True) for n, p in model.trainable}
            save_file(weights, out / f"{name}.rank{rank}.safetensors")
        torch.distributed.barrier()
    end_processes()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    flag = arguments.pop() if arguments[-1].startswith("--") else None
    engine_name, model_path, folder, scenario_names = arguments
    main(engine_name, model_path, Path(folder), scenario_names.split(","), flag)
