"""Plain-PyTorch versions of the token-loss ops.

Two kinds live here (DESIGN §2):

- ``token_loss_naive`` and ``fused_linear_token_loss_naive``: the straightforward formulas
  (log-softmax of both models, ``p' · (log p' − log p)``) used as test oracles, in fp64 for the
  "truth" and in the input dtype for the tolerance of DESIGN §4 rule 7. They hold several N × V
  tensors and are differentiated by autograd.
- ``token_loss_rows_chunked``: the CPU backend of ``sku_fast.ops``. Same contract as the Triton
  launcher in ``sku_fast.kernels.token_loss``: per-row losses, and the gradient written into a
  caller-given buffer, computed a chunk of rows at a time so no more than one chunk of fp32
  softmax is alive. It uses the difference form of DESIGN §3.2 for the KL.
"""

import torch
import torch.nn.functional as F

# Above this |u| the difference form has no cancellation to avoid, and below it expm1/exp are
# finite for every representable p, so the two branches below meet where both are exact.
_U_DIRECT = 1.0
# |log Z| below which log1p(Σ p·expm1(d)) is used; beyond it lse' − lse is already accurate.
_LOGZ_DIRECT = 1.0


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


def _kl_excess(u: torch.Tensor) -> torch.Tensor:
    """u·eᵘ − expm1(u) = Σ_{k≥2} (k−1)/k!·uᵏ without cancellation: a Horner series for
    |u| < 1/2 (nine terms reach fp32 precision there), the closed form beyond."""
    series = (
        u
        * u
        * (
            1 / 2
            + u
            * (
                1 / 3
                + u
                * (
                    1 / 8
                    + u
                    * (1 / 30 + u * (1 / 144 + u * (1 / 840 + u * (1 / 5760 + u * (1 / 45360)))))
                )
            )
        )
    )
    return torch.where(u.abs() < 0.5, series, u * torch.exp(u) - torch.expm1(u))


def _chunk_rows(
    z: torch.Tensor,  # [C, V] fp32
    y: torch.Tensor,  # [C]
    zr: torch.Tensor | None,  # [C, V] fp32
    a: torch.Tensor,  # [C] fp32
    b: torch.Tensor,  # [C] fp32
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [C] and gradient [C, V] (fp32) of one chunk; rows with an ignored label
    give 0 and a zero gradient."""
    valid = y != ignore_index
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [C, 1]
    p = torch.exp(z - lse)
    target = torch.where(valid, y, 0)[:, None]
    ce = lse[:, 0] - z.gather(1, target)[:, 0]
    grad = a[:, None] * p
    grad.scatter_add_(1, target, -a[:, None])
    rows = torch.where(a != 0, a * ce, 0)
    if zr is not None:
        lse_r = torch.logsumexp(zr, dim=-1, keepdim=True)
        d = zr - z
        # Σ p·expm1(d) = Z − 1 term by term; where p underflows or d is large (or inf − inf),
        # the direct e^{z'−lse} − p has no cancellation. The clamp only matters for |log Z| > 1.
        direct = torch.exp((zr - lse).clamp_max(60.0)) - p
        terms = torch.where((p > 0) & (d <= 1), p * torch.expm1(d), direct)
        log_z_diff = lse_r - lse
        log_z = torch.where(
            log_z_diff.abs() < _LOGZ_DIRECT, torch.log1p(terms.sum(-1, keepdim=True)), log_z_diff
        )
        u = d - log_z  # log p' − log p
        q = torch.exp(zr - lse_r)  # p'
        near = u.abs() <= _U_DIRECT  # False for NaN (both logits −inf)
        g_kl = torch.where(near, -p * torch.expm1(u), p - q)
        far = torch.where(q > 0, q * u, 0) - q + p
        kl = torch.where(near, p * _kl_excess(u), far).sum(-1)
        grad += torch.where(b[:, None] != 0, b[:, None] * g_kl, 0)
        rows = rows + torch.where(b != 0, b * kl, 0)
    grad = torch.where(valid[:, None], grad, 0)
    return torch.where(valid, rows, 0), grad


def token_loss_rows_chunked(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None,
    ce_weight: torch.Tensor,
    kl_weight: torch.Tensor,
    ignore_index: int,
    grad_out: torch.Tensor | None,
    chunk_rows: int,
    loss_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """CPU backend. logits, ref_logits: [N, V] (any row stride); labels, ce_weight, kl_weight:
    [N] (weights fp32, already scaled by the reduction). Returns the per-row losses [N] fp32;
    writes the gradient into ``grad_out`` [N, V] when given (it may be ``logits`` itself: each
    chunk is read before it is overwritten). The losses go into loss_out [N] fp32 when given."""
    n = logits.shape[0]
    rows = (
        torch.empty(n, dtype=torch.float32, device=logits.device) if loss_out is None else loss_out
    )
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        zr = None if ref_logits is None else ref_logits[start:stop].float()
        loss, grad = _chunk_rows(
            logits[start:stop].float(),
            labels[start:stop],
            zr,
            ce_weight[start:stop],
            kl_weight[start:stop],
            ignore_index,
        )
        rows[start:stop] = loss
        if grad_out is not None:
            grad_out[start:stop] = grad
    return rows
