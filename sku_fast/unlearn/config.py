"""The settings of one unlearning run, loadable from a JSON or YAML file and saved resolved
into the run's output folder so that the run can be repeated from its own folder."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union

from sku_fast.errors import ConfigError

METHODS = ("sku", "ga")
LOSS_BACKENDS = ("fused-linear", "fused", "torch")
# ε (guided distortion / harmful CE, random answers, preservation KL) per (method,
# preservation). SKU's default keeps θ_bad near θ_o on normal data with a strong KL, so that τ
# holds little normal knowledge; "diverge" is the paper's objective with the paper's weights
# (docs/study.md, "Why the defaults depart from the paper").
DEFAULT_EPSILON = {
    ("sku", "keep"): (1.0, 1.0, 3.0),
    ("sku", "diverge"): (2.5, 2.5, 1.0),
    ("ga", "keep"): (0.5, 1.0, 1.0),
}
# (method, lora) -> learning rate. The baseline as published is full fine-tuning at 2e-6; with
# LoRA that rate does not move the adapter at all, so LoRA gets the rate measured to move the
# model about as much (docs/study.md, §2.1 "A faithful baseline").
DEFAULT_LR = {("sku", True): 2e-4, ("sku", False): 2e-4, ("ga", False): 2e-6, ("ga", True): 2e-4}
DEFAULT_LORA = {"sku": True, "ga": False}
PATH_FIELDS = ("model", "harmful", "normal", "anchors")  # the settings that name input files
PRESERVATIONS = ("diverge", "keep")
DEFAULT_PRESERVATION = {"sku": "keep", "ga": "keep"}
DEFAULT_STEPS = {"sku": 200, "ga": 1000}  # SKU: measured in docs/study.md; GA: as published
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class UnlearnConfig:
    """Everything `run_unlearn` needs. `None` fields take the method's default on `resolve()`.

    model: a Hugging Face model directory or .gguf file; None = embedded SmolLM2-135M-Instruct.
    harmful / normal: data files (see sku_fast.unlearn.data); None = the packaged demo sets.
    method: "sku" (stage 1 then negation) or "ga" (the gradient-ascent baseline, no negation).
    lora: train a LoRA adapter (reference = same network, adapter off) or the full model;
        None = the method's default (SKU: LoRA; the baseline: full fine-tuning, as published).
    steps: optimizer steps, exactly; None = 200 for sku, 1000 (as published) for ga;
        batch_size samples per micro-batch of each set; grad_accum micro-batches per step.
    lam: λ of the negation θ_o − λ·τ (2: chosen on validation data in docs/study.md).
    validation: samples of each set held out of training (at most a fifth), saved in
        <out>/validation/ for choosing λ.
    lambda_grid: when set, `sku-fast unlearn` chooses λ from this grid after training, on the
        validation samples (sku-fast select-lambda); `lam` is then only the first guess.
    k: random answers per harmful prompt (random disassociation).
    epsilon: weights of the three terms; None = (1, 1, 3) for sku (keep), the paper's
        (2.5, 2.5, 1) for sku with preservation "diverge", (0.5, 1, 1) for ga.
    guided_distortion / random_disassociation / preservation_divergence: ablation switches.
    preservation: SKU's KL term on normal data: "keep" (+ε3·KL, the default: θ_bad stays
        close, so τ holds less normal knowledge) or "diverge" (−ε3·KL, the paper's: θ_bad
        moves away from θ_o); None = "keep". The baseline always keeps.
    kl_cap: κ, the per-token cap of a diverging KL (no gradient beyond it): the guard against
        the runaway of −KL, which is unbounded below; None = uncapped.
    safe_weight: ε4, a KL kept small on the safe answers of the harmful prompts (needs harmful
        data with safe answers: BeaverTails or PKU-SafeRLHF layouts); 0 = off.
    contrast: c, the weight of a safe twin: stage 1 also trains the same recipe on the harmful
        prompts' safe answers (τ_safe), and stage 2 writes θ_o − λ·(τ − c·τ_safe), so that
        what both learn (the data's answer style) cancels and what tells harm from refusal
        remains; 0 = off, the paper's negation; None (the default) = 1 when the harmful data
        has safe answers, else 0.
    anchors: a file of harmless prompts that sound harmful, each with a helpful answer and a
        refusal (columns prompt/answer/refusal): θ_bad also learns the refusals and the safe
        twin the answers, so the negation answers such prompts instead of refusing them;
        None = none (docs/study.md).
    loss_backend: "fused-linear" (never materialises logits), "fused" (fused op on logits) or
        "torch" (softmax and log of both models in PyTorch, as the published code does).
    checkpoint_every: save a resumable checkpoint every N steps (0: never); resume: continue
        from the newest checkpoint in `out`.
    gradient_checkpointing: recompute each layer's activations in the backward instead of
        keeping them (less memory, about a third more compute).
    """

    model: str | None = None
    harmful: str | None = None
    normal: str | None = None
    harmful_prompt_column: str | None = None
    harmful_answer_column: str | None = None
    normal_prompt_column: str | None = None
    normal_answer_column: str | None = None
    method: str = "sku"
    lora: bool | None = None
    lora_r: int = 32
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    steps: int | None = None
    lam: float = 2.0
    out: str = "sku-fast-runs/run"
    seed: int = 0
    batch_size: int = 2
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 0.0
    k: int = 1
    max_length: int = 256
    epsilon: list[float] | None = None
    guided_distortion: bool = True
    random_disassociation: bool = True
    preservation_divergence: bool = True
    validation: int = 0
    lambda_grid: list[float] | None = None
    preservation: str | None = None
    kl_cap: float | None = None
    safe_weight: float = 0.0
    contrast: float | None = None
    anchors: str | None = None
    loss_backend: str = "fused-linear"
    checkpoint_every: int = 0
    resume: bool = False
    log_every: int = 1
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    overwrite: bool = False

    def resolve(self) -> UnlearnConfig:
        """A copy with method defaults filled in and every value checked: its type, that it
        is finite, and that it lies in a range that makes sense (the message says why)."""
        resolved = dataclasses.replace(self)
        for item in dataclasses.fields(resolved):
            value = getattr(resolved, item.name)
            setattr(resolved, item.name, _checked_type(item.name, value, _FIELD_TYPES[item.name]))
        if resolved.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {resolved.method!r}")
        if resolved.loss_backend not in LOSS_BACKENDS:
            raise ConfigError(
                f"loss_backend must be one of {LOSS_BACKENDS}, got {resolved.loss_backend!r}"
            )
        if resolved.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {resolved.dtype!r}")
        if resolved.preservation is None:
            resolved.preservation = DEFAULT_PRESERVATION[resolved.method]
        if resolved.preservation not in PRESERVATIONS:
            raise ConfigError(
                f"preservation must be one of {PRESERVATIONS}, got {resolved.preservation!r}"
            )
        if resolved.method == "ga" and (resolved.contrast or 0) > 0:
            raise ConfigError("contrast is part of SKU's negation; the baseline has none")
        if resolved.method == "ga" and resolved.anchors is not None:
            raise ConfigError("anchors shape SKU's task vector; the baseline takes none")
        if resolved.method == "ga":
            resolved.contrast = 0.0
        if resolved.steps is None:
            resolved.steps = DEFAULT_STEPS[resolved.method]
        if resolved.method == "ga" and resolved.preservation != "keep":
            raise ConfigError("the gradient-ascent baseline keeps θ close on normal data")
        if resolved.epsilon is None:
            resolved.epsilon = list(DEFAULT_EPSILON[(resolved.method, resolved.preservation)])
        if resolved.kl_cap is not None and not 0 < resolved.kl_cap <= 1000:
            raise ConfigError(f"kl_cap must be in (0, 1000] nats per token, got {resolved.kl_cap}")
        if resolved.lora is None:
            resolved.lora = DEFAULT_LORA[resolved.method]
        if resolved.lr is None:
            resolved.lr = DEFAULT_LR[(resolved.method, resolved.lora)]
        if len(resolved.epsilon) != 3:
            raise ConfigError(f"epsilon needs 3 weights, got {len(resolved.epsilon)}")
        if not resolved.lora_targets:
            raise ConfigError("lora_targets must name at least one module, e.g. q_proj")
        for name, low, high, why in _RANGES:
            values = getattr(resolved, name)
            for value in values if isinstance(values, list) else [values]:
                if value is None:  # a default decided later (contrast: by the data)
                    continue
                if not (math.isfinite(value) and low(value) and high(value)):
                    raise ConfigError(f"{name} must be {why}, got {value}")
        if resolved.lambda_grid is not None:
            if not resolved.lambda_grid or any(not 0 < v <= 100 for v in resolved.lambda_grid):
                raise ConfigError(
                    f"lambda_grid must list values in (0, 100], got {resolved.lambda_grid}"
                )
            if resolved.validation == 0:
                raise ConfigError(
                    "choosing λ (lambda_grid, --lambda auto) needs validation > 0 samples "
                    "held out of training"
                )
        if resolved.warmup_steps > resolved.steps:
            raise ConfigError(
                f"warmup_steps ({resolved.warmup_steps}) must not exceed steps ({resolved.steps})"
            )
        if not (resolved.guided_distortion or resolved.random_disassociation):
            raise ConfigError(
                "switching off both guided_distortion and random_disassociation leaves no "
                "harmful term to train on"
            )
        return resolved

    def with_absolute_paths(self) -> UnlearnConfig:
        """A copy whose model and data paths are resolved, as a run saves them, so that the run
        folder can be repeated or resumed from anywhere."""
        return dataclasses.replace(self, **{
            name: None if getattr(self, name) is None
            else str(Path(getattr(self, name)).expanduser().resolve())
            for name in PATH_FIELDS
        })  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UnlearnConfig:
        if not all(isinstance(key, str) for key in values):
            raise ConfigError("config keys must be strings")
        known = {f.name for f in dataclasses.fields(cls)}
        aliases = {"lambda": "lam", "K": "k"}
        values = {aliases.get(key, key): value for key, value in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config keys {', '.join(unknown)}; "
                f"known keys are {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> UnlearnConfig:
        """Read a JSON (.json) or YAML (.yaml/.yml) mapping of field names to values."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is over 1 MB; it is not a settings file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"config file {path} is not UTF-8 text ({error.reason})") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as error:
                raise ConfigError(
                    "reading a YAML config needs PyYAML (pip install pyyaml)"
                ) from error
            try:
                values = yaml.safe_load(text)
            except yaml.YAMLError as error:
                where = getattr(error, "problem_mark", None)
                line = f" at line {where.line + 1}" if where is not None else ""
                problem = getattr(error, "problem", None) or "not valid YAML"
                raise ConfigError(f"config file {path}: invalid YAML{line} ({problem})") from None
        else:
            try:
                values = json.loads(text, parse_constant=_refuse_constant)
            except json.JSONDecodeError as error:
                raise ConfigError(f"config file {path}: invalid JSON ({error})") from error
            except ValueError as error:
                raise ConfigError(f"config file {path}: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping, not {type(values).__name__}"
            )
        return cls.from_dict(values)


_MAX_CONFIG_BYTES = 1 << 20
_FIELD_TYPES = typing.get_type_hints(UnlearnConfig)

# (field, lower check, upper check, the rule as the message states it)
_RANGES: tuple[tuple[str, Callable[[float], bool], Callable[[float], bool], str], ...] = (
    ("steps", lambda v: v >= 1, lambda v: v <= 10_000_000, "between 1 and 10,000,000"),
    ("batch_size", lambda v: v >= 1, lambda v: v <= 4096, "between 1 and 4096"),
    ("grad_accum", lambda v: v >= 1, lambda v: v <= 4096, "between 1 and 4096"),
    ("k", lambda v: v >= 1, lambda v: v <= 64, "between 1 and 64 random answers"),
    ("lora_r", lambda v: v >= 1, lambda v: v <= 65536, "a rank between 1 and 65536"),
    ("lora_alpha", lambda v: v > 0, lambda v: v <= 1e6, "positive and at most 1e6"),
    ("lora_dropout", lambda v: v >= 0, lambda v: v < 1, "in [0, 1)"),
    ("lam", lambda v: v > 0, lambda v: v <= 100,
     "in (0, 100]: it scales the subtracted task vector, and λ ≤ 0 would add the harm back"),
    ("lr", lambda v: v > 0, lambda v: v <= 1,
     "in (0, 1]: a larger learning rate diverges at the first step"),
    ("weight_decay", lambda v: v >= 0, lambda v: v <= 10, "in [0, 10]"),
    ("max_grad_norm", lambda v: v >= 0, lambda v: v <= 1e6, "in [0, 1e6] (0: no clipping)"),
    ("epsilon", lambda v: abs(v) <= 1000, lambda v: True,
     "finite with |ε| ≤ 1000 (the terms' weights)"),
    ("warmup_steps", lambda v: v >= 0, lambda v: True, ">= 0"),
    ("safe_weight", lambda v: v >= 0, lambda v: v <= 1000, "in [0, 1000] (0: off)"),
    ("contrast", lambda v: v >= 0, lambda v: v <= 10, "in [0, 10] (0: off)"),
    ("validation", lambda v: v >= 0, lambda v: v <= 100_000, "between 0 and 100,000 samples"),
    ("checkpoint_every", lambda v: v >= 0, lambda v: True, ">= 0 (0: no checkpoints)"),
    ("log_every", lambda v: v >= 1, lambda v: True, ">= 1"),
    ("max_length", lambda v: v >= 8, lambda v: v <= 1_000_000, "between 8 and 1,000,000 tokens"),
    ("seed", lambda v: v >= 0, lambda v: v < 2**63, "between 0 and 2**63 - 1"),
)  # fmt: skip


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid number in a settings file")


def _checked_type(name: str, value: Any, expected: Any) -> Any:
    """`value` as the field's type (ints accepted for floats), or SkuFastError naming the
    field. Booleans are never numbers and strings are never booleans ("no" is an error)."""
    options = typing.get_args(expected) if typing.get_origin(expected) in (Union, UnionType) else ()
    if options:
        if value is None and type(None) in options:
            return None
        expected = next(t for t in options if t is not type(None))
    if typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_checked_type(name, v, item) for v in value]
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise AssertionError(f"no type check for {name}: {expected}")
