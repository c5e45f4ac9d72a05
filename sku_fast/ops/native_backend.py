"""The fused token loss on the CPU in native code (``sku_fast._C.token_loss_rows``).

Same contract as ``sku_fast.ops.torch_backend.token_loss_rows_chunked`` (without its chunk size) and
the Triton launcher: per row r of logits z [V] with label y_r, optional reference logits z'
and fp32 weights a_r (CE) and b_r (KL),

    loss_r = a_r·CE(z, y_r) + b_r·KL(softmax(z') ‖ softmax(z))
    grad_r = a_r·(p − onehot(y_r)) + b_r·(p − p')

returned as fp32 [N]; the gradient is written into ``grad_out`` when given (it may be the
logits buffer itself). Rows labelled ``ignore_index``, and rows with a = b = 0, give 0 and a
zero gradient; without reference logits there is no KL term. A counted row with a ≠ 0 needs
a label in [0, V) (ValueError otherwise; a KL-only row's label is never read).

The kernel (csrc/token_loss_row.inc) reads each row twice and writes its gradient once, in
fp32 whatever the storage (fp32, bf16 or fp16, the reference may differ from the logits),
with the KL in the difference form of docs/design.md §3.1, vectorised for AVX2 / AVX-512 and
threaded over rows with the GIL released. This module checks the tensors and passes their
addresses; the C++ side knows nothing of torch.
"""

from __future__ import annotations

import torch

from sku_fast import _C

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _dtype_name(tensor: torch.Tensor, what: str) -> str:
    name = _DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(f"{what} must be float32, bfloat16 or float16, got {tensor.dtype}")
    return name


def _check_cpu(tensor: torch.Tensor, what: str) -> None:
    if tensor.device.type != "cpu":
        raise ValueError(f"{what} must be on the CPU, got {tensor.device}")


def _row_stride(tensor: torch.Tensor) -> int:
    """Elements between rows; a single row may report any stride."""
    return tensor.stride(0) if tensor.shape[0] > 1 else tensor.shape[1]


def _rows_readable(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of contiguous elements, at least a row apart (copied if not, e.g. expanded)."""
    v = tensor.shape[1]
    if (v > 1 and tensor.stride(1) != 1) or (tensor.shape[0] > 1 and tensor.stride(0) < v):
        return tensor.contiguous()
    return tensor


def _per_row(tensor: torch.Tensor, n: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    _check_cpu(tensor, what)
    if tensor.numel() != n:
        raise ValueError(
            f"{what} must have one value per row ({n}), got shape {tuple(tensor.shape)}"
        )
    return tensor.detach().reshape(n).to(dtype).contiguous()


def token_loss_rows_native(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None,
    ce_weight: torch.Tensor,
    kl_weight: torch.Tensor,
    ignore_index: int,
    grad_out: torch.Tensor | None,
    threads: int | None = None,
    loss_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row losses [N] fp32 of CPU logits [N, V] (fp32/bf16/fp16, any row stride).

    labels: [N] integers; ref_logits: [N, V] or None; ce_weight, kl_weight: [N] (fp32, the
    reduction already folded in); grad_out: [N, V] (fp32/bf16/fp16, unit column stride) or
    None; may be ``logits`` itself (in-place mode). threads: worker threads, default
    ``torch.get_num_threads()``. The losses go into loss_out [N] fp32 when given.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    n, v = logits.shape
    _check_cpu(logits, "logits")
    logits_dtype = _dtype_name(logits, "logits")
    if loss_out is None:
        loss_out = torch.empty(n, dtype=torch.float32)
    elif loss_out.dtype != torch.float32 or not loss_out.is_contiguous() or loss_out.numel() != n:
        raise ValueError(
            f"loss_out must be a contiguous float32 tensor of {n} elements, got "
            f"{loss_out.dtype} of shape {tuple(loss_out.shape)}"
        )
    if n == 0:
        return loss_out
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    y = _per_row(labels, n, torch.int64, "labels")
    a = _per_row(ce_weight, n, torch.float32, "ce_weight")
    b = _per_row(kl_weight, n, torch.float32, "kl_weight")
    z = _rows_readable(logits.detach())

    ref = None
    if ref_logits is not None:
        _check_cpu(ref_logits, "ref_logits")
        if tuple(ref_logits.shape) != (n, v):
            raise ValueError(
                f"ref_logits shape {tuple(ref_logits.shape)} must equal logits shape {(n, v)}"
            )
        ref = _rows_readable(ref_logits.detach())
    if grad_out is not None:
        _check_cpu(grad_out, "grad_out")
        if tuple(grad_out.shape) != (n, v):
            raise ValueError(
                f"grad_out shape {tuple(grad_out.shape)} must equal logits shape {(n, v)}"
            )
        if (v > 1 and grad_out.stride(1) != 1) or (n > 1 and grad_out.stride(0) < v):
            raise ValueError(
                f"grad_out needs contiguous rows (a unit vocabulary stride, rows at least V "
                f"apart), got strides {grad_out.stride()}"
            )
    if threads is None:
        threads = torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")

    _C.token_loss_rows(
        logits=z.data_ptr(),
        logits_dtype=logits_dtype,
        rows=n,
        vocab=v,
        logits_stride=_row_stride(z),
        labels=y.data_ptr(),
        ref_logits=None if ref is None else ref.data_ptr(),
        ref_dtype="F32" if ref is None else _dtype_name(ref, "ref_logits"),
        ref_stride=0 if ref is None else _row_stride(ref),
        ce_weight=a.data_ptr(),
        kl_weight=b.data_ptr(),
        ignore_index=int(ignore_index),
        grad=None if grad_out is None else grad_out.data_ptr(),
        grad_dtype="F32" if grad_out is None else _dtype_name(grad_out, "grad_out"),
        grad_stride=0 if grad_out is None else _row_stride(grad_out),
        loss=loss_out.data_ptr(),
        threads=int(threads),
    )
    return loss_out
