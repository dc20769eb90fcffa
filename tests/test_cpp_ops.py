"""What is special to the cpp backend's CPU kernels: shapes past the conformance suite's tiny
ones (vector bodies and tails, the BLAS-backed and chunked inter forms), the contract functions
called directly (partial needs, empty masks), opcheck and argument checks of every schema, the
portable loops and thread counts. Forward, every gradient, gradcheck and non-contiguous inputs
of the public ops at tiny shapes are the conformance suite's (``test_conformance.py``).

Skipped when the extension ``icakd_fast._C`` is not built.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from icakd_fast import _ext

if not _ext.load():
    pytest.skip(f"icakd_fast._C is not built: {_ext.reason()}", allow_module_level=True)

from icakd_fast import ops, reference  # noqa: E402
from icakd_fast.ops import _cpp_impl as cpp  # noqa: E402

from helpers import cam_features_with_grads  # noqa: E402

pytestmark = pytest.mark.cpp

C_OPS = torch.ops.icakd_fast_C
EPS = reference.NORM_EPS
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def close(actual, expected, dtype=torch.float32, scale=1.0, msg=""):
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol["rtol"] * scale, atol=tol["atol"] * scale, msg=msg or None
    )


#: absolute floor of `close_grad`: the rounding noise of a gradient that is zero in exact arithmetic
#: (one valid class: every cosine is 1), far below every non-zero gradient these tests compare
GRAD_FLOOR = {torch.float64: 1e-14, torch.float32: 1e-9, torch.bfloat16: 1e-8}


def close_grad(actual, expected, dtype=torch.float32, scale=1.0, msg="", nonzero=True):
    """Gradients [N, D], relative to each row's own size: row i may differ by rtol * max|expected[i]|
    (plus a floor of rounding noise, `GRAD_FLOOR`), so a zero gradient fails wherever the expected
    row is not negligible, and the 1/eps-sized gradient of a zero-norm centroid does not loosen
    the other rows. `nonzero`: the math says the gradient is not zero, so it must not be
    negligible (else a zero would pass)."""
    rtol = TOL[dtype]["rtol"] * scale
    floor = GRAD_FLOOR[dtype]
    expected = expected.double()
    if nonzero:
        assert expected.abs().max() > 1e3 * floor, f"{msg}: the expected gradient is negligible, nothing is checked"
    row_scale = expected.abs().amax(dim=1, keepdim=True) if expected.dim() > 1 else expected.abs().max()
    err = (actual.double() - expected).abs()
    bound = rtol * (expected.abs() + row_scale) + floor
    worst = (err / bound).max().item()
    assert worst <= 1, (f"{msg}: gradient off by {worst:.2f}x its bound (rtol {rtol:.0e} of the entry and of its "
                        f"row's largest entry, floor {floor:.0e}); largest error {err.max().item():.3e}")


def noncontig(x: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous layout (the last dim strided by 2)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    out = wide[..., ::2]
    assert not out.is_contiguous() or out.numel() <= 1
    return out


# ---------------------------------------------------------------------------------------------
# cam
# ---------------------------------------------------------------------------------------------

#: shapes past the conformance suite's tiny ones (vector bodies and tails, a 1-row map)
CAM_SHAPES = [(2, 33, 7, 7), (4, 64, 8, 8), (1, 5, 1, 13)]


@pytest.mark.parametrize("shape", CAM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cam_fwd_matches_reference(shape, dtype):
    b, k, h, w = shape
    f = torch.randn(shape).to(dtype)
    wt = torch.randn(b, k).to(dtype)
    cam, pooled, pool_w = cpp.cam_fwd(f, wt, True)
    r_cam, r_pooled = reference.class_activation_features(f, wt)
    assert cam.dtype == dtype and pooled.dtype == dtype and cam.shape == (b, h, w) and pooled.shape == (b, k)
    close(cam, r_cam, dtype)
    close(pooled, r_pooled, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    r_pw = reference.cam_pool_weights(reference.cam._cam_acc(f, wt))
    assert pool_w.dtype == acc
    close(pool_w, r_pw, acc)
    cam2, pooled2, pw2 = cpp.cam_fwd(f, wt, False)
    assert torch.equal(cam2, cam) and pooled2.numel() == 0 and pw2.numel() == 0


def test_cam_mixed_dtypes_noncontiguous_and_constant_map():
    f = torch.randn(3, 9, 4, 5, dtype=torch.bfloat16)
    w = torch.randn(3, 9, dtype=torch.float32)
    cam, pooled, _ = cpp.cam_fwd(f, w, True)
    r_cam, r_pooled = reference.class_activation_features(f, w)
    assert cam.dtype == torch.float32
    close(cam, r_cam, torch.bfloat16)
    close(pooled, r_pooled, torch.bfloat16)
    # channels_last and strided views
    f32 = torch.randn(4, 6, 5, 7)
    for view in (f32.to(memory_format=torch.channels_last), f32.transpose(2, 3), noncontig(f32)):
        wv = noncontig(torch.randn(view.shape[0], view.shape[1]))
        c1, p1, _ = cpp.cam_fwd(view, wv, True)
        c2, p2 = reference.class_activation_features(view, wv)
        close(c1, c2)
        close(p1, p2)
    # all-zero CAM: uniform pooling (plain spatial mean)
    f = torch.randn(2, 4, 3, 3)
    cam, pooled, pool_w = cpp.cam_fwd(f, torch.zeros(2, 4), True)
    assert torch.all(cam == 0)
    close(pooled, f.mean(dim=(2, 3)))
    close(pool_w, torch.full_like(pool_w, 1 / 9))


@pytest.mark.parametrize("shape", [(2, 40, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cam_backward_matches_reference(shape, dtype):
    b, k, h, w = shape
    f0 = torch.randn(shape).to(dtype)
    w0 = torch.randn(b, k).to(dtype)
    g_cam = torch.randn(b, h, w).to(dtype)
    g_pool = torch.randn(b, k).to(dtype)

    out = cam_features_with_grads(lambda f, w: ops.cam_features("cpp", f, w), f0, w0, g_cam, g_pool)
    ref = cam_features_with_grads(reference.class_activation_features, f0, w0, g_cam, g_pool)
    for a, r in zip(out, ref):
        assert a.dtype == r.dtype and a.shape == r.shape
        close(a, r, dtype, scale=2.0)


def test_cam_backward_partial_needs():
    f = torch.randn(2, 5, 3, 4)
    w = torch.randn(2, 5)
    cam, pooled, pool_w = cpp.cam_fwd(f, w, True)
    gc, gp = torch.randn_like(cam), torch.randn_like(pooled)
    gf_full, gw_full = cpp.cam_bwd(gc, gp, f, w, cam, pool_w, True, True)
    gf, gw = cpp.cam_bwd(gc, gp, f, w, cam, pool_w, True, False)
    assert gw is None and torch.equal(gf, gf_full)
    gf, gw = cpp.cam_bwd(gc, gp, f, w, cam, pool_w, False, True)
    assert gf is None and torch.equal(gw, gw_full)
    # only one output received a gradient
    gf, gw = cpp.cam_bwd(None, gp, f, w, cam, pool_w, True, True)
    close(gf, gp[:, :, None, None] * pool_w.view(2, 1, 3, 4))
    assert torch.all(gw == 0)
    gf, gw = cpp.cam_bwd(gc, None, f, w, cam, pool_w, True, True)
    gf2, gw2 = cpp.cam_bwd(gc, torch.zeros_like(gp), f, w, cam, pool_w, True, True)
    close(gf, gf2)
    close(gw, gw2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_spatial_mean(dtype):
    g = torch.randn(3, 11, 5, 7).to(dtype)
    out = cpp.spatial_mean(g)
    assert out.dtype == dtype
    close(out, reference.grad_cam_weights(g), dtype)
    close(cpp.spatial_mean(g.transpose(2, 3)), reference.grad_cam_weights(g), dtype)


# ---------------------------------------------------------------------------------------------
# centroids and intra
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c,d,b", [(50, 64, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_centroids(c, d, b, dtype):
    sums = torch.randn(c, d) * 3
    counts = torch.randint(0, 4, (c,))
    sums[counts == 0] = 0
    feats = torch.randn(b, d).to(dtype)
    labels = torch.randint(0, c, (b,))
    g = torch.randn(c, d)
    f1 = feats.clone().requires_grad_()
    mu, total = ops.centroids("cpp", sums, counts, f1, labels)
    f2 = feats.clone().requires_grad_()
    r_mu, r_total = reference.class_centroids(sums, counts, f2, labels)
    assert mu.dtype == r_mu.dtype and torch.equal(total, r_total)
    close(mu, r_mu, dtype)
    (mu * g.to(mu.dtype)).sum().backward()
    (r_mu * g.to(r_mu.dtype)).sum().backward()
    close(f1.grad, f2.grad, dtype)
    mu_nc, _ = cpp.centroids_fwd(noncontig(sums), counts, noncontig(feats), labels)
    close(mu_nc, r_mu, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_centroids_gradient_of_the_bank_sums(dtype):
    """The backward's bank-sums branch (sums that require grad): d mu[c] / d sums[c] = 1 / total[c]
    (1 for a class with no row), against float64 gradcheck and the reference's autograd."""
    C, D, B = 6, 5, 9
    sums = torch.randn(C, D, dtype=torch.float64)
    counts = torch.tensor([2, 0, 1, 0, 3, 1])
    labels = torch.tensor([0, 1, 1, 4, 0, 2, 1, 4, 0])  # classes 3 and 5: no batch row; 3: no row at all
    feats = torch.randn(B, D, dtype=torch.float64)
    if dtype == torch.float64:
        s, f = sums.clone().requires_grad_(), feats.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: ops.centroids("cpp", a, counts, b, labels)[0], (s, f))
    g = torch.randn(C, D, dtype=torch.float64)
    s, f = sums.to(dtype).requires_grad_(), feats.to(dtype).requires_grad_()
    mu, _ = ops.centroids("cpp", s, counts, f, labels)
    g_s, g_f = torch.autograd.grad(mu, (s, f), g.to(mu.dtype))
    s64, f64 = sums.to(dtype).double().requires_grad_(), feats.to(dtype).double().requires_grad_()
    r_s, r_f = torch.autograd.grad(reference.class_centroids(s64, counts, f64, labels)[0], (s64, f64), g)
    assert g_s.dtype == dtype and g_f.dtype == dtype
    close_grad(g_s, r_s, dtype, msg="sums")
    close_grad(g_f, r_f, dtype, msg="feats")
    total = torch.tensor([5, 3, 2, 0, 5, 1], dtype=torch.float64)  # counts + the batch's rows
    close_grad(g_s, g / total.clamp(min=1).unsqueeze(1), dtype, msg="sums, by hand")


def _intra_inputs(b, c, d, dtype):
    f_s = torch.randn(b, d).to(dtype)
    f_t = torch.randn(b, d).to(dtype)
    mu_s = torch.randn(c, d).to(dtype)
    mu_t = torch.randn(c, d).to(dtype)
    labels = torch.randint(0, c, (b,))
    valid = torch.rand(c) > 0.3
    return f_s, f_t, mu_s, mu_t, labels, valid


@pytest.mark.parametrize("b,c,d", [(64, 100, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_intra(b, c, d, dtype):
    inputs = _intra_inputs(b, c, d, dtype)
    g = torch.tensor(1.7)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in inputs[:4]]
        loss = fn(*leaves, *inputs[4:])
        (loss * g.to(loss.dtype)).backward()
        return [loss] + [leaves[0].grad, leaves[1].grad, leaves[3].grad] + [leaves[2].grad]

    out = run(lambda *a: ops.intra_loss("cpp", *a))
    ref = run(reference.intra_class_loss)
    close(out[0], ref[0], dtype)
    for a, r in zip(out[1:4], ref[1:4]):
        assert a.dtype == r.dtype
        close(a, r, dtype)
    assert out[4] is None and ref[4] is None  # mu_s is detached


def test_intra_no_valid_row_and_noncontiguous():
    f_s, f_t, mu_s, mu_t, labels, _ = _intra_inputs(8, 4, 6, torch.float32)
    valid = torch.zeros(4, dtype=torch.bool)
    assert cpp.intra_fwd(f_s, f_t, mu_s, mu_t, labels, valid).item() == 0
    assert torch.all(cpp.intra_bwd(torch.tensor(1.0), f_s, f_t, mu_s, mu_t, labels, valid) == 0)
    valid = torch.ones(4, dtype=torch.bool)
    a = cpp.intra_fwd(noncontig(f_s), noncontig(f_t), noncontig(mu_s), noncontig(mu_t), labels, valid)
    close(a, reference.intra_class_loss(f_s, f_t, mu_s, mu_t, labels, valid))


# ---------------------------------------------------------------------------------------------
# inter
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["direct", "gram"])
def inter_form(request, monkeypatch):
    """Both forms of the inter loss: tiles of E = A B^T, or the float64 Gram matrix A^T A."""
    monkeypatch.setenv("ICAKD_INTER_FORM", request.param)
    return request.param


def _inter_inputs(c, ds, dt, dtype, frac_valid=0.8, zero_row=False):
    mu_s = torch.randn(c, ds).to(dtype)
    mu_t = torch.randn(c, dt).to(dtype)
    valid = torch.rand(c) < frac_valid
    valid[0] = True
    if zero_row and c > 2:
        mu_s[1] = 0
        mu_t[2] = 0
    return mu_s, mu_t, valid


@pytest.mark.parametrize("c,ds,dt", [(1, 1, 1), (7, 5, 9), (130, 32, 48), (200, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inter_forward(c, ds, dt, dtype, inter_form):
    mu_s, mu_t, valid = _inter_inputs(c, ds, dt, dtype, zero_row=True)
    out = cpp.inter_fwd(mu_s, mu_t, valid, EPS)
    ref = reference.inter_class_loss(mu_s, mu_t, valid)
    assert out.dtype == ref.dtype and out.dim() == 0
    close(out, ref, dtype)
    close(cpp.inter_fwd(noncontig(mu_s), noncontig(mu_t), valid, EPS), ref, dtype)


@pytest.mark.parametrize("c,ds,dt", [(1, 3, 2), (9, 5, 7), (150, 24, 40)])
@pytest.mark.parametrize("use_live", [False, True])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inter_backward(c, ds, dt, use_live, need, dtype, inter_form):
    mu_s0, mu_t0, valid = _inter_inputs(c, ds, dt, dtype, zero_row=True)
    live = (torch.rand(c) < 0.3) if use_live else None
    g = torch.tensor(0.7, dtype=dtype)

    def run(fn):
        mu_s = mu_s0.clone().requires_grad_(need[0])
        mu_t = mu_t0.clone().requires_grad_(need[1])
        loss = fn(mu_s, mu_t)
        (loss * g).backward()
        return loss, mu_s.grad, mu_t.grad

    out = run(lambda s, t: ops.inter_loss("cpp", s, t, valid, live, EPS))
    ref = run(lambda s, t: reference.inter_class_loss(s, t, valid, live))
    close(out[0], ref[0], dtype)
    # the math's gradient is zero with fewer than two valid classes, and for mu_s with no live row
    several = int(valid.sum()) > 1
    nonzero = (several and (live is None or bool((live & valid).any())), several)
    for i, (a, r) in enumerate(zip(out[1:], ref[1:])):
        assert (a is None) == (r is None)
        if a is not None:
            assert a.dtype == r.dtype
            close_grad(a, r, dtype, scale=10.0, msg=("mu_s", "mu_t")[i], nonzero=nonzero[i])
    if use_live and need[0]:
        assert torch.all(out[1][~live] == 0)


@pytest.mark.parametrize("all_valid", [False, True])
@pytest.mark.parametrize("use_live", [False, True])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("blocks", ["1", "3", "19"])
def test_inter_gram_chunks(all_valid, use_live, need, blocks, monkeypatch):
    """The Gram form builds A and the gradients in row chunks: chunks of two rows (and a remainder
    of one) give the same loss and gradients as the reference, on every row or only the live ones;
    K = A^T A from its blocks on and above the diagonal (1, 3 or 19 column blocks), mirrored."""
    monkeypatch.setenv("ICAKD_INTER_FORM", "gram")
    monkeypatch.setenv("ICAKD_GRAM_CHUNK_ELEMS", "40")  # D = 19: two rows per chunk
    monkeypatch.setenv("ICAKD_GRAM_BLOCKS", blocks)
    mu_s0, mu_t0, valid = _inter_inputs(23, 8, 11, torch.float64, zero_row=True)
    if all_valid:  # every row computed: chunks are slices, not index lists
        valid[:] = True
    live = (torch.rand(23) < 0.4) if use_live else None

    def run(fn):
        mu_s = mu_s0.clone().requires_grad_(need[0])
        mu_t = mu_t0.clone().requires_grad_(need[1])
        loss = fn(mu_s, mu_t)
        (loss * 1.3).backward()
        return loss, mu_s.grad, mu_t.grad

    out = run(lambda s, t: ops.inter_loss("cpp", s, t, valid, live, EPS))
    ref = run(lambda s, t: reference.inter_class_loss(s, t, valid, live))
    for a, r in zip(out, ref):
        assert (a is None) == (r is None)
        if a is not None:
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    K = cpp.inter_gram_fwd(mu_s0, mu_t0, valid, EPS)[1]  # the blocks below the diagonal mirrored
    A = torch.cat([mu_s0 / mu_s0.norm(dim=1, keepdim=True).clamp_min(EPS),
                   mu_t0 / mu_t0.norm(dim=1, keepdim=True).clamp_min(EPS)], 1) * valid[:, None]
    torch.testing.assert_close(K, A.t() @ A, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, "40"])
@pytest.mark.parametrize("slack", [0, 3, 100])
def test_inter_gram_backward_with_a_live_row_bound(chunk, slack, monkeypatch):
    """``max_live``: the Gram form's backward takes the first max_live rows of a wanted-first order
    (what it does on a GPU, where the live rows cannot be counted without a host sync): an exact
    bound, a loose one and one at least C all give the reference gradient, zero outside live."""
    import icakd_fast.functional as F

    monkeypatch.setenv("ICAKD_INTER_FORM", "gram")
    if chunk:
        monkeypatch.setenv("ICAKD_GRAM_CHUNK_ELEMS", chunk)  # D = 19: chunks of two rows
    mu_s0, mu_t0, valid = _inter_inputs(23, 8, 11, torch.float64, zero_row=True)
    live = torch.rand(23) < 0.4
    live[1] = True  # a live row with a zero centroid
    bound = int((valid & live).sum()) + slack

    def run(fn):
        mu_s = mu_s0.clone().requires_grad_(True)
        loss = fn(mu_s)
        (loss * 1.3).backward()
        return loss, mu_s.grad

    out = run(lambda s: F.inter_class_loss(s, mu_t0, valid, live=live, max_live=bound, backend="cpp"))
    ref = run(lambda s: reference.inter_class_loss(s, mu_t0, valid, live))
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    assert torch.all(out[1][~live] == 0)
    # the C++ op directly: no row live -> a zero gradient
    gram = cpp.inter_gram_fwd(mu_s0, mu_t0, valid, EPS)[1]
    g_s, _ = cpp.inter_gram_bwd(torch.tensor(1.0, dtype=torch.float64), gram, mu_s0, mu_t0, valid,
                                torch.zeros(23, dtype=torch.bool), True, False, EPS, 0)
    assert g_s.shape == mu_s0.shape and torch.all(g_s == 0)


def test_inter_max_live_checks():
    import icakd_fast.functional as F

    mu_s, mu_t, valid = _inter_inputs(12, 4, 6, torch.float32)
    valid[:] = True
    live = torch.zeros(12, dtype=torch.bool)
    live[:5] = True
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="max_live"):
            F.inter_class_loss(mu_s, mu_t, valid, live=live, max_live=bad, backend="cpp")
    with pytest.raises(ValueError, match="give live too"):
        F.inter_class_loss(mu_s, mu_t, valid, max_live=5, backend="cpp")
    with pytest.raises(RuntimeError, match="max_live=4 is below"):  # 5 rows live and valid
        F.inter_class_loss(mu_s, mu_t, valid, live=live, max_live=4, backend="cpp")
    with pytest.raises(RuntimeError, match="max_live must be -1"):
        cpp.inter_gram_bwd(torch.tensor(1.0), torch.zeros(10, 10, dtype=torch.float64), mu_s, mu_t, valid, live,
                           True, False, EPS, -2)


def test_inter_bf16_backward(inter_form):
    mu_s0, mu_t0, valid = _inter_inputs(70, 16, 24, torch.bfloat16)
    live = torch.rand(70) < 0.5
    s1 = mu_s0.clone().requires_grad_()
    ops.inter_loss("cpp", s1, mu_t0, valid, live, EPS).backward()
    s2 = mu_s0.clone().requires_grad_()
    reference.inter_class_loss(s2, mu_t0, valid, live).backward()
    assert s1.grad.dtype == torch.bfloat16
    close_grad(s1.grad, s2.grad, torch.bfloat16, scale=2.0, msg="mu_s")


def test_inter_no_valid_class(inter_form):
    mu_s, mu_t, valid = _inter_inputs(5, 3, 4, torch.float32)
    valid[:] = False
    assert cpp.inter_fwd(mu_s, mu_t, valid, EPS).item() == 0
    gs, gt = cpp.inter_bwd(torch.tensor(1.0), mu_s, mu_t, valid, None, True, True, EPS)
    assert torch.all(gs == 0) and torch.all(gt == 0)


def test_inter_gradcheck(inter_form):
    mu_s, mu_t, valid = _inter_inputs(11, 4, 6, torch.float64)
    mu_s.requires_grad_()
    mu_t.requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: ops.inter_loss("cpp", s, t, valid, None, EPS), (mu_s, mu_t))
    live = torch.rand(11) < 0.5
    live[0] = True
    base, idx = mu_s.detach(), live.nonzero().squeeze(1)

    def live_rows_only(rows):  # only the live rows are variables; the others are constants
        return ops.inter_loss("cpp", base.index_put((idx,), rows), mu_t.detach(), valid, live, EPS)

    assert torch.autograd.gradcheck(live_rows_only, (base[idx].clone().requires_grad_(),))


def test_inter_is_deterministic_and_tiles_exactly(inter_form):
    # several 64-row tiles, uneven last tile; the loss does not depend on the thread count
    mu_s, mu_t, valid = _inter_inputs(301, 8, 12, torch.float32)
    a = cpp.inter_fwd(mu_s, mu_t, valid, EPS)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = cpp.inter_fwd(mu_s, mu_t, valid, EPS)
        gb = cpp.inter_bwd(torch.tensor(1.0), mu_s, mu_t, valid, None, True, True, EPS)
    finally:
        torch.set_num_threads(threads)
    ga = cpp.inter_bwd(torch.tensor(1.0), mu_s, mu_t, valid, None, True, True, EPS)
    assert torch.equal(a, b)
    assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])


# ---------------------------------------------------------------------------------------------
# schema / fake kernels: torch.library.opcheck on every registered op
# ---------------------------------------------------------------------------------------------


def _step_op_inputs(cam, sums, count, feats, labels):
    """Inputs of the training step's one-op forms: a teacher map and ``cam_loss_fwd``'s outputs, a
    batch with a NaN row, a keep mask and ``structure_fwd``'s outputs (for the backwards)."""
    cam_t = torch.rand_like(cam)
    bad = feats.clone()
    bad[1, 2] = float("nan")
    keep = torch.tensor([True, False, True, True, True, False, True])
    fwd = cpp.structure_fwd(sums.float(), count, sums.float() * 0.5, count, feats, feats.flip(0), labels, keep, None,
                            1, EPS)
    return cam_t, cpp.cam_loss_fwd(cam, cam_t, EPS), bad, keep, fwd


def _opcheck_cases():
    f = torch.randn(2, 5, 3, 4)
    w = torch.randn(2, 5)
    cam, pooled, pool_w = cpp.cam_fwd(f, w, True)
    bank = torch.randn(6, 3, 4)
    count = torch.tensor([0, 1, 3, 2, 0, 3])
    ptr = torch.tensor([0, 1, 0, 2, 0, 1])
    sums = (bank * (torch.arange(3)[None, :, None] < count[:, None, None])).sum(1)
    feats = torch.randn(7, 4)
    labels = torch.tensor([0, 2, 2, 5, 1, 2, 2])
    mask = torch.tensor([True, True, False, True, True, True, True])
    fifo = torch.randn(5, 4)
    fifo_labels = torch.tensor([0, -1, 3, 1, -1])
    mu_s, mu_t, valid = _inter_inputs(9, 4, 6, torch.float32)
    live = torch.rand(9) < 0.5
    K = cpp.inter_gram_fwd(mu_s, mu_t, valid, EPS)[1]
    f_s, f_t, m_s, m_t, lab, val = _intra_inputs(6, 4, 5, torch.float32)
    g = torch.tensor(1.3)
    cam_t, loss_q_norm, bad, keep, fwd_small = _step_op_inputs(cam, sums, count, feats, labels)
    s_sums, s_count = sums.float(), count
    big_c = 300  # past the small loop form: the BLAS-backed forms
    big = (torch.randn(big_c, 32), torch.randint(0, 3, (big_c,)), torch.randn(7, 32), torch.randint(0, big_c, (7,)))
    fwd_big = cpp.structure_fwd(big[0], big[1], big[0], big[1], big[2], big[2] * 2, big[3], None, None, 1, EPS)
    raw = feats * 3.0
    raw[4] = 0.0
    fwd_raw = cpp.structure_fwd(s_sums, s_count, s_sums * 0.5, s_count, raw, raw.flip(0), labels, keep, None, 1, EPS,
                                True)
    proj = torch.randn(4, 6)  # the student's rows [7, 6] projected to the bank's width 4
    wide = torch.randn(7, 6)
    fwd_proj = cpp.structure_fwd(s_sums, s_count, s_sums * 0.5, s_count, wide, raw, labels, keep, None, 1, EPS, True,
                                 proj)
    fc, tg = torch.randn(6, 5), torch.tensor([3, 0])
    f_cl = f.to(memory_format=torch.channels_last)
    act = cpp.class_activation_fwd(f, fc, tg, cam_t, EPS)
    act_bare = cpp.class_activation_fwd(f_cl, fc, tg, None, EPS)
    act64 = cpp.class_activation_fwd(f.double(), fc.double(), tg, cam_t.double(), EPS)
    return {
        "cam_loss_fwd": [(cam, cam_t, EPS)],
        "cam_loss_bwd": [(g, cam, cam_t, loss_q_norm[1], loss_q_norm[2], EPS)],
        "class_activation_fwd": [(f, fc, tg, cam_t, EPS), (f_cl, fc, tg, None, EPS),
                                 (f.double(), fc.double(), tg, cam_t.double(), EPS),
                                 (f.bfloat16(), fc, tg, cam_t, EPS)],
        "class_activation_bwd": [
            (torch.randn_like(act[1]), g, f, fc, tg, act[0], act[3], act[4], act[5], act[6], EPS, True, True),
            (None, g, f, fc, tg, act[0], act[3], act[4], act[5], act[6], EPS, False, True),
            (torch.randn_like(act_bare[1]), None, f_cl, fc, tg, act_bare[0], act_bare[3], act_bare[4], act_bare[5],
             act_bare[6], EPS, True, True),
            (torch.randn_like(act64[1]), g.double(), f.double(), fc.double(), tg, act64[0], act64[3], act64[4],
             act64[5], act64[6], EPS, True, True),
        ],
        "class_bank_update_": [
            (bank.clone(), count.clone(), ptr.clone(), sums.clone(), torch.tensor(4), torch.tensor(0), bad, labels, mask,
             2),
            (bank.clone(), count.clone(), ptr.clone(), sums.clone(), torch.tensor(0), torch.tensor(0), feats, labels,
             None, 0),
        ],
        "fifo_bank_update_": [(fifo.clone(), fifo_labels.clone(), torch.tensor(3), torch.tensor(0), bad, labels, mask)],
        # two banks of one batch: each its own rows and mask (one bank without a mask)
        "class_banks_update_": [
            ([bank.clone(), bank.clone()], [count.clone(), count.clone()], [ptr.clone(), ptr.clone()],
             [sums.clone(), sums.clone()], [torch.tensor(4), torch.tensor(1)], [torch.tensor(0), torch.tensor(0)],
             [bad, feats], labels, [mask, None], 2),
        ],
        "fifo_banks_update_": [
            ([fifo.clone(), fifo.clone()], [fifo_labels.clone(), fifo_labels.clone()], [torch.tensor(3), torch.tensor(0)],
             [torch.tensor(0), torch.tensor(0)], [bad, feats], labels, [None, mask]),
        ],
        "structure_fwd": [
            (s_sums, s_count, s_sums * 0.5, s_count, feats, feats.flip(0), labels, keep, None, 1, EPS),
            (big[0], big[1], big[0], big[1], big[2], big[2] * 2, big[3], None, None, 1, EPS),
            # raw rows that the op normalises (a zero row: the eps branch)
            (s_sums, s_count, s_sums * 0.5, s_count, raw, raw.flip(0), labels, keep, None, 1, EPS, True),
            (s_sums, s_count, s_sums * 0.5, s_count, wide, raw, labels, keep, None, 1, EPS, True, proj),
        ],
        "structure_bwd": [
            (g, g * 2, feats, feats.flip(0), fwd_small[2], fwd_small[3], fwd_small[4], fwd_small[5], labels, keep,
             fwd_small[6], EPS),
            (g, g * 2, big[2], big[2] * 2, fwd_big[2], fwd_big[3], fwd_big[4], fwd_big[5], big[3], None, fwd_big[6],
             EPS),
            (g, g * 2, fwd_raw[7], fwd_raw[8], fwd_raw[2], fwd_raw[3], fwd_raw[4], fwd_raw[5], labels, keep,
             fwd_raw[6], EPS, fwd_raw[9]),
            (g, g * 2, fwd_proj[7], fwd_proj[8], fwd_proj[2], fwd_proj[3], fwd_proj[4], fwd_proj[5], labels, keep,
             fwd_proj[6], EPS, fwd_proj[9], wide, proj),
        ],
        "cam_fwd": [(f, w, True), (f, w, False), (f.to(memory_format=torch.channels_last), w, True)],
        "cam_bwd": [
            (torch.randn_like(cam), torch.randn_like(pooled), f, w, cam, pool_w, True, True),
            (None, torch.randn_like(pooled), f, w, cam, pool_w, True, False),
            (torch.randn_like(cam), None, f.to(memory_format=torch.channels_last), w, cam, pool_w, True, True),
        ],
        "spatial_mean": [(f,)],
        "class_bank_enqueue_": [(bank.clone(), count.clone(), ptr.clone(), sums.clone(), feats, labels, mask)],
        "class_bank_resync_": [(bank, count, sums.clone(), torch.tensor([1, 3]))],
        "fifo_bank_enqueue_": [(fifo.clone(), fifo_labels.clone(), torch.tensor(3), feats, labels, mask)],
        "fifo_bank_sums": [(fifo, fifo_labels, 4)],
        "centroids_fwd": [(sums, count, feats, labels)],
        "intra_fwd": [(f_s, f_t, m_s, m_t, lab, val)],
        "intra_bwd": [(g, f_s, f_t, m_s, m_t, lab, val)],
        "inter_fwd": [(mu_s, mu_t, valid, EPS)],
        "inter_bwd": [(g, mu_s, mu_t, valid, live, True, False, EPS), (g, mu_s, mu_t, valid, None, True, True, EPS)],
        "inter_gram_fwd": [(mu_s, mu_t, valid, EPS)],
        "inter_gram_bwd": [(g, K, mu_s, mu_t, valid, live, True, False, EPS), (g, K, mu_s, mu_t, valid, None, True, True, EPS)],
    }


@pytest.mark.parametrize("name", sorted(_opcheck_cases().keys()))
def test_opcheck(name):
    for args in _opcheck_cases()[name]:
        torch.library.opcheck(getattr(C_OPS, name).default, args)


def test_every_op_has_a_cpu_kernel_and_a_fake():
    for name in _opcheck_cases():
        assert _ext.has_kernel(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"icakd_fast_C::{name}", "Meta"), name


# ---------------------------------------------------------------------------------------------
# malformed arguments: every one raises a RuntimeError whose message starts with the argument's
# name, before any data is read (docs/cpp_extension.md, "Argument checks")
# ---------------------------------------------------------------------------------------------


def _good_args():
    """Well-formed CPU arguments of every op, as (op name, list of arguments)."""
    f, w = torch.randn(2, 5, 3, 4), torch.randn(2, 5)
    cam, pooled, pool_w = cpp.cam_fwd(f, w, True)
    bank = torch.randn(6, 3, 4)
    count = torch.tensor([0, 1, 3, 2, 0, 3])
    ptr = torch.tensor([0, 1, 0, 2, 0, 1])
    sums = torch.zeros(6, 4)
    feats, labels = torch.randn(7, 4), torch.tensor([0, 2, 2, 5, 1, 2, 2])
    mask = torch.ones(7, dtype=torch.bool)
    fifo, fifo_labels = torch.randn(5, 4), torch.tensor([0, -1, 3, 1, -1])
    f_s, f_t, m_s, m_t, lab, val = _intra_inputs(6, 4, 5, torch.float32)
    mu_s, mu_t, valid = _inter_inputs(9, 4, 6, torch.float32)
    live = torch.rand(9) < 0.5
    g = torch.tensor(1.3)
    cam_t, loss_q_norm, bad, keep, fwd_small = _step_op_inputs(cam, sums, count, feats, labels)
    s_sums, s_count = sums.float(), count
    fc, tg = torch.randn(6, 5), torch.tensor([3, 0])
    act = cpp.class_activation_fwd(f, fc, tg, cam_t, EPS)
    return {
        "cam_loss_fwd": [cam, cam_t, EPS],
        "cam_loss_bwd": [g, cam, cam_t, loss_q_norm[1], loss_q_norm[2], EPS],
        "class_activation_fwd": [f, fc, tg, cam_t, EPS],
        "class_activation_bwd": [torch.randn_like(act[1]), g, f, fc, tg, act[0], act[3], act[4], act[5], act[6], EPS,
                                 True, True],
        "class_bank_update_": [bank.clone(), count.clone(), ptr.clone(), sums.clone(), torch.tensor(4), torch.tensor(0),
                               bad, labels, mask, 2],
        "fifo_bank_update_": [fifo.clone(), fifo_labels.clone(), torch.tensor(3), torch.tensor(0), bad, labels, mask],
        "class_banks_update_": [[bank.clone(), bank.clone()], [count.clone(), count.clone()], [ptr.clone(), ptr.clone()],
                                [sums.clone(), sums.clone()], [torch.tensor(4), torch.tensor(1)],
                                [torch.tensor(0), torch.tensor(0)], [bad, feats], labels, [mask, None], 2],
        "fifo_banks_update_": [[fifo.clone(), fifo.clone()], [fifo_labels.clone(), fifo_labels.clone()],
                               [torch.tensor(3), torch.tensor(0)], [torch.tensor(0), torch.tensor(0)], [bad, feats],
                               labels, [None, mask]],
        "structure_fwd": [s_sums, s_count, s_sums * 0.5, s_count, feats, feats.flip(0), labels, keep, keep, 1, EPS],
        "structure_bwd": [g, g * 2, feats, feats.flip(0), fwd_small[2], fwd_small[3], fwd_small[4], fwd_small[5], labels,
                          keep, fwd_small[6], EPS, torch.rand(7) + 0.5],
        "cam_fwd": [f, w, True],
        "cam_bwd": [torch.randn_like(cam), torch.randn_like(pooled), f, w, cam, pool_w, True, True],
        "spatial_mean": [f],
        "class_bank_enqueue_": [bank.clone(), count.clone(), ptr.clone(), sums.clone(), feats, labels, mask],
        "class_bank_resync_": [bank, count, sums.clone(), torch.tensor([1, 3])],
        "fifo_bank_enqueue_": [fifo.clone(), fifo_labels.clone(), torch.tensor(3), feats, labels, mask],
        "fifo_bank_sums": [fifo, fifo_labels, 4],
        "centroids_fwd": [sums, count, feats, labels],
        "intra_fwd": [f_s, f_t, m_s, m_t, lab, val],
        "intra_bwd": [g, f_s, f_t, m_s, m_t, lab, val],
        "inter_fwd": [mu_s, mu_t, valid, EPS],
        "inter_bwd": [g, mu_s, mu_t, valid, live, True, True, EPS],
        "inter_gram_fwd": [mu_s, mu_t, valid, EPS],
        "inter_gram_bwd": [g, cpp.inter_gram_fwd(mu_s, mu_t, valid, EPS)[1], mu_s, mu_t, valid, live, True, True, EPS],
    }


def _arg_index(op: str, name: str) -> int:
    names = [a.name for a in getattr(C_OPS, op).default._schema.arguments]
    return names.index(name)


def _set(op, name, value, value_check=False):
    """Mutation: argument `name` of `op` replaced by value(old). `value_check`: the values are
    malformed (an index out of range), not the metadata; the CUDA kernels skip such indices
    instead of raising (raising would need a host synchronisation)."""

    def mutate(args):
        i = _arg_index(op, name)
        args = list(args)
        args[i] = value(args[i])
        return args

    mutate.value_check = value_check
    return mutate


def _with(args, op, **values):
    """The well-formed arguments with trailing optional arguments set by name."""
    schema = getattr(C_OPS, op).default._schema
    args = list(args)
    for name, value in values.items():
        i = [a.name for a in schema.arguments].index(name)
        while len(args) <= i:
            args.append(schema.arguments[len(args)].default_value)
        args[i] = value
    return args


# (op, argument named in the message, mutation of the well-formed arguments)
BAD = [
    # cam
    ("cam_fwd", "features", _set("cam_fwd", "features", lambda t: t[0])),
    ("cam_fwd", "features", _set("cam_fwd", "features", lambda t: t.long())),
    ("cam_fwd", "weights", _set("cam_fwd", "weights", lambda t: t[:, :4])),
    ("cam_fwd", "weights", _set("cam_fwd", "weights", lambda t: t[:1])),
    ("cam_fwd", "weights", _set("cam_fwd", "weights", lambda t: t.int())),
    ("cam_fwd", "weights", _set("cam_fwd", "weights", lambda t: t[None])),
    ("cam_bwd", "grad_cam", _set("cam_bwd", "grad_cam", lambda t: t[:1])),
    ("cam_bwd", "grad_cam", _set("cam_bwd", "grad_cam", lambda t: t.long())),
    ("cam_bwd", "grad_pooled", _set("cam_bwd", "grad_pooled", lambda t: t[:, :3])),
    ("cam_bwd", "cam", _set("cam_bwd", "cam", lambda t: t[:, :1])),
    ("cam_bwd", "pool_w", _set("cam_bwd", "pool_w", lambda t: t[:, :5])),
    ("cam_bwd", "features", _set("cam_bwd", "features", lambda t: t.flatten(2))),
    ("cam_bwd", "weights", _set("cam_bwd", "weights", lambda t: t[:, :2])),
    ("spatial_mean", "grads", _set("spatial_mean", "grads", lambda t: t[0])),
    ("spatial_mean", "grads", _set("spatial_mean", "grads", lambda t: t.long())),
    # class bank
    ("class_bank_enqueue_", "bank", _set("class_bank_enqueue_", "bank", lambda t: t[:, 0])),
    ("class_bank_enqueue_", "bank", _set("class_bank_enqueue_", "bank", lambda t: t[:, :0])),
    ("class_bank_enqueue_", "count", _set("class_bank_enqueue_", "count", lambda t: t[:5])),
    ("class_bank_enqueue_", "count", _set("class_bank_enqueue_", "count", lambda t: t.float())),
    ("class_bank_enqueue_", "ptr", _set("class_bank_enqueue_", "ptr", lambda t: t[:, None])),
    ("class_bank_enqueue_", "ptr", _set("class_bank_enqueue_", "ptr", lambda t: t.int())),
    ("class_bank_enqueue_", "sums", _set("class_bank_enqueue_", "sums", lambda t: t[:, :3])),
    ("class_bank_enqueue_", "sums", _set("class_bank_enqueue_", "sums", lambda t: t.double())),
    ("class_bank_enqueue_", "feats", _set("class_bank_enqueue_", "feats", lambda t: t[:, :3])),
    ("class_bank_enqueue_", "feats", _set("class_bank_enqueue_", "feats", lambda t: t.long())),
    ("class_bank_enqueue_", "labels", _set("class_bank_enqueue_", "labels", lambda t: t[:6])),
    ("class_bank_enqueue_", "labels", _set("class_bank_enqueue_", "labels", lambda t: t.int())),
    ("class_bank_enqueue_", "mask", _set("class_bank_enqueue_", "mask", lambda t: t[:6])),
    ("class_bank_enqueue_", "mask", _set("class_bank_enqueue_", "mask", lambda t: t.long())),
    ("class_bank_resync_", "classes", _set("class_bank_resync_", "classes", lambda t: torch.tensor([1, 6]), True)),
    ("class_bank_resync_", "classes", _set("class_bank_resync_", "classes", lambda t: torch.tensor([-1]), True)),
    ("class_bank_resync_", "classes", _set("class_bank_resync_", "classes", lambda t: t[None])),
    ("class_bank_resync_", "count", _set("class_bank_resync_", "count", lambda t: t[:2])),
    ("class_bank_resync_", "sums", _set("class_bank_resync_", "sums", lambda t: t.t())),
    # fifo bank
    ("fifo_bank_enqueue_", "bank", _set("fifo_bank_enqueue_", "bank", lambda t: t[:0])),
    ("fifo_bank_enqueue_", "bank_labels", _set("fifo_bank_enqueue_", "bank_labels", lambda t: t[:4])),
    ("fifo_bank_enqueue_", "ptr", _set("fifo_bank_enqueue_", "ptr", lambda t: torch.tensor([1, 2]))),
    ("fifo_bank_enqueue_", "ptr", _set("fifo_bank_enqueue_", "ptr", lambda t: t.float())),
    ("fifo_bank_enqueue_", "feats", _set("fifo_bank_enqueue_", "feats", lambda t: t[:, :2])),
    ("fifo_bank_enqueue_", "labels", _set("fifo_bank_enqueue_", "labels", lambda t: t.float())),
    ("fifo_bank_enqueue_", "mask", _set("fifo_bank_enqueue_", "mask", lambda t: t[:3])),
    ("fifo_bank_sums", "bank_labels", _set("fifo_bank_sums", "bank_labels", lambda t: torch.tensor([0, 4, 1, 1, 0]), True)),
    ("fifo_bank_sums", "bank_labels", _set("fifo_bank_sums", "bank_labels", lambda t: t[:2])),
    ("fifo_bank_sums", "num_classes", _set("fifo_bank_sums", "num_classes", lambda n: -1)),
    # centroids
    ("centroids_fwd", "labels", _set("centroids_fwd", "labels", lambda t: torch.tensor([0, 2, 2, 6, 1, 2, 2]), True)),
    ("centroids_fwd", "labels", _set("centroids_fwd", "labels", lambda t: torch.tensor([0, 2, -1, 5, 1, 2, 2]), True)),
    ("centroids_fwd", "labels", _set("centroids_fwd", "labels", lambda t: t[:5])),
    ("centroids_fwd", "labels", _set("centroids_fwd", "labels", lambda t: t.float())),
    ("centroids_fwd", "counts", _set("centroids_fwd", "counts", lambda t: t[:4])),
    ("centroids_fwd", "counts", _set("centroids_fwd", "counts", lambda t: t.float())),
    ("centroids_fwd", "feats", _set("centroids_fwd", "feats", lambda t: t[:, :3])),
    ("centroids_fwd", "sums", _set("centroids_fwd", "sums", lambda t: t[0])),
    # intra
    ("intra_fwd", "labels", _set("intra_fwd", "labels", lambda t: torch.full_like(t, 4), True)),
    ("intra_fwd", "labels", _set("intra_fwd", "labels", lambda t: torch.full_like(t, -2), True)),
    ("intra_fwd", "labels", _set("intra_fwd", "labels", lambda t: t[:2])),
    ("intra_fwd", "f_t", _set("intra_fwd", "f_t", lambda t: t[:, :3])),
    ("intra_fwd", "mu_s", _set("intra_fwd", "mu_s", lambda t: t[:, :3])),
    ("intra_fwd", "mu_t", _set("intra_fwd", "mu_t", lambda t: t[:2])),
    ("intra_fwd", "valid", _set("intra_fwd", "valid", lambda t: t[:3])),
    ("intra_fwd", "valid", _set("intra_fwd", "valid", lambda t: t.long())),
    ("intra_fwd", "f_s", _set("intra_fwd", "f_s", lambda t: t.long())),
    ("intra_bwd", "grad_out", _set("intra_bwd", "grad_out", lambda t: torch.ones(2))),
    ("intra_bwd", "labels", _set("intra_bwd", "labels", lambda t: torch.full_like(t, 9), True)),
    # inter
    ("inter_fwd", "valid", _set("inter_fwd", "valid", lambda t: torch.ones(10, dtype=torch.bool))),
    ("inter_fwd", "valid", _set("inter_fwd", "valid", lambda t: t.float())),
    ("inter_fwd", "mu_t", _set("inter_fwd", "mu_t", lambda t: t[:8])),
    ("inter_fwd", "mu_s", _set("inter_fwd", "mu_s", lambda t: t[0])),
    ("inter_fwd", "mu_s", _set("inter_fwd", "mu_s", lambda t: t.long())),
    ("inter_fwd", "eps", _set("inter_fwd", "eps", lambda e: 0.0)),
    ("inter_bwd", "live", _set("inter_bwd", "live", lambda t: t[:8])),
    ("inter_bwd", "live", _set("inter_bwd", "live", lambda t: t.long())),
    ("inter_bwd", "grad_out", _set("inter_bwd", "grad_out", lambda t: torch.ones(2, 2))),
    ("inter_bwd", "valid", _set("inter_bwd", "valid", lambda t: t[:3])),
    ("inter_gram_fwd", "mu_t", _set("inter_gram_fwd", "mu_t", lambda t: t[:8])),
    ("inter_gram_fwd", "eps", _set("inter_gram_fwd", "eps", lambda e: -1.0)),
    ("inter_gram_bwd", "gram", _set("inter_gram_bwd", "gram", lambda t: t.float())),
    ("inter_gram_bwd", "gram", _set("inter_gram_bwd", "gram", lambda t: t[:-1])),
    ("inter_gram_bwd", "gram", _set("inter_gram_bwd", "gram", lambda t: t[0])),
    ("inter_gram_bwd", "live", _set("inter_gram_bwd", "live", lambda t: t[:8])),
    ("inter_gram_bwd", "grad_out", _set("inter_gram_bwd", "grad_out", lambda t: torch.ones(2))),
]


def _no_gradient_asked(args):
    """A malformed `live` while no gradient is asked for: the checks run all the same."""
    args = list(args)
    args[_arg_index("inter_bwd", "need_s")] = False
    args[_arg_index("inter_bwd", "need_t")] = False
    args[_arg_index("inter_bwd", "live")] = args[_arg_index("inter_bwd", "live")][:8]
    return args


_no_gradient_asked.value_check = False
BAD.append(("inter_bwd", "live", _no_gradient_asked))
# the training step's one-op forms
BAD += [
    ("cam_loss_fwd", "cam_t", _set("cam_loss_fwd", "cam_t", lambda t: t[:, :1])),
    ("cam_loss_fwd", "cam_s", _set("cam_loss_fwd", "cam_s", lambda t: t.long())),
    ("cam_loss_bwd", "q_s", _set("cam_loss_bwd", "q_s", lambda t: t[:1])),
    ("cam_loss_bwd", "norm_s", _set("cam_loss_bwd", "norm_s", lambda t: t[:1])),
    ("class_activation_fwd", "features", _set("class_activation_fwd", "features", lambda t: t[0])),
    ("class_activation_fwd", "fc_weight", _set("class_activation_fwd", "fc_weight", lambda t: t[:, :4])),
    ("class_activation_fwd", "fc_weight", _set("class_activation_fwd", "fc_weight", lambda t: t.long())),
    ("class_activation_fwd", "targets", _set("class_activation_fwd", "targets", lambda t: t.int())),
    ("class_activation_fwd", "targets", _set("class_activation_fwd", "targets", lambda t: t[:1])),
    ("class_activation_fwd", "targets", _set("class_activation_fwd", "targets", lambda t: t + 3, True)),
    ("class_activation_fwd", "targets", _set("class_activation_fwd", "targets", lambda t: t - 1, True)),
    ("class_activation_fwd", "cam_t", _set("class_activation_fwd", "cam_t", lambda t: t[:, :1])),
    ("class_activation_fwd", "cam_t", _set("class_activation_fwd", "cam_t", lambda t: t.long())),
    ("class_activation_bwd", "grad_pooled", _set("class_activation_bwd", "grad_pooled", lambda t: t[:, :3])),
    ("class_activation_bwd", "grad_loss", _set("class_activation_bwd", "grad_loss", lambda t: torch.ones(2))),
    ("class_activation_bwd", "fc_weight", _set("class_activation_bwd", "fc_weight", lambda t: t[:, :2])),
    ("class_activation_bwd", "targets", _set("class_activation_bwd", "targets", lambda t: t + 6, True)),
    ("class_activation_bwd", "cam", _set("class_activation_bwd", "cam", lambda t: t[:, :1])),
    ("class_activation_bwd", "pool_w", _set("class_activation_bwd", "pool_w", lambda t: t[:, :5])),
    ("class_activation_bwd", "q_s", _set("class_activation_bwd", "q_s", lambda t: t[:1])),
    ("class_activation_bwd", "norm_s", _set("class_activation_bwd", "norm_s", lambda t: t[:1])),
    ("class_activation_bwd", "q_t", _set("class_activation_bwd", "q_t", lambda t: t[:, :3])),
    ("class_bank_update_", "refused", _set("class_bank_update_", "refused", lambda t: t.float())),
    ("class_bank_update_", "resync_pos", _set("class_bank_update_", "resync_pos", lambda t: t.expand(2))),
    ("class_bank_update_", "mask", _set("class_bank_update_", "mask", lambda t: t[:3])),
    ("class_bank_update_", "labels", _set("class_bank_update_", "labels", lambda t: t.float())),
    ("fifo_bank_update_", "mask", _set("fifo_bank_update_", "mask", lambda t: t.long())),
    ("class_banks_update_", "count", _set("class_banks_update_", "count", lambda t: t[:1])),
    ("class_banks_update_", "mask", _set("class_banks_update_", "mask", lambda t: t + [None])),
    ("class_banks_update_", "refused", _set("class_banks_update_", "refused", lambda t: [t[0], t[1].float()])),
    ("class_banks_update_", "feats", _set("class_banks_update_", "feats", lambda t: [t[0], t[1][:, :2]])),
    ("fifo_banks_update_", "ptr", _set("fifo_banks_update_", "ptr", lambda t: t[:1])),
    ("fifo_banks_update_", "mask", _set("fifo_banks_update_", "mask", lambda t: [t[0], t[1].long()])),
    ("structure_fwd", "f_t", _set("structure_fwd", "f_t", lambda t: t[:, :2])),
    ("structure_fwd", "labels", _set("structure_fwd", "labels", lambda t: t[:3])),
    ("structure_fwd", "labels", _set("structure_fwd", "labels", lambda t: t + 100, value_check=True)),
    ("structure_fwd", "keep_s", _set("structure_fwd", "keep_s", lambda t: t[:2])),
    ("structure_fwd", "count_t", _set("structure_fwd", "count_t", lambda t: t[:2])),
    ("structure_fwd", "sums_s", _set("structure_fwd", "sums_s", lambda t: t.long())),
    ("structure_bwd", "grad_inter", _set("structure_bwd", "grad_inter", lambda t: t.expand(2))),
    ("structure_bwd", "gram", _set("structure_bwd", "gram", lambda t: t.float())),
    ("structure_bwd", "total_s", _set("structure_bwd", "total_s", lambda t: t[:2])),
    ("structure_bwd", "norm_s", _set("structure_bwd", "norm_s", lambda t: t[:2])),
    ("structure_bwd", "norm_s", _set("structure_bwd", "norm_s", lambda t: t.long())),
    ("structure_fwd", "projection", lambda a: _with(a, "structure_fwd", normalize=True,
                                                    projection=torch.randn(4, 3))),
    ("structure_fwd", "projection", lambda a: _with(a, "structure_fwd", projection=torch.randn(4, 4))),
    ("structure_bwd", "x_s", lambda a: _with(a, "structure_bwd", x_s=torch.randn(7, 4))),
    ("structure_bwd", "projection", lambda a: _with(a, "structure_bwd", x_s=torch.randn(7, 6),
                                                    projection=torch.randn(3, 6))),
]


def _call(op, args, keyset=None):
    overload = getattr(C_OPS, op).default
    if keyset is None:
        return overload(*args)
    return overload.redispatch(keyset, *args)


def test_good_arguments_do_not_raise():
    for op, args in _good_args().items():
        _call(op, args)


@pytest.mark.parametrize("case", range(len(BAD)), ids=[f"{op}-{name}-{i}" for i, (op, name, _) in enumerate(BAD)])
def test_bad_arguments_raise(case):
    op, name, mutate = BAD[case]
    args = mutate(_good_args()[op])
    with pytest.raises(RuntimeError, match=rf"^{re.escape(name)}\b"):
        _call(op, args)


def _tensor_positions():
    out = []
    for op, args in _good_args().items():
        schema = getattr(C_OPS, op).default._schema
        for i, (a, arg) in enumerate(zip(schema.arguments, args)):
            if isinstance(arg, torch.Tensor):
                out.append((op, a.name, i))
    return out


@pytest.mark.parametrize("op,name,i", _tensor_positions(), ids=[f"{o}-{n}" for o, n, _ in _tensor_positions()])
def test_bad_arguments_wrong_device_raise(op, name, i):
    """A tensor of another device given to the CPU kernel (here: a meta tensor, with the CPU kernel
    called directly; a CUDA tensor would dispatch to the CUDA kernel) is refused before its data is
    read, naming the argument. tests/test_cpp_gpu.py checks the CUDA kernels with a CPU argument."""
    args = _good_args()[op]
    args[i] = args[i].to("meta")
    with pytest.raises(RuntimeError, match=rf"^{re.escape(name)} must be a CPU tensor"):
        _call(op, args, torch._C.DispatchKeySet(torch._C.DispatchKey.CPU))


def test_malformed_inputs_do_not_crash_the_process():
    """The malformed-argument tests in a child process: a kernel that crashes (instead of raising)
    fails this test with the signal instead of killing the whole pytest run."""
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "bad_arguments"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout


# ---------------------------------------------------------------------------------------------
# CAM kernel paths: channels_last in place, vector tails, the portable loops, thread counts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 70, 3, 5), (3, 9, 7, 7), (1, 130, 9, 9), (2, 1, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cam_channels_last_forward_backward(shape, dtype):
    b, k, h, w = shape
    f0 = torch.randn(shape).to(dtype).to(memory_format=torch.channels_last)
    w0 = torch.randn(b, k).to(dtype)
    gc, gp = torch.randn(b, h, w).to(dtype), torch.randn(b, k).to(dtype)

    out = cam_features_with_grads(lambda f, w: ops.cam_features("cpp", f, w), f0, w0, gc, gp)
    ref = cam_features_with_grads(reference.class_activation_features, f0, w0, gc, gp)
    for a, r in zip(out, ref):
        assert a.dtype == r.dtype and a.shape == r.shape
        close(a, r, dtype, scale=2.0)


@pytest.mark.parametrize("shape", [(2, 67, 9, 9), (3, 8, 1, 1), (2, 17, 4, 2), (1, 9, 8, 9)])
def test_cam_vector_tails(shape):
    # rows not a multiple of 8, pixel counts below / above one 64-wide block, both layouts
    b, k, h, w = shape
    f = torch.randn(shape, dtype=torch.float64)
    wt = torch.randn(b, k, dtype=torch.float64)
    r_cam, r_pooled = reference.class_activation_features(f, wt)
    for view in (f.float(), f.float().to(memory_format=torch.channels_last)):
        cam, pooled, pool_w = cpp.cam_fwd(view, wt.float(), True)
        close(cam, r_cam)
        close(pooled, r_pooled)
        gc = torch.randn(b, h, w)
        _, gw = cpp.cam_bwd(gc, None, view, wt.float(), cam, pool_w, False, True)
        close(gw, torch.einsum("bp,bkp->bk", gc.double().flatten(1) * (r_cam.flatten(1) > 0), f.flatten(2)))


def test_cam_portable_loops_match_the_reference():
    """ICAKD_CPU_VECTOR=generic: the float32 kernels without the AVX2 code (other CPUs run these)."""
    code = (
        "import torch\n"
        "from icakd_fast import ops, reference\n"
        "torch.manual_seed(0)\n"
        "for shape in [(3, 7, 5, 6), (2, 67, 9, 9), (4, 64, 8, 8)]:\n"
        "    for fmt in (torch.contiguous_format, torch.channels_last):\n"
        "        f0 = torch.randn(shape).to(memory_format=fmt)\n"
        "        w0 = torch.randn(shape[:2])\n"
        "        outs = []\n"
        "        for fn in (lambda f, w: ops.cam_features('cpp', f, w), reference.class_activation_features):\n"
        "            f, w = f0.clone().requires_grad_(), w0.clone().requires_grad_()\n"
        "            cam, pooled = fn(f, w)\n"
        "            (cam.square().sum() + pooled.sum()).backward()\n"
        "            outs.append((cam, pooled, f.grad, w.grad))\n"
        "        for a, r in zip(*outs):\n"
        "            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ICAKD_CPU_VECTOR="generic")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_cam_does_not_depend_on_the_thread_count():
    f = torch.randn(16, 64, 7, 7)
    w = torch.randn(16, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.cam_fwd(f, w, True)
        g1 = cpp.cam_bwd(torch.ones(16, 7, 7), torch.ones(16, 64), f, w, one[0], one[2], True, True)
        torch.set_num_threads(max(threads, 2))
        many = cpp.cam_fwd(f, w, True)
        g2 = cpp.cam_bwd(torch.ones(16, 7, 7), torch.ones(16, 64), f, w, many[0], many[2], True, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one + g1, many + g2):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# one network's CAM step in one op each way: the composition of the per-op kernels it replaces
# ---------------------------------------------------------------------------------------------


def _composed_activation(f, fc, tg, cam_t, g_pooled, g_loss):
    """The CAM step from the per-op kernels: weights, cam_fwd, cam_loss_fwd, then cam_loss_bwd,
    cam_bwd and the scatter of the weights' gradient (what the one-op form replaces)."""
    spatial = f.shape[2] * f.shape[3]
    w = reference.cam_weights_from_linear(fc, tg, spatial)
    cam, pooled, pool_w = cpp.cam_fwd(f, w, True)
    loss, q_s, norm_s = cpp.cam_loss_fwd(cam, cam_t, EPS)
    g_cam = cpp.cam_loss_bwd(g_loss, cam, cam_t, q_s, norm_s, EPS)
    g_f, g_w = cpp.cam_bwd(g_cam, g_pooled, f, w, cam, pool_w, True, True)
    acc = torch.float64 if fc.dtype == torch.float64 else torch.float32
    g_fc = torch.zeros(fc.shape, dtype=acc).index_add_(0, tg, g_w.to(acc) / spatial).to(fc.dtype)
    return (cam, pooled, loss, pool_w, q_s, norm_s), (g_f, g_fc)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float64,) * 3, (torch.bfloat16, torch.float32,
                                                                                 torch.bfloat16),
                                    (torch.float16, torch.float16, torch.float32)])
def test_class_activation_is_the_composition_of_the_per_op_kernels(dtypes, layout):
    """Repeated targets (the scatter adds), a constant map (uniform pooling weights) and a
    teacher row of zeros (norm below eps)."""
    fd, wd, td = dtypes
    B, K, H, W, C = 6, 19, 3, 5, 7
    f = torch.randn(B, K, H, W).to(fd)
    f[2] = 1.0
    if layout == "channels_last":
        f = f.to(memory_format=torch.channels_last)
    fc = torch.randn(C, K).to(wd)
    tg = torch.tensor([3, 0, 3, 6, 3, 1])
    cam_t = torch.rand(B, H, W).to(td)
    cam_t[4] = 0
    g_pooled = torch.randn(B, K).to(torch.promote_types(fd, wd))
    g_loss = torch.tensor(1.7)
    want_fwd, want_bwd = _composed_activation(f, fc, tg, cam_t, g_pooled, g_loss)
    got_fwd = cpp.class_activation_fwd(f, fc, tg, cam_t, EPS)
    cam, pooled, loss, pool_w, q_s, norm_s, q_t = got_fwd
    for a, b, name in zip((cam, pooled, loss, pool_w, q_s, norm_s), want_fwd,
                          ("cam", "pooled", "loss", "pool_w", "q_s", "norm_s")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    q_t_want = torch.nn.functional.normalize(cam_t.to(q_s.dtype).flatten(1), dim=1, eps=EPS)
    torch.testing.assert_close(q_t, q_t_want, rtol=1e-6, atol=1e-7)
    got_bwd = cpp.class_activation_bwd(g_pooled, g_loss, f, fc, tg, cam, pool_w, q_s, norm_s, q_t, EPS, True, True)
    for a, b, name in zip(got_bwd, want_bwd, ("grad_features", "grad_fc_weight")):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous(), name
        if b.dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(a, b, rtol=1e-6 if b.dtype == torch.float32 else 1e-13, atol=0, msg=name)
        else:  # the composed form rounds grad_weights to fc_weight's dtype before the scatter; a map of
            # zeros (the constant image where its weights sum below zero) has a 1/eps gradient: inf in float16
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-2, atol=1e-3, equal_nan=True, msg=name)
    assert got_bwd[1][[2, 4, 5]].abs().max() == 0  # rows no target names


def test_class_activation_without_the_teacher_map_and_partial_needs():
    B, K, H, W, C = 4, 9, 2, 3, 5
    f, fc, tg = torch.randn(B, K, H, W), torch.randn(C, K), torch.tensor([1, 1, 4, 0])
    cam, pooled, loss, pool_w, q_s, norm_s, q_t = cpp.class_activation_fwd(f, fc, tg, None, EPS)
    w = reference.cam_weights_from_linear(fc, tg, H * W)
    for a, b in zip((cam, pooled, pool_w), cpp.cam_fwd(f, w, True)):
        assert torch.equal(a, b)
    assert loss.numel() == q_s.numel() == norm_s.numel() == q_t.numel() == 0
    gp = torch.randn(B, K)
    g_f, g_fc = cpp.class_activation_bwd(gp, None, f, fc, tg, cam, pool_w, q_s, norm_s, q_t, EPS, True, True)
    assert torch.equal(g_f, cpp.cam_bwd(None, gp, f, w, cam, pool_w, True, False)[0])
    assert g_fc.shape == fc.shape and g_fc.abs().max() == 0  # the pooling weights are a constant
    g_f, g_fc = cpp.class_activation_bwd(None, None, f, fc, tg, cam, pool_w, q_s, norm_s, q_t, EPS, True, False)
    assert g_f.shape == f.shape and g_f.abs().max() == 0 and g_fc is None  # not asked for
    # an empty batch
    out = cpp.class_activation_fwd(f[:0], fc, tg[:0], torch.rand(0, H, W), EPS)
    assert out[0].shape == (0, H, W) and out[1].shape == (0, K)
    g_f, g_fc = cpp.class_activation_bwd(out[1], torch.tensor(1.0), f[:0], fc, tg[:0], out[0], out[3], out[4], out[5],
                                         out[6], EPS, True, True)
    assert g_f.shape == (0, K, H, W) and g_fc.shape == fc.shape and g_fc.abs().max() == 0


def test_class_activation_gradcheck_float64():
    B, K, H, W, C = 3, 4, 2, 3, 5
    f = torch.randn(B, K, H, W, dtype=torch.float64).requires_grad_()
    fc = torch.randn(C, K, dtype=torch.float64).requires_grad_()
    tg = torch.tensor([2, 0, 2])
    cam_t = torch.rand(B, H, W, dtype=torch.float64)

    def loss_only(f, fc):
        return ops.class_activation("cpp", f, fc, tg, cam_t, fused=True)[2]

    assert torch.autograd.gradcheck(loss_only, (f, fc))
