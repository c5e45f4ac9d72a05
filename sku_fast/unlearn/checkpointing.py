"""Resumable stage-1 checkpoints, safe to open: safetensors and JSON only, never a pickle.

    <out>/checkpoints/step-NNNNNNN/
        trainable.safetensors   the trainable weights, by parameter name
        optimizer.safetensors   AdamW's moments and step count, "<parameter>/<state>"
        rng.safetensors         the torch RNG states ("cpu", "cuda:<i>")
        state.json              step, the run's settings, optimizer hyperparameters, scheduler

Each checkpoint is written atomically. Loading checks everything against the model being
resumed before changing anything: the tensor names, shapes and dtypes must match exactly, the
step must lie within the run, and the settings must be the run's own (paths compared resolved,
so a moved run folder or a relative path resumes). Any mismatch or damage is one
TrainingError naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sku_fast.engine.output import write_atomically
from sku_fast.errors import TrainingError

if TYPE_CHECKING:  # pragma: no cover
    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.network import Model

CHECKPOINTS = "checkpoints"
FORMAT = 1
# settings that may differ between a run and its resumption
_RESUME_FREE = ("resume", "overwrite", "checkpoint_every", "log_every", "out")
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:07d}"


def save_checkpoint(
    out: Path, step: int, model: Model, optimizer, scheduler, config: UnlearnConfig
) -> Path:
    """Write the state after `step` optimizer steps; returns the checkpoint folder."""
    index = {id(p): name for name, p in model.trainable}
    optimizer_tensors: dict[str, torch.Tensor] = {}
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            optimizer_tensors[f"{index[id(parameter)]}/{key}"] = value.detach().cpu().contiguous()
    groups = [
        {k: v for k, v in group.items() if k != "params"}
        for group in optimizer.state_dict()["param_groups"]
    ]
    schedule = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    state = {
        "format": FORMAT,
        "step": step,
        "config": config.to_dict(),
        "optimizer": {"param_groups": groups},
        "scheduler": schedule,
    }

    def write(staging: Path) -> None:
        weights = {name: p.detach().cpu().contiguous() for name, p in model.trainable}
        save_file(weights, staging / "trainable.safetensors")
        save_file(optimizer_tensors, staging / "optimizer.safetensors")
        save_file(rng, staging / "rng.safetensors")
        (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    path = checkpoint_dir(out, step)
    write_atomically(path, write)
    return path


def latest_checkpoint(out: Path) -> Path | None:
    folder = out / CHECKPOINTS
    found = sorted(p for p in folder.glob("step-*[0-9]") if p.is_dir()) if folder.is_dir() else []
    return found[-1] if found else None


def comparable_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that must not change on resume, with data and model paths resolved."""
    values = {k: v for k, v in config.items() if k not in _RESUME_FREE}
    for key in ("model", "harmful", "normal"):
        if isinstance(values.get(key), str):
            values[key] = str(Path(values[key]).expanduser().resolve())
    return values


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{path}: missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise TrainingError(f"{path}: unreadable checkpoint state ({error})") from error
    if not isinstance(value, dict):
        raise TrainingError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TrainingError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise TrainingError(f"{path}: not a readable safetensors file ({error})") from error


def _check_names(path: Path, found: set[str], expected: set[str]) -> None:
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        detail = f"lacks {missing[0]!r}" if missing else f"has unexpected tensor {extra[0]!r}"
        raise TrainingError(f"{path}: {detail}; it does not belong to this model and settings")


def _check_like(path: Path, name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if tensor.shape != like.shape or tensor.dtype != like.dtype:
        raise TrainingError(
            f"{path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)} but the model "
            f"needs {like.dtype} {list(like.shape)}"
        )


def load_checkpoint(path: Path, model: Model, optimizer, scheduler, config: UnlearnConfig) -> int:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the step. Everything
    is checked before anything is changed."""
    state = _read_json(path / "state.json")
    step = state.get("step")
    if state.get("format") != FORMAT or not isinstance(step, int) or isinstance(step, bool):
        raise TrainingError(f"{path / 'state.json'}: not a sku-fast checkpoint of format {FORMAT}")
    if not 0 < step <= config.steps:
        raise TrainingError(
            f"{path / 'state.json'}: step {step} is outside this run's 1..{config.steps} steps"
        )
    saved = comparable_settings(state.get("config") or {})
    now = comparable_settings(config.to_dict())
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise TrainingError(f"cannot resume from {path}: the settings changed ({details})")

    params = dict(model.trainable)
    weights = _read_tensors(path / "trainable.safetensors")
    _check_names(path / "trainable.safetensors", set(weights), set(params))
    for name, tensor in weights.items():
        _check_like(path / "trainable.safetensors", name, tensor, params[name])

    moments = _read_tensors(path / "optimizer.safetensors")
    where = path / "optimizer.safetensors"
    updated: dict[str, set[str]] = {}  # parameters the optimizer has state for (all, usually)
    for key, tensor in moments.items():
        name, _, kind = key.rpartition("/")
        if name not in params or kind not in _ADAM_STATE:
            raise TrainingError(f"{where}: unexpected tensor {key!r}; not this model's optimizer")
        updated.setdefault(name, set()).add(kind)
        if kind == "step":
            if tensor.numel() != 1 or not tensor.dtype.is_floating_point:
                raise TrainingError(f"{where}: {key!r} is not a step count")
        else:
            _check_like(where, key, tensor, params[name])
        if not torch.isfinite(tensor).all():
            raise TrainingError(f"{where}: {key!r} is not finite")
    for name, kinds in updated.items():
        if kinds != set(_ADAM_STATE):
            missing = sorted(set(_ADAM_STATE) - kinds)[0]
            raise TrainingError(f"{where}: lacks {name + '/' + missing!r}")

    groups = (state.get("optimizer") or {}).get("param_groups")
    current = optimizer.state_dict()
    if not isinstance(groups, list) or len(groups) != len(current["param_groups"]):
        raise TrainingError(f"{path / 'state.json'}: optimizer settings do not match this run")
    schedule = state.get("scheduler")
    if not isinstance(schedule, dict) or schedule.get("last_epoch") != step:
        raise TrainingError(
            f"{path / 'state.json'}: the scheduler state does not match step {step}"
        )
    for value in (*groups, schedule):
        if not _finite_json(value):
            raise TrainingError(f"{path / 'state.json'}: holds a non-finite number")
    rng = _read_tensors(path / "rng.safetensors")
    cpu_rng = rng.get("cpu")
    if (
        cpu_rng is None
        or cpu_rng.dtype != torch.uint8
        or cpu_rng.shape != torch.get_rng_state().shape
    ):
        raise TrainingError(f"{path / 'rng.safetensors'}: no valid CPU random state")

    with torch.no_grad():
        for name, parameter in model.trainable:
            parameter.copy_(weights[name])
    order = [name for name, _ in model.trainable]
    optimizer.load_state_dict(
        {
            "state": {
                i: {key: moments[f"{name}/{key}"] for key in _ADAM_STATE}
                for i, name in enumerate(order)
                if name in updated
            },
            "param_groups": [
                {**group, "params": list(g["params"])}
                for group, g in zip(groups, current["param_groups"], strict=True)
            ],
        }
    )
    scheduler.load_state_dict({**scheduler.state_dict(), **schedule})
    torch.set_rng_state(cpu_rng)
    if torch.cuda.is_available():
        states = [rng[f"cuda:{i}"] for i in range(torch.cuda.device_count()) if f"cuda:{i}" in rng]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return step


def _finite_json(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_json(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite_json(v) for v in value)
    return True


def truncate_log(log: Path, step: int) -> None:
    """Keep the log lines of steps ≤ `step` (a resumed run rewrites the later ones)."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by the kill: drop it and what follows
    log.write_text("".join(line + "\n" for line in kept))
