"""Triton kernel for the fused token loss of docs/design.md §3, one program per row:

    loss_r = a_r · CE(z, y) + b_r · KL(softmax(z') ‖ softmax(z))
    grad_r = a_r · (p − onehot(y)) + b_r · (p − p')

Forward and backward are one kernel with two passes over the row (the structure of
Liger-Kernel's and flash-attention's cross-entropy kernels, which also write the gradient in
the forward pass): pass 1 runs an online log-sum-exp over z and z' and accumulates
Σ p·expm1(z' − z) for the KL's difference form; pass 2 writes the gradient and sums the KL.
The backward of autograd only scales the saved gradient (in ``sku_fast.ops.token_loss``),
so there is no separate backward kernel.

Numerics (fp32 whatever the input dtype): with d = z' − z and log Z = log1p(Σ p·expm1(d)),
u = d − log Z = log p' − log p, the KL gradient is −p·expm1(u) and the KL term is
p·(u·eᵘ − expm1(u)), both free of the cancellation that p − p' suffers when p ≈ p'. Where |u|
is large, p or p' may underflow or a logit be −inf, and the direct forms p − p' and
p'·u − p' + p are exact enough and finite. expm1, log1p and u·eᵘ − expm1(u) are short
polynomials near 0 so that no libdevice call is needed (and the interpreter runs them).
"""

import torch
import triton
import triton.language as tl
from sku_fast.kernels.config import row_block_config

# Finite start for running maxima, so exp(m_old − m_new) never sees −inf − −inf. Compiled
# Triton reads only globals instantiated as tl.constexpr.
_NEG_BIG = tl.constexpr(-3.0e38)


@triton.jit
def _expm1(x):
    # Horner series to x⁹ for |x| < 1/2 (relative error < 1e-9), exp(x) − 1 beyond it.
    series = x * (
        1.0
        + x
        * (
            0.5
            + x
            * (
                1.0 / 6
                + x
                * (
                    1.0 / 24
                    + x
                    * (
                        1.0 / 120
                        + x * (1.0 / 720 + x * (1.0 / 5040 + x * (1.0 / 40320 + x / 362880)))
                    )
                )
            )
        )
    )
    return tl.where(tl.abs(x) < 0.5, series, tl.exp(x) - 1.0)


@triton.jit
def _log1p(x):
    # 2·atanh(s), s = x / (2 + x), to s⁹ for |x| < 0.1; log(1 + x) beyond it.
    s = x / (2.0 + x)
    s2 = s * s
    series = 2.0 * s * (1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 / 9))))
    return tl.where(tl.abs(x) < 0.1, series, tl.log(1.0 + x))


@triton.jit
def _kl_excess(u):
    # u·eᵘ − expm1(u) = Σ_{k≥2} (k−1)/k!·uᵏ: series for |u| < 1/2, closed form beyond.
    series = (
        u
        * u
        * (
            0.5
            + u
            * (
                1.0 / 3
                + u
                * (
                    1.0 / 8
                    + u
                    * (1.0 / 30 + u * (1.0 / 144 + u * (1.0 / 840 + u * (1.0 / 5760 + u / 45360))))
                )
            )
        )
    )
    return tl.where(tl.abs(u) < 0.5, series, u * tl.exp(u) - _expm1(u))


@triton.jit
def _token_loss_kernel(
    logits_ptr,  # [N, V] any float dtype, unit column stride
    logits_stride,
    ref_ptr,  # [N, V] reference logits (read only when HAS_REF)
    ref_stride,
    labels_ptr,  # [N] int
    ce_weight_ptr,  # [N] fp32, reduction scale folded in
    kl_weight_ptr,  # [N] fp32
    loss_ptr,  # [N] fp32 out
    grad_ptr,  # [N, V] out (may alias logits_ptr), written when HAS_GRAD
    grad_stride,
    n_cols,
    ignore_index,
    HAS_REF: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride
    y = tl.load(labels_ptr + row).to(tl.int64)
    a = tl.load(ce_weight_ptr + row)
    b = tl.load(kl_weight_ptr + row)
    offs = tl.arange(0, BLOCK_V)

    if (y == ignore_index) | ((a == 0.0) & (b == 0.0)):
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < n_cols)
        return

    kl_on = b != 0.0
    r_row = ref_ptr + row * ref_stride
    # rows without KL weight read no reference logits: their load mask is empty
    ref_cols = tl.where(kl_on, n_cols, 0)

    # Pass 1: running max m and Σ exp(z − m) for z; the same for z'; Σ (e^{z'−c} − e^{z−c})
    # with c = max(m, m') for the difference form; the target logit.
    m = _NEG_BIG
    s = 0.0
    m_r = _NEG_BIG
    s_r = 0.0
    s_d = 0.0
    z_y = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        z_y += tl.sum(tl.where(cols == y, z, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        e_z = tl.exp(z - m_new)
        s = s * tl.exp(m - m_new) + tl.sum(e_z, axis=0)
        if HAS_REF:
            zr = tl.load(r_row + cols, mask=cols < ref_cols, other=-float("inf")).to(tl.float32)
            mr_new = tl.maximum(m_r, tl.max(zr, axis=0))
            e_r = tl.exp(zr - mr_new)
            s_r = s_r * tl.exp(m_r - mr_new) + tl.sum(e_r, axis=0)
            c_old = tl.maximum(m, m_r)
            c_new = tl.maximum(m_new, mr_new)
            e = e_z * tl.exp(m_new - c_new)  # e^{z − c}
            d = zr - z
            # e·expm1(d) is exact for near-equal logits; e^{z'−c} − e is, and is finite, where
            # e underflows, d is large or both logits are −inf (d = NaN fails d <= 1).
            t = tl.where((e > 0.0) & (d <= 1.0), e * _expm1(d), e_r * tl.exp(mr_new - c_new) - e)
            s_d = s_d * tl.exp(c_old - c_new) + tl.sum(t, axis=0)
            m_r = mr_new
        m = m_new

    lse = m + tl.log(s)
    loss = tl.where(a != 0.0, a * (lse - z_y), 0.0)
    if HAS_REF:
        lse_r = m_r + tl.log(s_r)
        log_z_diff = lse_r - lse
        # Σ p·expm1(d) = s_d·e^{c−m}/s; |log Z| < 1 bounds c − m, so the exp cannot overflow
        ratio = s_d * tl.exp(tl.minimum(tl.maximum(m, m_r) - m, 80.0)) / s
        log_z = tl.where(tl.abs(log_z_diff) < 1.0, _log1p(ratio), log_z_diff)

    # Pass 2: gradient and the KL sum.
    kl = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        p = tl.exp(z - lse)
        grad = a * p - tl.where(cols == y, a, 0.0)
        if HAS_REF:
            zr = tl.load(r_row + cols, mask=cols < ref_cols, other=-float("inf")).to(tl.float32)
            u = zr - z - log_z  # log p' − log p
            q = tl.exp(zr - lse_r)  # p'
            near = tl.abs(u) <= 1.0  # False for NaN (both logits −inf or padding)
            g_kl = tl.where(near, -p * _expm1(u), p - q)
            far = tl.where(q > 0.0, q * u, 0.0) - q + p
            kl += tl.sum(tl.where(mask, tl.where(near, p * _kl_excess(u), far), 0.0), axis=0)
            grad += tl.where(kl_on, b * g_kl, 0.0)
        if HAS_GRAD:
            tl.store(g_row + cols, grad, mask=mask)
    if HAS_REF:
        loss += tl.where(kl_on, b * kl, 0.0)
    tl.store(loss_ptr + row, loss)


def token_loss_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None,
    ce_weight: torch.Tensor,
    kl_weight: torch.Tensor,
    ignore_index: int,
    grad_out: torch.Tensor | None,
    loss_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row losses [N] fp32 of logits [N, V] (any row stride, unit column stride); writes
    the gradient into grad_out [N, V] when given (it may be ``logits`` itself: each block is
    read before it is overwritten). labels, ce_weight, kl_weight: [N]; weights fp32. The
    losses go into loss_out [N] fp32 when given."""
    n, v = logits.shape
    assert logits.stride(1) == 1, "vocabulary dim must be contiguous"
    assert ref_logits is None or (ref_logits.shape == logits.shape and ref_logits.stride(1) == 1)
    assert grad_out is None or (grad_out.shape == logits.shape and grad_out.stride(1) == 1)
    loss = (
        torch.empty(n, dtype=torch.float32, device=logits.device) if loss_out is None else loss_out
    )
    if n == 0:
        return loss
    block, num_warps = row_block_config(v)
    ref = logits if ref_logits is None else ref_logits
    grad = logits if grad_out is None else grad_out
    _token_loss_kernel[(n,)](
        logits_ptr=logits,
        logits_stride=logits.stride(0),
        ref_ptr=ref,
        ref_stride=ref.stride(0),
        labels_ptr=labels.contiguous(),
        ce_weight_ptr=ce_weight.contiguous(),
        kl_weight_ptr=kl_weight.contiguous(),
        loss_ptr=loss,
        grad_ptr=grad,
        grad_stride=grad.stride(0),
        n_cols=v,
        ignore_index=ignore_index,
        HAS_REF=ref_logits is not None,
        HAS_GRAD=grad_out is not None,
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return loss
