"""PEFT LoRA adapters, read without the model and without torch.

A LoRA adapter's task vector is exact and small: per adapted module, `τ = scaling · B·A`.
`adapter_deltas` reads an adapter directory (adapter_config.json + adapter_model.safetensors;
headers through the engine's validator) into per-tensor deltas keyed by the BASE checkpoint's
tensor names, which the streaming engine merges row block by row block.

The scaling and orientation rules follow PEFT's LoRA layers (peft/tuners/lora/layer.py,
`update_layer` and `get_delta_weight`; rank/alpha patterns as in peft/utils/other.py
`get_pattern_key`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sku_fast.engine.checkpoint import (
    FLOAT_DTYPES,
    SafetensorsFile,
    TensorEntry,
    read_file,
    read_tensor_bytes,
)
from sku_fast.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_BIN = "adapter_model.bin"
# PEFT saves every key of a causal LM adapter under the PeftModel's wrapper prefix.
_PEFT_PREFIX = "base_model.model."
# Inits that rewrite the base weights (the adapter only means something on the rewritten base).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
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
    fan_in_fan_out: bool


_LORA_KEY = re.compile(r"^(.+)\.lora_(A|B)(?:\.([^.]+))?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(.+)\.lora_embedding_(A|B)(?:\.([^.]+))?$")
_SAVED_MODULE_KEY = re.compile(r"^(.+)\.modules_to_save(?:\.[^.]+)?\.([^.]+)$")
_BASE_LAYER_KEY = re.compile(r"^(.+)\.base_layer\.([^.]+)$")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a PEFT adapter directory: it has adapter_config.json, or holds no checkpoint
    itself and has subdirectories that do (PEFT saves adapters not named "default" there)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / ADAPTER_CONFIG).is_file():
        return True
    if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists():
        return False
    return bool(_adapter_subdirs(p))


def _adapter_subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and (d / ADAPTER_CONFIG).is_file())


def _resolve_adapter_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory; a PEFT adapter is a directory")
    if (p / ADAPTER_CONFIG).is_file():
        return p
    subdirs = _adapter_subdirs(p)
    if len(subdirs) == 1:
        return subdirs[0]
    if subdirs:
        names = ", ".join(d.name for d in subdirs)
        raise CheckpointError(f"{p}: holds several adapters ({names}); pass one of their folders")
    raise CheckpointError(f"{p}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")


def _load_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable adapter config: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: adapter config is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{path}: peft_type is {peft_type!r}; only LoRA adapters are supported"
        )
    if config.get("use_dora"):
        raise CheckpointError(
            f"{path}: DoRA adapter (use_dora=true): its delta is not scaling·B·A, it rescales "
            "whole weight columns; merge it with PEFT (merge_and_unload) and negate the full model"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise CheckpointError(f"{path}: r must be a positive integer, got {r!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)):
        raise CheckpointError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in pattern.values()
        ):
            raise CheckpointError(f"{path}: {key} must map module patterns to numbers")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights, so the adapter is not "
            "a delta on the original model; convert it with PEFT's "
            "path_initial_model_for_weight_conversion first"
        )
    for key, what in (
        ("lora_bias", "LoRA biases"),
        ("target_parameters", "adapters on nn.Parameters"),
        ("trainable_token_indices", "trainable tokens"),
        ("layer_replication", "layer replication"),
    ):
        if config.get(key):
            raise CheckpointError(f"{path}: {key} is set; {what} are not supported")
    return config


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's get_pattern_key: the first pattern P with re.match(rf"(.*\\.)?({P})$", module)."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise CheckpointError(f"bad module pattern {key!r} in the adapter config: {e}") from e
    return default


def _scaling(config: dict, module: str) -> tuple[int, float]:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return int(r), alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def load_adapter(path: str | os.PathLike) -> Adapter:
    directory = _resolve_adapter_dir(path)
    config = _load_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (directory / _ADAPTER_BIN).is_file():
            raise CheckpointError(
                f"{directory / _ADAPTER_BIN}: pickled .bin adapters are not read (unsafe to "
                "unpickle); re-save it with PEFT's save_pretrained(safe_serialization=True)"
            )
        raise CheckpointError(f"{weights}: missing; the adapter has no weights file")
    weights_file = read_file(weights)
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
        r, scaling = _scaling(config, module)
        # lora_A [r, in] / lora_B [out, r]; lora_embedding_A [r, num] / lora_embedding_B [dim, r]
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(
                f"{weights}: module {module!r}: rank {r} from the config (r / rank_pattern) but "
                f"A is {list(a.shape)} and B is {list(b.shape)}"
            )
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
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    return Adapter(directory, weights_file, tensors, modules, replaced, base_copies, fan_in_fan_out)


def delta_orientation(adapter: Adapter, name: str, base_shape: tuple[int, ...]) -> bool:
    """Whether the delta is (B·A)ᵀ for `name`; raises on a shape mismatch."""
    mod = adapter.modules[name]
    a_shape, b_shape = adapter.tensors[mod.a].shape, adapter.tensors[mod.b].shape
    plain, transposed = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
    if mod.embedding:
        fits = {True: base_shape == transposed}
    else:
        # PEFT picks the orientation from the layer type (nn.Linear [out, in] vs GPT-2's Conv1D
        # [in, out]) whatever fan_in_fan_out says; without the model, the shape tells them apart,
        # and only a square weight needs the config's flag.
        fits = {False: base_shape == plain, True: base_shape == transposed}
        if all(fits.values()):
            return adapter.fan_in_fan_out
    for orientation, ok in fits.items():
        if ok:
            return orientation
    raise CheckpointError(
        f"{adapter.weights.path}: module {mod.module!r}: lora A {list(a_shape)} and B "
        f"{list(b_shape)} give a {list(plain)} delta but base tensor {name!r} is {list(base_shape)}"
    )


def check_against_base(adapter: Adapter, base_shapes: dict[str, tuple[int, ...]]) -> None:
    path = adapter.weights.path
    used = {name: mod.a for name, mod in adapter.modules.items()} | adapter.replaced
    for name, key in used.items():
        if name not in base_shapes:
            raise CheckpointError(
                f"{path}: tensor {key!r}: the base checkpoint has no tensor {name!r}"
            )
    for name, key in [*adapter.replaced.items(), *adapter.base_copies.items()]:
        shape = adapter.tensors[key].shape
        if tuple(base_shapes[name]) != shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} is {list(shape)} but base tensor {name!r} is "
                f"{list(base_shapes[name])}"
            )


def adapter_deltas(
    adapter_dir: str | os.PathLike, base_shapes: dict[str, tuple[int, ...]]
) -> dict[str, LowRankDelta | ReplacedTensor]:
    """Per-tensor deltas of a PEFT LoRA adapter, keyed by the base checkpoint's tensor names.

    `base_shapes` maps every base tensor name to its shape. A LoRA module gives a `LowRankDelta`
    whose `scaling * left @ right` has the base tensor's shape (fan_in_fan_out and embedding
    transposes already applied); a `modules_to_save` tensor gives a `ReplacedTensor` pointing at
    its tuned value in the adapter file. Base tensors not in the result are unchanged.
    Raises CheckpointError naming the file, the tensor and the problem.
    """
    adapter = load_adapter(adapter_dir)
    check_against_base(adapter, base_shapes)
    out: dict[str, LowRankDelta | ReplacedTensor] = {}
    for name, mod in adapter.modules.items():
        transposed = delta_orientation(adapter, name, tuple(base_shapes[name]))
        a, b = (
            to_float(read_tensor_bytes(adapter.tensors[k]), adapter.tensors[k])
            for k in (mod.a, mod.b)
        )
        left, right = (a.T, b.T) if transposed else (b, a)  # [rows, r], [r, cols]
        out[name] = LowRankDelta(
            left=np.ascontiguousarray(left, dtype=np.float32),
            right=np.ascontiguousarray(right, dtype=np.float32),
            scaling=float(mod.scaling),
        )
    for name, key in adapter.replaced.items():
        out[name] = ReplacedTensor(path=str(adapter.weights.path), name=key)
    return out
