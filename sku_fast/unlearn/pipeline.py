"""`run_unlearn`: stage 1 (train) -> stage 2 (negate) -> one self-describing output folder.

    <out>/config.json        the resolved settings (re-run with --config <out>/config.json)
    <out>/log.jsonl          one line per optimizer step: lr, each term, the total loss
    <out>/original/          θ_o as safetensors + config + tokenizer, when the model was not
                             already a safetensors directory (e.g. the embedded GGUF)
    <out>/stage1/adapter/    the trained LoRA adapter (LoRA mode), or
    <out>/stage1/model/      the trained full model (full fine-tuning)
    <out>/adapter-negated/   the adapter with lora_B scaled by −λ (SKU, LoRA mode)
    <out>/model/             the result; loads with `from_pretrained`
    <out>/checkpoints/       resumable stage-1 checkpoints (when checkpoint_every > 0)

SKU writes model/ = θ_o − λ·(θ_bad − θ_o) with the streaming engine, which reads θ_o and the
adapter (or θ_bad) from disk in bounded memory: two full copies are never held. The
gradient-ascent baseline writes model/ = θ_o + τ, the trained model itself.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from sku_fast.engine.adapter_negation import negate_lora
from sku_fast.engine.arithmetic import negate, task_arithmetic
from sku_fast.errors import TrainingError
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.data import demo_data_path, load_qa_pairs
from sku_fast.unlearn.models import load_model, load_tokenizer, resolve_model_path
from sku_fast.unlearn.network import prepare_model
from sku_fast.unlearn.objective import objective_for
from sku_fast.unlearn.trainer import train

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sku_fast.unlearn.trainer import StepCallback


def _has_safetensors(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Write a model as model.safetensors + config + tokenizer (works for GGUF-loaded models,
    which refuse save_pretrained). Tied weights are stored once, as transformers expects."""

    out.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key in seen:  # a tied copy, e.g. lm_head.weight = embed_tokens.weight
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _prepare_out(config: UnlearnConfig) -> Path:

    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output {str(out)!r} exists and is not a directory")
    if config.resume:
        if not out.is_dir():
            raise TrainingError(f"--resume: output folder {str(out)!r} does not exist")
    elif out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            raise TrainingError(
                f"output folder {str(out)!r} is not empty; pass --overwrite, --resume or "
                "another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_unlearn(
    config: UnlearnConfig, progress: bool = True, *, on_step: StepCallback | None = None
) -> Path:
    """Run stage 1 and (for SKU) stage 2 as `config` says; return the output folder.

    `<out>/model` loads with `from_pretrained`. Works under `accelerate launch`: every process
    trains, the main process writes the folder. `on_step(step, record)` is called after each
    optimizer step (e.g. to stop early or watch the losses).
    """

    config = config.resolve()
    model_path = resolve_model_path(config.model)
    harmful = load_qa_pairs(
        config.harmful or demo_data_path("harmful"),
        config.harmful_prompt_column,
        config.harmful_answer_column,
    )
    normal = load_qa_pairs(
        config.normal or demo_data_path("normal"),
        config.normal_prompt_column,
        config.normal_answer_column,
    )
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    out = _prepare_out(config) if accelerator.is_main_process else Path(config.out).expanduser()
    accelerator.wait_for_everyone()

    tokenizer = load_tokenizer(model_path)
    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise TrainingError(f"dtype {config.dtype!r} is not a torch dtype (e.g. float32)")
    model = load_model(model_path, dtype=dtype, device=str(accelerator.device))
    if accelerator.is_main_process:
        # saved as a fresh run: `--config <out>/config.json` repeats it from the start
        dataclasses.replace(config, resume=False, overwrite=False).save(out / "config.json")
        base = model_path
        if not _has_safetensors(model_path):
            base = out / "original"
            if not _has_safetensors(base):  # written before training changes any weight
                save_model_dir(model, tokenizer, base)

    objective = objective_for(config)
    trained = prepare_model(model, config)
    train(
        trained,
        tokenizer,
        harmful,
        normal,
        objective,
        config,
        out,
        accelerator,
        progress=progress,
        on_step=on_step,
    )
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return out

    stage1 = out / "stage1"
    stage1.mkdir(exist_ok=True)
    if config.lora:
        tuned = stage1 / "adapter"
        trained.network.save_pretrained(tuned)
        if config.method == "sku":
            negate_lora(tuned, out / "adapter-negated", config.lam, base=base, overwrite=True)
    else:
        tuned = save_model_dir(trained.network, tokenizer, stage1 / "model")
    if config.method == "sku":
        negate(base, tuned, out / "model", config.lam, overwrite=True, progress=None)
    else:
        task_arithmetic(base, [(tuned, 1.0)], out / "model", overwrite=True, progress=None)
    summary = {
        "method": config.method,
        "model": str(model_path),
        "harmful_samples": len(harmful),
        "normal_samples": len(normal),
        "steps": config.steps,
        "trainable_parameters": sum(p.numel() for _, p in trained.trainable),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out
