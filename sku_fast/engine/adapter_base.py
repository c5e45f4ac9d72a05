"""The base model a LoRA adapter is merged onto, as far as the merge needs it, without torch:
each tensor's shape and dtype, and which modules are GPT-2-style Conv1D layers.

PEFT orients a LoRA delta by the layer's class, not by the adapter's `fan_in_fan_out` flag: an
nn.Linear weight is [out, in] and gets `B·A` (PEFT warns and clears a set flag), a transformers
`Conv1D` weight is [in, out] and gets `(B·A)ᵀ` (PEFT sets a cleared flag), an nn.Embedding gets
`(B·A)ᵀ` (peft/tuners/lora/layer.py, dispatch_default and get_delta_weight). Without the model,
a non-square weight's shape tells the two apart; a square one needs the layer class, which the
base's config.json gives through its model_type.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from sku_fast.engine.adapter_config import MAX_CONFIG_BYTES
from sku_fast.engine.checkpoint import SINGLE_NAME, Checkpoint, open_checkpoint, path_kind
from sku_fast.errors import CheckpointError

CONFIG_NAME = "config.json"
# transformers model types whose projections are GPT-2's Conv1D (weight [in, out]) and the module
# names that are Conv1D there: every `Conv1D(` under transformers/models/ (gpt2, openai,
# imagegpt, decision_transformer, clvp's decoder MLP; transformers 5). Every other adapted matrix
# of a transformers model is an nn.Linear or an nn.Embedding.
CONV1D_MODEL_TYPES = frozenset(
    {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder"}
)
CONV1D_MODULES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})


@dataclass(frozen=True)
class BaseModel:
    """What a merge needs of the base: every tensor's shape, its dtype when known, and the
    model's config.json when there is one. `BaseModel.of` builds it from a checkpoint, a path
    or a plain {name: shape} mapping (then dtypes and the model type are unknown)."""

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str] | None = None
    config: Path | None = None  # the model's config.json
    path: Path | None = field(default=None, compare=False)  # the base as the user gave it

    @classmethod
    def of(cls, base: BaseModel | Checkpoint | str | os.PathLike | Mapping) -> BaseModel:
        if isinstance(base, BaseModel):
            return base
        if isinstance(base, (str, os.PathLike)):
            base = open_checkpoint(base)
        if isinstance(base, Checkpoint):
            entries = base.tensor_map()
            # a file's neighbours are its model's only when it is the model's model.safetensors
            has_config = base.kind != "file" or base.path.name == SINGLE_NAME
            config = base.directory / CONFIG_NAME if has_config else None
            if config is not None and path_kind(config) == "missing":
                config = None
            return cls(
                {name: e.shape for name, e in entries.items()},
                {name: e.dtype for name, e in entries.items()},
                config,
                base.path,
            )
        return cls({name: tuple(shape) for name, shape in _shapes(base).items()})

    @cached_property
    def _model_config(self) -> dict | None:
        if self.config is None:
            return None
        try:
            if self.config.stat().st_size > MAX_CONFIG_BYTES:
                raise CheckpointError(f"{self.config}: too large for a model config")
            config = json.loads(self.config.read_bytes())
        except OSError as error:
            raise CheckpointError(
                f"{self.config}: cannot read: {error.strerror or error}"
            ) from error
        except (ValueError, RecursionError) as error:
            raise CheckpointError(f"{self.config}: invalid JSON: {error}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.config}: not a JSON object")
        return config

    @property
    def model_type(self) -> str | None:
        """config.json's model_type; None without one, or for a model that brings its own code
        (auto_map), whose layer classes only that code knows."""
        config = self._model_config
        if config is None or config.get("auto_map"):
            return None
        model_type = config.get("model_type")
        return model_type if isinstance(model_type, str) else None

    def layer(self, module: str) -> str | None:
        """The class of a matrix module, "conv1d" or "linear"; None when it cannot be told."""
        model_type = self.model_type
        if model_type is None:
            return None
        conv1d = model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_MODULES
        return "conv1d" if conv1d else "linear"

    def why_unknown(self) -> str:
        if self.config is None:
            where = f" beside {self.path}" if self.path is not None else ""
            return f"there is no config.json{where} to give the model type"
        if (self._model_config or {}).get("auto_map"):
            return f"{self.config} names its own model code (auto_map)"
        return f"{self.config} has no model_type"


def _shapes(base: Mapping) -> Mapping[str, Sequence[int]]:
    if not isinstance(base, Mapping):
        raise TypeError(
            f"base must be a checkpoint path, a Checkpoint or a mapping of tensor shapes, got "
            f"{type(base).__name__}"
        )
    return base
