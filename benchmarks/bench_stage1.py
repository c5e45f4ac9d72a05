"""Stage-1 step: the SKU objective with the fused ops vs the published code's way.

One optimizer step (forward of the LoRA model, reference forward with the adapter disabled,
the three loss terms, backward, AdamW) of the same trainer, on a random Llama with a
realistic vocabulary (32000, hidden 256, 2 layers), B = 2 harmful + K = 1 random + 2 normal
rows of 256 tokens, half of each row answer. Backends:

- fused-linear: hidden states -> fused_linear_token_loss (no logits at all);
- fused: model logits -> fused token_loss;
- torch (baseline): model logits, log-softmax of the model and softmax + log of the
  reference in PyTorch, as the published code computes its losses.

Time: pytest-benchmark, 3 rounds after a warm-up, in one process. Peak memory: each backend
in a fresh subprocess (`python bench_stage1.py BACKEND`), the growth of the peak RSS
(VmHWM, reset through /proc/self/clear_refs) over one step after a warm-up step, so that
freed-but-cached memory of another backend cannot hide an allocation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BACKENDS = ("fused-linear", "fused", "torch")
VOCAB, HIDDEN, LAYERS, SEQ, BATCH = 32000, 256, 2, 256, 2


def build(seed: int = 0):
    """A LoRA-wrapped random Llama, its optimizer, one micro-batch and the SKU objective."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.network import prepare_model
    from sku_fast.unlearn.objective import TERM_IDS, objective_for
    from sku_fast.unlearn.tokens import IGNORE_INDEX

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    settings = UnlearnConfig(lora_r=8, lora_alpha=16).resolve()
    model = prepare_model(LlamaForCausalLM(config), settings)
    with torch.no_grad():  # a non-zero adapter, so the model differs from its reference
        for name, parameter in model.trainable:
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    rows = 2 * BATCH + BATCH  # gd, rd (K = 1), pd
    input_ids = torch.randint(0, VOCAB, (rows, SEQ))
    labels = input_ids.clone()
    labels[:, : SEQ // 2] = IGNORE_INDEX
    terms = [TERM_IDS["gd"]] * BATCH + [TERM_IDS["rd"]] * BATCH + [TERM_IDS["pd"]] * BATCH
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "term": torch.tensor(terms),
    }
    optimizer = torch.optim.AdamW([p for _, p in model.trainable], lr=2e-4)
    return model, optimizer, batch, objective_for(settings)


def step(model, optimizer, batch, objective, backend: str) -> float:
    from sku_fast.unlearn.network import compute_terms
    from sku_fast.unlearn.objective import combine

    loss = combine(compute_terms(model, batch, objective, backend), objective)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_step_memory(backend: str) -> dict:
    """Run in a fresh process: the peak RSS growth over one step, after a warm-up step."""
    model, optimizer, batch, objective = build()
    step(model, optimizer, batch, objective, backend)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    loss = step(model, optimizer, batch, objective, backend)
    return {"peak_mb": (_status("VmHWM") - before) / 2**20, "loss": loss}


def _measure_in_subprocess(backend: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, backend], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def memory() -> dict[str, dict]:
    return {backend: _measure_in_subprocess(backend) for backend in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage1_step(benchmark, backend, memory):
    model, optimizer, batch, objective = build()
    benchmark.group = f"stage-1 step: vocab {VOCAB}, hidden {HIDDEN}, {3 * BATCH}x{SEQ} tokens"
    benchmark.extra_info.update(
        {
            "backend": backend,
            "shape": f"rows={batch['input_ids'].shape[0]} seq={SEQ} vocab={VOCAB} H={HIDDEN}",
            "dtype": "float32",
            "peak_step_mb": round(memory[backend]["peak_mb"], 1),
        }
    )
    benchmark.pedantic(
        step, args=(model, optimizer, batch, objective, backend), rounds=3, warmup_rounds=1
    )
    # after timing: every backend computes the same first-step loss (same seed, same batch)
    assert memory[backend]["loss"] == pytest.approx(memory["torch"]["loss"], rel=1e-4)
    print(f"\n{backend}: peak step memory {memory[backend]['peak_mb']:.0f} MB")


if __name__ == "__main__":
    print(json.dumps(peak_step_memory(sys.argv[1])))
