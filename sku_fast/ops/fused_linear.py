"""The fused-linear token loss: ``token_loss(hidden @ weight.T + bias, labels, ...)`` without
ever holding the N × V logits. Rows are processed in chunks; each chunk's logits become its
gradient in place, which then flows to the hidden states and the output layer."""

from dataclasses import replace

import torch
import torch.nn.functional as F

from sku_fast.ops.rows import (
    CPU_CHUNK_ELEMENTS,
    LINEAR_MIN_CHUNK,
    TokenLossOptions,
    check_common,
    reduced_weights,
    resolve_backend,
    row_losses,
)


def _linear_pass(opts, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, a, b):
    """One pass over row chunks of hidden [N, H]: per-row losses [N] and, when
    opts.needs_grad, grad_hidden [N, H], grad_weight [V, H] fp32 and grad_bias [V] fp32.
    Only a chunk of logits [C, V] (and its reference) is alive at a time; the gradient of the
    chunk overwrites its logits."""
    n = hidden.shape[0]
    rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = grad_w = grad_b = None
    if opts.needs_grad:
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if bias is not None:
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    v = weight.shape[0]
    inner = replace(opts, inplace=True, chunk_rows=max(1, CPU_CHUNK_ELEMENTS // v))
    for start in range(0, n, opts.chunk_rows):
        stop = min(start + opts.chunk_rows, n)
        h = hidden[start:stop]  # [C, H]
        z = F.linear(h, weight, bias)  # [C, V]
        zr = None
        if ref_hidden is not None:
            zr = F.linear(ref_hidden[start:stop], ref_weight, ref_bias)
        g = z if opts.needs_grad else None
        rows[start:stop] = row_losses(
            inner, z, labels[start:stop], zr, a[start:stop], b[start:stop], g
        )
        if g is None:
            continue
        grad_h[start:stop] = g @ weight
        # fp32 accumulation across chunks; within a chunk the matmul accumulates in fp32 too
        if g.dtype == torch.float32:
            grad_w.addmm_(g.t(), h)
        else:
            grad_w.add_(g.t() @ h)  # cast on the fly: no fp32 [V, H] temporary
        if grad_b is not None:
            grad_b += g.float().sum(0)
    return rows, grad_h, grad_w, grad_b


class _FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, a, b, opts):
        per_row = opts.reduction == "none"
        ctx.per_row = per_row
        ctx.opts = opts
        if per_row:
            # Σ_r g_r·h_rᵀ cannot be rescaled per row afterwards: backward recomputes the pass
            # with the upstream gradient folded into the row weights.
            rows, *_ = _linear_pass(
                replace(opts, needs_grad=False), hidden, weight, bias, labels, ref_hidden,
                ref_weight, ref_bias, a, b,
            )  # fmt: skip
            ctx.save_for_backward(
                hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, a, b
            )
            return rows
        rows, grad_h, grad_w, grad_b = _linear_pass(
            opts, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, a, b
        )
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
            grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return rows.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.per_row:
            hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, a, b = ctx.saved_tensors
            _, grad_h, grad_w, grad_b = _linear_pass(
                replace(ctx.opts, needs_grad=True), hidden, weight, bias, labels, ref_hidden,
                ref_weight, ref_bias, a * grad_output, b * grad_output,
            )  # fmt: skip
            grad_w = grad_w.to(weight.dtype)
            grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        else:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            grad_h, grad_w = grad_h.mul_(grad_output), grad_w.mul_(grad_output)
            grad_b = None if grad_b is None else grad_b.mul_(grad_output)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def fused_linear_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    *,
    ce_weight: float | torch.Tensor = 1.0,
    kl_weight: float | torch.Tensor = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``token_loss(hidden @ weight.T + bias, labels, ref_hidden @ ref_weight.T + ref_bias)``
    without ever holding the N × V logits: rows are processed in chunks.

    Args:
        hidden: [..., H] hidden states of the trained model (gets a gradient).
        weight: [V, H] output layer (gets a gradient, accumulated in fp32 across chunks).
        labels: [...] as in ``token_loss``.
        ref_hidden: [..., H] hidden states of the frozen reference model (detached).
        ref_weight: [V, H] reference output layer (detached); defaults to ``weight`` (LoRA
            models share it). ref_bias likewise defaults to ``bias`` when ref_weight is None.
        bias: [V] optional output bias (gets a gradient).
        chunk_rows: rows per chunk; default makes a chunk of logits about the size of hidden,
            and at least 4M logits (each chunk reads and writes the fp32 weight gradient).
        Other arguments as in ``token_loss``.

    Returns:
        float32 scalar, or [...] for reduction="none" (its backward recomputes the chunks).
    """
    check_common(hidden, labels, reduction)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got "
            f"{tuple(weight.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden shape without the hidden "
            f"dim {tuple(hidden.shape[:-1])}"
        )
    if ref_hidden is None and (isinstance(kl_weight, torch.Tensor) or kl_weight != 0):
        raise ValueError("kl_weight is set but ref_hidden is None: the KL needs reference states")
    if ref_hidden is not None and tuple(ref_hidden.shape) != tuple(hidden.shape):
        raise ValueError(
            f"ref_hidden shape {tuple(ref_hidden.shape)} must equal hidden shape "
            f"{tuple(hidden.shape)}"
        )
    v, h_dim = weight.shape
    h2 = hidden.reshape(-1, h_dim)
    n = h2.shape[0]
    rh = rw = rb = None
    if ref_hidden is not None:
        rh = ref_hidden.detach().reshape(-1, h_dim)
        rw, rb = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
        rw = rw.detach()
        rb = None if rb is None else rb.detach()
    y, a, b = reduced_weights(labels, ce_weight, kl_weight, ignore_index, reduction)
    if chunk_rows is None:
        chunk_rows = max(-(-n // max(1, -(-v // h_dim))), -(-LINEAR_MIN_CHUNK // v))
    opts = TokenLossOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        backend=resolve_backend(backend, hidden),
        chunk_rows=chunk_rows,
        needs_grad=torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (hidden, weight, bias)),
    )
    out = _FusedLinearFunction.apply(h2, weight, bias, y, rh, rw, rb, a, b, opts)
    return out.view(labels.shape) if reduction == "none" else out
