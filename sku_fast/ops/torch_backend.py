"""The plain-PyTorch backend of the token-loss ops: any device, a chunk of rows at a time.

Same contract as the Triton launcher (`sku_fast.kernels.token_loss.token_loss_rows`) and the
native CPU kernel: per-row losses, and the gradient written into a caller-given buffer. No more
than one chunk of fp32 softmax is alive at a time. The KL uses the difference form of
docs/design.md §3.1, exact where p ≈ p'.
"""

import torch

# Above this |u| the difference form has no cancellation to avoid, and below it expm1/exp are
# finite for every representable p, so the two branches below meet where both are exact.
_U_DIRECT = 1.0
# |log Z| below which log1p(Σ p·expm1(d)) is used; beyond it lse' − lse is already accurate.
_LOGZ_DIRECT = 1.0


def _kl_parts(
    z: torch.Tensor, zr: torch.Tensor, p: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p' ‖ p) per row [C] and its gradient p − p' [C, V] for fp32 logits z, zr [C, V],
    p = softmax(z) and lse = logsumexp(z) [C, 1], in the difference form of docs/design.md
    §3.1."""
    lse_r = torch.logsumexp(zr, dim=-1, keepdim=True)
    # d = z' − z; where both logits are −inf neither model has mass: d = 0 keeps it out
    d = torch.sub(zr, z).nan_to_num_(nan=0.0)
    # Σ p·expm1(d) = Z − 1 without cancellation. It is inf/NaN only where some d is huge or
    # p = 0 meets d = inf; such rows, and rows with |log Z| ≥ 1, take lse' − lse, which is
    # then accurate enough.
    s = (p * torch.expm1(d)).sum(-1, keepdim=True)
    log_z_diff = lse_r - lse
    exact = torch.isfinite(s) & (log_z_diff.abs() < _LOGZ_DIRECT)
    log_z = torch.where(exact, torch.log1p(s), log_z_diff)
    u = d.sub_(log_z)  # log p' − log p
    q = torch.sub(zr, lse_r).exp_()  # p'
    near = u.abs() <= _U_DIRECT  # False at ±inf: one model rules the token out
    grad = torch.where(near, torch.expm1(u).mul_(p).neg_(), p - q)
    # u·eᵘ − expm1(u) ≥ 0 cancels like u²/2; fp64 keeps 1e-16/|u| of it (a 1e-8 gap in the
    # logits still gives 8 digits). Far from 0: p'·u − p' + p, finite when p or p' is 0.
    ud = u.double()
    excess = (ud * ud.exp()).sub_(ud.expm1()).mul_(p)
    far = torch.where(q > 0, q * u, 0).sub_(q).add_(p)
    kl = torch.where(near, excess, far).sum(-1)
    return kl.float(), grad


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
    p = torch.sub(z, lse).exp_()
    target = torch.where(valid, y, 0)[:, None]
    rows = torch.where(a != 0, a * (lse[:, 0] - z.gather(1, target)[:, 0]), 0)
    if zr is None:
        grad = p.mul_(a[:, None])
    else:
        kl, grad = _kl_parts(z, zr, p, lse)
        rows = rows + torch.where(b != 0, b * kl, 0)
        grad = grad.mul_(b[:, None]).add_(p.mul_(a[:, None]))
    grad.scatter_add_(1, target, -a[:, None])
    grad.masked_fill_(~valid[:, None], 0.0)
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
