"""Triton centroid, intra-class and inter-class kernels against the float64 reference."""

import pytest
import torch

import icakd_fast.functional as F
import icakd_fast.reference as R
from icakd_fast._backend import is_available
from icakd_fast.ops import inter_loss

from helpers import assert_close_rel, noncontig

pytestmark = pytest.mark.skipif(not is_available("triton", "inter", "cpu") and not torch.cuda.is_available(),
                                reason="triton backend unavailable")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
impl = pytest.importorskip("icakd_fast.ops._triton_impl")


def _leaf(x, dtype, nc=False):
    x = x.to(DEV).to(dtype)
    if nc:
        x = noncontig(x)
    return x.requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C,B,D", [(13, 4, 130)])
def test_centroids(dtype, C, B, D):
    sums = torch.randn(C, D, device=DEV) * 3
    counts = torch.randint(0, 4, (C,), device=DEV)
    feats = _leaf(torch.randn(B, D), dtype, nc=True)
    labels = torch.randint(0, C, (B,), device=DEV)
    mu, total = F.class_centroids(sums, counts, feats, labels, backend="triton")
    f64 = feats.detach().double().requires_grad_(True)
    rmu, rtotal = R.class_centroids(sums.double(), counts, f64, labels)
    assert mu.dtype == torch.float32 and torch.equal(total, rtotal)
    assert_close_rel(mu, rmu, dtype)
    go = torch.randn(C, D, device=DEV)
    (g,) = torch.autograd.grad((mu * go).sum(), feats)
    (rg,) = torch.autograd.grad((rmu * go.double()).sum(), f64)
    assert g.dtype == dtype
    assert_close_rel(g, rg, dtype)


@pytest.mark.parametrize("block_b", [16, None])
def test_centroids_label_scan_in_several_steps(monkeypatch, block_b):
    """Classes whose rows fall in several steps of the kernel's label scan, a class with no row,
    strided bank sums, and a sums/feats dtype pair that promotes to float64."""
    from icakd_fast.kernels import structure as kst

    monkeypatch.setattr(kst, "CENTROID_BLOCK_B", block_b)
    C, B, D = 7, 150, 40
    sums = torch.randn(D, C, device=DEV, dtype=torch.float64).t()  # strided
    counts = torch.randint(0, 4, (C,), device=DEV)
    labels = torch.randint(0, C - 1, (B,), device=DEV)  # class C-1 has no row in the batch
    feats = _leaf(torch.randn(B, D), torch.float32)
    mu, total = F.class_centroids(sums, counts, feats, labels, backend="triton")
    rmu, rtotal = R.class_centroids(sums, counts, feats.detach().double(), labels)
    assert mu.dtype == torch.float64 and torch.equal(total, rtotal)
    assert_close_rel(mu, rmu, torch.float32)
    assert torch.equal(mu[C - 1], sums[C - 1] / counts[C - 1].clamp(min=1))


def test_centroids_16_bit_sums_add_in_float32():
    """float16 sums and rows: a float16 output, summed in float32 inside the kernel (the sum of
    2000 float16 rows in float16 would be far off the float64 reference)."""
    C, B, D = 2, 4000, 24
    sums = torch.randn(C, D, device=DEV).half()
    counts = torch.randint(0, 4, (C,), device=DEV)
    labels = torch.randint(0, C, (B,), device=DEV)
    feats = (torch.randn(B, D, device=DEV) + 3.0).half()  # a large common part: rounding errors do not cancel
    mu, _ = F.class_centroids(sums, counts, feats, labels, backend="triton")
    rmu, _ = R.class_centroids(sums.double(), counts, feats.double(), labels)
    assert mu.dtype == torch.float16
    torch.testing.assert_close(mu.double(), rmu, rtol=1e-3, atol=1e-3)  # one float16 rounding of the result


def test_centroids_empty_batch_and_zero_width():
    C = 4
    counts = torch.tensor([0, 3, 1, 2], device=DEV)
    sums = torch.randn(C, 5, device=DEV)
    mu, total = F.class_centroids(sums, counts, torch.zeros(0, 5, device=DEV), torch.zeros(0, dtype=torch.long,
                                                                                          device=DEV),
                                  backend="triton")
    assert torch.equal(total, counts) and torch.equal(mu, sums / counts.clamp(min=1)[:, None])
    labels = torch.tensor([1, 1, 3], device=DEV)
    mu, total = F.class_centroids(torch.zeros(C, 0, device=DEV), counts, torch.zeros(3, 0, device=DEV), labels,
                                  backend="triton")
    assert mu.shape == (C, 0) and total.tolist() == [0, 5, 1, 3]


def test_centroids_gradient_of_the_bank_sums():
    """The backward's bank-sums branch (sums that require grad): d mu[c] / d sums[c] = 1 / total[c]
    (1 for a class with no row), by float64 gradcheck, then float32 rows against the reference."""
    C, D = 4, 3
    counts = torch.tensor([2, 0, 1, 0], device=DEV)
    labels = torch.tensor([0, 1, 1, 0, 2], device=DEV)  # class 3: no row at all
    sums = torch.randn(C, D, device=DEV, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(5, D, device=DEV, dtype=torch.float64)
    # the rows' gradient has its own tests; the interpreter makes each gradcheck point slow
    assert torch.autograd.gradcheck(lambda s: F.class_centroids(s, counts, feats, labels, backend="triton")[0], (sums,))
    s32, f32 = sums.detach().float().requires_grad_(), feats.detach().float().requires_grad_()
    mu, _ = F.class_centroids(s32, counts, f32, labels, backend="triton")
    go = torch.randn(C, D, device=DEV, dtype=torch.float64)
    got = torch.autograd.grad(mu, (s32, f32), go.float())
    s64, f64 = s32.detach().double().requires_grad_(), f32.detach().double().requires_grad_()
    exp = torch.autograd.grad(R.class_centroids(s64, counts, f64, labels)[0], (s64, f64), go)
    for name, g, e in zip(("sums", "feats"), got, exp):
        assert g.dtype == torch.float32
        assert_close_rel(g, e, torch.float32, name)
    total = torch.tensor([4, 2, 2, 0], device=DEV, dtype=torch.float64)
    assert_close_rel(got[0], go / total.clamp(min=1).unsqueeze(1), torch.float32, "sums, by hand")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C,B,D", [(11, 70, 300)])
def test_intra_loss(dtype, C, B, D):
    f_s = _leaf(torch.randn(B, D), dtype, nc=True)
    f_t = _leaf(torch.randn(B, D), dtype)
    mu_s = torch.randn(C, D, device=DEV).to(dtype)
    mu_t = _leaf(torch.randn(C, D), dtype, nc=True)
    labels = torch.randint(0, C, (B,), device=DEV)
    valid = torch.rand(C, device=DEV) > 0.3
    loss = F.intra_class_loss(f_s, f_t, mu_s, mu_t, labels, valid, backend="triton")
    ins = [t.detach().double().requires_grad_(True) for t in (f_s, f_t, mu_t)]
    ref = R.intra_class_loss(ins[0], ins[1], mu_s.double(), ins[2], labels, valid)
    assert_close_rel(loss, ref, dtype)
    go = 0.7
    got = torch.autograd.grad(loss * go, (f_s, f_t, mu_t))
    exp = torch.autograd.grad(ref * go, ins)
    for name, g, e in zip(("f_s", "f_t", "mu_t"), got, exp):
        assert_close_rel(g, e, dtype, name)


def test_intra_no_valid_rows_is_zero():
    f = torch.randn(4, 5, device=DEV, requires_grad=True)
    mu = torch.randn(3, 5, device=DEV)
    loss = F.intra_class_loss(f, f.detach(), mu, mu, torch.zeros(4, dtype=torch.int64, device=DEV),
                              torch.zeros(3, dtype=torch.bool, device=DEV), backend="triton")
    assert loss.item() == 0
    (g,) = torch.autograd.grad(loss, f)
    assert g.abs().max() == 0


def _inter_case(C, Ds, Dt, dtype, nc, zero_row=False):
    mu_s = torch.randn(C, Ds)
    mu_t = torch.randn(C, Dt)
    if zero_row and C > 2:
        mu_s[1] = 0
        mu_t[2] = 0
    return _leaf(mu_s, dtype, nc), _leaf(mu_t, dtype, nc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C,Ds,Dt", [(45, 16, 70)])
@pytest.mark.parametrize("use_live", [False, True])
def test_inter_loss(dtype, C, Ds, Dt, use_live):
    # a zero row has gradient dn / eps (huge), which overflows float16 in every backend
    mu_s, mu_t = _inter_case(C, Ds, Dt, dtype, nc=C == 7, zero_row=dtype == torch.float32)
    valid = torch.rand(C, device=DEV) > 0.25
    live = (torch.rand(C, device=DEV) > 0.6) if use_live else None
    loss = F.inter_class_loss(mu_s, mu_t, valid, live=live, backend="triton")
    s64 = mu_s.detach().double().requires_grad_(True)
    t64 = mu_t.detach().double().requires_grad_(True)
    ref = R.inter_class_loss(s64, t64, valid, live)
    assert loss.dtype == torch.float32 or loss.dtype == dtype
    if ref.abs().item() < 1e-6:  # a single class: only the diagonal, (1 - 1)^2 up to rounding
        assert loss.abs().item() < 1e-5
    else:
        assert_close_rel(loss, ref, dtype, "loss", factor=2)
    go = 1.3
    got = torch.autograd.grad(loss * go, (mu_s, mu_t))
    exp = torch.autograd.grad(ref * go, (s64, t64))
    for name, g, e in zip(("mu_s", "mu_t"), got, exp):
        assert g.dtype == dtype
        if e.abs().max() < 1e-6:
            assert g.abs().max() < 1e-4, name
        else:
            assert_close_rel(g, e, dtype, name, factor=4)
    if live is not None:
        assert got[0][~live].abs().max() == 0 if (~live).any() else True


def test_inter_only_student_grad_and_no_valid():
    mu_s, mu_t = _inter_case(9, 8, 12, torch.float32, nc=False)
    mu_t = mu_t.detach()
    valid = torch.zeros(9, dtype=torch.bool, device=DEV)
    loss = inter_loss("triton", mu_s, mu_t, valid, None, 1e-12)
    assert loss.item() == 0
    (g,) = torch.autograd.grad(loss, mu_s)
    assert g.abs().max() == 0


def test_inter_contract_direct():
    C, Ds, Dt = 10, 6, 9
    mu_s = torch.randn(C, Ds, device=DEV)
    mu_t = torch.randn(C, Dt, device=DEV)
    valid = torch.ones(C, dtype=torch.bool, device=DEV)
    live = torch.zeros(C, dtype=torch.bool, device=DEV)
    live[3] = True
    g_s, g_t = impl.inter_bwd(torch.tensor(2.0, device=DEV), mu_s, mu_t, valid, live, True, False, 1e-12)
    assert g_t is None and g_s.dtype == torch.float32
    s64 = mu_s.double().requires_grad_(True)
    ref = R.inter_class_loss(s64, mu_t.double(), valid, live) * 2
    (e,) = torch.autograd.grad(ref, s64)
    assert_close_rel(g_s, e, torch.float32)


@pytest.mark.parametrize("splits", [2, 5])
def test_inter_backward_column_splits(monkeypatch, splits):
    """Several programs per row tile add their column range into the gradient (atomic path)."""
    from icakd_fast.kernels import structure as kst

    monkeypatch.setattr(kst, "BWD_SPLITS", splits)
    C, Ds, Dt = 70, 12, 20
    mu_s = torch.randn(C, Ds, device=DEV, requires_grad=True)
    mu_t = torch.randn(C, Dt, device=DEV, requires_grad=True)
    valid = torch.rand(C, device=DEV) > 0.2
    live = torch.rand(C, device=DEV) > 0.5
    loss = inter_loss("triton", mu_s, mu_t, valid, live, 1e-12)
    got = torch.autograd.grad(loss, (mu_s, mu_t))
    s64 = mu_s.detach().double().requires_grad_(True)
    t64 = mu_t.detach().double().requires_grad_(True)
    exp = torch.autograd.grad(R.inter_class_loss(s64, t64, valid, live), (s64, t64))
    for g, e in zip(got, exp):
        assert_close_rel(g, e, torch.float32, factor=4)
    # deterministic algorithms switch the splits off
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert kst._splits(C, 16, mu_s.device) == 1


@pytest.mark.parametrize("precision,expected", [("highest", "tf32x3"), ("high", "tf32"), ("medium", "bf16")])
def test_dot_precision_follows_torch(precision, expected):
    from icakd_fast.kernels._common import dot_precision

    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        assert dot_precision(torch.float32, torch.float32) == expected
        assert dot_precision(torch.float16, torch.bfloat16) == "tf32"
        assert dot_precision(torch.float32, torch.float64) == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)
