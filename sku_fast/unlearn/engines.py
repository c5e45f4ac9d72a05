"""Stage 1 on accelerate's engines: one process, DDP, FSDP2 or DeepSpeed ZeRO-3.

The Accelerator comes from the launcher's configuration (`accelerate launch --config_file
examples/<engine>.yaml ...`): the engine and its plugin, mixed precision, processes and
machines. sku-fast adds only what its own loop needs:

- gradient accumulation from `grad_accum`; a launcher or DeepSpeed setting that differs is an
  error (the loop runs `grad_accum` micro-batches per optimizer step);
- the scheduler steps once per optimizer step (accelerate's default steps it once per
  process, for schedules counted in samples);
- DDP's gradients are views into its all-reduce buckets, so no second copy of them exists;
- without CUDA, `cpu=True`: accelerate runs several CPU processes (gloo) only then.
  accelerate enables FSDP and DeepSpeed only on accelerators (on a CPU it leaves FSDP out and
  miscounts DeepSpeed's processes), so such a launch without CUDA is refused;
  tests/distributed_runs.py emulates the state those launches give on GPUs to test them here.

How the objective reaches the weights (sku_fast.unlearn.network):

| engine | trained module | frozen reference (--full) | its output layer |
|---|---|---|---|
| none, DDP | TermsModule (DDP: wrapped) | on the device, not wrapped | the parameter |
| FSDP2 | fully_shard per decoder layer, root | fully_shard, no optimizer | gathered once |
| ZeRO-3 | DeepSpeed engine, head registered external | engine, no optimizer | gathered once |

With LoRA the reference is the trained network with its adapter off, inside the same forward.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sku_fast.errors import TrainingError
from sku_fast.unlearn.network import ReferenceModule, TermsModule

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.network import Model
    from sku_fast.unlearn.objective import Objective

ENGINES = ("none", "ddp", "fsdp", "deepspeed")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(config: UnlearnConfig) -> Accelerator:
    """The launcher's Accelerator with sku-fast's gradient accumulation (see the module)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    sharded = _flag("ACCELERATE_USE_FSDP") or _flag("ACCELERATE_USE_DEEPSPEED")
    if not cuda and sharded and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError(
            "FSDP and DeepSpeed need GPUs: accelerate enables them only on accelerators; on "
            "CPUs launch with examples/ddp.yaml"
        )
    return Accelerator(
        cpu=not cuda,
        gradient_accumulation_steps=config.grad_accum,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
    )


def end_processes() -> None:
    """Destroy the process group `accelerate launch` set up, once every process is done with
    it: a gloo group left to the interpreter's shutdown can abort a process there ("terminate
    called without an active exception", pytorch/pytorch#190489). No group: nothing to do."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def engine_of(accelerator: Accelerator) -> str:
    """ "none" (one process), "ddp", "fsdp" (FSDP2) or "deepspeed"."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise TrainingError(
                "sku-fast shards with FSDP2 (fully_shard): set fsdp_version: 2 in the "
                "accelerate config (see examples/fsdp.yaml)"
            )
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "none"


def load_device(accelerator: Accelerator) -> str:
    """Where to load the model: sharding engines take it from the CPU and place the shards."""
    return "cpu" if engine_of(accelerator) in ("fsdp", "deepspeed") else str(accelerator.device)


@contextlib.contextmanager
def loading(accelerator: Accelerator):
    """The context to load the model in: whole on every process. Under ZeRO-3 transformers
    would otherwise build it already partitioned (it sees DeepSpeed's config through a global
    reference that accelerate sets), from which neither the frozen copy of --full nor the
    saved original can be made; DeepSpeed partitions it when it is prepared."""
    if engine_of(accelerator) != "deepspeed":
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


@dataclass
class Prepared:
    """The objective's module as the engine wrapped it, with the optimizer and scheduler."""

    module: Any
    optimizer: Any
    scheduler: Any
    engine: str


def prepare(
    accelerator: Accelerator,
    model: Model,
    objective: Objective,
    config: UnlearnConfig,
    optimizer: Any,
    scheduler: Any,
) -> Prepared:
    """Wrap the objective's module, optimizer and scheduler with the launcher's engine, and
    prepare the frozen reference of full fine-tuning for evaluation. Afterwards
    `model.trainable` lists the live parameters and `model.engine` names the engine."""
    engine = engine_of(accelerator)
    network = model.network
    model.dtypes = {name: p.dtype for name, p in network.named_parameters()}
    if config.gradient_checkpointing:
        checkpoint_activations(network)
    terms = TermsModule(network, objective, config.loss_backend, model.lora)
    if engine == "deepspeed":
        _configure_deepspeed(accelerator, config)
        if terms.fused_linear and _zero_stage(accelerator) == 3:
            import deepspeed

            # the loss reads the head's weight without calling the head: gather it with the
            # module whose forward does
            deepspeed.zero.register_external_parameter(terms, terms.head_weight())
    module, optimizer, scheduler = accelerator.prepare(terms, optimizer, scheduler)
    if accelerator.gradient_accumulation_steps != config.grad_accum:
        raise TrainingError(
            f"the accelerate configuration accumulates {accelerator.gradient_accumulation_steps} "
            f"micro-batches per step but grad_accum is {config.grad_accum}: remove "
            "gradient_accumulation_steps from the accelerate/DeepSpeed config (or set it to "
            "auto); sku-fast takes it from --grad-accum"
        )
    if not model.lora:
        reference = prepare_reference(accelerator, engine, ReferenceModule(model.reference))
        head = model.reference.get_output_embeddings().weight if terms.fused_linear else None
        terms.set_reference(reference, None if head is None else gathered(head))
    model.trainable = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    model.engine = engine
    return Prepared(module, optimizer, scheduler, engine)


def checkpoint_activations(network: Any) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant, which
    every engine supports) instead of keeping them."""
    model = network.get_base_model() if hasattr(network, "get_base_model") else network
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_reference(accelerator: Accelerator, engine: str, reference: ReferenceModule):
    """The frozen reference for evaluation: sharded under FSDP2/ZeRO-3, never given an
    optimizer; a callable (input_ids, attention_mask, hidden) -> states."""
    reference.requires_grad_(False).eval()
    if engine == "fsdp":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        module = fsdp2_prepare_model(accelerator, reference)
        return _Resharding(module)
    if engine == "deepspeed":
        import deepspeed

        settings = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            settings.pop(key, None)
        if _zero_stage(accelerator) != 3:  # ZeRO-1/2 shard optimizer states: a replica here
            settings["zero_optimization"] = {"stage": 0}
        module, *_ = deepspeed.initialize(model=reference, config=settings)
        module.eval()  # DeepSpeed's engine returns None here, not itself
        return module
    return accelerator.prepare_model(reference, evaluation_mode=True)


class _Resharding:
    """An FSDP2 root keeps its own weights (embeddings, output layer) gathered after a forward
    for the backward that follows; the reference has none, so it gives them back at once."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, input_ids, attention_mask, hidden: bool = True):
        try:
            return self.module(input_ids, attention_mask, hidden)
        finally:
            self.module.reshard()


def gathered(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in full on every process: itself when no engine shards it, else a gathered
    detached copy (FSDP2: DTensor.full_tensor; ZeRO-3: GatheredParameters). A collective
    for sharded weights: every process must call it."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        return weight.full_tensor().detach()
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight


def _zero_stage(accelerator: Accelerator) -> int:
    settings = accelerator.state.deepspeed_plugin.deepspeed_config
    return int(settings.get("zero_optimization", {}).get("stage", 0))


def _configure_deepspeed(accelerator: Accelerator, config: UnlearnConfig) -> None:
    """The run's settings in DeepSpeed's config: clipping (DeepSpeed clips inside its step) and
    the batch sizes it checks (sku-fast draws its own micro-batches, no dataloader)."""
    plugin = accelerator.state.deepspeed_plugin
    settings = plugin.deepspeed_config
    if not hasattr(plugin, "sku_fast_launcher"):  # what the launcher set, before sku-fast's
        keys = ("gradient_clipping", "gradient_accumulation_steps")
        plugin.sku_fast_launcher = {key: settings.get(key, "auto") for key in keys}
    clip = plugin.sku_fast_launcher["gradient_clipping"]
    if clip != "auto" and float(clip) != config.max_grad_norm:
        raise TrainingError(
            f"the DeepSpeed config clips gradients at {clip} but max_grad_norm is "
            f"{config.max_grad_norm}: remove gradient_clipping from it (or set it to auto); "
            "sku-fast takes it from its own settings"
        )
    settings["gradient_clipping"] = config.max_grad_norm
    accum = plugin.sku_fast_launcher["gradient_accumulation_steps"]
    settings["gradient_accumulation_steps"] = config.grad_accum if accum == "auto" else accum
    settings["train_micro_batch_size_per_gpu"] = config.batch_size
    settings["train_batch_size"] = (
        config.batch_size * settings["gradient_accumulation_steps"] * accelerator.num_processes
    )
