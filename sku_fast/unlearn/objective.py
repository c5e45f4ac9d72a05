"""The one weighted objective of stage 1. SKU and the gradient-ascent baseline are settings.

Every training row is a (prompt, answer) pair tagged with a term:

- "gd": a harmful prompt with its own answer (SKU: descent, ε1; baseline: ascent, −ε1);
- "rd": a harmful prompt with K random answers, from other harmful samples (SKU, ε2) or from
  the normal set (baseline's L_rand, ε2);
- "pd": a normal pair, KL(h_θo ‖ h_θ) on its answer tokens (SKU: −ε3, baseline: +ε3).

Each term is a mean: "gd" and "rd" average each sample's mean token cross-entropy, "pd" averages
the KL over all answer tokens of the batch (prompt and padding never count). The term values
come from the fused token-loss ops as per-row weighted sums, then total = Σ coefficient·term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sku_fast.unlearn.tokens import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sku_fast.unlearn.config import UnlearnConfig

TERMS = ("gd", "rd", "pd")
# rows per chunk of the fused-linear loss: ~8M logits (32 MB in fp32) per chunk. The op's
# default (chunk logits the size of the hidden states) re-reads the [V, H] output layer about
# V/H times per call, which made a SmolLM2 step ~10x slower on CPU.
CHUNK_LOGITS = 1 << 23
TERM_IDS = {name: index for index, name in enumerate(TERMS)}


@dataclass(frozen=True)
class Objective:
    """Coefficients of the three terms (0 switches a term off) and where random answers of the
    "rd" rows come from ("harmful" or "normal")."""

    gd: float
    rd: float
    pd: float
    k: int = 1
    random_source: str = "harmful"

    def active(self, term: str) -> bool:
        return getattr(self, term) != 0.0


def objective_for(config: UnlearnConfig) -> Objective:
    """SKU or the gradient-ascent baseline from a resolved config, ablations applied."""
    e1, e2, e3 = config.epsilon
    if config.method == "sku":
        gd, rd, pd, source = e1, e2, -e3, "harmful"
    else:  # Yao et al.: ascent on the harm, descent on random normal answers, KL kept close
        gd, rd, pd, source = -e1, e2, e3, "normal"
    return Objective(
        gd=gd if config.guided_distortion else 0.0,
        rd=rd if config.random_disassociation else 0.0,
        pd=pd if config.preservation_divergence else 0.0,
        k=config.k,
        random_source=source,
    )


def row_weights(labels: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """Per-token normalisers [B, T-1] for shifted labels [B, T-1] and row terms [B].

    gd: 1 / (tokens of the row · gd rows); rd: 1 / (tokens of the row · rd rows), which
    averages over the K answers (separate rows) and the prompts at once;
    pd: 1 / (pd answer tokens).
    """
    import torch

    counted = (labels != IGNORE_INDEX).to(torch.float32)  # [B, T-1]
    per_row = counted.sum(dim=1).clamp_min(1.0)  # [B]
    scale = torch.zeros_like(per_row)
    for name in ("gd", "rd"):
        rows = terms == TERM_IDS[name]
        scale[rows] = 1.0 / (per_row[rows] * rows.sum().clamp_min(1))
    pd_rows = terms == TERM_IDS["pd"]
    scale[pd_rows] = 1.0 / counted[pd_rows].sum().clamp_min(1.0)
    return counted * scale[:, None]


Hidden = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def term_values(
    batch: dict[str, torch.Tensor],
    objective: Objective,
    *,
    policy_hidden: Hidden,
    policy_head: torch.Tensor,
    reference_hidden: Hidden | None,
    reference_head: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Each active term's value (a scalar) with the fused-linear op: logits are never formed.

    batch: input_ids, attention_mask, labels [B, T] (unshifted) and term [B].
    policy_hidden / reference_hidden: (input_ids, attention_mask) -> last hidden states
        [B, T, H]; *_head: the output-layer weight [V, H].
    """
    import torch

    from sku_fast.ops import fused_linear_token_loss

    labels, terms = batch["labels"][:, 1:], batch["term"]
    weights = row_weights(labels, terms)
    hidden = policy_hidden(batch["input_ids"], batch["attention_mask"])[:, :-1]  # [B, T-1, H]
    chunk_rows = max(1, CHUNK_LOGITS // policy_head.shape[0])
    values: dict[str, torch.Tensor] = {}
    for name in ("gd", "rd"):
        rows = terms == TERM_IDS[name]
        if objective.active(name) and bool(rows.any()):
            counted = rows[:, None] & (labels != IGNORE_INDEX)  # [B, T-1]
            values[name] = fused_linear_token_loss(
                hidden[counted],
                policy_head,
                labels[counted],
                ce_weight=weights[counted],
                kl_weight=0.0,
                ignore_index=IGNORE_INDEX,
                reduction="sum",
                chunk_rows=chunk_rows,
            )
    rows = terms == TERM_IDS["pd"]
    if objective.active("pd") and bool(rows.any()):
        assert reference_hidden is not None and reference_head is not None
        with torch.no_grad():
            ref = reference_hidden(batch["input_ids"][rows], batch["attention_mask"][rows])
        counted = labels[rows] != IGNORE_INDEX  # [P, T-1]
        values["pd"] = fused_linear_token_loss(
            hidden[rows][counted],
            policy_head,
            labels[rows][counted],
            ref[:, :-1][counted],
            reference_head,
            ce_weight=0.0,
            kl_weight=weights[rows][counted],
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            chunk_rows=chunk_rows,
        )
    return values


def term_values_from_logits(
    batch: dict[str, torch.Tensor],
    objective: Objective,
    *,
    policy_logits: Hidden,
    reference_logits: Hidden | None,
    backend: str = "fused",
) -> dict[str, torch.Tensor]:
    """Each active term's value from full logits [B, T, V].

    backend "fused": the fused token-loss op on the logits; "torch": the published code's way,
    log-softmax of the model and softmax and log of the reference in PyTorch (with its masking
    defects fixed), kept as the benchmark baseline.
    """
    import torch

    from sku_fast.ops import token_loss

    labels, terms = batch["labels"][:, 1:], batch["term"]
    weights = row_weights(labels, terms)
    logits = policy_logits(batch["input_ids"], batch["attention_mask"])[:, :-1]  # [B, T-1, V]
    values: dict[str, torch.Tensor] = {}

    def loss(rows, ref):
        # rows of one term: logits [R, T-1, V], labels and weights [R, T-1], ref like logits
        sub_logits, sub_labels, sub_weights = logits[rows], labels[rows], weights[rows]
        if backend == "fused":
            return token_loss(
                sub_logits.flatten(0, 1),
                sub_labels.flatten(),
                None if ref is None else ref.flatten(0, 1),
                ce_weight=sub_weights.flatten() if ref is None else 0.0,
                kl_weight=0.0 if ref is None else sub_weights.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        counted = (sub_labels != IGNORE_INDEX).to(sub_weights.dtype)
        logp = torch.log_softmax(sub_logits.float(), dim=-1)
        if ref is None:
            picked = logp.gather(-1, sub_labels.clamp_min(0)[..., None])[..., 0]
            return -(picked * sub_weights * counted).sum()
        q = torch.softmax(ref.float(), dim=-1)
        kl_tok = (q * (torch.log(q.clamp_min(1e-30)) - logp)).sum(-1)  # [R, T-1]
        return (kl_tok * sub_weights * counted).sum()

    for name in ("gd", "rd"):
        rows = terms == TERM_IDS[name]
        if objective.active(name) and bool(rows.any()):
            values[name] = loss(rows, None)
    rows = terms == TERM_IDS["pd"]
    if objective.active("pd") and bool(rows.any()):
        assert reference_logits is not None
        with torch.no_grad():
            ref = reference_logits(batch["input_ids"][rows], batch["attention_mask"][rows])
        values["pd"] = loss(rows, ref[:, :-1])
    return values


def combine(values: dict[str, torch.Tensor], objective: Objective) -> torch.Tensor:
    """Σ coefficient · term over the active terms present in `values`."""
    return sum(getattr(objective, name) * value for name, value in values.items())
