"""Fused token losses: per-row cross-entropy and KL preservation divergence (DESIGN §3.2).

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

Backends: Triton on CUDA tensors (``sku_fast.kernels.token_loss``), a chunked plain-PyTorch path
otherwise (``sku_fast.reference.token_loss_rows_chunked``); ``backend=`` forces one.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sku_fast.reference import token_loss_rows_chunked

_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("triton", "torch")
# CPU path: rows per chunk so that one fp32 chunk of logits is about 4 MiB (measured fastest
# of 256K..4M elements on the dev machine; the chunk holds ~15 such temporaries).
_CPU_CHUNK_ELEMENTS = 1 << 20
# fused-linear: fewer, larger chunks, since every chunk adds into the whole [V, H] gradient
_LINEAR_MIN_CHUNK = 1 << 22


@dataclass(frozen=True)
class TokenLossOptions:
    """Non-tensor options of one call; crosses the autograd boundary as a single object."""

    ignore_index: int
    reduction: str
    backend: str
    chunk_rows: int
    inplace: bool = False
    needs_grad: bool = True


def _rows(opts: TokenLossOptions, logits, labels, ref_logits, a, b, grad_out) -> torch.Tensor:
    """Per-row losses [N] of 2-D logits, writing the gradient into ``grad_out`` when given."""
    if opts.backend == "triton":
        from sku_fast.kernels.token_loss import token_loss_rows

        return token_loss_rows(logits, labels, ref_logits, a, b, opts.ignore_index, grad_out)
    return token_loss_rows_chunked(
        logits, labels, ref_logits, a, b, opts.ignore_index, grad_out, opts.chunk_rows
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
        rows = _rows(opts, logits, labels, ref_logits, ce_weight, kl_weight, grad)
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


def _resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    if backend is None:
        return "triton" if tensor.is_cuda else "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    return backend


def _row_weight(weight: float | torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor:
    """A scalar or a per-row tensor broadcastable to labels' shape, as fp32 [N] (detached)."""
    if isinstance(weight, torch.Tensor):
        try:
            w = weight.detach().to(device=labels.device, dtype=torch.float32)
            return w.expand(labels.shape).reshape(-1)
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(weight.shape)} does not broadcast to labels' shape "
                f"{tuple(labels.shape)}"
            ) from None
    return torch.full((labels.numel(),), float(weight), dtype=torch.float32, device=labels.device)


def _reduced_weights(labels, ce_weight, kl_weight, ignore_index, reduction):
    """Row weights with the ignore mask and, for "mean", 1/count folded in (no host sync)."""
    y = labels.reshape(-1)
    valid = y != ignore_index
    a = _row_weight(ce_weight, labels, "ce_weight")
    b = _row_weight(kl_weight, labels, "kl_weight")
    if reduction == "mean":
        scale = valid.to(torch.float32) / valid.sum().clamp_min(1)
    else:
        scale = valid.to(torch.float32)
    return y, a * scale, b * scale


def _check_common(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")


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
        backend: "triton", "torch" or None (Triton for CUDA tensors, the chunked PyTorch path
            otherwise).
        chunk_rows: rows per chunk of the PyTorch path (default: about 1M logits per chunk).

    Returns:
        float32 scalar, or [...] for reduction="none".
    """
    _check_common(logits, labels, reduction)
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
    y, a, b = _reduced_weights(labels, ce_weight, kl_weight, ignore_index, reduction)
    opts = TokenLossOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        backend=_resolve_backend(backend, logits),
        chunk_rows=chunk_rows or max(1, _CPU_CHUNK_ELEMENTS // max(v, 1)),
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
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
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
    inner = replace(opts, inplace=True, chunk_rows=max(1, _CPU_CHUNK_ELEMENTS // v))
    for start in range(0, n, opts.chunk_rows):
        stop = min(start + opts.chunk_rows, n)
        h = hidden[start:stop]  # [C, H]
        z = F.linear(h, weight, bias)  # [C, V]
        zr = None
        if ref_hidden is not None:
            zr = F.linear(ref_hidden[start:stop], ref_weight, ref_bias)
        g = z if opts.needs_grad else None
        rows[start:stop] = _rows(inner, z, labels[start:stop], zr, a[start:stop], b[start:stop], g)
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
    _check_common(hidden, labels, reduction)
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
    y, a, b = _reduced_weights(labels, ce_weight, kl_weight, ignore_index, reduction)
    if chunk_rows is None:
        chunk_rows = max(-(-n // max(1, -(-v // h_dim))), -(-_LINEAR_MIN_CHUNK // v))
    opts = TokenLossOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        backend=_resolve_backend(backend, hidden),
        chunk_rows=chunk_rows,
        needs_grad=torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (hidden, weight, bias)),
    )
    out = _FusedLinearFunction.apply(h2, weight, bias, y, rh, rw, rb, a, b, opts)
    return out.view(labels.shape) if reduction == "none" else out
