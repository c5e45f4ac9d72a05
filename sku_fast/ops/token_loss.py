"""Fused token losses: per-row cross-entropy and the KL preservation divergence
(docs/design.md §3).

For row r with logits z, reference logits z' and label y:

    loss_r = a_r · CE(z, y) + b_r · KL(softmax(z') ‖ softmax(z))
    ∂loss_r/∂z = a_r · (p − onehot(y)) + b_r · (p − p')

Counting rule: a row counts, and contributes anything at all, only when its label is not
``ignore_index``. KL-only rows therefore still need a label (any value in [0, V), e.g. the real
next token; with a zero CE weight it is never read for the loss). ``reduction="mean"`` divides
the sum of the row losses by the number of counted rows (1 if there are none, so an all-ignored
batch gives 0, not NaN); ``"sum"`` does not divide; ``"none"`` returns the row losses with the
shape of ``labels`` (ignored rows are 0). Losses are returned in float32 whatever the logits
dtype: they are accumulated in fp32.

The reference logits are a frozen model's: they are detached and get no gradient. The gradient
of the logits is computed in the forward pass (one pass over the logits reads each row twice and
writes its gradient once) and scaled by the upstream gradient in backward, without host syncs.

Backends: Triton on CUDA tensors (``sku_fast.kernels.token_loss``), the native kernel of the
extension on CPU tensors (``sku_fast.ops.native_backend``), a chunked plain-PyTorch path
anywhere (``sku_fast.ops.torch_backend``); ``backend=`` forces one.
"""

import torch
from torch import nn

from sku_fast.ops.rows import (
    CPU_CHUNK_ELEMENTS,
    REDUCTIONS,
    TokenLossOptions,
    check_common,
    reduced_weights,
    resolve_backend,
    row_losses,
)


class _TokenLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ref_logits, ce_weight, kl_weight, opts: TokenLossOptions):
        grad = None
        if opts.needs_grad:
            grad = (
                logits
                if opts.inplace
                else torch.empty_like(logits, memory_format=torch.contiguous_format)
            )
        rows = row_losses(opts, logits, labels, ref_logits, ce_weight, kl_weight, grad)
        if opts.inplace and grad is not None:
            # The logits now hold the gradient: any other autograd node that saved them will
            # raise "modified by an inplace operation" instead of silently using gradients.
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(grad)
        ctx.per_row = opts.reduction == "none"
        return rows if ctx.per_row else rows.sum()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        scale = grad_output[:, None] if ctx.per_row else grad_output
        # In place on our own buffer: a second backward through the same graph fails loudly
        # on the version check instead of reusing a scaled gradient.
        return grad.mul_(scale), None, None, None, None, None


def token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    *,
    ce_weight: float | torch.Tensor = 1.0,
    kl_weight: float | torch.Tensor = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace: bool = False,
    backend: str | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Weighted per-row ``a·CE + b·KL(softmax(ref) ‖ softmax(logits))``, fused.

    Args:
        logits: [..., V], fp32/fp16/bf16; rows may have any stride.
        labels: [...] integer ids in [0, V) or ``ignore_index``.
        ref_logits: [..., V] frozen reference logits (detached, no gradient); needed when any
            KL weight is non-zero.
        ce_weight, kl_weight: floats or tensors broadcastable to ``labels.shape`` (per row), of
            either sign; treated as constants.
        ignore_index: rows with this label contribute 0 and get a zero gradient.
        reduction: "mean" (over rows whose label is not ignore_index), "sum" or "none".
        inplace: write the gradient into the ``logits`` buffer instead of a new one (saves one
            logits-sized tensor). Only when nothing else needs these logits: their contents are
            destroyed, and an autograd node that saved them will raise on backward.
        backend: "triton", "native", "torch" or None (Triton for CUDA tensors, the native
            kernel for CPU tensors, the chunked PyTorch path on other devices).
        chunk_rows: rows per chunk of the PyTorch path (default: about 1M logits per chunk).

    Returns:
        float32 scalar, or [...] for reduction="none".
    """
    check_common(logits, labels, reduction)
    v = logits.shape[-1]
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocabulary "
            f"dim {tuple(logits.shape[:-1])}"
        )
    if ref_logits is not None and tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(
            f"ref_logits shape {tuple(ref_logits.shape)} must equal logits shape "
            f"{tuple(logits.shape)}"
        )
    if ref_logits is None and (isinstance(kl_weight, torch.Tensor) or kl_weight != 0):
        raise ValueError("kl_weight is set but ref_logits is None: the KL needs reference logits")
    if inplace:
        try:
            z = logits.view(-1, v)
        except RuntimeError:
            raise ValueError(
                f"inplace=True needs logits whose leading dims flatten without a copy; got shape "
                f"{tuple(logits.shape)} with strides {logits.stride()}"
            ) from None
        if z.stride(-1) != 1:
            raise ValueError(f"inplace=True needs a unit vocabulary stride, got {z.stride(-1)}")
    else:
        z = logits.reshape(-1, v)
        if z.stride(-1) != 1:
            z = z.contiguous()
    zr = None
    if ref_logits is not None:
        zr = ref_logits.detach().reshape(-1, v)
        if zr.stride(-1) != 1:
            zr = zr.contiguous()
    y, a, b = reduced_weights(labels, ce_weight, kl_weight, ignore_index, reduction)
    opts = TokenLossOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        backend=resolve_backend(backend, logits),
        chunk_rows=chunk_rows or max(1, CPU_CHUNK_ELEMENTS // max(v, 1)),
        inplace=inplace,
        needs_grad=torch.is_grad_enabled() and logits.requires_grad,
    )
    out = _TokenLossFunction.apply(z, y, zr, a, b, opts)
    return out.view(labels.shape) if reduction == "none" else out


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace: bool = False,
) -> torch.Tensor:
    """Fused cross-entropy; ``token_loss`` with ce_weight=1 and no KL."""
    return token_loss(
        logits, labels, ignore_index=ignore_index, reduction=reduction, inplace=inplace
    )


def kl_div(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace: bool = False,
) -> torch.Tensor:
    """Fused KL(softmax(ref_logits) ‖ softmax(logits)) per row. Without labels every row
    counts; with labels, rows labelled ``ignore_index`` are left out."""
    if labels is None:
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_loss(
        logits,
        labels,
        ref_logits,
        ce_weight=0.0,
        kl_weight=1.0,
        ignore_index=ignore_index,
        reduction=reduction,
        inplace=inplace,
    )


class TokenLoss(nn.Module):
    """Module form of ``token_loss``; weights given at call time override the defaults."""

    def __init__(
        self,
        ce_weight: float = 1.0,
        kl_weight: float = 0.0,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        inplace: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.ce_weight = ce_weight
        self.kl_weight = kl_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace = inplace
        self.backend = backend

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ref_logits: torch.Tensor | None = None,
        ce_weight: float | torch.Tensor | None = None,
        kl_weight: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return token_loss(
            logits,
            labels,
            ref_logits,
            ce_weight=self.ce_weight if ce_weight is None else ce_weight,
            kl_weight=self.kl_weight if kl_weight is None else kl_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            inplace=self.inplace,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, kl_weight={self.kl_weight}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )
