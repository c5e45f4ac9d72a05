"""What token_loss and fused_linear_token_loss share: the options that cross the autograd
boundary, the checks and row weights of their arguments, and the dispatch of a block of rows to
a backend: Triton on CUDA tensors, the native kernel of the extension on CPU tensors, and the
plain-PyTorch path on any device (the fallback, and what `backend="torch"` asks for)."""

from dataclasses import dataclass

import torch

from sku_fast.ops.native_backend import token_loss_rows_native
from sku_fast.ops.torch_backend import token_loss_rows_chunked

REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("triton", "native", "torch")
# CPU path: rows per chunk so that one fp32 chunk of logits is about 4 MiB (measured fastest
# of 256K..4M elements on the dev machine; the chunk holds ~15 such temporaries).
CPU_CHUNK_ELEMENTS = 1 << 20
# fused-linear: fewer, larger chunks, since every chunk adds into the whole [V, H] gradient
LINEAR_MIN_CHUNK = 1 << 22


@dataclass(frozen=True)
class TokenLossOptions:
    """Non-tensor options of one call; crosses the autograd boundary as a single object."""

    ignore_index: int
    reduction: str
    backend: str
    chunk_rows: int
    inplace: bool = False
    needs_grad: bool = True


def row_losses(opts: TokenLossOptions, logits, labels, ref_logits, a, b, grad_out) -> torch.Tensor:
    """Per-row losses [N] of 2-D logits, writing the gradient into ``grad_out`` when given."""
    if opts.backend == "triton":
        from sku_fast.kernels.token_loss import token_loss_rows

        return token_loss_rows(logits, labels, ref_logits, a, b, opts.ignore_index, grad_out)
    if opts.backend == "native":
        return token_loss_rows_native(logits, labels, ref_logits, a, b, opts.ignore_index, grad_out)
    return token_loss_rows_chunked(
        logits, labels, ref_logits, a, b, opts.ignore_index, grad_out, opts.chunk_rows
    )


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """None: Triton for CUDA tensors, native for CPU ones, PyTorch on any other device."""
    if backend is None:
        if tensor.is_cuda:
            return "triton"
        return "native" if tensor.device.type == "cpu" else "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    if backend == "native" and tensor.device.type != "cpu":
        raise ValueError(f'backend="native" runs on CPU tensors, got {tensor.device}')
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


def reduced_weights(labels, ce_weight, kl_weight, ignore_index, reduction):
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


def check_common(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
