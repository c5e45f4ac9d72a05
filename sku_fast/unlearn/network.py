"""The trained network, its reference θ_o, and how the objective's terms reach them.

LoRA by default (peft): the reference outputs come from the same network with the adapter
disabled, so one copy of the weights. Full fine-tuning keeps a frozen reference copy.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, get_peft_model

from sku_fast.errors import TrainingError
from sku_fast.unlearn.objective import HiddenStatesHead, LogitsHead, Objective, term_values

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from sku_fast.unlearn.config import UnlearnConfig


@dataclass
class Model:
    """The trained network and how the objective reaches it and its reference."""

    network: Any
    reference: Any  # a frozen copy (full fine-tuning) or None (LoRA: adapter disabled)
    lora: bool
    trainable: list[tuple[str, Any]] = field(default_factory=list)

    def reference_context(self):

        return self.network.disable_adapter() if self.lora else contextlib.nullcontext()

    def reference_network(self):
        return self.network if self.lora else self.reference


def prepare_model(model: PreTrainedModel, config: UnlearnConfig) -> Model:
    """Wrap `model` with a fresh LoRA adapter, or pair it with a frozen reference copy."""

    torch.manual_seed(config.seed)  # LoRA initialisation
    if config.lora:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            task_type="CAUSAL_LM",
        )
        try:
            network = get_peft_model(model, lora)
        except ValueError as error:
            raise TrainingError(f"cannot add LoRA to the model: {error}") from error
        reference = None
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        network = model.requires_grad_(True)
    network.train()
    trainable = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    return Model(network, reference, config.lora, trainable)


def _fused_linear_ok(network: Any) -> bool:
    """The fused-linear loss needs logits = hidden @ W.T exactly: a bias-free linear head
    and no logit scaling or soft-capping."""

    head = network.get_output_embeddings()
    cfg = network.config
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", None) in (None, 1.0)
    )


def compute_terms(model: Model, batch: dict[str, torch.Tensor], objective: Objective, backend: str):
    """The objective's term values on one micro-batch with the chosen loss backend."""
    network, reference = model.network, model.reference_network()

    def on_reference(forward):
        def call(ids, mask):
            with model.reference_context():
                return forward(reference, ids, mask)

        return call

    if backend == "fused-linear" and _fused_linear_ok(network):
        hidden = lambda net, ids, mask: (
            net.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        )
        head = HiddenStatesHead(
            batch,
            policy=lambda ids, mask: hidden(network, ids, mask),
            policy_head=network.get_output_embeddings().weight,
            reference=on_reference(hidden),
            reference_head=reference.get_output_embeddings().weight,
        )
    else:
        logits = lambda net, ids, mask: net(input_ids=ids, attention_mask=mask).logits
        head = LogitsHead(
            batch,
            policy=lambda ids, mask: logits(network, ids, mask),
            reference=on_reference(logits),
            backend="torch" if backend == "torch" else "fused",
        )
    return term_values(batch, objective, head)
