"""Resumable stage-1 checkpoints: the trainable weights, optimizer, scheduler and RNG states
after a step, written atomically under <out>/checkpoints/step-NNNNNNN."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from sku_fast.engine.output import write_atomically
from sku_fast.errors import TrainingError

if TYPE_CHECKING:  # pragma: no cover
    from sku_fast.unlearn.network import Model

CHECKPOINTS = "checkpoints"
_RESUME_FREE = ("resume", "overwrite", "checkpoint_every", "log_every")


def save_checkpoint(out: Path, step: int, model: Model, optimizer, scheduler, config) -> None:

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


def load_checkpoint(path: Path, model: Model, optimizer, scheduler, config) -> int:

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


def truncate_log(log: Path, step: int) -> None:
    if log.is_file():
        kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in kept))
