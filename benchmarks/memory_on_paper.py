"""Stage-1 memory per GPU on paper, for the README's "Scaling out" table (nothing is measured).

    python benchmarks/memory_on_paper.py

Assumptions (stated again in the README):
- weights bf16 (`dtype: bfloat16`, `--mixed_precision bf16`); under --full the trained weights
  keep an fp32 master copy (FSDP2 upcasts them, ZeRO-3 keeps one) with fp32 gradients (FSDP2)
  or bf16 gradients (ZeRO-3), and AdamW's two fp32 moments: 16 bytes per trained parameter
  either way (FSDP2: 4 + 4 + 8; ZeRO-3: 2 + 2 + 4 + 8); the frozen reference is bf16, 2 bytes;
- LoRA: r = 32 on q_proj and v_proj (the default), adapter in fp32 with its AdamW (16 bytes per
  adapter parameter); the reference is the same network with the adapter off (no copy);
- one micro-batch per GPU: batch 2 with K = 1, i.e. 6 trained rows (gd, rd, pd) of 512 tokens
  = 3072 tokens; SDPA/flash attention (no sequence-squared scores kept); the fused-linear loss
  keeps no logits; activations per token and layer ~ 2·(4h + 2·h_kv) + 2·(2h + 4I) bytes
  (norm inputs/outputs, q/k/v/attention outputs; gate, up, act(gate), product); gradient
  checkpointing keeps each layer's input (2h bytes) plus one layer's activations;
- sharded: every state divided by the N GPUs; while computing, two decoder layers (the current
  and the prefetched one) and the root unit (embeddings and output layer) are gathered in
  bf16, and sku-fast keeps a gathered copy of the reference's output layer;
- 1 GB = 1e9 bytes; CUDA context, allocator fragmentation and communication buffers (a few
  GB) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKENS = 6 * 512  # rows x tokens of one micro-batch per GPU
GB = 1e9


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    kv: int  # key/value width (heads x head size)
    mlp: int
    vocab: int

    @property
    def layer_parameters(self) -> int:
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv + 3 * h * self.mlp + 2 * h

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + 2 * self.vocab * self.hidden + self.hidden

    @property
    def lora_parameters(self) -> int:  # r = 32 on q_proj (h -> h) and v_proj (h -> kv)
        return self.layers * 32 * (2 * self.hidden + self.hidden + self.kv)

    def activations(self, checkpointing: bool) -> float:
        h, per_layer = (
            self.hidden,
            2 * (4 * self.hidden + 2 * self.kv) + 2 * (2 * self.hidden + 4 * self.mlp),
        )
        if checkpointing:
            return TOKENS * (self.layers * 2 * h + per_layer) / GB
        return TOKENS * self.layers * per_layer / GB


LLAMA2_7B = Shape("Llama-2-7B", 32, 4096, 4096, 11008, 32000)
LLAMA2_70B = Shape("Llama-2-70B", 80, 8192, 1024, 28672, 32000)


def rows(shape: Shape, gpus: int) -> dict[str, dict[str, float]]:
    """GB per GPU of each part, for each set-up."""
    p, n = shape.parameters / GB, gpus
    gathered = (2 * shape.layer_parameters + 2 * shape.vocab * shape.hidden) * 2 / GB
    gathered += shape.vocab * shape.hidden * 2 / GB  # the reference's output layer
    adapter = shape.lora_parameters / GB
    return {
        "LoRA + DDP": dict(weights=2 * p + 4 * adapter, gradients=4 * adapter,
                           optimizer=8 * adapter, reference=0.0, gathered=0.0),
        "full + FSDP2": dict(weights=4 * p / n, gradients=4 * p / n, optimizer=8 * p / n,
                             reference=2 * p / n, gathered=gathered),
        "full + ZeRO-3": dict(weights=6 * p / n, gradients=2 * p / n, optimizer=8 * p / n,
                              reference=2 * p / n, gathered=gathered),
        # AdamW's moments and the fp32 master in host memory (offload_optimizer_device: cpu)
        "full + ZeRO-3, optimizer offloaded": dict(weights=2 * p / n, gradients=2 * p / n,
                                                   optimizer=0.0, reference=2 * p / n,
                                                   gathered=gathered),
    }  # fmt: skip


def main() -> None:
    print(
        "| model | GPUs | set-up | weights | gradients | AdamW | reference | gathered "
        "| activations (with checkpointing) | total (with checkpointing) | fits 80 GB |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for shape in (LLAMA2_7B, LLAMA2_70B):
        plain, ckpt = shape.activations(False), shape.activations(True)
        for gpus in (1, 4, 8):
            for setup, parts in rows(shape, gpus).items():
                if "offloaded" in setup and shape is LLAMA2_7B:
                    continue
                states = sum(parts.values())
                fits = (
                    "yes"
                    if states + plain <= 80
                    else "with checkpointing"
                    if (states + ckpt <= 80)
                    else "no"
                )
                cells = " | ".join(f"{v:.1f}" for v in parts.values())
                print(f"| {shape.name} | {gpus} | {setup} | {cells} | {plain:.1f} ({ckpt:.1f}) "
                      f"| {states + plain:.1f} ({states + ckpt:.1f}) | {fits} |")  # fmt: skip
    for shape in (LLAMA2_7B, LLAMA2_70B):
        print(f"{shape.name}: {shape.parameters / 1e9:.2f}B parameters, LoRA r=32 on q/v "
              f"{shape.lora_parameters / 1e6:.1f}M")  # fmt: skip


if __name__ == "__main__":
    main()
