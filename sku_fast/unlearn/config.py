"""The settings of one unlearning run, loadable from a JSON or YAML file and saved resolved
into the run's output folder so that the run can be repeated from its own folder."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sku_fast.errors import SkuFastError

METHODS = ("sku", "ga")
LOSS_BACKENDS = ("fused-linear", "fused", "torch")
# ε (guided distortion / harmful CE, random answers, preservation KL) per method
DEFAULT_EPSILON = {"sku": (2.5, 2.5, 1.0), "ga": (0.5, 1.0, 1.0)}
DEFAULT_LR = {"sku": 2e-4, "ga": 2e-6}


@dataclass
class UnlearnConfig:
    """Everything `run_unlearn` needs. `None` fields take the method's default on `resolve()`.

    model: a Hugging Face model directory or .gguf file; None = embedded SmolLM2-135M-Instruct.
    harmful / normal: data files (see sku_fast.unlearn.data); None = the packaged demo sets.
    method: "sku" (stage 1 then negation) or "ga" (the gradient-ascent baseline, no negation).
    lora: train a LoRA adapter (reference = same network, adapter off) or the full model.
    steps: optimizer steps, exactly; batch_size samples per micro-batch of each set;
        grad_accum micro-batches per step.
    lam: λ of the negation θ_o − λ·τ.
    k: random answers per harmful prompt (random disassociation).
    epsilon: weights of the three terms; None = (2.5, 2.5, 1) for sku, (0.5, 1, 1) for ga.
    guided_distortion / random_disassociation / preservation_divergence: ablation switches.
    loss_backend: "fused-linear" (never materialises logits), "fused" (fused op on logits) or
        "torch" (softmax and log of both models in PyTorch, as the published code does).
    checkpoint_every: save a resumable checkpoint every N steps (0: never); resume: continue
        from the newest checkpoint in `out`.
    """

    model: str | None = None
    harmful: str | None = None
    normal: str | None = None
    harmful_prompt_column: str | None = None
    harmful_answer_column: str | None = None
    normal_prompt_column: str | None = None
    normal_answer_column: str | None = None
    method: str = "sku"
    lora: bool = True
    lora_r: int = 32
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    steps: int = 1000
    lam: float = 1.0
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
    loss_backend: str = "fused-linear"
    checkpoint_every: int = 0
    resume: bool = False
    log_every: int = 1
    dtype: str = "float32"
    overwrite: bool = False

    def resolve(self) -> UnlearnConfig:
        """A copy with method defaults filled in and every value checked."""
        resolved = dataclasses.replace(self)
        if resolved.method not in METHODS:
            raise SkuFastError(f"method must be one of {METHODS}, got {resolved.method!r}")
        if resolved.loss_backend not in LOSS_BACKENDS:
            raise SkuFastError(
                f"loss_backend must be one of {LOSS_BACKENDS}, got {resolved.loss_backend!r}"
            )
        if resolved.epsilon is None:
            resolved.epsilon = list(DEFAULT_EPSILON[resolved.method])
        if resolved.lr is None:
            resolved.lr = DEFAULT_LR[resolved.method]
        if len(resolved.epsilon) != 3:
            raise SkuFastError(f"epsilon needs 3 weights, got {len(resolved.epsilon)}")
        resolved.epsilon = [float(e) for e in resolved.epsilon]
        for name in ("steps", "batch_size", "grad_accum", "k", "lora_r", "lora_alpha"):
            if getattr(resolved, name) < 1:
                raise SkuFastError(f"{name} must be at least 1, got {getattr(resolved, name)}")
        for name in ("checkpoint_every", "warmup_steps", "log_every", "max_grad_norm"):
            if getattr(resolved, name) < 0:
                raise SkuFastError(f"{name} must be >= 0, got {getattr(resolved, name)}")
        if resolved.max_length < 8:
            raise SkuFastError(f"max_length must be at least 8 tokens, got {resolved.max_length}")
        for name in ("lam", "lr"):
            if not math.isfinite(getattr(resolved, name)):
                raise SkuFastError(f"{name} must be finite, got {getattr(resolved, name)}")
        if not resolved.lr > 0:
            raise SkuFastError(f"lr must be positive, got {resolved.lr}")
        if not (resolved.guided_distortion or resolved.random_disassociation):
            raise SkuFastError(
                "switching off both guided_distortion and random_disassociation leaves no "
                "harmful term to train on"
            )
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UnlearnConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        aliases = {"lambda": "lam", "K": "k"}
        values = {aliases.get(key, key): value for key, value in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SkuFastError(
                f"unknown config keys {', '.join(unknown)}; "
                f"known keys are {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> UnlearnConfig:
        """Read a JSON (.json) or YAML (.yaml/.yml) mapping of field names to values."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise SkuFastError(f"config file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as error:
                raise SkuFastError(
                    "reading a YAML config needs PyYAML (pip install pyyaml)"
                ) from error
            values = yaml.safe_load(text)
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as error:
                raise SkuFastError(f"config file {path}: invalid JSON ({error})") from error
        if not isinstance(values, dict):
            raise SkuFastError(
                f"config file {path} must hold a mapping, not {type(values).__name__}"
            )
        return cls.from_dict(values)
