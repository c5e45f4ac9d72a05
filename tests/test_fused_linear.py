"""fused_linear_token_loss: the three-way tolerance against the fp64 oracle for every input
that takes a gradient, in both passes (a frozen output layer: row chunks; a trained one: two
phases over vocabulary chunks), and the memory each pass may use: no [V, H] buffer for a frozen
layer, no fp32 [V, H] buffer for a trained bf16 one."""

import pytest
import torch
import torch.nn.functional as F
from oracles.token_loss import fused_linear_token_loss_naive

from sku_fast.ops import FusedLinearTokenLoss, fused_linear_token_loss, linear_passes, token_loss

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

IGNORE = -100
BACKENDS = ["torch", "native", "triton"]


def _upstream(reduction, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(() if reduction != "none" else shape, generator=g)


def _three_way(got, truth, same, atol, rtol, what):
    got, truth, same = got.double(), truth.double(), same.double()
    assert not got.isnan().any(), what
    bound = (same - truth).abs() + atol + rtol * truth.abs()
    worst = ((got - truth).abs() - bound).max().item()
    assert worst <= 0, f"{what}: exceeds the three-way bound by {worst:.3g}"


def _linear_batch(n=13, h=24, v=157, seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    ref_hidden = hidden + 0.3 * torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    ref_weight = weight + 0.05 * torch.randn(v, h, generator=g)
    bias = torch.randn(v, generator=g) * 0.1
    y = torch.randint(0, v, (n,), generator=g)
    y[::3] = IGNORE
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return hidden, weight, bias, ref_hidden, ref_weight, y, a, b


def _linear_grads(fn, dtype, hidden, weight, bias, y, ref_hidden, ref_weight, upstream, **kw):
    params = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    out = fn(
        params[0], params[1], y, ref_hidden.to(dtype), ref_weight.to(dtype), bias=params[2], **kw
    )
    grads = torch.autograd.grad(out, params, upstream.to(dtype))
    return [out.detach(), *grads]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_three_way(backend, reduction):
    hidden, weight, bias, ref_hidden, ref_weight, y, a, b = _linear_batch()
    upstream = _upstream(reduction, y.shape)
    kw = {"ce_weight": a, "kl_weight": b, "reduction": reduction}
    args = (hidden, weight, bias, y, ref_hidden, ref_weight, upstream)
    truth = _linear_grads(fused_linear_token_loss_naive, torch.float64, *args, **kw)
    same = _linear_grads(fused_linear_token_loss_naive, torch.float32, *args, **kw)
    got = _linear_grads(
        fused_linear_token_loss, torch.float32, *args, chunk_rows=5, backend=backend, **kw
    )
    for name, g, t, s in zip(("loss", "hidden", "weight", "bias"), got, truth, same, strict=True):
        _three_way(g, t, s, 1e-6, 1e-5, name)


def test_fused_linear_reference_defaults_to_the_trained_head():
    hidden, weight, bias, ref_hidden, _, y, a, b = _linear_batch()
    got = fused_linear_token_loss(hidden, weight, y, ref_hidden, bias=bias, kl_weight=b)
    expected = token_loss(
        F.linear(hidden, weight, bias), y, F.linear(ref_hidden, weight, bias), kl_weight=b
    )
    torch.testing.assert_close(got, expected)


def test_fused_linear_bad_weight_shape():
    hidden, weight, _, _, _, y, _, _ = _linear_batch()
    with pytest.raises(
        ValueError, match=r"weight must be \[V, H\] with H = hidden.shape\[-1\] = 24"
    ):
        fused_linear_token_loss(hidden, weight[:, :20], y)


@pytest.mark.parametrize("trained", ["hidden-only", "head-only", "all"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_each_input_gets_a_gradient_only_if_it_asks(monkeypatch, trained, reduction):
    """Small vocabulary blocks (force several chunks of 157 tokens, uneven) and the three-way
    bound for every gradient that is asked for; None for the others."""
    monkeypatch.setattr(linear_passes, "VOCAB_BLOCK_ELEMENTS", 24 * 40)
    hidden, weight, bias, ref_hidden, ref_weight, y, a, b = _linear_batch()
    wants = {"hidden-only": (1, 0, 0), "head-only": (0, 1, 1), "all": (1, 1, 1)}[trained]
    upstream = _upstream(reduction, y.shape)

    def grads(fn, dtype, **kw):
        params = [t.detach().to(dtype).requires_grad_(bool(w)) for t, w in zip(
            (hidden, weight, bias), wants, strict=True)]  # fmt: skip
        out = fn(params[0], params[1], y, ref_hidden.to(dtype), ref_weight.to(dtype),
                 bias=params[2], ce_weight=a, kl_weight=b, reduction=reduction, **kw)  # fmt: skip
        out.backward(upstream.to(dtype))
        return [out.detach(), *(p.grad for p in params)]

    truth = grads(fused_linear_token_loss_naive, torch.float64)
    same = grads(fused_linear_token_loss_naive, torch.float32)
    got = grads(fused_linear_token_loss, torch.float32, chunk_rows=4)
    for name, g, t, s in zip(("loss", "hidden", "weight", "bias"), got, truth, same, strict=True):
        if t is None:
            assert g is None, name
        else:
            _three_way(g, t, s, 1e-6, 1e-5, name)


def test_near_identical_models_keep_their_precision_over_vocabulary_chunks(monkeypatch):
    """θ ≈ θ_o at the start of unlearning: the KL and its gradient must not cancel
    (docs/design.md §3.1), also when the vocabulary is split into chunks. Inputs are chosen so
    that every logit is exact in fp32 (small integers times 1/64), so the fp64 result of the
    same logits is the truth to the last bit."""
    monkeypatch.setattr(linear_passes, "VOCAB_BLOCK_ELEMENTS", 24 * 50)
    g = torch.Generator().manual_seed(5)
    n, h, v = 9, 24, 157
    hidden = torch.randint(-2, 3, (n, h), generator=g).float()
    weight = torch.randint(-64, 65, (v, h), generator=g).float() / 64
    ref_weight = weight + torch.randint(-1, 2, (v, h), generator=g).float() / 1024
    y = torch.randint(0, v, (n,), generator=g)
    kw = {"ce_weight": 0.0, "kl_weight": 1.0, "reduction": "sum"}

    def run(fn, dtype):
        w = weight.to(dtype, copy=True).requires_grad_()
        x = hidden.to(dtype, copy=True).requires_grad_()
        loss = fn(x, w, y, hidden.to(dtype), ref_weight.to(dtype), **kw)
        loss.backward()
        return loss.detach().double(), w.grad.double(), x.grad.double()

    truth = run(fused_linear_token_loss_naive, torch.float64)
    naive = run(fused_linear_token_loss_naive, torch.float32)
    got = run(fused_linear_token_loss, torch.float32)
    for name, t, n32, ours in zip(("kl", "weight", "hidden"), truth, naive, got, strict=True):
        error = ((ours - t).norm() / t.norm()).item()
        naive_error = ((n32 - t).norm() / t.norm()).item()
        assert error < 1e-5, f"{name}: {error:.2g} (the textbook formula: {naive_error:.2g})"


def _largest_allocation(step) -> int:
    """Bytes of the largest single CPU allocation made while `step()` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_a_frozen_output_layer_gets_no_gradient_buffer():
    """The LoRA case: the output layer does not require a gradient, so no [V, H] gradient
    (or any buffer of that size) is allocated, and no gradient reaches it."""
    n, h, v = 32, 256, 8192
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(v, h, generator=g) / h**0.5  # frozen
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    ref_hidden = hidden.detach() + 0.1
    y = torch.randint(0, v, (n,), generator=g)

    def step():
        fused_linear_token_loss(hidden, weight, y, ref_hidden, kl_weight=-1.0,
                                reduction="sum").backward()  # fmt: skip

    assert _largest_allocation(step) < v * h * 2  # far below even a bf16 [V, H]
    assert weight.grad is None and hidden.grad is not None


def test_a_trained_bf16_output_layer_gets_no_fp32_full_gradient():
    """--full: the gradient is written in the layer's dtype one vocabulary chunk at a time;
    nothing as large as an fp32 [V, H] is ever allocated (V spans several chunks)."""
    n, h, v = 32, 256, 65536
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(v, h, generator=g) / h**0.5).bfloat16().requires_grad_()
    hidden = torch.randn(n, h, generator=g).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)

    def step():
        fused_linear_token_loss(hidden, weight, y, reduction="sum").backward()

    assert _largest_allocation(step) < v * h * 4
    assert weight.grad.dtype == torch.bfloat16 and weight.grad.shape == (v, h)


def test_module_form_matches_the_function():
    hidden, weight, bias, ref_hidden, ref_weight, y, a, b = _linear_batch()
    module = FusedLinearTokenLoss(ce_weight=0.5, kl_weight=2.0, reduction="sum", backend="torch")
    got = module(hidden, weight, y, ref_hidden, ref_weight, bias=bias)
    expected = fused_linear_token_loss(hidden, weight, y, ref_hidden, ref_weight, bias=bias,
                                       ce_weight=0.5, kl_weight=2.0, reduction="sum")  # fmt: skip
    torch.testing.assert_close(got, expected)
    assert "reduction='sum'" in repr(module)
    with pytest.raises(ValueError, match="reduction must be one of"):
        FusedLinearTokenLoss(reduction="avg")
