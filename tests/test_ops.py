"""Public token-loss API: autograd against the fp64 oracle (three-way tolerance, random
upstream gradient), reductions and the counting rule, the in-place mode's safety,
torch.compile and the wrappers. Backend "triton" runs in the interpreter on CPU
(conftest.py)."""

import pytest
import torch
import torch.nn.functional as F
from oracles.token_loss import token_loss_naive

from sku_fast.ops import TokenLoss, cross_entropy, kl_div, token_loss

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

IGNORE = -100
BACKENDS = ["torch", "native", "triton"]


def _batch(shape=(3, 7), v=211, seed=0):
    """logits [*shape, V], labels with ignored rows, reference logits, per-row weights."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, v, generator=g) * 2
    zr = z + 0.5 * torch.randn(*shape, v, generator=g)
    y = torch.randint(0, v, shape, generator=g)
    y.view(-1)[::4] = IGNORE
    a = torch.randn(shape, generator=g)
    b = torch.randn(shape, generator=g)
    return z, y, zr, a, b


def _upstream(reduction, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(() if reduction != "none" else shape, generator=g)


def _three_way(got, truth, same, atol, rtol, what):
    got, truth, same = got.double(), truth.double(), same.double()
    assert not got.isnan().any(), what
    bound = (same - truth).abs() + atol + rtol * truth.abs()
    worst = ((got - truth).abs() - bound).max().item()
    assert worst <= 0, f"{what}: exceeds the three-way bound by {worst:.3g}"


def _naive_with_grad(z, y, zr, a, b, reduction, upstream, dtype):
    zz = z.detach().to(dtype).requires_grad_()
    out = token_loss_naive(
        zz, y, zr.to(dtype), ce_weight=a.to(dtype), kl_weight=b.to(dtype), reduction=reduction
    )
    (grad,) = torch.autograd.grad(out, zz, upstream.to(dtype))
    return out.detach(), grad


@pytest.mark.parametrize("inplace", [False, True], ids=["keep-logits", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_loss_autograd_three_way(backend, reduction, inplace):
    z, y, zr, a, b = _batch()
    upstream = _upstream(reduction, y.shape)
    truth, truth_grad = _naive_with_grad(z, y, zr, a, b, reduction, upstream, torch.float64)
    same, same_grad = _naive_with_grad(z, y, zr, a, b, reduction, upstream, torch.float32)

    leaf = z.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf buffer the in-place mode may overwrite
    out = token_loss(
        logits, y, zr, ce_weight=a, kl_weight=b, reduction=reduction, inplace=inplace,
        backend=backend,
    )  # fmt: skip
    assert out.dtype == torch.float32 and out.shape == upstream.shape
    out.backward(upstream)
    _three_way(out.detach(), truth, same, 1e-6, 1e-5, "loss")
    _three_way(leaf.grad, truth_grad, same_grad, 1e-7, 1e-5, "gradient")
    if not inplace:
        assert torch.equal(logits.detach(), z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_counts_rows_with_a_label(backend):
    z, y, zr, _, _ = _batch((2, 3), v=31)
    y[0] = IGNORE
    y[1, 0] = 5
    y[1, 1:] = IGNORE
    rows = token_loss(z, y, zr, kl_weight=0.5, reduction="none", backend=backend)
    assert (rows[0] == 0).all() and (rows[1, 1:] == 0).all()
    mean = token_loss(z, y, zr, kl_weight=0.5, backend=backend)
    torch.testing.assert_close(mean, rows[1, 0])  # one counted row: mean = its loss

    y[:] = IGNORE
    leaf = z.clone().requires_grad_()
    out = token_loss(leaf, y, zr, kl_weight=0.5, backend=backend)
    out.backward()
    assert out.item() == 0.0 and torch.equal(leaf.grad, torch.zeros_like(z))


def test_wrappers_match_torch_builtins():
    z, y, zr, _, _ = _batch()
    y2 = y.reshape(-1)
    expected_ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), y2, ignore_index=IGNORE)
    torch.testing.assert_close(cross_entropy(z, y), expected_ce)

    logp = torch.log_softmax(z, -1)
    logq = torch.log_softmax(zr, -1)
    per_row = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_div(z, zr, reduction="none"), per_row)
    torch.testing.assert_close(kl_div(z, zr), per_row.mean())
    counted = y != IGNORE
    torch.testing.assert_close(kl_div(z, zr, y), per_row[counted].mean())


def test_module_form_and_call_time_weights():
    z, y, zr, a, b = _batch()
    loss = TokenLoss(ce_weight=2.0, kl_weight=-1.0, reduction="sum")
    torch.testing.assert_close(
        loss(z, y, zr), token_loss(z, y, zr, ce_weight=2.0, kl_weight=-1.0, reduction="sum")
    )
    torch.testing.assert_close(
        loss(z, y, zr, ce_weight=a, kl_weight=b),
        token_loss(z, y, zr, ce_weight=a, kl_weight=b, reduction="sum"),
    )
    assert "kl_weight=-1.0" in repr(loss)


def test_inplace_refuses_to_corrupt_a_saved_tensor():
    z, y, _, _, _ = _batch()
    x = z.clone().requires_grad_()
    out = token_loss(torch.tanh(x), y, inplace=True)  # tanh saves its output for backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_second_backward_fails_loudly():
    z, y, zr, _, _ = _batch()
    leaf = z.clone().requires_grad_()
    out = token_loss(leaf, y, zr, kl_weight=1.0)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_no_grad_leaves_inplace_logits_untouched():
    z, y, zr, _, _ = _batch()
    logits = z.clone()
    with torch.no_grad():
        token_loss(logits, y, zr, kl_weight=1.0, inplace=True)
    assert torch.equal(logits, z)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    z, y, zr, a, b = _batch()

    def step(logits, labels, ref, ce, kl):
        return token_loss(logits, labels, ref, ce_weight=ce, kl_weight=kl, backend="torch")

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    results = []
    for fn in (step, compiled):
        leaf = z.clone().requires_grad_()
        out = fn(leaf, y, zr, a, b)
        out.backward(torch.tensor(0.7))
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"kl_weight": 1.0, "ref": False}, "kl_weight is set but ref_logits is None"),
        ({"labels": torch.zeros(3, 6, dtype=torch.long)}, r"labels shape \(3, 6\) must equal"),
        ({"ce_weight": torch.ones(4)}, r"ce_weight of shape \(4,\) does not broadcast"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
    ids=["reduction", "kl-without-ref", "labels-shape", "weight-shape", "backend"],
)
def test_bad_arguments_name_the_values(kwargs, message):
    z, y, zr, _, _ = _batch()
    ref = zr if kwargs.pop("ref", True) else None
    labels = kwargs.pop("labels", y)
    with pytest.raises(ValueError, match=message):
        token_loss(z, labels, ref, **kwargs)


def test_inplace_needs_a_flat_view():
    z = torch.randn(2, 6, 11)[:, :-1]  # leading dims do not flatten without a copy
    with pytest.raises(ValueError, match="inplace=True needs logits"):
        token_loss(z, torch.zeros(2, 5, dtype=torch.long), inplace=True)
    # the copying mode accepts it
    token_loss(z, torch.zeros(2, 5, dtype=torch.long))
