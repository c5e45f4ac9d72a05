"""Stage-1 step: the SKU objective with the fused ops vs the published code's way.

One optimizer step (forward of the model, reference forward, the three loss terms, backward,
AdamW) of the same trainer. Two workloads:

- LoRA on a random Llama with a realistic vocabulary (32000, hidden 256, 2 layers), rows of
  256 tokens (B = 2 harmful + K = 1 random + 2 normal), half of each row answer. Backends:
  - fused-linear: hidden states -> fused_linear_token_loss; the frozen output layer gets no
    gradient (the default);
  - fused-linear-head-grad: the same with the output layer's weight made to require a
    gradient that is then thrown away: the work the previous version did on every LoRA step
    (the "before" of the frozen-head change);
  - fused: model logits -> fused token_loss;
  - torch (baseline): model logits, log-softmax of the model and softmax + log of the
    reference in PyTorch, as the published code computes its losses.
- --full at SmolLM2-135M's shape (vocab 49152, hidden 576, 30 layers), one row set of 128
  tokens: peak memory of the fused-linear step against the torch step.

Time: pytest-benchmark, in one process. Peak memory: each backend in a fresh subprocess
(`python bench_stage1.py WORKLOAD BACKEND`): the growth of the peak RSS (VmHWM, reset through
/proc/self/clear_refs; on CUDA max_memory_allocated) over one step after a warm-up step, so
that memory cached by another backend cannot hide an allocation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LORA_BACKENDS = ("fused-linear", "fused-linear-head-grad", "fused", "torch")
FULL_BACKENDS = ("fused-linear", "torch")
# workload -> (vocab, hidden, layers, intermediate, heads, kv heads, tokens per row, lora)
WORKLOADS = {
    "lora": (32000, 256, 2, 1024, 4, 4, 256, True),
    "full-smollm2": (49152, 576, 30, 1536, 9, 3, 128, False),
}
BATCH = 2


def build(workload: str, backend: str, seed: int = 0):
    """The model (LoRA-wrapped or full), its optimizer, one micro-batch and the objective."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.network import prepare_model
    from sku_fast.unlearn.objective import TERM_IDS, objective_for
    from sku_fast.unlearn.tokens import IGNORE_INDEX

    vocab, hidden, layers, inner, heads, kv, seq, lora = WORKLOADS[workload]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    settings = UnlearnConfig(lora=lora, lora_r=8, lora_alpha=16).resolve()
    model = prepare_model(LlamaForCausalLM(config).to(DEVICE), settings)
    with torch.no_grad():  # a non-zero adapter, so the model differs from its reference
        for name, parameter in model.trainable:
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    if backend == "fused-linear-head-grad":
        model.network.get_output_embeddings().weight.requires_grad_(True)
    rows = 2 * BATCH + BATCH  # gd, rd (K = 1), pd
    input_ids = torch.randint(0, vocab, (rows, seq), device=DEVICE)
    labels = input_ids.clone()
    labels[:, : seq // 2] = IGNORE_INDEX
    terms = [TERM_IDS["gd"]] * BATCH + [TERM_IDS["rd"]] * BATCH + [TERM_IDS["pd"]] * BATCH
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "term": torch.tensor(terms, device=DEVICE),
    }
    optimizer = torch.optim.AdamW([p for _, p in model.trainable], lr=2e-4)
    return model, optimizer, batch, objective_for(settings)


def step(model, optimizer, batch, objective, backend: str) -> float:
    from sku_fast.unlearn.network import compute_terms
    from sku_fast.unlearn.objective import combine

    loss = combine(compute_terms(model, batch, objective, backend.removesuffix("-head-grad")),
                   objective)  # fmt: skip
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    head = model.network.get_output_embeddings().weight
    head.grad = None  # the head-grad variant's gradient is computed, then thrown away
    if CUDA:
        torch.cuda.synchronize()
    return float(loss.detach())


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_step_memory(workload: str, backend: str) -> dict:
    """Run in a fresh process: the peak memory growth over one step, after a warm-up step."""
    model, optimizer, batch, objective = build(workload, backend)
    step(model, optimizer, batch, objective, backend)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
    loss = step(model, optimizer, batch, objective, backend)
    peak = torch.cuda.max_memory_allocated() if CUDA else _status("VmHWM")
    return {"peak_mb": (peak - before) / 2**20, "loss": loss}


def _measure_in_subprocess(workload: str, backend: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, workload, backend], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def memory() -> dict[tuple[str, str], dict]:
    pairs = [("lora", b) for b in LORA_BACKENDS] + [("full-smollm2", b) for b in FULL_BACKENDS]
    return {pair: _measure_in_subprocess(*pair) for pair in pairs}


def _bench(benchmark, memory, workload: str, backend: str, rounds: int) -> None:
    model, optimizer, batch, objective = build(workload, backend)
    vocab, hidden, layers, _, _, _, seq, lora = WORKLOADS[workload]
    benchmark.group = (
        f"stage-1 step ({'LoRA' if lora else 'full'}): vocab {vocab}, hidden {hidden}, "
        f"{layers} layers, {3 * BATCH}x{seq} tokens, {DEVICE}"
    )
    benchmark.extra_info.update(
        backend=backend,
        shape=f"rows={batch['input_ids'].shape[0]} seq={seq} vocab={vocab} H={hidden}",
        dtype="float32",
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        peak_step_mb=round(memory[(workload, backend)]["peak_mb"], 1),
    )
    benchmark.pedantic(
        step, args=(model, optimizer, batch, objective, backend), rounds=rounds, warmup_rounds=1
    )
    # after timing: every backend computes the same first-step loss (same seed, same batch)
    reference = memory[(workload, "torch")]["loss"]
    assert memory[(workload, backend)]["loss"] == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_lora_step(benchmark, backend, memory):
    _bench(benchmark, memory, "lora", backend, rounds=3)


@pytest.mark.parametrize("backend", FULL_BACKENDS)
def test_full_step_smollm2(benchmark, backend, memory):
    _bench(benchmark, memory, "full-smollm2", backend, rounds=1)


if __name__ == "__main__":
    print(json.dumps(peak_step_memory(sys.argv[1], sys.argv[2])))
