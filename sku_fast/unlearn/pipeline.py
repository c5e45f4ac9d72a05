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
    <out>/validation/        the samples held out of training (with validation > 0), for
                             choosing λ (sku-fast select-lambda)

SKU writes model/ = θ_o − λ·(θ_bad − θ_o) with the streaming engine, which reads θ_o and the
adapter (or θ_bad) from disk in bounded memory: two full copies are never held. The
gradient-ascent baseline writes model/ = θ_o + τ, the trained model itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from sku_fast.engine.adapter_negation import negate_lora
from sku_fast.engine.arithmetic import negate, task_arithmetic
from sku_fast.engine.output import StagedOutput, check_output, write_atomically
from sku_fast.errors import DataError, TrainingError
from sku_fast.unlearn.checkpointing import CHECKPOINTS, latest_checkpoint
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.data import (
    Anchor,
    QAPair,
    demo_data_path,
    hold_out,
    load_anchors,
    load_contrast_pairs,
    load_qa_pairs,
)
from sku_fast.unlearn.engines import load_device, loading, make_accelerator
from sku_fast.unlearn.fullstate import (
    checkpoint_dtypes,
    full_numel,
    gathered_parameters,
    write_model_dir,
)
from sku_fast.unlearn.models import load_model, load_tokenizer, resolve_model_path
from sku_fast.unlearn.network import prepare_model
from sku_fast.unlearn.objective import objective_for
from sku_fast.unlearn.trainer import train

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sku_fast.unlearn.network import Model
    from sku_fast.unlearn.trainer import StepCallback


VALIDATION = "validation"
TWIN = "safe-twin"  # the contrast's second stage-1 run: its log and checkpoints


def _has_safetensors(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Write a model as model.safetensors + config + tokenizer (works for GGUF-loaded models,
    which refuse save_pretrained). Tied weights are stored once, as transformers expects."""

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


def check_run_output(out: Path, inputs: Sequence[Path], *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, an output folder that is, contains or lies inside
    an input (model, data, settings file), an existing folder without --overwrite, and a
    --resume without a checkpoint to continue from."""
    check_output(out, inputs, overwrite=True)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output {str(out)!r} exists and is not a directory")
    if resume:
        if latest_checkpoint(out) is None:
            raise TrainingError(
                f"--resume: {out / CHECKPOINTS} holds no checkpoint to continue from "
                "(runs save them with --checkpoint-every N)"
            )
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TrainingError(
            f"output folder {str(out)!r} is not empty; pass --overwrite, --resume or another --out"
        )


def run_unlearn(
    config: UnlearnConfig,
    progress: bool = True,
    *,
    on_step: StepCallback | None = None,
    also_read: Sequence[str | Path] = (),
) -> Path:
    """Run stage 1 and (for SKU) stage 2 as `config` says; return the output folder.

    `<out>/model` loads with `from_pretrained`. Works under `accelerate launch`: every process
    trains, the main process writes the folder. `on_step(step, record)` is called after each
    optimizer step (e.g. to stop early or watch the losses). `also_read`: other files the run
    reads (its settings file), which the output must not touch either.

    A new run is built beside `out` and appears there only when complete; an existing `out`
    (with `overwrite`) is replaced only then, and kept if the run fails. A run that stops after
    writing a checkpoint leaves `out` with it, for `resume`. With `resume` the run continues in
    `out` itself, whose settings file is left as it is.
    """
    config = config.resolve()
    model_path = resolve_model_path(config.model)
    harmful_path = Path(config.harmful).expanduser() if config.harmful else None
    normal_path = Path(config.normal).expanduser() if config.normal else None
    anchors_path = Path(config.anchors).expanduser() if config.anchors else None
    out = Path(config.out).expanduser()
    data_paths = [p for p in (harmful_path, normal_path, anchors_path) if p]
    inputs = [model_path, *data_paths, *map(Path, also_read)]
    check_run_output(out, inputs, resume=config.resume, overwrite=config.overwrite)
    harmful = load_qa_pairs(
        harmful_path or demo_data_path("harmful"),
        config.harmful_prompt_column,
        config.harmful_answer_column,
    )
    normal = load_qa_pairs(
        normal_path or demo_data_path("normal"),
        config.normal_prompt_column,
        config.normal_answer_column,
    )
    harmful, harmful_held = hold_out(harmful, config.validation, config.seed)
    normal, normal_held = hold_out(normal, config.validation, config.seed + 1)
    safe_by_prompt = {}
    if config.safe_weight > 0 or config.contrast != 0 or harmful_held:
        source = harmful_path or demo_data_path("harmful")
        safe_by_prompt = {pair.prompt: pair.safe for pair in load_contrast_pairs(source)}
    if config.contrast is None:  # the default: the safe twin whenever the data allows one
        # the twin's random disassociation needs safe answers that differ
        usable = len(set(safe_by_prompt.values())) >= 2
        config = dataclasses.replace(config, contrast=1.0 if usable else 0.0)
        if not usable:
            print(
                f"sku-fast: {harmful_path} has no varied safe answers, so SKU runs without its "
                "safe twin (contrast 0); data with prompt/unsafe/safe columns negates more "
                "selectively (docs/study.md)",
                file=sys.stderr,
            )
    needs_safe = config.safe_weight > 0 or config.contrast > 0
    safe = None
    if needs_safe:
        if not safe_by_prompt:
            option = "safe_weight" if config.safe_weight > 0 else "contrast"
            raise DataError(
                f"{harmful_path}: {option} needs harmful data with safe answers as well "
                "(columns prompt/unsafe/safe, or PKU-SafeRLHF's response_0/1 with "
                "is_response_0/1_safe)"
            )
        safe = [safe_by_prompt.get(pair.prompt) for pair in harmful]
    validation = _validation_rows(harmful_held, normal_held, safe_by_prompt)
    anchors = load_anchors(anchors_path) if anchors_path else []
    tokenizer = load_tokenizer(model_path)
    # the launcher's engine and mixed precision (sku_fast.unlearn.engines)
    accelerator = make_accelerator(config)
    with loading(accelerator):
        model = load_model(
            model_path, dtype=getattr(torch, config.dtype), device=load_device(accelerator)
        )
    run = _Run(config, model_path, model, tokenizer, harmful, normal, safe, anchors, validation,
               accelerator)  # fmt: skip
    if config.resume:
        run.produce(out, progress, on_step)
        return out
    with contextlib.ExitStack() as cleanup:
        stage = staging = None
        if accelerator.is_main_process:
            stage = StagedOutput(out)
            staging = cleanup.enter_context(stage)
        folder = _shared_path(accelerator, staging)
        try:
            run.produce(folder, progress, on_step)
        except BaseException as error:
            if stage is not None:
                _keep_resumable(stage, folder, out, error)
            raise
        if stage is not None:
            stage.commit()
    accelerator.wait_for_everyone()
    return out


def _validation_rows(
    harmful: Sequence[QAPair], normal: Sequence[QAPair], safe: dict[str, str]
) -> dict[str, list[dict]]:
    """The held-out samples as rows to save: harmful ones with their safe answer when the data
    has one (the layout load_contrast_pairs reads), normal ones as prompt/answer."""
    if not harmful and not normal:
        return {}
    rows = {"normal": [{"prompt": p.prompt, "answer": p.answer} for p in normal], "harmful": []}
    for pair in harmful:
        row = {"prompt": pair.prompt, "unsafe": pair.answer}
        rows["harmful"].append(row | ({"safe": safe[pair.prompt]} if pair.prompt in safe else {}))
    return rows


def negate_model(
    base: Path, tuned: Path, twin: Path | None, contrast: float, out: Path, lam: float
) -> None:
    """θ_o − λ·τ, or with a safe twin θ_o − λ·(τ − c·τ_safe), streamed into `out`."""
    if twin is None:
        negate(base, tuned, out, lam, overwrite=True, progress=None)
    else:
        terms = [(tuned, -lam), (twin, lam * contrast)]
        task_arithmetic(base, terms, out, overwrite=True, progress=None)


def negate_run(
    base: Path, tuned: Path, twin: Path | None, contrast: float, folder: Path, lam: float
) -> None:
    """Stage 2 into <folder>/model (negate_model); with LoRA and no twin also the negated
    adapter (<folder>/adapter-negated)."""
    if twin is None and tuned.name == "adapter":
        negate_lora(tuned, folder / "adapter-negated", lam, base=base, overwrite=True)
    negate_model(base, tuned, twin, contrast, folder / "model", lam)


def _shared_path(accelerator: Accelerator, staging: Path | None) -> Path:
    """The main process made the staging folder; every process learns its path."""
    paths = [str(staging) if staging is not None else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(paths)
    return Path(paths[0])


def _keep_resumable(stage: StagedOutput, folder: Path, out: Path, error: BaseException) -> None:
    """A new run that stops after a checkpoint keeps its folder at `out`, so that `--resume`
    continues it; a run that replaces an earlier output never does (the earlier one stays)."""
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None or out.exists():
        return
    stage.commit()
    note = f"the run's checkpoints up to {checkpoint.name} are in {out}: continue with --resume"
    if isinstance(error, TrainingError):
        error.args = (f"{error}; {note}",)
    else:
        print(f"sku-fast: {note}", file=sys.stderr)


@dataclasses.dataclass
class _Run:
    """One run's loaded inputs, and how they become a run folder."""

    config: UnlearnConfig
    model_path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    harmful: list
    normal: list
    safe: list | None
    anchors: list[Anchor]
    validation: dict[str, list[dict]]
    accelerator: Accelerator

    def produce(self, folder: Path, progress: bool, on_step: StepCallback | None) -> None:
        config, accelerator = self.config, self.accelerator
        base = self.model_path
        if accelerator.is_main_process:
            if not config.resume:
                # saved as a fresh run: `--config <out>/config.json` repeats it from the start
                saved = dataclasses.replace(
                    config.with_absolute_paths(), resume=False, overwrite=False
                )
                saved.save(folder / "config.json")
                if self.validation:
                    write_atomically(folder / VALIDATION, self._write_validation)
            if not _has_safetensors(self.model_path):
                base = folder / "original"
                if not _has_safetensors(base):  # written before training changes any weight
                    write_atomically(
                        base, lambda tmp: save_model_dir(self.model, self.tokenizer, tmp)
                    )
        accelerator.wait_for_everyone()
        trained = prepare_model(self.model, config)
        started = time.perf_counter()
        train(
            trained,
            self.tokenizer,
            self.harmful,
            self.normal,
            objective_for(config),
            config,
            folder,
            accelerator,
            progress=progress,
            on_step=on_step,
            safe=self.safe,
            anchors=[QAPair(anchor.prompt, anchor.refusal) for anchor in self.anchors],
        )
        tuned = self._write_stage1(folder, trained, base)
        trainable = sum(full_numel(p) for _, p in trained.trainable)
        twin = None
        if config.contrast > 0:
            del trained
            twin = self._train_twin(folder, base, progress)
        seconds = time.perf_counter() - started
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._negate(folder, base, tuned, twin, seconds, trainable)

    def _train_twin(self, folder: Path, base: Path, progress: bool) -> Path:
        """The safe twin of the contrast: the same recipe on the harmful prompts' safe answers
        (and the anchors' helpful ones, where θ_bad learned their refusals), from a fresh θ_o,
        in <folder>/safe-twin (its log and checkpoints). Returns its
        stage-1 output, stage1/safe-adapter or stage1/safe-model."""
        twin_folder = folder / TWIN
        if self.accelerator.is_main_process:
            twin_folder.mkdir(exist_ok=True)
        self.accelerator.wait_for_everyone()
        pairs = [
            QAPair(pair.prompt, answer)
            for pair, answer in zip(self.harmful, self.safe, strict=True)
            if answer is not None
        ]
        config = dataclasses.replace(
            self.config,
            safe_weight=0.0,  # its harmful answers are the safe ones already
            resume=self.config.resume and latest_checkpoint(twin_folder) is not None,
        )
        with loading(self.accelerator):
            model = load_model(base, dtype=getattr(torch, config.dtype),
                               device=load_device(self.accelerator))  # fmt: skip
        trained = prepare_model(model, config)
        anchors = [QAPair(anchor.prompt, anchor.answer) for anchor in self.anchors]
        train(trained, self.tokenizer, pairs, self.normal, objective_for(config), config,
              twin_folder, self.accelerator, progress=progress, anchors=anchors)  # fmt: skip
        return self._write_stage1(folder, trained, base, prefix="safe-")

    def _write_validation(self, staging: Path) -> None:
        for name, rows in self.validation.items():
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            (staging / f"{name}.jsonl").write_text(text, encoding="utf-8")

    def _write_stage1(self, folder: Path, trained: Model, base: Path, prefix: str = "") -> Path:
        """The trained adapter or model, gathered from whatever engine holds it (every process
        takes part; the main process writes): the adapter as one copy in host memory, the
        full model shard by shard, in the dtypes of `base` (a model trained in bf16 from an
        fp32 checkpoint, or in fp32 from a bf16 one, is negated against it). Returns
        stage1/<prefix>adapter or stage1/<prefix>model."""
        main = self.accelerator.is_main_process
        stage1 = folder / "stage1"
        if main:
            stage1.mkdir(exist_ok=True)
        if self.config.lora:
            tuned = stage1 / f"{prefix}adapter"
            adapter = dict(gathered_parameters(trained.trainable, keep=main))
            if main:
                save = trained.network.save_pretrained
                write_atomically(tuned, lambda tmp: save(tmp, state_dict=adapter))
            return tuned
        tuned = stage1 / f"{prefix}model"
        if main:
            dtypes = checkpoint_dtypes(base)
            write = lambda tmp: write_model_dir(trained, self.tokenizer, tmp, True, dtypes=dtypes)
            write_atomically(tuned, write)
        else:
            write_model_dir(trained, self.tokenizer, None, keep=False)
        return tuned

    def _negate(
        self,
        folder: Path,
        base: Path,
        tuned: Path,
        twin: Path | None,
        seconds: float,
        trainable: int,
    ) -> None:
        """Stage 2 (SKU) or the trained model itself (the baseline), each output atomic."""
        config = self.config
        if config.method == "sku":
            negate_run(base, tuned, twin, config.contrast, folder, config.lam)
        else:
            task_arithmetic(base, [(tuned, 1.0)], folder / "model", overwrite=True, progress=None)
        summary = {
            "method": config.method,
            "model": str(self.model_path),
            "harmful_samples": len(self.harmful),
            "normal_samples": len(self.normal),
            "steps": config.steps,
            "train_seconds": round(seconds, 1),
            "lambda": config.lam if config.method == "sku" else None,
            "contrast": config.contrast if config.method == "sku" else None,
            "trainable_parameters": trainable,
        }
        text = json.dumps(summary, indent=2) + "\n"
        write_atomically(folder / "summary.json", lambda tmp: tmp.write_text(text), directory=False)
