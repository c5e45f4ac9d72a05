"""Fused token loss (forward + backward) against its baselines, side by side in one run.

Workload: the SKU / gradient-ascent batch, every row with a CE weight and a KL weight of mixed
sign (per-row tensors), 1/8 of the rows ignored:

    loss = mean_r [a_r·CE(z_r, y_r) + b_r·KL(softmax(z'_r) ‖ softmax(z_r))]

- fused:          sku_fast.token_loss (Triton on CUDA, the chunked PyTorch path on CPU)
- fused-inplace:  the same, writing the gradient into the logits buffer
- fused-compiled: (CPU only) torch.compile of the fused call, 512-row chunks
- eager:          the usual PyTorch code: both log-softmaxes in fp32, nll + Σ p'(log p' − log p)
- compiled:       torch.compile of eager (compiled once, outside the timing)
- liger:          Liger-Kernel's cross_entropy + kl_div, when liger_kernel imports and CUDA is
                  present (its kernels are Triton-only)

fused-linear runs hidden [N, H] @ weight [V, H]ᵀ + the same loss, against eager (F.linear then
the eager loss). Each row records shape, dtype, effective GB/s (the bandwidth floor's bytes:
both logit tensors read once and the gradient written once, divided by the best time) and the
peak memory beyond the inputs (CUDA: max_memory_allocated; CPU: the process's VmHWM after
resetting it through /proc/self/clear_refs). Then the result is checked against eager.

CPU shapes fit a 24 GB, 2-core machine; with CUDA the issue's GPU targets run instead:
N=16384, V=128256 bf16, and fused-linear N=8192, H=4096, V=128256 bf16.
Run: `make bench` or `pytest benchmarks/bench_token_loss.py --benchmark-only`.
"""

from __future__ import annotations

import ctypes
import gc
import re

import pytest
import torch
import torch.nn.functional as F

from sku_fast.ops import fused_linear_token_loss, token_loss

IGNORE = -100
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    LOSS_SHAPES = [(16384, 128256, torch.bfloat16)]
    LINEAR_SHAPES = [(8192, 4096, 128256, torch.bfloat16)]
    ROUNDS = 10
else:
    LOSS_SHAPES = [(2048, 32000, torch.float32), (2048, 32000, torch.bfloat16)]
    # SmolLM2's head, and a Llama-3-sized trained bf16 head (the --full case at 7B+ scale)
    LINEAR_SHAPES = [(2048, 576, 49152, torch.float32), (256, 4096, 128256, torch.bfloat16)]
    ROUNDS = 3


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _mem_reset() -> int:
    """Start a peak-memory window; returns the current bytes in use."""
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    # hand freed heap pages back first, or reusing them would hide allocations from VmHWM
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to VmRSS
        f.write("5")
    return _proc_kb("VmRSS") * 1024


def _mem_peak() -> int:
    if CUDA:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_kb("VmHWM") * 1024


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def eager_loss(z, y, zr, a, b):
    """The usual code: fp32 log-softmax of both models over the whole vocabulary."""
    logp = torch.log_softmax(z.float(), dim=-1)
    logq = torch.log_softmax(zr.float(), dim=-1)
    ce = F.nll_loss(logp, y, ignore_index=IGNORE, reduction="none")
    kl = (logq.exp() * (logq - logp)).sum(-1)
    valid = y != IGNORE
    rows = torch.where(valid, a * ce + b * kl, 0)
    return rows.sum() / valid.sum().clamp_min(1)


_compiled_eager = torch.compile(eager_loss, dynamic=False)


def _liger_loss():
    if not CUDA:
        return None
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy, liger_kl_div
    except ImportError:
        return None

    def loss(z, y, zr, a, b):
        # Liger's pair takes scalar weights only: the closest like-for-like call
        ce = liger_cross_entropy(z, y, ignore_index=IGNORE)
        logp = torch.log_softmax(z.float(), -1)
        logq = torch.log_softmax(zr.float(), -1)
        return ce + liger_kl_div(logp, logq, True, "batchmean")

    return loss


def _fused(z, y, zr, a, b):
    return token_loss(z, y, zr, ce_weight=a, kl_weight=b)


def _fused_inplace(z, y, zr, a, b):
    return token_loss(z, y, zr, ce_weight=a, kl_weight=b, inplace=True)


# The PyTorch path under torch.compile: inductor fuses each chunk's elementwise work. Few,
# large chunks keep the unrolled graph (and the compile time) small.
_fused_compiled = torch.compile(
    lambda z, y, zr, a, b: token_loss(z, y, zr, ce_weight=a, kl_weight=b, chunk_rows=512),
    dynamic=False,
)


LOSS_VARIANTS = {
    "fused": _fused,
    "fused-inplace": _fused_inplace,
    "fused-compiled": None if CUDA else _fused_compiled,
    "eager": eager_loss,
    "compiled": _compiled_eager,
    "liger": _liger_loss(),
}


def _loss_inputs(n, v, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    z = torch.randn(n, v, generator=g, dtype=dtype, device=DEVICE)
    zr = torch.randn(n, v, generator=g, dtype=dtype, device=DEVICE).mul_(0.1).add_(z)
    y = torch.randint(0, v, (n,), generator=g, device=DEVICE)
    y[::8] = IGNORE
    a = torch.randn(n, generator=g, device=DEVICE)
    b = torch.randn(n, generator=g, device=DEVICE)
    return z, y, zr, a, b


def _run(fn, leaf, args):
    loss = fn(leaf, *args)
    loss.backward()
    _sync()
    return loss


@pytest.mark.parametrize("variant", list(LOSS_VARIANTS))
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{str(s[2])[6:]}")
def test_token_loss(benchmark, shape, variant):
    fn = LOSS_VARIANTS[variant]
    if fn is None:
        pytest.skip(f"{variant}: needs liger_kernel and CUDA (liger) / a CPU run (fused-compiled)")
    n, v, dtype = shape
    z, y, zr, a, b = _loss_inputs(n, v, dtype)
    args = (y, zr, a, b)
    _run(fn, z.clone().requires_grad_(), args)  # compile / autotune / warm the allocator

    benchmark.group = f"token_loss {n}x{v} {dtype}"
    benchmark.pedantic(
        _run,
        setup=lambda: ((fn, z.clone().requires_grad_(), args), {}),
        rounds=ROUNDS,
        iterations=1,
    )

    leaf = z.clone().requires_grad_()
    start = _mem_reset()
    loss = _run(fn, leaf, args)
    peak = _mem_peak() - start
    floor_bytes = 3 * n * v * z.element_size()
    benchmark.extra_info.update(
        shape=f"{n}x{v}",
        dtype=str(dtype),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        gbps=floor_bytes / benchmark.stats.stats.min / 1e9,
        peak_extra_mb=peak / 2**20,
        logits_mb=n * v * z.element_size() / 2**20,
    )

    if variant != "liger":  # liger's pair computes a different (scalar-weight) loss
        ref_leaf = z.clone().requires_grad_()
        expected = _run(eager_loss, ref_leaf, args)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(loss.float(), expected.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad.float(), rtol=tol, atol=tol)


def _eager_linear(h, w, y, rh, a, b):
    with torch.no_grad():
        zr = F.linear(rh, w)
    return eager_loss(F.linear(h, w), y, zr, a, b)


def _fused_linear(h, w, y, rh, a, b):
    return fused_linear_token_loss(h, w, y, rh, ce_weight=a, kl_weight=b)


LINEAR_VARIANTS = {"fused-linear": _fused_linear, "eager-linear": _eager_linear}


@pytest.mark.parametrize("variant", list(LINEAR_VARIANTS))
@pytest.mark.parametrize(
    "shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-{str(s[3])[6:]}"
)
def test_fused_linear(benchmark, shape, variant):
    fn = LINEAR_VARIANTS[variant]
    n, h, v, dtype = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, device=DEVICE)
    ref_hidden = torch.randn(n, h, generator=g, dtype=dtype, device=DEVICE).mul_(0.1).add_(hidden)
    weight = torch.randn(v, h, generator=g, dtype=dtype, device=DEVICE).mul_(h**-0.5)
    y = torch.randint(0, v, (n,), generator=g, device=DEVICE)
    y[::8] = IGNORE
    a = torch.randn(n, generator=g, device=DEVICE)
    b = torch.randn(n, generator=g, device=DEVICE)

    def run(hl, wl):
        loss = fn(hl, wl, y, ref_hidden, a, b)
        loss.backward()
        _sync()
        return loss, hl, wl

    def fresh():
        return (hidden.clone().requires_grad_(), weight.clone().requires_grad_()), {}

    run(*fresh()[0])
    benchmark.group = f"fused_linear {n}x{h}x{v} {dtype}"
    benchmark.pedantic(run, setup=fresh, rounds=ROUNDS, iterations=1)

    params = fresh()[0]
    start = _mem_reset()
    loss, hl, wl = run(*params)
    peak = _mem_peak() - start
    benchmark.extra_info.update(
        shape=f"{n}x{h}x{v}",
        dtype=str(dtype),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        peak_extra_mb=peak / 2**20,
        logits_mb=n * v * hidden.element_size() / 2**20,
    )

    exp_loss, exp_h, exp_w = _run_eager_linear(hidden, weight, y, ref_hidden, a, b)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.float(), exp_loss.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(hl.grad.float(), exp_h.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(wl.grad.float(), exp_w.float(), rtol=tol, atol=tol)


def _run_eager_linear(hidden, weight, y, ref_hidden, a, b):
    hl, wl = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = _eager_linear(hl, wl, y, ref_hidden, a, b)
    loss.backward()
    return loss.detach(), hl.grad, wl.grad
