"""adapter_config.json of a PEFT LoRA adapter, parsed strictly: what the merge needs from it.

Only the fields that change the delta `scaling·B·A` are read (r, lora_alpha, use_rslora,
rank_pattern, alpha_pattern, fan_in_fan_out) and those that make it something else, which are
refused (DoRA and the other LoRA variants, base-rewriting inits, LoRA biases...). Every field
read is type-checked; numbers are finite and in range (engine/limits.py), so a NaN, an Infinity
or a 1e39 is refused where it enters, naming the file, the key and the value. Fields that do not
change the merge (target_modules, lora_dropout, task_type...) are not checked.

Scaling as in PEFT's LoraLayer.update_layer: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with
use_rslora; rank_pattern / alpha_pattern keys are regexes matched as in PEFT's get_pattern_key
(the first P with re.match(rf"(.*\\.)?({P})$", module) wins).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from sku_fast.engine.limits import MAX_LORA_ALPHA
from sku_fast.engine.strict_json import unique_keys
from sku_fast.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
MAX_CONFIG_BYTES = 16 << 20  # rank patterns of the largest models are a few hundred kB
# Inits that rewrite the base weights (the adapter only means something on the rewritten base).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
# LoRA variants whose merge is not `scaling·B·A` (peft/tuners/lora/variants.py), and other
# features whose weights are not a LoRA delta on the base.
_REFUSED = (
    ("use_dora", "DoRA adapter (use_dora=true): its delta is not scaling·B·A, it rescales whole "
     "weight columns; merge it with PEFT (merge_and_unload) and negate the full model"),
    ("use_qalora", "QA-LoRA adapter (use_qalora=true): its delta acts on pooled inputs, not "
     "scaling·B·A"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens): PEFT cannot "
     "merge it"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora): its delta is not scaling·B·A"),
    ("velora_config", "VeLoRA adapter (velora_config): its delta is not scaling·B·A"),
    ("monteclora_config", "MonteCLoRA adapter (monteclora_config): its delta is not "
     "scaling·B·A"),
    ("arrow_config", "Arrow adapter (arrow_config): it routes between adapters per token"),
    ("kasa_config", "KaSA adapter (kasa_config): its delta is not scaling·B·A"),
    ("lora_bias", "lora_bias is set; LoRA biases are not supported"),
    ("target_parameters", "target_parameters is set; adapters on nn.Parameters are not supported"),
    ("trainable_token_indices", "trainable_token_indices is set; trainable tokens are not "
     "supported"),
    ("layer_replication", "layer_replication is set; layer replication is not supported"),
)  # fmt: skip
_FLAGS = ("use_dora", "use_qalora", "lora_bias")


@dataclass(frozen=True)
class LoraSettings:
    """The merge-relevant settings of one adapter_config.json, validated."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def rank(self, module: str) -> int:
        return _pattern_value(self.rank_pattern, module, self.r)

    def scaling(self, module: str) -> float:
        r = self.rank(module)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / (math.sqrt(r) if self.use_rslora else r)


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class _NonFinite(str):
    """A NaN / Infinity literal (or a float that overflows to one), kept to be reported with
    its key once the whole document is parsed."""


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _find_non_finite(value, where: str) -> tuple[str, str] | None:
    if isinstance(value, _NonFinite):
        return where, str(value)
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, child in items:
        label = key if not where else f"{where}[{key!r}]"
        found = _find_non_finite(child, label)
        if found:
            return found
    return None


def read_config(path: Path) -> dict:
    """The JSON object of an adapter config: UTF-8, no duplicate keys, no NaN or Infinity."""

    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes; an adapter config is a small JSON file "
                f"(at most {MAX_CONFIG_BYTES >> 20} MiB)"
            )
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        reason = f"{error.reason} at byte {error.start}"
        raise CheckpointError(f"{path}: not UTF-8 text ({reason})") from None
    try:
        config = json.loads(
            text,
            object_pairs_hook=unique_keys(path),
            parse_constant=_NonFinite,
            parse_float=_parse_float,
        )
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: invalid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except (ValueError, RecursionError) as error:  # huge integers, absurd nesting
        raise CheckpointError(f"{path}: invalid JSON: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path}: adapter config is not a JSON object (got {type(config).__name__})"
        )
    try:
        found = _find_non_finite(config, "")
    except RecursionError:
        raise CheckpointError(f"{path}: invalid JSON: nested too deeply") from None
    if found:
        key, literal = found
        raise CheckpointError(
            f"{path}: {key} is {literal}: not a finite number (NaN and Infinity are not JSON "
            "numbers and mean nothing in an adapter config)"
        )
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(config: dict, key: str, path: Path) -> bool:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise CheckpointError(f"{path}: {key} must be true or false, got {value!r}")
    return bool(value)


def _rank(value, what: str, path: Path) -> int:
    if not (_is_int(value) and value > 0):
        raise CheckpointError(f"{path}: {what} must be a positive integer, got {value!r}")
    return value


def _alpha(value, what: str, path: Path) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise CheckpointError(f"{path}: {what} must be a number, got {value!r}")
    if not 0 < value <= MAX_LORA_ALPHA:  # exact for huge ints too
        raise CheckpointError(
            f"{path}: {what} must be positive and at most {MAX_LORA_ALPHA:g}, got {value!r}: "
            "LoRA alphas are small numbers (usually r or 2·r); a larger one overflows "
            "half-precision outputs"
        )
    return float(value)


def _patterns(config: dict, key: str, path: Path, check) -> dict:
    patterns = config.get(key)
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{path}: {key} must map module patterns to values, got {patterns!r}")
    out = {}
    for pattern, value in patterns.items():
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except (re.error, RecursionError, OverflowError) as error:
            raise CheckpointError(
                f"{path}: {key} pattern {pattern!r} is not a valid regular expression: {error}"
            ) from None
        out[pattern] = check(value, f"{key}[{pattern!r}]", path)
    return out


def load_settings(directory: Path) -> LoraSettings:
    """Read and validate `directory/adapter_config.json` (raises CheckpointError)."""
    path = directory / ADAPTER_CONFIG
    config = read_config(path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{path}: peft_type is {peft_type!r}; only LoRA adapters are supported"
        )
    for key, what in _REFUSED:
        # true/false fields are type-checked (a "false" string is not false); the others are
        # lists or objects, refused when non-empty
        if _flag(config, key, path) if key in _FLAGS else config.get(key):
            raise CheckpointError(f"{path}: {what}")
    init = config.get("init_lora_weights")
    if init is not None and not isinstance(init, (bool, str)):
        raise CheckpointError(
            f"{path}: init_lora_weights must be true, false or the name of an init, got {init!r}"
        )
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights, so the adapter is not "
            "a delta on the original model; convert it with PEFT's "
            "path_initial_model_for_weight_conversion first"
        )
    for key in ("r", "lora_alpha"):  # PEFT always writes both
        if key not in config:
            raise CheckpointError(f"{path}: {key} is missing; a LoRA config gives r and lora_alpha")
    return LoraSettings(
        path=path,
        r=_rank(config.get("r"), "r", path),
        lora_alpha=_alpha(config.get("lora_alpha"), "lora_alpha", path),
        use_rslora=_flag(config, "use_rslora", path),
        fan_in_fan_out=_flag(config, "fan_in_fan_out", path),
        rank_pattern=_patterns(config, "rank_pattern", path, _rank),
        alpha_pattern=_patterns(config, "alpha_pattern", path, _alpha),
    )
