"""The fused-linear token loss: ``token_loss(hidden @ weight.T + bias, labels, ...)`` without
ever holding the N × V logits. The output layer gets a gradient only when it requires one
(full fine-tuning; with LoRA it is frozen and no [V, H] buffer is made), and then one chunk of
the vocabulary at a time (sku_fast.ops.linear_passes)."""

import torch
from torch import nn

from sku_fast.ops.linear_passes import Head, rows_pass, vocab_pass
from sku_fast.ops.rows import (
    LINEAR_MIN_CHUNK,
    REDUCTIONS,
    TokenLossOptions,
    check_common,
    reduced_weights,
    resolve_backend,
)


class _FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, a, b, opts):
        head = Head(weight, bias, ref_hidden, ref_weight, ref_bias)
        # which inputs need a gradient (a frozen output layer, as with LoRA, gets none)
        needs = tuple(
            opts.needs_grad and t is not None and t.requires_grad for t in (hidden, weight, bias)
        )
        ctx.per_row, ctx.opts, ctx.needs = opts.reduction == "none", opts, needs
        if ctx.per_row or not any(needs):
            # Σ_r g_r·h_rᵀ cannot be rescaled per row afterwards: backward recomputes the
            # pass with the upstream gradient folded into the row weights.
            rows, _ = rows_pass(opts, hidden, head, labels, a, b, grad_hidden=False)
            ctx.save_for_backward(
                hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, a, b
            )
            return rows if ctx.per_row else rows.sum()
        rows, grads = _pass(opts, hidden, head, labels, a, b, needs)
        ctx.save_for_backward(*grads)
        return rows.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.per_row or not any(ctx.needs):
            hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, a, b = ctx.saved_tensors
            head = Head(weight, bias, ref_hidden, ref_weight, ref_bias)
            scale = grad_output if ctx.per_row else grad_output.expand_as(a)
            _, grads = _pass(ctx.opts, hidden, head, labels, a * scale, b * scale, ctx.needs)
        else:
            grads = tuple(None if g is None else g.mul_(grad_output) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None, None, None)


def _pass(opts, hidden, head: Head, labels, a, b, needs):
    """Losses and the gradients `needs` asks for, by the cheapest pass that gives them."""
    need_h, need_w, need_b = needs
    if need_w or need_b:
        rows, grad_h, grad_w, grad_b = vocab_pass(opts, hidden, head, labels, a, b, needs)
        return rows, (grad_h, grad_w, grad_b)
    rows, grad_h = rows_pass(opts, hidden, head, labels, a, b, grad_hidden=need_h)
    return rows, (grad_h, None, None)


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
    without ever holding the N × V logits.

    Args:
        hidden: [..., H] hidden states of the trained model (gets a gradient).
        weight: [V, H] output layer. It gets a gradient only if it requires one, computed one
            chunk of the vocabulary at a time (fp32 inside the chunk, stored in its dtype).
        labels: [...] as in ``token_loss``.
        ref_hidden: [..., H] hidden states of the frozen reference model (detached).
        ref_weight: [V, H] reference output layer (detached); defaults to ``weight`` (LoRA
            models share it). ref_bias likewise defaults to ``bias`` when ref_weight is None.
        bias: [V] optional output bias (a gradient if it requires one).
        chunk_rows: rows per chunk when the output layer is frozen; default makes a chunk of
            logits about the size of hidden, and at least 4M logits (each chunk reads the
            whole output layer).
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


class FusedLinearTokenLoss(nn.Module):
    """Module form of ``fused_linear_token_loss``; weights given at call time override the
    defaults. Call it with the hidden states and the output layer's weight (and bias)."""

    def __init__(
        self,
        ce_weight: float = 1.0,
        kl_weight: float = 0.0,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_rows: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.ce_weight, self.kl_weight = ce_weight, kl_weight
        self.ignore_index, self.reduction = ignore_index, reduction
        self.chunk_rows, self.backend = chunk_rows, backend

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        ce_weight: float | torch.Tensor | None = None,
        kl_weight: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_token_loss(
            hidden,
            weight,
            labels,
            ref_hidden,
            ref_weight,
            ce_weight=self.ce_weight if ce_weight is None else ce_weight,
            kl_weight=self.kl_weight if kl_weight is None else kl_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            bias=bias,
            ref_bias=ref_bias,
            chunk_rows=self.chunk_rows,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, kl_weight={self.kl_weight}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )
