"""Resumable stage-1 checkpoints, safe to open: safetensors and JSON only, never a pickle.

    <out>/checkpoints/step-NNNNNNN/
        trainable.safetensors   the trainable weights in full, by parameter name
        optimizer.safetensors   AdamW's moments and step count in full, "<parameter>/<state>"
        rng.safetensors         the torch RNG states of each process ("cpu", "cuda:<i>" for
                                process 0, "rank<r>/cpu", "rank<r>/cuda:<i>" for the others)
        state.json              step, processes, engine, the run's settings, optimizer
                                hyperparameters, scheduler

A file larger than one shard (sku_fast.unlearn.fullstate.SHARD_BYTES) is written as
`<name>-00001-of-0000N.safetensors` with the index `<name>.safetensors.index.json`. The
tensors are gathered from whatever engine holds them (one process, DDP, FSDP2, ZeRO-3), one
parameter at a time, and written by the main process; every process takes part in the
gathering. The format does not depend on the engine or the number of processes, so a run
resumes on another number of processes (its micro-batches are then assigned differently, so
it no longer repeats the uninterrupted run exactly; a warning says so).

Each checkpoint is written atomically. Loading checks everything against the model being
resumed before changing anything: the tensor names, shapes and dtypes must match exactly, the
step must lie within the run, and the settings must be the run's own (paths compared resolved,
so a moved run folder or a relative path resumes). Any mismatch or damage is one
TrainingError naming the file and what is wrong. Every process reads the files and keeps its
own part of each tensor.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sku_fast.engine.output import write_atomically
from sku_fast.errors import TrainingError
from sku_fast.unlearn.fullstate import (
    ADAM_STATE,
    SAFETENSORS_DTYPES,
    ShardedWriter,
    full_moments,
    full_numel,
    full_shape,
    gathered_parameters,
    set_moments,
    set_parameter,
    stored_dtype,
)

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.network import Model

CHECKPOINTS = "checkpoints"
FORMAT = 1
# settings that may differ between a run and its resumption
_RESUME_FREE = (
    "resume", "overwrite", "checkpoint_every", "log_every", "out", "gradient_checkpointing"
)  # fmt: skip
_ADAM_STATE = ADAM_STATE


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:07d}"


def save_checkpoint(
    out: Path,
    step: int,
    model: Model,
    optimizer,
    scheduler,
    config: UnlearnConfig,
    accelerator: Accelerator | None = None,
) -> Path:
    """Write the state after `step` optimizer steps; returns the checkpoint folder. Under
    several processes every one of them must call it (the tensors are gathered)."""
    main = accelerator is None or accelerator.is_main_process
    rng = _gathered_rng(accelerator)
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    schedule = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {
        "format": FORMAT,
        "step": step,
        "processes": 1 if accelerator is None else accelerator.num_processes,
        "engine": model.engine,
        "config": config.to_dict(),
        "optimizer": {"param_groups": groups},
        "scheduler": schedule,
    }
    weight_bytes = sum(full_numel(p) * _itemsize(stored_dtype(p)) for _, p in model.trainable)

    def write(staging: Path | None) -> None:
        files = staging is not None
        weights = ShardedWriter(staging, "trainable", weight_bytes) if files else None
        for name, tensor in gathered_parameters(model.trainable, keep=files):
            if weights is not None:
                weights.add(name, tensor)
        moments = ShardedWriter(staging, "optimizer", 2 * weight_bytes) if files else None
        for name, parameter in model.trainable:
            for key, value in full_moments(optimizer, parameter, keep=files).items():
                if moments is not None:
                    moments.add(f"{name}/{key}", value)
        if files:
            weights.close()
            moments.close()
            save_file(rng, staging / "rng.safetensors")
            (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    path = checkpoint_dir(out, step)
    if main:
        write_atomically(path, write)
    else:
        write(None)
    return path


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return rng


def _gathered_rng(accelerator: Accelerator | None) -> dict[str, torch.Tensor]:
    """Every process's RNG states, named by process (on the main process; a collective)."""
    mine = _rng_state()
    if accelerator is None or accelerator.num_processes == 1:
        return mine
    flat = torch.cat([state.reshape(-1) for state in mine.values()])
    everyone = accelerator.gather(flat.to(accelerator.device)).cpu().view(-1, flat.numel())
    rng = {}
    for rank, row in enumerate(everyone):
        offset, prefix = 0, "" if rank == 0 else f"rank{rank}/"
        for key, state in mine.items():
            rng[prefix + key] = row[offset : offset + state.numel()].clone()
            offset += state.numel()
    return rng


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


_DTYPES = SAFETENSORS_DTYPES


class TensorFiles:
    """The tensors of `<folder>/<prefix>.safetensors`, or of the shards its index names, read
    one at a time; every problem is a TrainingError naming the file."""

    def __init__(self, folder: Path, prefix: str) -> None:
        single = folder / f"{prefix}.safetensors"
        index = folder / f"{prefix}.safetensors.index.json"
        self.where: dict[str, Path] = {}
        self.info: dict[str, tuple[torch.Size, torch.dtype | None]] = {}
        if single.is_file() or not index.is_file():
            self.path = single
            self._add(single)
            return
        self.path = index
        weight_map = _read_json(index).get("weight_map")
        pattern = re.compile(rf"{re.escape(prefix)}-\d{{5}}-of-\d{{5}}\.safetensors")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and pattern.fullmatch(v) for v in weight_map.values()
        ):
            raise TrainingError(f"{index}: not an index of {prefix} shards")
        for shard in sorted(set(weight_map.values())):
            found = self._add(folder / shard)
            if found != {k for k, v in weight_map.items() if v == shard}:
                raise TrainingError(f"{folder / shard}: does not hold what {index.name} says")

    def _add(self, path: Path) -> set[str]:
        if not path.is_file():
            raise TrainingError(f"{path}: missing; the checkpoint is incomplete")
        try:
            with safe_open(path, "pt") as handle:
                names = set(handle.keys())
                for name in names:
                    piece = handle.get_slice(name)
                    dtype = _DTYPES.get(piece.get_dtype())
                    self.info[name] = (torch.Size(piece.get_shape()), dtype)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise TrainingError(f"{path}: not a readable safetensors file ({error})") from error
        for name in names:
            if name in self.where:
                raise TrainingError(f"{path}: tensor {name!r} is stored twice")
            self.where[name] = path
        return names

    def names(self) -> set[str]:
        return set(self.where)

    def check_like(self, name: str, shape: torch.Size, dtype: torch.dtype) -> None:
        found_shape, found_dtype = self.info[name]
        if found_shape != shape or found_dtype != dtype:
            raise TrainingError(
                f"{self.where[name]}: tensor {name!r} is {found_dtype} {list(found_shape)} but "
                f"the model needs {dtype} {list(shape)}"
            )

    def get(self, name: str) -> torch.Tensor:
        path = self.where[name]
        try:
            with safe_open(path, "pt") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise TrainingError(f"{path}: not a readable safetensors file ({error})") from error


def _check_names(path: Path, found: set[str], expected: set[str]) -> None:
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        detail = f"lacks {missing[0]!r}" if missing else f"has unexpected tensor {extra[0]!r}"
        raise TrainingError(f"{path}: {detail}; it does not belong to this model and settings")


def load_checkpoint(
    path: Path,
    model: Model,
    optimizer,
    scheduler,
    config: UnlearnConfig,
    accelerator: Accelerator | None = None,
) -> int:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the step. Everything
    is checked before anything is changed. Under several processes every one calls it."""
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
    weights = TensorFiles(path, "trainable")
    _check_names(weights.path, weights.names(), set(params))
    for name, parameter in params.items():
        weights.check_like(name, full_shape(parameter), stored_dtype(parameter))

    moments = TensorFiles(path, "optimizer")
    where = moments.path
    updated: dict[str, set[str]] = {}  # parameters the optimizer has state for (all, usually)
    for key in sorted(moments.names()):
        name, _, kind = key.rpartition("/")
        if name not in params or kind not in _ADAM_STATE:
            raise TrainingError(f"{where}: unexpected tensor {key!r}; not this model's optimizer")
        updated.setdefault(name, set()).add(kind)
        tensor = moments.get(key)
        if kind == "step":
            if tensor.numel() != 1 or not tensor.dtype.is_floating_point:
                raise TrainingError(f"{where}: {key!r} is not a step count")
        else:
            moments.check_like(key, full_shape(params[name]), stored_dtype(params[name]))
        if not torch.isfinite(tensor).all():
            raise TrainingError(f"{where}: {key!r} is not finite")
    for name, kinds in updated.items():
        if kinds != set(_ADAM_STATE):
            missing = sorted(set(_ADAM_STATE) - kinds)[0]
            raise TrainingError(f"{where}: lacks {name + '/' + missing!r}")

    groups = (state.get("optimizer") or {}).get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise TrainingError(f"{path / 'state.json'}: optimizer settings do not match this run")
    if not all(isinstance(g, dict) and "params" not in g for g in groups):
        raise TrainingError(f"{path / 'state.json'}: optimizer settings do not match this run")
    schedule = state.get("scheduler")
    if not isinstance(schedule, dict) or schedule.get("last_epoch") != step:
        raise TrainingError(
            f"{path / 'state.json'}: the scheduler state does not match step {step}"
        )
    for value in (*groups, schedule):
        if not _finite_json(value):
            raise TrainingError(f"{path / 'state.json'}: holds a non-finite number")
    rank = 0 if accelerator is None else accelerator.process_index
    rng = _rng_for(path / "rng.safetensors", rank)

    for name, parameter in model.trainable:
        set_parameter(parameter, weights.get(name))
    for name, parameter in model.trainable:
        if name in updated:
            kinds = {kind: moments.get(f"{name}/{kind}") for kind in _ADAM_STATE}
            set_moments(optimizer, parameter, kinds)
    for group, saved_group in zip(optimizer.param_groups, groups, strict=True):
        group.update(saved_group)
    scheduler.load_state_dict({**scheduler.state_dict(), **schedule})
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        states = [rng[f"cuda:{i}"] for i in range(count) if f"cuda:{i}" in rng]
        if len(states) == count:
            torch.cuda.set_rng_state_all(states)
    processes = 1 if accelerator is None else accelerator.num_processes
    if state.get("processes", 1) != processes and (accelerator is None or rank == 0):
        print(
            f"sku-fast: {path.name} was written by {state.get('processes')} processes and "
            f"resumes on {processes}: each step's micro-batches are assigned differently, so "
            "the result differs from an uninterrupted run",
            file=sys.stderr,
        )
    return step


def _rng_for(path: Path, rank: int) -> dict[str, torch.Tensor]:
    """This process's RNG states ("cpu", "cuda:<i>"): its own when the checkpoint has them,
    else process 0's (a checkpoint of fewer processes)."""
    rng = _read_tensors(path)
    cpu_rng = rng.get("cpu")
    shape = torch.get_rng_state().shape
    if cpu_rng is None or cpu_rng.dtype != torch.uint8 or cpu_rng.shape != shape:
        raise TrainingError(f"{path}: no valid CPU random state")
    prefix = f"rank{rank}/"
    if rank == 0 or prefix + "cpu" not in rng:
        return {k: v for k, v in rng.items() if "/" not in k}
    mine = {k[len(prefix) :]: v for k, v in rng.items() if k.startswith(prefix)}
    if mine["cpu"].dtype != torch.uint8 or mine["cpu"].shape != shape:
        raise TrainingError(f"{path}: no valid CPU random state for process {rank}")
    return mine


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
