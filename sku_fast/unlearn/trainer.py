"""Stage 1: train θ_bad (or the baseline's unlearned model) with the weighted objective.

AdamW with linear decay, exactly `steps` optimizer steps of `grad_accum` micro-batches.
Built on accelerate's engines (sku_fast.unlearn.engines): the objective's module, the
optimizer and the scheduler go through `accelerator.prepare`, micro-batches through
`accelerator.accumulate` and `accelerator.backward`, clipping through
`accelerator.clip_grad_norm_`; DDP, FSDP2 or DeepSpeed ZeRO-3 average (and shard) the
gradients as the launcher configured. Under `accelerate launch` every process draws its own
micro-batches from one seeded stream (sku_fast.unlearn.batches). Checkpoints carry the
optimizer, scheduler and RNG states, so `resume` continues to the same weights as an
uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from sku_fast.engine.strict_json import to_json
from sku_fast.errors import TrainingError
from sku_fast.unlearn.batches import BatchStream
from sku_fast.unlearn.checkpointing import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    truncate_log,
)
from sku_fast.unlearn.engines import prepare
from sku_fast.unlearn.monitor import RunawayMonitor
from sku_fast.unlearn.network import Model
from sku_fast.unlearn.objective import TERMS, Objective, combine

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.data import QAPair

LOG_FILE = "log.jsonl"
StepCallback = Callable[[int, dict[str, float]], None]


def linear_schedule(optimizer: Any, steps: int, warmup: int) -> Any:

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    safe: Sequence[str | None] | None = None,
    anchors: Sequence[QAPair] = (),
) -> Model:
    """Run stage 1 for `config.steps` optimizer steps, logging each to `out/log.jsonl`.

    `config` must be resolved. With `config.resume` the newest checkpoint in `out` is loaded
    first. `on_step(step, record)` is called after every step with the logged values.
    `safe[i]`: the safe answer of harmful sample i (or None), for the "sp" term. `anchors`:
    harmless prompts with the answer this run learns, as extra "gd" rows (BatchStream).
    Raises TrainingError on a non-finite loss (naming the step and the term).
    """

    stream = BatchStream(
        tokenizer,
        harmful,
        normal,
        objective,
        batch_size=config.batch_size,
        max_length=config.max_length,
        seed=config.seed,
        safe=safe,
        anchors=anchors,
    )
    optimizer = torch.optim.AdamW(
        [p for _, p in model.trainable], lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = linear_schedule(optimizer, config.steps, config.warmup_steps)
    prepared = prepare(accelerator, model, objective, config, optimizer, scheduler)
    module, optimizer, scheduler = prepared.module, prepared.optimizer, prepared.scheduler
    parameters = [p for _, p in model.trainable]  # the live ones, after `prepare`
    log = out / LOG_FILE
    start = 0
    if config.resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise TrainingError(f"--resume: no checkpoint in {out / CHECKPOINTS}")
        start = load_checkpoint(checkpoint, model, optimizer, scheduler, config, accelerator)
        if accelerator.is_main_process:
            truncate_log(log, start)
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
    monitor = RunawayMonitor() if objective.pd < 0 else None  # only a diverging KL runs away
    objective_terms = (*TERMS, "loss")
    model.network.train()
    accelerator.step = 0  # accumulate() counts micro-batches from here: steps start synced
    for step in range(start, config.steps):
        totals: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = stream.micro_batch((step * accum + micro) * world + rank)
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accelerator.accumulate(module):
                values = module(
                    batch["input_ids"], batch["attention_mask"], batch["labels"], batch["term"]
                )
                for name, value in values.items():
                    if not torch.isfinite(value):
                        raise TrainingError(
                            f"step {step + 1}: the {name} loss term is {value.item()} "
                            f"(micro-batch {micro + 1} of {accum}); lower the learning rate "
                            "or check the data"
                        )
                    totals[name] = totals.get(name, 0.0) + value.detach() / accum
                loss = combine(values, objective)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"step {step + 1}: the weighted loss is {loss.item()} although every "
                        "term is finite; check the term weights (epsilon)"
                    )
                accelerator.backward(loss)  # divided by grad_accum; synced on the last one
        assert accelerator.sync_gradients, "the step must end on a synced micro-batch"
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        names = sorted(totals)
        stacked = accelerator.reduce(torch.stack([totals[n] for n in names]), "mean")
        record = {name: float(v) for name, v in zip(names, stacked.tolist(), strict=True)}
        record["loss"] = sum(getattr(objective, n) * v for n, v in record.items())
        record = {"step": step + 1, "lr": lr, **record}
        warning = monitor.check(step + 1, record) if monitor is not None else None
        if accelerator.is_main_process:
            if warning is not None:
                record["warning"] = warning
                bar.write(f"warning: {warning}")
            if warning or (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                with log.open("a") as handle:
                    handle.write(to_json(record) + "\n")
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in objective_terms})
        bar.update(1)
        every = config.checkpoint_every
        if every and (step + 1) % every == 0 and step + 1 < config.steps:
            save_checkpoint(out, step + 1, model, optimizer, scheduler, config, accelerator)
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(step + 1, record)
    bar.close()
    model.network.eval()
    return model
