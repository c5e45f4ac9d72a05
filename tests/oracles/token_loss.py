"""Test oracles of the token-loss ops: the straightforward formulas (log-softmax of both
models, ``p' · (log p' − log p)``), in fp64 for the "truth" and in the input dtype for the
tolerance of the three-way tests. They hold several N × V tensors and are differentiated by
autograd.
"""

import torch
import torch.nn.functional as F


def token_loss_naive(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    *,
    ce_weight: float | torch.Tensor = 1.0,
    kl_weight: float | torch.Tensor = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Oracle: ``a·CE(z, y) + b·KL(softmax(z') ‖ softmax(z))`` per row, computed in the dtype
    of ``logits`` with textbook formulas. logits, ref_logits: [..., V]; labels: [...]."""
    v = logits.shape[-1]
    z = logits.reshape(-1, v)  # [N, V]
    y = labels.reshape(-1)  # [N]
    valid = y != ignore_index
    logp = torch.log_softmax(z, dim=-1)
    ce = -logp.gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    a = torch.as_tensor(ce_weight, dtype=z.dtype).expand(labels.shape).reshape(-1)
    b = torch.as_tensor(kl_weight, dtype=z.dtype).expand(labels.shape).reshape(-1)
    rows = torch.where(a != 0, a * ce, 0)
    if ref_logits is not None:
        logq = torch.log_softmax(ref_logits.reshape(-1, v).to(z.dtype), dim=-1)
        # xlogy-style guard: p' = 0 contributes 0 even where log p' = -inf
        kl = torch.where(logq > -torch.inf, logq.exp() * (logq - logp), 0).sum(-1)
        rows = rows + torch.where(b != 0, b * kl, 0)
    rows = torch.where(valid, rows, 0)
    if reduction == "none":
        return rows.reshape(labels.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp_min(1)


def fused_linear_token_loss_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    **loss_options,
) -> torch.Tensor:
    """Oracle for ``fused_linear_token_loss``: materialises the logits, then token_loss_naive."""
    logits = F.linear(hidden, weight, bias)
    ref_logits = None
    if ref_hidden is not None:
        w = weight if ref_weight is None else ref_weight
        ref_logits = F.linear(ref_hidden, w, bias if ref_weight is None else ref_bias).detach()
    return token_loss_naive(logits, labels, ref_logits, **loss_options)
