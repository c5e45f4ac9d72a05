"""Numerics of the native CPU token loss (sku_fast.ops.native_backend, csrc/token_loss_row.inc).

Every case is checked with the three-way tolerance of docs/design.md §5 rule 6 against the fp64
oracle: |native − fp64| ≤ |oracle in the input dtype − fp64| + atol + rtol·|fp64|, for the
row losses and for the gradient under a random upstream gradient. Outputs are NaN-poisoned
before each call, so an element the kernel does not write fails. The vector variants
(AVX2, AVX-512) must give the bits of the portable one, and two threads those of one.
"""

import pytest
import torch
from oracles.token_loss import token_loss_naive

from sku_fast import _C
from sku_fast.ops.native_backend import token_loss_rows_native

IGNORE = -100

# id -> (rows, vocab, logits dtype, reference dtype)
SPEC = {
    "ce-63x507": (63, 507, torch.float32, None),
    "kl-40x63": (40, 63, torch.float32, torch.float32),
    "mixed-5x32001": (5, 32001, torch.float32, torch.float32),
    "all-ignored-9x130": (9, 130, torch.float32, torch.float32),
    "some-ignored-negative-17x257": (17, 257, torch.float32, torch.float32),
    "per-row-bf16-31x100": (31, 100, torch.bfloat16, torch.bfloat16),
    "fp16-11x333": (11, 333, torch.float16, torch.float16),
    "bf16-logits-f32-ref-13x507": (13, 507, torch.bfloat16, torch.float32),
    "f32-logits-f16-ref-7x1029": (7, 1029, torch.float32, torch.float16),
    "extreme-8x300": (8, 300, torch.float32, torch.float32),
    "near-identical-16x1000": (16, 1000, torch.float32, torch.float32),
    "strided-12x200": (12, 200, torch.float32, torch.float32),
    "wide-1x262147-bf16": (1, 262147, torch.bfloat16, torch.bfloat16),
}
CASE_IDS = list(SPEC)


def _case(case_id: str):
    """(logits, labels, ref_logits | None, ce_weight [N], kl_weight [N]) chosen by hand."""
    g = torch.Generator().manual_seed(sum(map(ord, case_id)))
    n, v, dtype, ref_dtype = SPEC[case_id]
    z = torch.randn(n, v, generator=g) * 3
    zr = z + torch.randn(n, v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    a = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g)
    y[::5] = IGNORE  # some rows ignored unless the case says otherwise
    if case_id == "ce-63x507":
        a, b = torch.ones(n), torch.zeros(n)
    elif case_id == "all-ignored-9x130":
        y[:] = IGNORE
    elif case_id == "some-ignored-negative-17x257":
        a, b = torch.full((n,), -2.5), torch.full((n,), -1.0)
    elif case_id == "per-row-bf16-31x100":
        a[::3], b[1::3] = 0.0, 0.0  # KL-only and CE-only rows
        a[2], b[2] = 0.0, 0.0  # a row with no weight at all: zeros, like an ignored one
    elif case_id == "extreme-8x300":
        z[0, 5], z[1, :10], z[2, 7], zr[2, 7] = 1e4, -1e4, 1e4, -1e4
        z[3, 20:40] = zr[3, 20:40] = -torch.inf  # masked vocabulary in both models
        zr[4, 50:60] = -torch.inf  # only the reference rules tokens out: the KL stays finite
        zr[5] = z[5] + 1e4  # same distribution far away: log Z comes from lse' − lse
        zr[6, 3] = 1e4  # reference puts all its mass where the model puts almost none
        z[7, 100:] = -100.0  # exp underflows to zero...
        z[7, 100:150] = zr[7, 100:150] = -92.0  # ...and to subnormals, in p and p' alike
        y[3], y[7] = 0, 150
    elif case_id == "near-identical-16x1000":
        zr = z + 1e-3 * torch.randn(n, v, generator=g)
        a, b = torch.zeros(n), torch.ones(n)
        y[::5] = 0  # every row counts
    z = z.to(dtype)
    zr = None if ref_dtype is None else zr.to(ref_dtype)
    if case_id == "strided-12x200":  # rows further apart than V
        z = torch.cat([z, torch.zeros(n, 37)], 1)[:, :v]
        zr = torch.cat([torch.zeros(n, 11), zr], 1)[:, 11:]
    return z, y, zr, a, b


def _oracle(z, y, zr, a, b, dtype, upstream):
    """Row losses [N] and the gradient [N, V] of Σ upstream·rows, in ``dtype``."""
    zz = z.to(dtype).requires_grad_()
    rr = None if zr is None else zr.to(dtype)
    rows = token_loss_naive(
        zz, y, rr, ce_weight=a.to(dtype), kl_weight=b.to(dtype), reduction="none"
    )
    (grad,) = torch.autograd.grad(rows, zz, upstream.to(dtype))
    return rows.detach().double(), grad.double()


def assert_three_way(got, truth, same_dtype, *, atol, rtol, what):
    got, truth, same_dtype = got.double(), truth.double(), same_dtype.double()
    assert not got.isnan().any(), f"{what}: {int(got.isnan().sum())} NaN (unwritten) elements"
    bound = (same_dtype - truth).abs().nan_to_num(posinf=0.0) + atol + rtol * truth.abs()
    err = (got - truth).abs()
    bad = err > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements out of tolerance; first at {i}: got "
            f"{got[tuple(i)].item():.9g}, fp64 {truth[tuple(i)].item():.9g}, same-dtype oracle "
            f"{same_dtype[tuple(i)].item():.9g}"
        )


# relative tolerance of the stored gradient: fp32 arithmetic, then half an ulp of the storage
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8 + 1e-5, torch.float16: 2**-11 + 1e-5}


def _run(z, y, zr, a, b, **kwargs):
    """Row losses and gradient of the native kernel into NaN-poisoned buffers."""
    grad = torch.full(z.shape, torch.nan, dtype=z.dtype)
    loss = torch.full((z.shape[0],), torch.nan)
    rows = token_loss_rows_native(z, y, zr, a, b, IGNORE, grad, loss_out=loss, **kwargs)
    assert rows is loss
    return loss, grad


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_rows_three_way(case_id):
    z, y, zr, a, b = _case(case_id)
    upstream = torch.randn(z.shape[0], generator=torch.Generator().manual_seed(7))
    truth_rows, truth_grad = _oracle(z, y, zr, a, b, torch.float64, upstream)
    same_rows, same_grad = _oracle(z, y, zr, a, b, z.dtype, upstream)

    before = z.clone()
    loss, grad = _run(z, y, zr, a, b)
    assert torch.equal(z, before), "non-destructive mode changed the logits"

    assert_three_way(loss, truth_rows, same_rows, atol=1e-6, rtol=1e-5, what="row losses")
    scaled = grad.double() * upstream.double()[:, None]
    assert_three_way(
        scaled, truth_grad, same_grad, atol=1e-7, rtol=GRAD_RTOL[z.dtype], what="gradient"
    )
    silent = (y == IGNORE) | ((a == 0) & (b == 0))
    assert (loss[silent] == 0).all() and (grad[silent] == 0).all()


@pytest.mark.parametrize("case_id", ["mixed-5x32001", "per-row-bf16-31x100", "fp16-11x333"])
def test_inplace_gradient_overwrites_logits(case_id):
    z, y, zr, a, b = _case(case_id)
    expected_rows, expected_grad = _run(z, y, zr, a, b)
    buf = z.clone()
    rows = token_loss_rows_native(buf, y, zr, a, b, IGNORE, buf)
    assert torch.equal(rows, expected_rows)
    assert torch.equal(buf, expected_grad)


def test_forward_only_gives_the_same_losses():
    z, y, zr, a, b = _case("mixed-5x32001")
    expected, _ = _run(z, y, zr, a, b)
    assert torch.equal(token_loss_rows_native(z, y, zr, a, b, IGNORE, None), expected)
    expected, _ = _run(z, y, None, a, torch.zeros_like(b))
    assert torch.equal(token_loss_rows_native(z, y, None, a, b, IGNORE, None), expected)


def test_near_identical_relative_error():
    """At θ = θ_o (logit gap 1e-3) the KL is ~d²/2 and its gradient tiny: the difference
    form keeps both to 1e-5 relative error in fp32 (measured ~2e-7), where the textbook
    formulas in fp32 are ~50% off for the KL and ~7e-4 for the gradient."""
    z, y, zr, a, b = _case("near-identical-16x1000")
    ones = torch.ones(z.shape[0])
    truth_rows, truth_grad = _oracle(z, y, zr, a, b, torch.float64, ones)
    naive_rows, naive_grad = _oracle(z, y, zr, a, b, torch.float32, ones)
    rows, grad = _run(z, y, zr, a, b)

    def rel(x, t):
        return ((x.double() - t).norm(dim=-1) / t.norm(dim=-1)).max().item()

    assert rel(grad, truth_grad) <= 1e-5
    assert rel(rows[:, None], truth_rows[:, None]) <= 1e-5
    # the cancellation the kernel avoids is real
    assert rel(naive_rows[:, None], truth_rows[:, None]) > 0.1
    assert rel(grad, truth_grad) < rel(naive_grad, truth_grad) / 30


@pytest.fixture
def set_vector_level():
    """_C.set_vector_level for one test; the level in effect before is restored after."""
    before = _C.vector_level()
    yield _C.set_vector_level
    _C.set_vector_level(before)


# cases that cross every code path: each dtype and mixed references, masked and extreme
# logits (the slow exp path, far lanes), ignored, CE-only, KL-only and weightless rows
BITWISE_CASES = [
    "kl-40x63",
    "per-row-bf16-31x100",
    "fp16-11x333",
    "bf16-logits-f32-ref-13x507",
    "f32-logits-f16-ref-7x1029",
    "extreme-8x300",
    "near-identical-16x1000",
    "strided-12x200",
]


@pytest.mark.parametrize("case_id", BITWISE_CASES)
def test_every_vector_level_gives_the_portable_bits(case_id, set_vector_level):
    """Level 0 (portable C++, lane by lane), 1 (AVX2) and 2 (AVX-512), where the CPU has
    them, run the same operations: the losses and gradients must be equal bit for bit."""
    z, y, zr, a, b = _case(case_id)
    results = {}
    for level in (0, 1, 2):
        if set_vector_level(level) == level:
            results[level] = _run(z, y, zr, a, b, threads=1)
    for level, (rows, grad) in results.items():
        assert torch.equal(rows.view(torch.int32), results[0][0].view(torch.int32)), level
        bits = torch.int32 if grad.dtype == torch.float32 else torch.int16
        assert torch.equal(grad.view(bits), results[0][1].view(bits)), level


@pytest.mark.parametrize("case_id", ["mixed-5x32001", "some-ignored-negative-17x257"])
def test_two_threads_give_the_bits_of_one(case_id):
    z, y, zr, a, b = _case(case_id)
    one = _run(z, y, zr, a, b, threads=1)
    two = _run(z, y, zr, a, b, threads=2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_bad_arguments_are_value_errors():
    z, y, zr, a, b = _case("kl-40x63")
    y = y.clone()
    y[4] = 63  # a counted row with a CE weight and a label outside [0, 63)
    with pytest.raises(ValueError, match=r"labels\[4\] = 63 is outside \[0, 63\)"):
        token_loss_rows_native(z, y, zr, a, b, IGNORE, None)
    a0 = a.clone()
    a0[4] = 0.0  # the same label on a KL-only row is never read
    rows, grad = _run(z, y, zr, a0, b)
    y_in = y.clone()
    y_in[4] = 0
    rows_in, grad_in = _run(z, y_in, zr, a0, b)
    assert torch.equal(rows, rows_in) and torch.equal(grad, grad_in)

    with pytest.raises(ValueError, match="logits must be float32, bfloat16 or float16"):
        token_loss_rows_native(z.double(), y, zr, a0, b, IGNORE, None)
    with pytest.raises(ValueError, match=r"ref_logits shape \(40, 62\) must equal"):
        token_loss_rows_native(z, y, zr[:, :62], a0, b, IGNORE, None)
    with pytest.raises(ValueError, match=r"ce_weight must have one value per row \(40\)"):
        token_loss_rows_native(z, y, zr, a0[:3], b, IGNORE, None)
    with pytest.raises(ValueError, match=r"grad_out needs contiguous rows .* strides \(1, 40\)"):
        token_loss_rows_native(z, y, zr, a0, b, IGNORE, torch.empty(63, 40).t())
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        token_loss_rows_native(z, y.float(), zr, a0, b, IGNORE, None)
    assert token_loss_rows_native(z[:0], y[:0], zr[:0], a0[:0], b[:0], IGNORE, None).numel() == 0

    # the native entry point checks what it can see: sizes, strides, dtypes
    args = dict(
        logits=z.data_ptr(), logits_dtype="F32", rows=40, vocab=63, logits_stride=63,
        labels=y.data_ptr(), ce_weight=a0.data_ptr(), kl_weight=b.data_ptr(),
        ignore_index=IGNORE, loss=torch.empty(40).data_ptr(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="logits row stride 62 is smaller than the vocabulary"):
        _C.token_loss_rows(**{**args, "logits_stride": 62})
    with pytest.raises(ValueError, match="needs rows > 0 and vocab > 0, got rows=0 vocab=63"):
        _C.token_loss_rows(**{**args, "rows": 0})
    with pytest.raises(ValueError, match="logits must be F32, BF16 or F16, got I64"):
        _C.token_loss_rows(**{**args, "logits_dtype": "I64"})
    with pytest.raises(ValueError, match="unknown dtype 'F12'"):
        _C.token_loss_rows(**{**args, "logits_dtype": "F12"})
