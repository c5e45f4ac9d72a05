"""Stage 1: train θ_bad (or the baseline's unlearned model) with the weighted objective.

LoRA by default (peft): the reference outputs come from the same network with the adapter
disabled, so one copy of the weights. Full fine-tuning keeps a frozen reference copy.
AdamW with linear decay, exactly `steps` optimizer steps of `grad_accum` micro-batches.

Built on accelerate: under `accelerate launch` every process draws its own micro-batches
from one seeded stream and the gradients are averaged across processes before each step, so
all ranks hold identical weights. The model is not wrapped in DDP because the fused-linear
loss calls the decoder and the output layer separately, bypassing a wrapper's forward.

Micro-batch g (counted over steps, accumulation and processes) always holds the same samples
and random answers, and checkpoints carry the optimizer, scheduler and RNG states, so
`resume` continues to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sku_fast.data import (
    QAPair,
    Sampler,
    TokenRow,
    answer_groups,
    collate,
    random_answers,
    tokenize_pair,
)
from sku_fast.errors import TrainingError
from sku_fast.objective import TERM_IDS, Objective, combine, term_values, term_values_from_logits
from sku_fast.output import write_atomically

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sku_fast.config import UnlearnConfig

CHECKPOINTS = "checkpoints"
LOG_FILE = "log.jsonl"
StepCallback = Callable[[int, dict[str, float]], None]


class BatchStream:
    """Micro-batch g as token rows: B harmful samples (a "gd" row each and K "rd" rows with
    random answers) and B normal samples ("pd" rows), all chosen from (seed, g) alone."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        harmful: Sequence[QAPair],
        normal: Sequence[QAPair],
        objective: Objective,
        *,
        batch_size: int,
        max_length: int,
        seed: int,
    ) -> None:
        self.tokenizer, self.harmful, self.normal = tokenizer, harmful, normal
        self.objective, self.batch_size, self.max_length = objective, batch_size, max_length
        self.seed = seed
        self.harmful_order = Sampler(len(harmful), seed)
        self.normal_order = Sampler(len(normal), seed + 1)
        self.groups = (
            answer_groups([pair.answer for pair in harmful])
            if objective.active("rd") and objective.random_source == "harmful"
            else None
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cache: dict[tuple[str, int, int], TokenRow] = {}

    def _row(self, source: str, prompt: int, answer: int) -> TokenRow:
        key = (source, prompt, answer)
        if key not in self._cache:
            prompts = self.normal if source == "normal" else self.harmful
            answers = self.normal if source in ("normal", "harmful-normal") else self.harmful
            self._cache[key] = tokenize_pair(
                self.tokenizer, prompts[prompt].prompt, answers[answer].answer, self.max_length
            )
        return self._cache[key]

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        b, rows, terms = self.batch_size, [], []
        harmful = self.harmful_order.take(index * b, b)
        if self.objective.active("gd"):
            rows += [self._row("harmful", i, i) for i in harmful]
            terms += [TERM_IDS["gd"]] * b
        if self.objective.active("rd"):
            rng = np.random.default_rng([self.seed, 2, index])
            k = self.objective.k
            if self.groups is not None:
                draws = random_answers(self.groups, harmful, k, rng)
                source = "harmful"
            else:  # the baseline's random normal answers
                draws = rng.integers(0, len(self.normal), size=(b, k)).tolist()
                source = "harmful-normal"
            for i, answers in zip(harmful, draws, strict=True):
                rows += [self._row(source, i, j) for j in answers]
            terms += [TERM_IDS["rd"]] * (b * k)
        if self.objective.active("pd"):
            rows += [self._row("normal", i, i) for i in self.normal_order.take(index * b, b)]
            terms += [TERM_IDS["pd"]] * b
        batch = collate(rows, self.pad_id)
        batch["term"] = torch.tensor(terms, dtype=torch.long)
        return batch


@dataclass
class Model:
    """The trained network and how the objective reaches it and its reference."""

    network: Any
    reference: Any  # a frozen copy (full fine-tuning) or None (LoRA: adapter disabled)
    lora: bool
    trainable: list[tuple[str, Any]] = field(default_factory=list)

    def reference_context(self):
        import contextlib

        return self.network.disable_adapter() if self.lora else contextlib.nullcontext()

    def reference_network(self):
        return self.network if self.lora else self.reference


def prepare_model(model: PreTrainedModel, config: UnlearnConfig) -> Model:
    """Wrap `model` with a fresh LoRA adapter, or pair it with a frozen reference copy."""
    import copy

    import torch

    torch.manual_seed(config.seed)  # LoRA initialisation
    if config.lora:
        from peft import LoraConfig, get_peft_model

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
    import torch

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

    def reference_call(function):
        def call(ids, mask):
            with model.reference_context():
                return function(reference, ids, mask)

        return call

    if backend == "fused-linear" and _fused_linear_ok(network):
        hidden = lambda net, ids, mask: (
            net.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        )
        return term_values(
            batch,
            objective,
            policy_hidden=lambda ids, mask: hidden(network, ids, mask),
            policy_head=network.get_output_embeddings().weight,
            reference_hidden=reference_call(hidden),
            reference_head=reference.get_output_embeddings().weight,
        )
    logits = lambda net, ids, mask: net(input_ids=ids, attention_mask=mask).logits
    return term_values_from_logits(
        batch,
        objective,
        policy_logits=lambda ids, mask: logits(network, ids, mask),
        reference_logits=reference_call(logits),
        backend="torch" if backend == "torch" else "fused",
    )


def linear_schedule(optimizer: Any, steps: int, warmup: int) -> Any:
    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- checkpoints ----------------------------------------------------------------------------

_RESUME_FREE = ("resume", "overwrite", "checkpoint_every", "log_every")


def _save_checkpoint(out: Path, step: int, model: Model, optimizer, scheduler, config) -> None:
    import torch
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        weights = {name: p.detach().cpu().contiguous() for name, p in model.trainable}
        save_file(weights, staging / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            staging / "state.pt",
        )
        (staging / "state.json").write_text(
            json.dumps({"step": step, "config": config.to_dict()}, indent=2) + "\n"
        )

    write_atomically(out / CHECKPOINTS / f"step-{step:07d}", write)


def latest_checkpoint(out: Path) -> Path | None:
    folder = out / CHECKPOINTS
    found = sorted(folder.glob("step-*[0-9]")) if folder.is_dir() else []
    return found[-1] if found else None


def _load_checkpoint(path: Path, model: Model, optimizer, scheduler, config) -> int:
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    saved = {k: v for k, v in state["config"].items() if k not in _RESUME_FREE}
    now = {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise TrainingError(f"cannot resume from {path}: the settings changed ({details})")
    weights = load_file(path / "trainable.safetensors")
    with torch.no_grad():
        for name, parameter in model.trainable:
            parameter.copy_(weights[name])
    extra = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    return int(state["step"])


def _truncate_log(log: Path, step: int) -> None:
    if log.is_file():
        kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in kept))


# --- the loop -------------------------------------------------------------------------------


def _sync_gradients(model: Model, accelerator: Accelerator) -> None:
    """Average the gradients over processes (all ranks then take the same step)."""
    import torch
    import torch.distributed as dist

    grads = [p.grad for _, p in model.trainable if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def train(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    harmful: Sequence[QAPair],
    normal: Sequence[QAPair],
    objective: Objective,
    config: UnlearnConfig,
    out: Path,
    accelerator: Accelerator,
    *,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> Model:
    """Run stage 1 for `config.steps` optimizer steps, logging each to `out/log.jsonl`.

    `config` must be resolved. With `config.resume` the newest checkpoint in `out` is loaded
    first. `on_step(step, record)` is called after every step with the logged values.
    Raises TrainingError on a non-finite loss (naming the step and the term).
    """
    import torch
    from tqdm.auto import tqdm

    stream = BatchStream(
        tokenizer,
        harmful,
        normal,
        objective,
        batch_size=config.batch_size,
        max_length=config.max_length,
        seed=config.seed,
    )
    parameters = [p for _, p in model.trainable]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = linear_schedule(optimizer, config.steps, config.warmup_steps)
    log = out / LOG_FILE
    start = 0
    if config.resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise TrainingError(f"--resume: no checkpoint in {out / CHECKPOINTS}")
        start = _load_checkpoint(checkpoint, model, optimizer, scheduler, config)
        if accelerator.is_main_process:
            _truncate_log(log, start)
    elif accelerator.is_main_process and log.exists():
        log.unlink()
    accelerator.wait_for_everyone()

    world, rank, accum = accelerator.num_processes, accelerator.process_index, config.grad_accum
    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not (progress and accelerator.is_main_process),
        desc=f"stage 1 ({config.method})",
    )
    model.network.train()
    for step in range(start, config.steps):
        totals: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = stream.micro_batch((step * accum + micro) * world + rank)
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accelerator.autocast():
                values = compute_terms(model, batch, objective, config.loss_backend)
            for name, value in values.items():
                if not torch.isfinite(value):
                    raise TrainingError(
                        f"step {step + 1}: the {name} loss term is {value.item()} "
                        f"(micro-batch {micro + 1} of {accum}); lower the learning rate "
                        "or check the data"
                    )
                totals[name] = totals.get(name, 0.0) + value.detach() / accum
            (combine(values, objective) / accum).backward()
        if world > 1:
            _sync_gradients(model, accelerator)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        names = sorted(totals)
        stacked = accelerator.reduce(torch.stack([totals[n] for n in names]), "mean")
        record = {name: float(v) for name, v in zip(names, stacked.tolist(), strict=True)}
        record["loss"] = sum(getattr(objective, n) * v for n, v in record.items())
        record = {"step": step + 1, "lr": lr, **record}
        if accelerator.is_main_process:
            if (step + 1) % max(config.log_every, 1) == 0 or step + 1 == config.steps:
                with log.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k not in ("step", "lr")})
        bar.update(1)
        every = config.checkpoint_every
        if every and (step + 1) % every == 0 and step + 1 < config.steps:
            if accelerator.is_main_process:
                _save_checkpoint(out, step + 1, model, optimizer, scheduler, config)
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(step + 1, record)
    bar.close()
    model.network.eval()
    return model
