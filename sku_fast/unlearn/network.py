"""The trained network, its reference θ_o, and the module whose forward is the objective.

LoRA by default (peft): the reference outputs come from the same network with the adapter
disabled, so one copy of the weights. Full fine-tuning keeps a frozen reference copy.

Under accelerate's engines every weight must be used inside the forward of the module that the
engine wrapped, so that the engine's hooks run: DDP's gradient reducer, FSDP2's and ZeRO-3's
gathering of sharded weights. `TermsModule` is that module: its forward runs the network (with
LoRA also the network with its adapter off) and the fused loss, which reads the output layer's
weight directly instead of calling the layer. `ReferenceModule` wraps the frozen reference of
full fine-tuning, which is prepared on its own for evaluation (sharded, no optimizer state);
the trained module only holds a reference to it, never as a submodule.
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
    """The trained network and how the objective reaches it and its reference.

    `trainable` lists the live trainable parameters by name (an engine that replaces them,
    FSDP2, gets them listed again when it is prepared); `engine` is the engine that holds
    them (sku_fast.unlearn.engines) and `dtypes` the parameters' dtypes before it did."""

    network: Any
    reference: Any  # a frozen copy (full fine-tuning) or None (LoRA: adapter disabled)
    lora: bool
    trainable: list[tuple[str, Any]] = field(default_factory=list)
    engine: str = "none"
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

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


def fused_linear_ok(network: Any) -> bool:
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


def states(network: Any, ids: torch.Tensor, mask: torch.Tensor, hidden: bool) -> torch.Tensor:
    """The last hidden states [B, T, H] (the decoder alone) or the logits [B, T, V]."""
    if hidden:
        return network.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return network(input_ids=ids, attention_mask=mask).logits


class _Wrapper(torch.nn.Module):
    """What the engines read from a transformers model: its config (DeepSpeed's "auto" sizes)
    and the layer classes to shard one by one (`_no_split_modules`, FSDP's auto-wrap)."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.config = inner.config
        self._no_split_modules = _no_split_modules(inner)


def _no_split_modules(model: Any) -> list[str] | None:
    for candidate in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        found = getattr(candidate, "_no_split_modules", None)
        if found:
            return list(found)
    return None


class ReferenceModule(_Wrapper):
    """The frozen reference of full fine-tuning: forward(input_ids, attention_mask, hidden)
    gives its last hidden states [B, T, H] (hidden=True) or its logits [B, T, V]."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.model = model

    def forward(self, input_ids, attention_mask, hidden: bool = True):
        return states(self.model, input_ids, attention_mask, hidden)


class TermsModule(_Wrapper):
    """The objective as one forward: forward(input_ids, attention_mask, labels, term) gives
    {term: value} on one micro-batch (docs/design.md §4). The network is its only submodule;
    with full fine-tuning `set_reference` gives it the prepared reference and that reference's
    output-layer weight [V, H] (gathered in full where an engine shards it)."""

    def __init__(self, network: Any, objective: Objective, backend: str, lora: bool) -> None:
        super().__init__(network)
        self.network = network
        self.objective, self.lora = objective, lora
        self.fused_linear = backend == "fused-linear" and fused_linear_ok(network)
        self.logits_backend = "torch" if backend == "torch" else "fused"
        self._reference: tuple[Any, torch.Tensor | None] = (None, None)  # not a submodule

    def set_reference(self, reference: Any, head: torch.Tensor | None) -> None:
        self._reference = (reference, head)

    def head_weight(self) -> torch.Tensor:
        """The trained network's output-layer weight [V, H], read directly by the loss."""
        return self.network.get_output_embeddings().weight

    def forward(self, input_ids, attention_mask, labels, term) -> dict[str, torch.Tensor]:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch["term"] = term
        network = self.network
        if self.lora:

            def reference(ids, mask, hidden):
                with network.disable_adapter():
                    return states(network, ids, mask, hidden)

            reference_head = self.head_weight() if self.fused_linear else None
        else:
            reference, reference_head = self._reference
            if reference is None:
                raise AssertionError("full fine-tuning needs set_reference before the forward")
        if self.fused_linear:
            head = HiddenStatesHead(
                batch,
                policy=lambda ids, mask: states(network, ids, mask, True),
                policy_head=self.head_weight(),
                reference=lambda ids, mask: reference(ids, mask, True),
                reference_head=reference_head,
            )
        else:
            head = LogitsHead(
                batch,
                policy=lambda ids, mask: states(network, ids, mask, False),
                reference=lambda ids, mask: reference(ids, mask, False),
                backend=self.logits_backend,
            )
        return term_values(batch, self.objective, head)


def terms_module(model: Model, objective: Objective, backend: str) -> TermsModule:
    """The objective's module for `model` on one process (no engine): the reference is the
    frozen copy itself."""
    module = TermsModule(model.network, objective, backend, model.lora)
    if not model.lora:
        head = model.reference.get_output_embeddings().weight if module.fused_linear else None
        module.set_reference(ReferenceModule(model.reference), head)
    return module


def compute_terms(model: Model, batch: dict[str, torch.Tensor], objective: Objective, backend: str):
    """The objective's term values on one micro-batch with the chosen loss backend."""
    module = terms_module(model, objective, backend)
    return module(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["term"])
