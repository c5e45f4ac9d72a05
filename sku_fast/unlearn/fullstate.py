"""Full tensors out of, and back into, an engine's parameters and AdamW states, one at a time.

Checkpoints and stage 2 need every trained tensor in full, whatever holds it: one process or
DDP (the parameter itself), FSDP2 (a DTensor sharded over the processes) or ZeRO-3 (a flat
partition; the fp32 master weight and the AdamW moments live in DeepSpeed's optimizer).
Gathering is a collective: every process runs the same loop over the same parameters, only
the main process keeps what it gathers. Beyond the shards, memory holds one full parameter
and its moments at a time. Setting is local: every process reads the full tensor and keeps
its own part.

The files are safetensors written shard by shard (`ShardedWriter`): `<prefix>.safetensors`
when everything fits in one shard, else `<prefix>-00001-of-0000N.safetensors` and the index
`<prefix>.safetensors.index.json` that transformers and the streaming engine read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
SHARD_BYTES = 2 << 30  # at most this many bytes of tensors per file (and in memory at once)


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _zero3(parameter: Any) -> bool:
    return hasattr(parameter, "ds_id")


def full_shape(parameter: Any) -> torch.Size:
    """The shape of the whole parameter (ZeRO-3 leaves an empty placeholder)."""
    return parameter.ds_shape if _zero3(parameter) else parameter.shape


def full_numel(parameter: Any) -> int:
    return full_shape(parameter).numel()


def stored_dtype(parameter: Any) -> torch.dtype:
    """The dtype its checkpoint holds: ZeRO-3 trains an fp32 master of each trained weight."""
    return torch.float32 if _zero3(parameter) and parameter.requires_grad else parameter.dtype


def full_parameter(parameter: Any, keep: bool) -> torch.Tensor | None:
    """The whole parameter on the CPU where `keep`, else None (a collective when sharded)."""
    if _is_dtensor(parameter):
        full = parameter.full_tensor()
    elif _zero3(parameter):
        if parameter.requires_grad:
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(parameter)
        else:
            import deepspeed

            with deepspeed.zero.GatheredParameters([parameter]):
                full = parameter.detach().clone()
        full = full.reshape(parameter.ds_shape)
    else:
        full = parameter
    return full.detach().cpu().contiguous() if keep else None


def full_moments(optimizer: Any, parameter: Any, keep: bool) -> dict[str, torch.Tensor]:
    """AdamW's step and moments of `parameter` in full on the CPU where `keep` ({} when the
    optimizer has not stepped it yet or not `keep`; a collective when sharded)."""
    if _zero3(parameter):
        from deepspeed.utils import safe_get_full_optimizer_state

        step = _deepspeed_step(optimizer)
        if step is None:
            return {}
        found = {"step": step}
        for key in ADAM_STATE[1:]:
            found[key] = safe_get_full_optimizer_state(parameter, key).reshape(parameter.ds_shape)
    else:
        found = dict(optimizer.state.get(parameter, {}))
        for key, value in found.items():
            found[key] = value.full_tensor() if _is_dtensor(value) else value
    if not keep:
        return {}
    return {key: value.detach().cpu().contiguous() for key, value in found.items()}


def set_parameter(parameter: Any, value: torch.Tensor) -> None:
    """Give `parameter` the full `value` (every process passes the same value)."""
    with torch.no_grad():
        if _is_dtensor(parameter):
            parameter.to_local().copy_(_local_part(parameter, value))
        elif _zero3(parameter):
            import deepspeed

            if parameter.requires_grad:
                from deepspeed.utils import safe_set_full_fp32_param

                safe_set_full_fp32_param(parameter, value.to(torch.float32))
            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
                parameter.data.copy_(value.to(parameter.device, parameter.dtype))
        else:
            parameter.copy_(value)


def set_moments(optimizer: Any, parameter: Any, moments: dict[str, torch.Tensor]) -> None:
    """Give AdamW's state of `parameter` the full `moments` (step, exp_avg, exp_avg_sq)."""
    step = moments["step"].to(torch.float32).reshape(())
    if _zero3(parameter):
        from deepspeed.utils import safe_set_full_optimizer_state

        _deepspeed_states(optimizer, step)
        for key in ADAM_STATE[1:]:
            safe_set_full_optimizer_state(parameter, moments[key].to(torch.float32), key)
        return
    state = {"step": step.clone()}
    for key in ADAM_STATE[1:]:
        value = moments[key]
        if _is_dtensor(parameter):
            from torch.distributed.tensor import DTensor

            local = _local_part(parameter, value).clone()
            state[key] = DTensor.from_local(local, parameter.device_mesh, parameter.placements)
        else:
            state[key] = value.to(parameter.device, parameter.dtype).clone()
    optimizer.state[parameter] = state


def _local_part(parameter: Any, value: torch.Tensor) -> torch.Tensor:
    """This process's shard of a full tensor laid out like the DTensor `parameter`."""
    from torch.distributed.tensor import distribute_tensor

    local = value.to(parameter.device, parameter.dtype)
    spread = distribute_tensor(
        local, parameter.device_mesh, parameter.placements, src_data_rank=None
    )
    return spread.to_local()


def _deepspeed_optimizer(optimizer: Any) -> Any:
    """DeepSpeed's ZeRO-3 optimizer inside accelerate's wrapper."""
    return optimizer.optimizer


def _deepspeed_step(optimizer: Any) -> torch.Tensor | None:
    """The step count of the AdamW that DeepSpeed runs on its flat fp32 partitions."""
    zero = _deepspeed_optimizer(optimizer)
    steps = {float(s["step"]) for s in zero.optimizer.state.values() if "step" in s}
    if not steps:
        return None
    assert len(steps) == 1, f"DeepSpeed's partitions disagree on the step: {steps}"
    return torch.tensor(steps.pop(), dtype=torch.float32)


def _deepspeed_states(optimizer: Any, step: torch.Tensor) -> None:
    """AdamW's state on each flat fp32 partition, created before its first step if needed,
    with the given step count."""
    zero = _deepspeed_optimizer(optimizer)
    for flat in zero.fp32_partitioned_groups_flat:
        state = zero.optimizer.state[flat]
        if not state:
            state["exp_avg"] = torch.zeros_like(flat)
            state["exp_avg_sq"] = torch.zeros_like(flat)
        state["step"] = step.clone()


def gathered_parameters(
    named: list[tuple[str, Any]], keep: bool
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, full tensor or None) for each parameter in turn; every process iterates."""
    for name, parameter in named:
        yield name, full_parameter(parameter, keep)


class ShardedWriter:
    """Collects tensors and writes them as safetensors shards of at most `shard_bytes`
    (`total_bytes` decides upfront whether one file is enough)."""

    def __init__(
        self,
        folder: Path,
        prefix: str,
        total_bytes: int,
        shard_bytes: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder, self.prefix, self.metadata = folder, prefix, metadata
        self.limit = shard_bytes or SHARD_BYTES
        self.single = total_bytes <= self.limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.names: set[str] = set()
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self.names, f"tensor {name!r} written twice"
        size = tensor.numel() * tensor.element_size()
        if self.pending and not self.single and self.pending_bytes + size > self.limit:
            self._flush()
        self.names.add(name)
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        number = len(self.files) + 1
        save_file(self.pending, self.folder / f"{self.prefix}-{number:05d}.part", self.metadata)
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is left (and the index of a sharded set); returns the files."""
        if self.single:
            path = self.folder / f"{self.prefix}.safetensors"
            save_file(self.pending, path, self.metadata)
            return [path]
        if self.pending or not self.files:
            self._flush()
        count, weight_map, paths = len(self.files), {}, []
        for number, names in enumerate(self.files, start=1):
            path = self.folder / f"{self.prefix}-{number:05d}-of-{count:05d}.safetensors"
            (self.folder / f"{self.prefix}-{number:05d}.part").rename(path)
            weight_map.update(dict.fromkeys(names, path.name))
            paths.append(path)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / f"{self.prefix}.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n"
        )
        return paths


def write_model_dir(
    model: Any,
    tokenizer: Any,
    folder: Path | None,
    keep: bool,
    shard_bytes: int | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
) -> None:
    """The trained full model (`model.network`) as a model directory that loads with
    `from_pretrained`: safetensors shards (and their index when there are several), config,
    generation config, tokenizer; tied weights once. Each weight is stored in `dtypes[name]`
    (the base checkpoint's, so that stage 2 can subtract it) or else in the dtype it had
    before the engine took it. Every process calls it (weights are gathered one at a time);
    the one with `keep` writes into `folder`."""
    network = model.network
    stored = set(network.state_dict(keep_vars=True))
    named = list(network.named_parameters())  # a tied weight once, under its first name
    buffers = [(n, b) for n, b in network.named_buffers() if n in stored]
    given = dtypes or {}
    dtypes = {name: given.get(name, model.dtypes.get(name, p.dtype)) for name, p in named}
    total = sum(full_numel(p) * torch.empty((), dtype=dtypes[n]).element_size() for n, p in named)
    writer = None
    if keep:
        writer = ShardedWriter(folder, "model", total, shard_bytes, metadata={"format": "pt"})
    for name, parameter in named:
        tensor = full_parameter(parameter, keep)
        if writer is not None:
            writer.add(name, tensor.to(dtypes[name]))
    if writer is None:
        return
    for name, buffer in buffers:
        writer.add(name, buffer.detach().cpu().contiguous().to(given.get(name, buffer.dtype)))
    writer.close()
    network.config.save_pretrained(folder)
    if getattr(network, "generation_config", None) is not None:
        network.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def checkpoint_dtypes(folder: Path) -> dict[str, torch.dtype]:
    """The dtype of each tensor of a model directory (model.safetensors or the shards its
    index names), from the headers alone."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or not index.is_file():
        files = [folder / "model.safetensors"]
    else:
        files = [
            folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    found = {}
    for path in files:
        with safe_open(path, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                dtype = SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype())
                if dtype is not None:
                    found[name] = dtype
    return found
