"""Triton CAM kernels (interpreter on CPU, or a GPU) against the float64 reference."""

import pytest
import torch

import icakd_fast.functional as F
import icakd_fast.reference as R
from icakd_fast.reference.cam import cam_pool_weights
from icakd_fast._backend import is_available
from icakd_fast.ops import cam_features

from helpers import assert_close_rel, noncontig

pytestmark = pytest.mark.skipif(not is_available("triton", "cam", "cpu") and not torch.cuda.is_available(),
                                reason="triton backend unavailable")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
impl = pytest.importorskip("icakd_fast.ops._triton_impl")


@pytest.fixture(params=["split", "image", "vec"])
def fwd_mode(request, monkeypatch):
    """The forward strategies: channel blocks across programs, one program per image, and the
    opt-in "vec" kernels (NCHW-contiguous maps with H*W >= 8, forward and backward; other inputs
    fall back to the split kernels)."""
    from icakd_fast.kernels import cam as kcam

    if request.param == "vec":
        monkeypatch.setattr(kcam, "CAM_VEC", True)
    else:
        monkeypatch.setattr(kcam, "CAM_FWD_MODE", request.param)
    return request.param


@pytest.mark.parametrize("hw", [(2, 4), (3, 3), (3, 5), (4, 4), (1, 17), (7, 7), (8, 8)])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 65, 130, 264])
@pytest.mark.parametrize("wdtype", [torch.float16, torch.float32])
def test_vec_kernels_every_channel_and_pixel_phase(hw, k, wdtype, monkeypatch):
    """The vec kernels' slot pattern (8 channels per tile row, at most two channels per 8-slot
    group) at channel counts around the 8-channel step and the tile and program blocks, maps from
    8 pixels up; weights of the map's dtype (exact 16-bit products) and float32 weights (split
    into 16-bit pieces); the backward with an expanded (stride 0) grad_cam as ``cam.sum()`` gives
    it. Small tiles so that several programs and iterations run."""
    from icakd_fast.kernels import cam as kcam

    monkeypatch.setattr(kcam, "CAM_VEC", True)
    monkeypatch.setattr(kcam, "_VEC_FP16_WIDE_FACTORS", True)  # float32 weights split into float16 parts
    monkeypatch.setitem(kcam.CAM_CFG, "vec_tile", 16 * 128)
    monkeypatch.setitem(kcam.CAM_CFG, "vec_iters", 2)
    assert kcam._use_vec(torch.empty(1, k, *hw, dtype=torch.float16), torch.empty(1, k, dtype=wdtype), hw[0] * hw[1])
    B = 3
    f = torch.randn(B, k, *hw, device=DEV).half().requires_grad_(True)
    w = torch.randn(B, k, device=DEV).to(wdtype).requires_grad_(True)
    out_dt = torch.promote_types(f.dtype, w.dtype)
    cam, pooled = F.class_activation_features(f, w, backend="triton")
    gp = torch.randn(B, k, device=DEV).to(out_dt)
    gf, gw = torch.autograd.grad(cam.sum() + (pooled * gp).sum(), (f, w))
    rc, rp, rgf, rgw = _ref_all(f, w, torch.ones(B, *hw, device=DEV), gp)
    assert_close_rel(cam, rc, out_dt, "cam")
    assert_close_rel(pooled, rp, out_dt, "pooled")
    assert_close_rel(gf, rgf, torch.float16, "grad_features")
    assert_close_rel(gw, rgw, out_dt, "grad_weights")
    # weights only (no grad_features, no grad_pooled)
    (gw_only,) = torch.autograd.grad(F.class_activation_features(f.detach(), w, backend="triton")[0].sum(), (w,))
    assert_close_rel(gw_only, _ref_all(f, w, torch.ones(B, *hw, device=DEV), torch.zeros(B, k, device=DEV))[3], out_dt,
                     "grad_weights alone")


@pytest.mark.parametrize("fuse_blocks", [0, 8])
@pytest.mark.parametrize("shape", [(2, 40, 3, 3), (3, 300, 7, 7)])
def test_vec_forward_with_and_without_its_own_partial_reduction(shape, fuse_blocks, monkeypatch):
    """The pooling pass reduces the partial sums itself (few channel blocks per image) or reads
    pool_w from the separate pass-2 kernel: same results, cam and pool_w written once."""
    from icakd_fast.kernels import cam as kcam

    monkeypatch.setattr(kcam, "CAM_VEC", True)
    monkeypatch.setattr(kcam, "_VEC_FUSE_BLOCKS", fuse_blocks)
    monkeypatch.setitem(kcam.CAM_CFG, "vec_tile", 16 * 128)
    monkeypatch.setitem(kcam.CAM_CFG, "vec_iters", 1)
    B, K, H, W = shape
    f = torch.randn(shape, device=DEV).half()
    w = torch.randn(B, K, device=DEV).half()
    cam, pooled, pool_w, _ = kcam.cam_fwd(f, w, True)
    rc, rp = R.class_activation_features(f.double(), w.double())
    assert_close_rel(cam, rc, torch.float16, "cam")
    assert_close_rel(pooled, rp, torch.float16, "pooled")
    assert_close_rel(pool_w, cam_pool_weights(rc), torch.float16, "pool_w")
    cam_only, _, _, _ = kcam.cam_fwd(f, w, False)  # no pooling: partial sums + pass 2 only
    assert_close_rel(cam_only, rc, torch.float16, "cam without pooling")
    if not fuse_blocks:  # the same pass-2 kernel wrote both
        assert torch.equal(cam_only, cam)


def test_vec_kernels_need_16bit_nchw_maps(monkeypatch):
    """What the vec kernels take; everything else goes to the channel-block kernels."""
    from icakd_fast.kernels import cam as kcam

    monkeypatch.setattr(kcam, "CAM_VEC", True)
    h = torch.empty(2, 16, 7, 7, dtype=torch.float16)
    w = torch.empty(2, 16, dtype=torch.float16)
    assert kcam._use_vec(h, w, 49)
    assert kcam._use_vec(h.bfloat16(), w.float(), 49)  # float32 weights: bfloat16 parts
    assert not kcam._use_vec(h, w.float(), 49)  # float16 parts of float32 values could overflow
    assert not kcam._use_vec(h.float(), w, 49)  # 32-bit maps: no exact 16-bit tensor-core products
    assert not kcam._use_vec(h, w.double(), 49)
    assert not kcam._use_vec(h.contiguous(memory_format=torch.channels_last), w, 49)
    assert not kcam._use_vec(torch.empty(2, 16, 2, 3, dtype=torch.float16), w, 6)  # fewer than 8 pixels
    assert not kcam._use_vec(torch.empty(2, 16, 16, 16, dtype=torch.float16), w, 256)  # above CAM_VEC_MAX_HW
    monkeypatch.setattr(kcam, "CAM_VEC", False)
    assert not kcam._use_vec(h, w, 49)


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        return noncontig(x)
    return x


def _ref_all(f, w, gc, gp):
    f64 = f.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    cam, pooled = R.class_activation_features(f64, w64)
    loss = (cam * gc.double()).sum() + (pooled * gp.double()).sum()
    gf, gw = torch.autograd.grad(loss, (f64, w64))
    return cam, pooled, gf, gw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 3, 3), (3, 37, 7, 7), (2, 130, 4, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_cam_features_forward_backward(dtype, shape, layout, fwd_mode):
    B, K, H, W = shape
    f = _layout(torch.randn(shape, device=DEV).to(dtype), layout).requires_grad_(True)
    w = torch.randn(B, K, device=DEV).to(dtype).requires_grad_(True)
    cam, pooled = F.class_activation_features(f, w, backend="triton")
    assert cam.dtype == dtype and pooled.dtype == dtype
    gc = torch.randn(B, H, W, device=DEV)
    gp = torch.randn(B, K, device=DEV)
    gf, gw = torch.autograd.grad((cam.float() * gc).sum() + (pooled.float() * gp).sum(), (f, w))
    rc, rp, rgf, rgw = _ref_all(f, w, gc, gp)
    assert gf.shape == f.shape and gf.dtype == dtype and gw.dtype == dtype
    assert_close_rel(cam, rc, dtype, "cam")
    assert_close_rel(pooled, rp, dtype, "pooled", factor=2)
    assert_close_rel(gf, rgf, dtype, "grad_features", factor=2)
    assert_close_rel(gw, rgw, dtype, "grad_weights", factor=2)


@pytest.mark.parametrize("which", ["cam", "pooled", "weights_only"])
def test_cam_partial_gradients(which):
    f = torch.randn(2, 9, 3, 5, device=DEV, requires_grad=True)
    w = torch.randn(2, 9, device=DEV, requires_grad=which != "weights_only")
    fin = f.detach() if which == "weights_only" else f
    w = w if which != "weights_only" else w.detach().requires_grad_(True)
    cam, pooled = F.class_activation_features(fin, w, backend="triton")
    rc, rp = R.class_activation_features(fin.double(), w.double())
    out, ref = (cam, rc) if which in ("cam", "weights_only") else (pooled, rp)
    go = torch.randn_like(out)
    inputs = (w,) if which == "weights_only" else (f, w)
    got = torch.autograd.grad((out * go).sum(), inputs, allow_unused=True)
    f64 = fin.detach().double().requires_grad_(which != "weights_only")
    w64 = w.detach().double().requires_grad_(True)
    rc, rp = R.class_activation_features(f64, w64)
    ref = rc if which in ("cam", "weights_only") else rp
    exp = torch.autograd.grad((ref * go.double()).sum(), (w64,) if which == "weights_only" else (f64, w64), allow_unused=True)
    for g, e in zip(got, exp):
        if e is None:
            assert g is None or g.abs().max() == 0
        else:
            assert_close_rel(g, e, torch.float32, which)


def test_all_zero_cam_falls_back_to_mean(fwd_mode):
    f = torch.randn(2, 6, 3, 3, device=DEV)
    w = torch.zeros(2, 6, device=DEV)
    cam, pooled = F.class_activation_features(f, w, backend="triton")
    assert cam.abs().max() == 0
    assert_close_rel(pooled, f.double().mean(dim=(2, 3)), torch.float32, "gap fallback")


def test_tiled_path_for_large_maps(monkeypatch):
    from icakd_fast.kernels import cam as kcam

    monkeypatch.setattr(kcam, "MAX_FUSED_HW", 16)
    f = torch.randn(2, 7, 5, 6, device=DEV, requires_grad=True)
    w = torch.randn(2, 7, device=DEV, requires_grad=True)
    cam, pooled = cam_features("triton", f, w)
    rc, rp = R.class_activation_features(f.double(), w.double())
    assert_close_rel(cam, rc, torch.float32, "cam tiled")
    assert_close_rel(pooled, rp, torch.float32, "pooled tiled")
    g = torch.randn(2, 5, 6, device=DEV)
    out = impl.cam_fwd_from_grads(f.detach(), g.unsqueeze(1).expand(2, 7, 5, 6) * 1.5, True)
    rw = R.grad_cam_weights(g.unsqueeze(1).expand(2, 7, 5, 6).double() * 1.5)
    assert_close_rel(out[3], rw, torch.float32, "weights tiled")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_spatial_mean_and_fused_generic_path(dtype, fwd_mode):
    g = noncontig(torch.randn(3, 10, 5, 3, device=DEV).to(dtype))
    f = torch.randn(3, 10, 5, 3, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
    mean = F.grad_cam_weights(g, backend="triton")
    assert mean.dtype == dtype
    assert_close_rel(mean, R.grad_cam_weights(g.double()), dtype, "spatial_mean")
    cam, pooled, pool_w, w = impl.cam_fwd_from_grads(f, g, True)
    rw = R.grad_cam_weights(g.double()).to(dtype)
    rc, rp = R.class_activation_features(f.double(), rw.double())
    # same sums, possibly in another reduction order (the one-program-per-image kernel)
    torch.testing.assert_close(w, mean, rtol=2e-6 if dtype == torch.float32 else 2e-3, atol=1e-7)
    assert_close_rel(cam, rc, dtype, "cam (generic)")
    assert_close_rel(pooled, rp, dtype, "pooled (generic)", factor=2)
    assert_close_rel(pool_w, R.cam_pool_weights(rc), dtype, "pool_w (generic)", factor=2)


def test_gradcheck_float64(fwd_mode):
    f = torch.randn(2, 5, 3, 2, dtype=torch.float64, device=DEV, requires_grad=True)
    w = torch.randn(2, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    # pooled's map is a stop-gradient, so only the CAM itself has a numerical derivative to match
    torch.autograd.gradcheck(lambda a, b: cam_features("triton", a, b)[0], (f, w), eps=1e-6, atol=1e-6)
