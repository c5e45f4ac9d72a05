"""PEFT LoRA adapters, read without the model and without torch.

A LoRA adapter's task vector is exact and small: per adapted module, `τ = scaling · B·A`.
`adapter_deltas` reads an adapter directory (adapter_config.json + adapter_model.safetensors;
headers through the engine's validator) into per-tensor deltas keyed by the BASE checkpoint's
tensor names, which the streaming engine merges row block by row block.

The rules follow PEFT's LoRA layers: scaling and rank/alpha patterns in adapter_config.py,
orientation by layer class in adapter_base.py (peft/tuners/lora/layer.py, `update_layer`,
`get_delta_weight`, `dispatch_default`). What PEFT would refuse is refused here too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sku_fast.engine.adapter_base import CONV1D_MODULES, BaseModel
from sku_fast.engine.adapter_config import ADAPTER_CONFIG, LoraSettings, load_settings
from sku_fast.engine.checkpoint import (
    FLOAT_DTYPES,
    Checkpoint,
    SafetensorsFile,
    TensorEntry,
    path_kind,
    read_file,
    read_tensor_bytes,
    require_file,
)
from sku_fast.errors import CheckpointError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_BIN = "adapter_model.bin"
# PEFT saves every key of a causal LM adapter under the PeftModel's wrapper prefix.
_PEFT_PREFIX = "base_model.model."
# float safetensors dtype -> numpy storage dtype; BF16 is stored as raw uint16
NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


@dataclass(frozen=True)
class LowRankDelta:
    """`delta = scaling * (left @ right)`, the same shape [rows, cols] as the base tensor."""

    left: np.ndarray  # fp32 [rows, r], C-contiguous
    right: np.ndarray  # fp32 [r, cols], C-contiguous
    scaling: float


@dataclass(frozen=True)
class ReplacedTensor:
    """A tensor stored whole in the adapter file (modules_to_save): its tuned value."""

    path: str  # the adapter's .safetensors file
    name: str  # tensor name inside that file


# ----------------------------------------------------------------------------- tensor data


def to_float(raw: bytes, e: TensorEntry) -> np.ndarray:
    """Stored bytes of a float tensor -> fp32 array (fp64 for F64), shaped like the tensor."""
    a = np.frombuffer(raw, dtype=NUMPY_DTYPES[e.dtype]).reshape(e.shape)
    if e.dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float64 if e.dtype == "F64" else np.float32)


# ----------------------------------------------------------------------------- adapter parsing


@dataclass(frozen=True)
class _Module:
    """One LoRA-adapted module of the adapter."""

    module: str  # module name in the base model, e.g. "model.layers.0.self_attn.q_proj"
    embedding: bool  # lora_embedding_A/B (an nn.Embedding) instead of lora_A/B
    a: str  # tensor names in the adapter file
    b: str
    scaling: float


@dataclass(frozen=True)
class Adapter:
    directory: Path
    weights: SafetensorsFile
    tensors: dict[str, TensorEntry]  # adapter tensor name -> entry
    modules: dict[str, _Module]  # base tensor name -> module
    replaced: dict[str, str]  # base tensor name -> adapter tensor name (whole tuned value)
    base_copies: dict[str, str]  # base tensor name -> copy of the base layer saved with a delta
    settings: LoraSettings  # the validated adapter_config.json


_LORA_KEY = re.compile(r"^(.+)\.lora_(A|B)(?:\.([^.]+))?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(.+)\.lora_embedding_(A|B)(?:\.([^.]+))?$")
_SAVED_MODULE_KEY = re.compile(r"^(.+)\.modules_to_save(?:\.[^.]+)?\.([^.]+)$")
_BASE_LAYER_KEY = re.compile(r"^(.+)\.base_layer\.([^.]+)$")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a PEFT adapter directory: it has adapter_config.json, or holds no checkpoint
    itself and has subdirectories that do (PEFT saves adapters not named "default" there)."""
    p = Path(path)
    if path_kind(p) != "directory":
        return False
    if path_kind(p / ADAPTER_CONFIG) != "missing":
        return True
    names = {child.name for child in _listing(p)}
    if "model.safetensors.index.json" in names or any(n.endswith(".safetensors") for n in names):
        return False
    return bool(_adapter_subdirs(p))


def _listing(p: Path) -> list[Path]:
    try:
        return sorted(p.iterdir())
    except OSError as error:
        raise CheckpointError(f"{p}: cannot list: {error.strerror or error}") from error


def _adapter_subdirs(p: Path) -> list[Path]:
    return [
        d
        for d in _listing(p)
        if path_kind(d) == "directory" and path_kind(d / ADAPTER_CONFIG) != "missing"
    ]


def _resolve_adapter_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    kind = path_kind(p)
    if kind != "directory":
        what = "no such directory" if kind == "missing" else "not a directory"
        raise CheckpointError(f"{p}: {what}; a PEFT adapter is a directory")
    if path_kind(p / ADAPTER_CONFIG) != "missing":
        require_file(p / ADAPTER_CONFIG, "file (the adapter config)")
        return p
    subdirs = _adapter_subdirs(p)
    if len(subdirs) == 1:
        return _resolve_adapter_dir(subdirs[0])
    if subdirs:
        names = ", ".join(d.name for d in subdirs)
        raise CheckpointError(f"{p}: holds several adapters ({names}); pass one of their folders")
    raise CheckpointError(f"{p}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read and validate an adapter directory: its config and the names, dtypes and shapes of
    its tensors (no tensor data is read). Raises CheckpointError."""
    directory = _resolve_adapter_dir(path)
    settings = load_settings(directory)
    weights = directory / ADAPTER_WEIGHTS
    if path_kind(weights) == "missing":
        if path_kind(directory / _ADAPTER_BIN) != "missing":
            raise CheckpointError(
                f"{directory / _ADAPTER_BIN}: pickled .bin adapters are not read (unsafe to "
                "unpickle); re-save it with PEFT's save_pretrained(safe_serialization=True)"
            )
        raise CheckpointError(f"{weights}: missing; the adapter has no weights file")
    weights_file = read_file(weights)
    if not weights_file.tensors:
        raise CheckpointError(f"{weights}: holds no tensors; not a LoRA adapter")
    tensors = {e.name: e for e in weights_file.tensors}

    halves: dict[tuple[str, bool], dict[str, str]] = {}  # (module, embedding) -> {"A": key, ...}
    replaced: dict[str, str] = {}
    base_layer: dict[str, str] = {}
    adapter_names: set[str] = set()
    for key in tensors:
        name = key.removeprefix(_PEFT_PREFIX)
        if "lora_magnitude_vector" in name:
            raise CheckpointError(
                f"{weights}: tensor {key!r} is a DoRA magnitude vector; DoRA adapters are not "
                "scaling·B·A deltas: merge with PEFT (merge_and_unload) and negate the full model"
            )
        m = _LORA_KEY.match(name) or _EMBEDDING_KEY.match(name)
        if m:
            module, half, adapter_name = m.groups()
            if adapter_name:
                adapter_names.add(adapter_name)
            slot = halves.setdefault((module, "lora_embedding_" in name), {})
            if half in slot:
                raise CheckpointError(
                    f"{weights}: tensor {key!r}: module {module!r} has two {half}s"
                )
            slot[half] = key
            continue
        if ".lora_" in name or "trainable_tokens" in name:
            raise CheckpointError(f"{weights}: tensor {key!r}: unsupported adapter tensor kind")
        if m := _SAVED_MODULE_KEY.match(name):
            replaced[f"{m[1]}.{m[2]}"] = key
        elif m := _BASE_LAYER_KEY.match(name):
            base_layer[f"{m[1]}.{m[2]}"] = key
        else:
            replaced[name] = key  # modules_to_save as PEFT saves them: the plain module name
    if len(adapter_names) > 1:
        raise CheckpointError(
            f"{weights}: holds tensors of several adapters ({', '.join(sorted(adapter_names))})"
        )

    modules: dict[str, _Module] = {}
    for (module, embedding), slot in sorted(halves.items()):
        for half in ("A", "B"):
            if half not in slot:
                other = next(iter(slot.values()))
                raise CheckpointError(
                    f"{weights}: tensor {other!r}: module {module!r} has no lora_{half}"
                )
        a, b = tensors[slot["A"]], tensors[slot["B"]]
        for e in (a, b):
            if e.dtype not in FLOAT_DTYPES or len(e.shape) != 2:
                raise CheckpointError(
                    f"{weights}: tensor {e.name!r}: {e.dtype} {list(e.shape)}; expected a 2-D "
                    "float matrix (convolution and quantised LoRA layers are not supported)"
                )
        r = settings.rank(module)
        # lora_A [r, in] / lora_B [out, r]; lora_embedding_A [r, num] / lora_embedding_B [dim, r]
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(
                f"{weights}: module {module!r}: rank {r} from the config (r / rank_pattern) but "
                f"A is {list(a.shape)} and B is {list(b.shape)}"
            )
        scaling = settings.scaling(module)
        modules[f"{module}.weight"] = _Module(module, embedding, a.name, b.name, scaling)

    base_copies: dict[str, str] = {}
    for name, key in base_layer.items():
        # PEFT saves the base embedding beside an embedding adapter (save_embedding_layers); the
        # adapter is a delta on that copy, which equals the base unless the vocabulary was resized
        # (then the shapes differ and adapter_deltas refuses it).
        (base_copies if name in modules else replaced)[name] = key
    for name in replaced.keys() & modules.keys():
        raise CheckpointError(
            f"{weights}: tensor {replaced[name]!r}: {name!r} is both replaced and LoRA-adapted"
        )
    return Adapter(directory, weights_file, tensors, modules, replaced, base_copies, settings)


def delta_orientation(adapter: Adapter, name: str, base: BaseModel) -> bool:
    """Whether the delta of base tensor `name` is (B·A)ᵀ, as PEFT orients it by the layer's
    class (adapter_base.py): an embedding's always is; otherwise a non-square weight's shape
    decides, and a square one's class comes from the base's config.json. Raises on a shape
    mismatch, and where the class of a square layer cannot be told and the adapter suggests
    Conv1D (fan_in_fan_out set, or a GPT-2 Conv1D module name)."""
    mod = adapter.modules[name]
    base_shape = tuple(base.shapes[name])
    a_shape, b_shape = adapter.tensors[mod.a].shape, adapter.tensors[mod.b].shape
    plain, transposed = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
    if mod.embedding:
        if base_shape == transposed:
            return True
    elif base_shape == plain == transposed:
        return _square_orientation(adapter, mod, name, base)
    elif base_shape in (plain, transposed):
        return base_shape == transposed
    raise CheckpointError(
        f"{adapter.weights.path}: module {mod.module!r}: lora A {list(a_shape)} and B "
        f"{list(b_shape)} give a {list(plain)} delta but base tensor {name!r} is {list(base_shape)}"
    )


def _square_orientation(adapter: Adapter, mod: _Module, name: str, base: BaseModel) -> bool:
    layer = base.layer(mod.module)
    if layer is not None:
        return layer == "conv1d"
    flag = adapter.settings.fan_in_fan_out
    conv1d_name = mod.module.rsplit(".", 1)[-1] in CONV1D_MODULES
    if not flag and (base.config is not None or not conv1d_name):
        return False  # an nn.Linear, as the flag says and nothing contradicts
    what = (
        "fan_in_fan_out is true"
        if flag
        else f"module {mod.module!r} is named like a GPT-2 Conv1D layer"
    )
    fix = (
        "pass the base as the model directory that holds its config.json"
        if base.config is None
        else "merge it with PEFT (merge_and_unload) and negate the full model"
    )
    raise CheckpointError(
        f"{adapter.settings.path}: {what} and base tensor {name!r} is square "
        f"{list(base.shapes[name])}: PEFT transposes the delta of a GPT-2-style Conv1D layer but "
        f"not of an nn.Linear (it ignores the flag there), and {base.why_unknown()}; {fix}"
    )


def check_against_base(adapter: Adapter, base: BaseModel) -> dict[str, bool]:
    """Every adapted or replaced tensor exists in the base with a matching shape, every LoRA
    delta lands on a float tensor; returns each delta's orientation (delta_orientation)."""
    path = adapter.weights.path
    used = {name: mod.a for name, mod in adapter.modules.items()} | adapter.replaced
    for name, key in used.items():
        if name not in base.shapes:
            raise CheckpointError(
                f"{path}: tensor {key!r}: the base checkpoint has no tensor {name!r}"
            )
    for name, key in [*adapter.replaced.items(), *adapter.base_copies.items()]:
        shape = adapter.tensors[key].shape
        if tuple(base.shapes[name]) != shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} is {list(shape)} but base tensor {name!r} is "
                f"{list(base.shapes[name])}"
            )
    orientations = {}
    for name, mod in adapter.modules.items():
        dtype = base.dtypes.get(name) if base.dtypes is not None else None
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {mod.a!r}: a LoRA delta on base tensor {name!r}, which is "
                f"{dtype}; only float tensors ({', '.join(FLOAT_DTYPES)}) can take one"
            )
        orientations[name] = delta_orientation(adapter, name, base)
    return orientations


def adapter_deltas(
    adapter_dir: str | os.PathLike,
    base: BaseModel | Checkpoint | str | os.PathLike | Mapping[str, tuple[int, ...]],
) -> dict[str, LowRankDelta | ReplacedTensor]:
    """Per-tensor deltas of a PEFT LoRA adapter, keyed by the base checkpoint's tensor names.

    `base` is the base checkpoint (a path or an open Checkpoint: shapes, dtypes and config.json
    are checked) or a mapping of every base tensor name to its shape (then the class of a square
    layer is taken to be nn.Linear unless the adapter suggests Conv1D, which is refused). A LoRA
    module gives a `LowRankDelta` whose `scaling * left @ right` has the base tensor's shape
    (Conv1D and embedding transposes already applied); a `modules_to_save` tensor gives a
    `ReplacedTensor` pointing at its tuned value in the adapter file. Base tensors not in the
    result are unchanged. Raises CheckpointError naming the file, the tensor and the problem.
    """
    base = BaseModel.of(base)
    adapter = load_adapter(adapter_dir)
    orientations = check_against_base(adapter, base)
    out: dict[str, LowRankDelta | ReplacedTensor] = {}
    for name, mod in adapter.modules.items():
        # the engine's low-rank terms hold both factors whole, in fp32
        try:
            a, b = (
                to_float(read_tensor_bytes(adapter.tensors[k]), adapter.tensors[k])
                for k in (mod.a, mod.b)
            )
            left, right = (a.T, b.T) if orientations[name] else (b, a)  # [rows, r], [r, cols]
            out[name] = LowRankDelta(
                left=np.ascontiguousarray(left, dtype=np.float32),
                right=np.ascontiguousarray(right, dtype=np.float32),
                scaling=float(mod.scaling),
            )
        except MemoryError:
            sizes = " and ".join(f"{adapter.tensors[k].numel * 4} bytes" for k in (mod.a, mod.b))
            raise CheckpointError(
                f"{adapter.weights.path}: module {mod.module!r}: its LoRA factors take {sizes} "
                "in fp32, more than fits in memory"
            ) from None
    for name, key in adapter.replaced.items():
        out[name] = ReplacedTensor(path=str(adapter.weights.path), name=key)
    return out
