"""The one weighted objective of stage 1. SKU and the gradient-ascent baseline are settings.

Every training row is a (prompt, answer) pair tagged with a term:

- "gd": a harmful prompt with its own answer (SKU: descent, ε1; baseline: ascent, −ε1);
- "rd": a harmful prompt with K random answers, from other harmful samples (SKU, ε2) or from
  the normal set (baseline's L_rand, ε2);
- "pd": a normal pair, KL(h_θo ‖ h_θ) on its answer tokens (SKU as published: −ε3, pushing
  θ_bad away from θ_o; with preservation "keep": +ε3; the baseline: +ε3);
- "sp": a harmful prompt with its *safe* answer, KL(h_θo ‖ h_θ) kept small (+ε4), so that the
  task vector does not move what the model says when it refuses (off unless ε4 > 0).

Each term is a mean: "gd" and "rd" average each sample's mean token cross-entropy, "pd" and
"sp" average the KL over all answer tokens of the batch (prompt and padding never count). With
a KL cap κ the diverging "pd" term maximises min(KL, κ) per token: no gradient beyond κ, so it
cannot run away. The term values come from the fused token-loss ops as per-row weighted sums,
then total = Σ coefficient·term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from sku_fast.ops import fused_linear_token_loss, token_loss
from sku_fast.unlearn.tokens import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover
    from sku_fast.unlearn.config import UnlearnConfig

TERMS = ("gd", "rd", "pd", "sp")
DIVERGENCES = ("pd", "sp")  # the KL terms; the others are cross-entropies
# rows per chunk of the fused-linear loss: ~8M logits (32 MB in fp32) per chunk. The op's
# default (chunk logits the size of the hidden states) re-reads the [V, H] output layer about
# V/H times per call, which made a SmolLM2 step ~10x slower on CPU.
CHUNK_LOGITS = 1 << 23
TERM_IDS = {name: index for index, name in enumerate(TERMS)}


@dataclass(frozen=True)
class Objective:
    """Coefficients of the terms (0 switches a term off), where random answers of the "rd"
    rows come from ("harmful" or "normal"), and the per-token cap κ of a diverging "pd"
    term (None: uncapped, as published)."""

    gd: float
    rd: float
    pd: float
    sp: float = 0.0
    k: int = 1
    random_source: str = "harmful"
    kl_cap: float | None = None

    def active(self, term: str) -> bool:
        return getattr(self, term) != 0.0

    def cap(self, term: str) -> float | None:
        """κ for a term that maximises a KL (negative coefficient), else None."""
        return self.kl_cap if term == "pd" and self.pd < 0 else None


def objective_for(config: UnlearnConfig) -> Objective:
    """SKU or the gradient-ascent baseline from a resolved config, ablations applied."""
    e1, e2, e3 = config.epsilon
    if config.method == "sku":
        pd = -e3 if config.preservation == "diverge" else e3
        gd, rd, source = e1, e2, "harmful"
    else:  # Yao et al.: ascent on the harm, descent on random normal answers, KL kept close
        gd, rd, pd, source = -e1, e2, e3, "normal"
    return Objective(
        gd=gd if config.guided_distortion else 0.0,
        rd=rd if config.random_disassociation else 0.0,
        pd=pd if config.preservation_divergence else 0.0,
        sp=config.safe_weight,
        k=config.k,
        random_source=source,
        kl_cap=config.kl_cap,
    )


def row_weights(labels: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """Per-token normalisers [B, T-1] for shifted labels [B, T-1] and row terms [B].

    gd: 1 / (tokens of the row · gd rows); rd: 1 / (tokens of the row · rd rows), which
    averages over the K answers (separate rows) and the prompts at once;
    pd, sp: 1 / (answer tokens of the term's rows).
    """

    counted = (labels != IGNORE_INDEX).to(torch.float32)  # [B, T-1]
    per_row = counted.sum(dim=1).clamp_min(1.0)  # [B]
    scale = torch.zeros_like(per_row)
    for name in ("gd", "rd"):
        rows = terms == TERM_IDS[name]
        scale[rows] = 1.0 / (per_row[rows] * rows.sum().clamp_min(1))
    for name in DIVERGENCES:
        rows = terms == TERM_IDS[name]
        scale[rows] = 1.0 / counted[rows].sum().clamp_min(1.0)
    return counted * scale[:, None]


Forward = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


class LossHead(Protocol):
    """How a batch's per-token losses are computed: `weighted_loss` returns Σ weight·loss over
    the counted tokens of the selected rows, where loss is the policy's cross-entropy, or with
    `divergence` the KL(h_θo ‖ h_θ) from the frozen reference, capped at `cap` per token when
    given (no gradient from tokens beyond it)."""

    def weighted_loss(
        self,
        rows: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        divergence: bool,
        cap: float | None = None,
    ) -> torch.Tensor: ...


def _capped(per_token: torch.Tensor, weights: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Σ weight·min(KL, κ): clamp passes no gradient to a token beyond the cap."""
    return (weights * (per_token if cap is None else per_token.clamp(max=cap))).sum()


def term_values(
    batch: dict[str, torch.Tensor], objective: Objective, head: LossHead
) -> dict[str, torch.Tensor]:
    """Each active term's value (a scalar) on one micro-batch.

    batch: input_ids, attention_mask, labels [B, T] (unshifted) and term [B].
    """
    labels, terms = batch["labels"][:, 1:], batch["term"]  # [B, T-1], [B]
    weights = row_weights(labels, terms)
    values: dict[str, torch.Tensor] = {}
    for name in TERMS:
        rows = terms == TERM_IDS[name]
        if objective.active(name) and bool(rows.any()):
            values[name] = head.weighted_loss(
                rows, labels, weights, divergence=name in DIVERGENCES, cap=objective.cap(name)
            )
    return values


@dataclass
class HiddenStatesHead:
    """The fused-linear loss on the last hidden states: the N × V logits are never formed.

    policy / reference: (input_ids, attention_mask) -> last hidden states [B, T, H];
    policy_head / reference_head: the output-layer weight [V, H].
    """

    batch: dict[str, torch.Tensor]
    policy: Forward
    policy_head: torch.Tensor
    reference: Forward
    reference_head: torch.Tensor

    def __post_init__(self) -> None:
        ids, mask = self.batch["input_ids"], self.batch["attention_mask"]
        self.hidden = self.policy(ids, mask)[:, :-1]  # [B, T-1, H]
        self.chunk_rows = max(1, CHUNK_LOGITS // self.policy_head.shape[0])

    def weighted_loss(self, rows, labels, weights, divergence, cap=None):
        counted = labels[rows] != IGNORE_INDEX  # [R, T-1]
        token_weights = weights[rows][counted]
        reference = None
        if divergence:
            ids, mask = self.batch["input_ids"][rows], self.batch["attention_mask"][rows]
            with torch.no_grad():
                reference = self.reference(ids, mask)[:, :-1][counted]
        capped = cap is not None
        loss = fused_linear_token_loss(
            self.hidden[rows][counted],
            self.policy_head,
            labels[rows][counted],
            reference,
            self.reference_head if divergence else None,
            ce_weight=0.0 if divergence else token_weights,
            kl_weight=(1.0 if capped else token_weights) if divergence else 0.0,
            ignore_index=IGNORE_INDEX,
            reduction="none" if capped else "sum",
            chunk_rows=self.chunk_rows,
        )
        return _capped(loss, token_weights, cap) if capped else loss


@dataclass
class LogitsHead:
    """The losses on full logits [B, T, V]. backend "fused": the fused token-loss op;
    "torch": the published code's way, log-softmax of the model and softmax and log of the
    reference in PyTorch (its masking defects fixed), kept as the benchmark baseline."""

    batch: dict[str, torch.Tensor]
    policy: Forward
    reference: Forward
    backend: str = "fused"

    def __post_init__(self) -> None:
        ids, mask = self.batch["input_ids"], self.batch["attention_mask"]
        self.logits = self.policy(ids, mask)[:, :-1]  # [B, T-1, V]

    def weighted_loss(self, rows, labels, weights, divergence, cap=None):
        logits, labels, weights = self.logits[rows], labels[rows], weights[rows]
        reference = None
        if divergence:
            ids, mask = self.batch["input_ids"][rows], self.batch["attention_mask"][rows]
            with torch.no_grad():
                reference = self.reference(ids, mask)[:, :-1]  # [R, T-1, V]
        if self.backend == "fused":
            capped = divergence and cap is not None
            loss = token_loss(
                logits.flatten(0, 1),
                labels.flatten(),
                None if reference is None else reference.flatten(0, 1),
                ce_weight=0.0 if divergence else weights.flatten(),
                kl_weight=(1.0 if capped else weights.flatten()) if divergence else 0.0,
                ignore_index=IGNORE_INDEX,
                reduction="none" if capped else "sum",
            )
            return _capped(loss, weights.flatten(), cap) if capped else loss
        counted = (labels != IGNORE_INDEX).to(weights.dtype)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if reference is None:
            picked = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
            return -(picked * weights * counted).sum()
        q = torch.softmax(reference.float(), dim=-1)
        kl_tok = (q * (torch.log(q.clamp_min(1e-30)) - logp)).sum(-1)  # [R, T-1]
        return _capped(kl_tok, weights * counted, cap)


def combine(values: dict[str, torch.Tensor], objective: Objective) -> torch.Tensor:
    """Σ coefficient · term over the active terms present in `values`."""
    return sum(getattr(objective, name) * value for name, value in values.items())
