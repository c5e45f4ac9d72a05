"""Peak memory per process of a two-process `--full` stage-1 step on a SmolLM2-135M-shaped model.

`accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU) runs the stage-1 trainer
with full fine-tuning (the trained model, its frozen reference, AdamW) on a randomly
initialised Llama of SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, 9 heads, 3 KV
heads, vocabulary 49152, tied embeddings: 134.5M parameters, fp32) with the embedded SmolLM2
tokenizer and the packaged demo data, batch 1, 128 tokens at most, two optimizer steps.

Each process reports:

- run peak: its peak RSS (VmHWM) up to the end of step 1 (loading, the reference copy, the
  first step with AdamW's states allocated);
- step peak: its peak RSS during step 2, after VmHWM was reset through /proc/self/clear_refs
  at the end of step 1 (forward, backward, the gradient exchange, clipping, AdamW);
- RSS before the step, and step 2's wall time.

With CUDA, each process also reports the peak of `torch.cuda.max_memory_allocated` during
step 2. `SKU_BENCH_ACCELERATE_CONFIG=examples/fsdp.yaml` (or ddp.yaml, deepspeed-zero3.yaml)
launches with that configuration instead of `--multi_gpu`, and `SKU_BENCH_MIXED_PRECISION`
(default "no") sets the mixed precision, e.g. bf16 on GPUs.

Run: `pytest benchmarks/bench_scale.py --benchmark-only -s` (about a minute on two cores).
The worker is this file: `accelerate launch ... bench_scale.py OUT_DIR`. The figures before
the engines (the hand-written flat gradient sync) came from this benchmark at commit 4530154.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAYERS, HIDDEN, MLP, HEADS, KV_HEADS = 30, 576, 1536, 9, 3
STEPS, BATCH, MAX_LENGTH, PROCESSES = 2, 1, 128, 2


def _status(field: str) -> float:
    """A /proc/self/status memory field in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(out: Path) -> None:
    """One process of the launch: train STEPS steps and write rank<i>.json into `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.data import demo_data_path, load_qa_pairs
    from sku_fast.unlearn.engines import load_device, loading, make_accelerator
    from sku_fast.unlearn.fullstate import full_numel
    from sku_fast.unlearn.models import load_tokenizer
    from sku_fast.unlearn.network import prepare_model
    from sku_fast.unlearn.objective import objective_for
    from sku_fast.unlearn.trainer import train

    tokenizer = load_tokenizer(None)  # the embedded SmolLM2 tokenizer
    config = UnlearnConfig(
        lora=False, steps=STEPS, batch_size=BATCH, max_length=MAX_LENGTH, lr=1e-5,
        out=str(out / "run"),
    ).resolve()  # fmt: skip
    accelerator = make_accelerator(config)
    torch.manual_seed(0)
    shape = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    with loading(accelerator):
        model = LlamaForCausalLM(shape).eval().to(load_device(accelerator))
    trained = prepare_model(model, config)
    cuda = torch.cuda.is_available()
    marks: dict[str, float] = {}

    def on_step(step: int, record: dict) -> None:
        if step == 1:
            marks["run_peak_mb"] = _status("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            marks["rss_before_step_mb"] = _status("VmRSS")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            marks["started"] = time.perf_counter()
        elif step == 2:
            marks["step_s"] = time.perf_counter() - marks.pop("started")
            marks["step_peak_mb"] = _status("VmHWM")
            if cuda:
                marks["cuda_step_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            marks["loss"] = record["loss"]

    (out / "run").mkdir(parents=True, exist_ok=True)
    train(
        trained,
        tokenizer,
        load_qa_pairs(demo_data_path("harmful")),
        load_qa_pairs(demo_data_path("normal")),
        objective_for(config),
        config,
        out / "run",
        accelerator,
        progress=False,
        on_step=on_step,
    )
    marks["parameters"] = sum(full_numel(p) for p in model.parameters())
    rank = accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps(marks))


def launch(out: Path) -> list[dict]:
    """The two-process run; returns each rank's measurements."""
    launcher = Path(sys.executable).with_name("accelerate")
    settings = os.environ.get("SKU_BENCH_ACCELERATE_CONFIG")
    engine = ["--config_file", settings] if settings else ["--multi_gpu"]
    precision = os.environ.get("SKU_BENCH_MIXED_PRECISION", "no")
    command = [
        str(launcher), "launch", *engine, "--num_processes", str(PROCESSES),
        "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no",
        __file__, str(out),
    ]  # fmt: skip
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(PROCESSES)]


def test_two_process_full_step_memory(benchmark, tmp_path):
    ranks = benchmark.pedantic(launch, args=(tmp_path,), rounds=1, iterations=1)
    benchmark.group = "stage 1, --full, 2 processes, SmolLM2-135M shape"
    benchmark.extra_info.update(
        {
            "shape": f"layers={LAYERS} H={HIDDEN} MLP={MLP} V=49152 batch={BATCH} "
            f"max_length={MAX_LENGTH}",
            "dtype": "float32",
            "parameters": ranks[0]["parameters"],
            **{f"rank{r}": {k: round(v, 3) for k, v in m.items()} for r, m in enumerate(ranks)},
        }
    )
    for rank, marks in enumerate(ranks):
        gpu = marks.get("cuda_step_peak_mb")
        print(
            f"\nrank {rank}: run peak {marks['run_peak_mb']:.0f} MB, step peak "
            f"{marks['step_peak_mb']:.0f} MB (RSS before the step "
            f"{marks['rss_before_step_mb']:.0f} MB), step {marks['step_s']:.1f} s"
            + (f", GPU step peak {gpu:.0f} MB" if gpu is not None else "")
        )
    # after timing: both ranks took the same steps (the logged loss is averaged over ranks)
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"], rel=1e-6)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
