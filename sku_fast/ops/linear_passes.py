"""The two ways fused_linear_token_loss walks the output layer, and what each computes.

- `rows_pass` (the output layer is frozen, as with LoRA): row chunks of hidden [N, H], each
  with its full logits [C, V] through a row backend; the chunk's logits become its gradient
  in place, which flows to the hidden states only. No [V, H] buffer is ever made.
- `vocab_pass` (the output layer is trained, as with full fine-tuning): two phases over chunks
  of the vocabulary, after Cut Cross-Entropy (Wijmans et al. 2024): phase 1 gathers each row's
  log-sum-exp (and, for the KL, the reference's and Σ p·expm1(z′ − z)) online; phase 2
  recomputes each block of logits, turns it into its gradient and writes the output layer's
  gradient one vocabulary chunk at a time, accumulated in fp32 inside the chunk and stored in
  the layer's own dtype. Peak extra memory: one [V_c, H] fp32 chunk, not [V, H].

The KL uses the difference form of docs/design.md §3.1 in both, with the same thresholds as the
row backends (sku_fast.ops.torch_backend).
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sku_fast.ops.rows import CPU_CHUNK_ELEMENTS, TokenLossOptions, row_losses
from sku_fast.ops.torch_backend import _LOGZ_DIRECT, _U_DIRECT

# logits per block of the vocabulary pass: 4M fp32 (16 MiB), a few such temporaries alive
VOCAB_BLOCK_ELEMENTS = 1 << 22


@dataclass
class Head:
    """The trained output layer and its frozen reference (None when there is no KL)."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    ref_hidden: torch.Tensor | None  # [N, H]
    ref_weight: torch.Tensor | None  # [V, H]
    ref_bias: torch.Tensor | None  # [V]

    def logits(self, hidden: torch.Tensor, vocab: slice) -> torch.Tensor:
        bias = None if self.bias is None else self.bias[vocab]
        return F.linear(hidden, self.weight[vocab], bias).float()  # [C, V_c]

    def ref_logits(self, rows: slice, vocab: slice) -> torch.Tensor:
        bias = None if self.ref_bias is None else self.ref_bias[vocab]
        return F.linear(self.ref_hidden[rows], self.ref_weight[vocab], bias).float()


def rows_pass(opts: TokenLossOptions, hidden, head: Head, labels, a, b, grad_hidden: bool):
    """Per-row losses [N] and, with grad_hidden, the hidden states' gradient [N, H]."""
    n, v = hidden.shape[0], head.weight.shape[0]
    rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if grad_hidden else None
    inner = replace(opts, inplace=True, chunk_rows=max(1, CPU_CHUNK_ELEMENTS // v))
    every = slice(None)
    for start in range(0, n, opts.chunk_rows):
        part = slice(start, min(start + opts.chunk_rows, n))
        z = F.linear(hidden[part], head.weight, head.bias)  # [C, V]
        zr = None if head.ref_hidden is None else head.ref_logits(part, every)
        g = z if grad_hidden else None
        rows[part] = row_losses(inner, z, labels[part], zr, a[part], b[part], g)
        if g is not None:
            grad_h[part] = g @ head.weight
    return rows, grad_h


def _blocks(n: int, v: int, h: int):
    """(vocabulary chunk, row chunk) sizes: blocks of about VOCAB_BLOCK_ELEMENTS logits, and
    vocabulary chunks whose fp32 weight gradient is at most the same size."""
    v_chunk = max(1, min(v, VOCAB_BLOCK_ELEMENTS // max(h, 1)))
    row_chunk = max(1, VOCAB_BLOCK_ELEMENTS // v_chunk)
    return v_chunk, row_chunk


def _row_stats(hidden, head: Head, labels, v_chunk: int, row_chunk: int):
    """Phase 1: per row, the log-sum-exp of the logits [N], the logit of the label [N], and
    with a reference its log-sum-exp and log Z = log Σ p·e^(z′−z) [N]."""
    n, v = hidden.shape[0], head.weight.shape[0]
    kw = {"dtype": torch.float32, "device": hidden.device}
    top, total = torch.full((n,), -torch.inf, **kw), torch.zeros(n, **kw)
    picked = torch.zeros(n, **kw)
    with_ref = head.ref_hidden is not None
    if with_ref:
        ref_top, ref_total = torch.full((n,), -torch.inf, **kw), torch.zeros(n, **kw)
        diff = torch.zeros(n, **kw)  # Σ e^(z−top)·expm1(z′−z), rescaled with top
    for v0 in range(0, v, v_chunk):
        vocab = slice(v0, min(v0 + v_chunk, v))
        for r0 in range(0, n, row_chunk):
            part = slice(r0, min(r0 + row_chunk, n))
            z = head.logits(hidden[part], vocab)  # [C, V_c]
            new_top = torch.maximum(top[part], z.max(-1).values)
            shift = torch.exp(top[part] - new_top).nan_to_num_(0.0)
            e = torch.exp(z - new_top[:, None])
            total[part] = total[part] * shift + e.sum(-1)
            y = labels[part] - v0
            at = torch.nonzero((y >= 0) & (y < z.shape[1])).squeeze(1)  # rows labelled here
            picked[at + r0] = z[at, y[at]]
            if with_ref:
                zr = head.ref_logits(part, vocab)
                d = torch.sub(zr, z).nan_to_num_(nan=0.0)
                diff[part] = diff[part] * shift + (e * torch.expm1(d)).sum(-1)
                new_ref = torch.maximum(ref_top[part], zr.max(-1).values)
                ref_shift = torch.exp(ref_top[part] - new_ref).nan_to_num_(0.0)
                ref_e = torch.exp(zr - new_ref[:, None])
                ref_total[part] = ref_total[part] * ref_shift + ref_e.sum(-1)
                ref_top[part] = new_ref
            top[part] = new_top
    lse = top + torch.log(total)
    if not with_ref:
        return lse, picked, None, None
    lse_ref = ref_top + torch.log(ref_total)
    s = diff / total  # Σ p·expm1(d) = Z − 1, without cancellation
    gap = lse_ref - lse
    log_z = torch.where(torch.isfinite(s) & (gap.abs() < _LOGZ_DIRECT), torch.log1p(s), gap)
    return lse, picked, lse_ref, log_z


def vocab_pass(opts: TokenLossOptions, hidden, head: Head, labels, a, b, needs: tuple):
    """Per-row losses [N] and, as `needs` = (hidden, weight, bias) asks, their gradients:
    grad_hidden [N, H] in hidden's dtype, grad_weight [V, H] and grad_bias [V] in the
    layer's dtype (each vocabulary chunk accumulated in fp32, then stored)."""
    n, v, h_dim = hidden.shape[0], head.weight.shape[0], head.weight.shape[1]
    v_chunk, row_chunk = _blocks(n, v, h_dim)
    lse, picked, lse_ref, log_z = _row_stats(hidden, head, labels, v_chunk, row_chunk)
    valid = labels != opts.ignore_index
    kl = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    need_h, need_w, need_b = needs
    fp32 = {"dtype": torch.float32, "device": hidden.device}
    grad_h = torch.zeros(hidden.shape, **fp32) if need_h else None
    grad_w = torch.empty_like(head.weight) if need_w else None
    grad_b = torch.empty_like(head.bias) if need_b else None
    keep = valid.to(torch.float32)[:, None]
    for v0 in range(0, v, v_chunk):
        vocab = slice(v0, min(v0 + v_chunk, v))
        w_acc = torch.zeros((vocab.stop - v0, h_dim), **fp32) if need_w else None
        b_acc = torch.zeros(vocab.stop - v0, **fp32) if need_b else None
        for r0 in range(0, n, row_chunk):
            part = slice(r0, min(r0 + row_chunk, n))
            z = head.logits(hidden[part], vocab)
            p = torch.exp(z - lse[part, None])  # [C, V_c]
            g = p * a[part, None]
            y = labels[part] - v0
            at = torch.nonzero(valid[part] & (y >= 0) & (y < z.shape[1])).squeeze(1)
            g[at, y[at]] -= a[at + r0]
            if log_z is not None:
                zr = head.ref_logits(part, vocab)
                u = torch.sub(zr, z).nan_to_num_(nan=0.0).sub_(log_z[part, None])
                q = torch.exp(zr - lse_ref[part, None])
                near = u.abs() <= _U_DIRECT
                g += b[part, None] * torch.where(near, -p * torch.expm1(u), p - q)
                ud = u.double()
                excess = (ud * ud.exp() - ud.expm1()) * p
                far = torch.where(q > 0, q * u, 0) - q + p
                kl[part] += torch.where(near, excess, far).sum(-1)
            g *= keep[part]
            if need_h:
                grad_h[part] += g @ head.weight[vocab].float()
            if need_w:
                w_acc.addmm_(g.t(), hidden[part].float())
            if need_b:
                b_acc += g.sum(0)
        if need_w:
            grad_w[vocab] = w_acc
        if need_b:
            grad_b[vocab] = b_acc
    ce = torch.where(a != 0, a * (lse - picked), 0)
    rows = ce + (torch.where(b != 0, b * kl.float(), 0) if log_z is not None else 0)
    rows = torch.where(valid, rows, 0)
    return rows, (None if grad_h is None else grad_h.to(hidden.dtype)), grad_w, grad_b
