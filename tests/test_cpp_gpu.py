"""The cpp backend's CUDA kernels on a GPU: against the reference (computed on the same device),
against the triton backend where it exists, determinism of the bank, no host synchronisation.

Every test is marked ``gpu`` (skipped by tests/conftest.py without CUDA) and skips when the
extension was built without CUDA kernels.
"""

import pytest
import torch

from icakd_fast import _ext

pytestmark = [pytest.mark.gpu, pytest.mark.cpp]

if not _ext.load():
    pytest.skip(f"icakd_fast._C is not built: {_ext.reason()}", allow_module_level=True)

from icakd_fast import ops, reference  # noqa: E402
from icakd_fast.ops import _cpp_impl as cpp  # noqa: E402

from helpers import cam_features_with_grads  # noqa: E402

EPS = reference.NORM_EPS
DEV = "cuda"


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not _ext.with_cuda():
        pytest.skip("icakd_fast._C was built without CUDA kernels (rebuild with FORCE_CUDA=1)")


TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def close(a, b, dtype=torch.float32, scale=1.0):
    t = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=t["rtol"] * scale, atol=t["atol"] * scale)


def _triton():
    from icakd_fast import _backend

    if _backend.not_supported_reasons("triton", "cam", DEV):
        return None
    return _backend.implementation("triton")


def test_cuda_kernels_registered():
    for name in ("cam_fwd", "cam_bwd", "spatial_mean", "class_bank_enqueue_", "class_bank_resync_",
                 "fifo_bank_enqueue_", "fifo_bank_sums", "centroids_fwd", "intra_fwd", "intra_bwd",
                 "inter_fwd", "inter_bwd"):
        assert _ext.has_kernel(name, "CUDA"), name
    assert "cuda" in cpp.device_types()


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 5, 6), (64, 512, 8, 8), (8, 256, 14, 14), (2, 2048, 7, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cam_forward_backward(shape, dtype):
    b, k, h, w = shape
    f0 = torch.randn(shape, device=DEV).to(dtype)
    w0 = (torch.randn(b, k, device=DEV) / (h * w)).to(dtype)
    gc = torch.randn(b, h, w, device=DEV).to(dtype)
    gp = torch.randn(b, k, device=DEV).to(dtype)

    out = cam_features_with_grads(lambda f, w: ops.cam_features("cpp", f, w), f0, w0, gc, gp)
    ref = cam_features_with_grads(reference.class_activation_features, f0, w0, gc, gp)
    for a, r in zip(out, ref):
        assert a.dtype == r.dtype and a.shape == r.shape and a.device == r.device
        close(a, r, dtype, scale=4.0)
    # channels_last input, read in place: forward and both gradients
    cl = f0.to(memory_format=torch.channels_last)
    c1, p1, _ = cpp.cam_fwd(cl, w0, True)
    close(c1, ref[0], dtype, scale=4.0)
    close(p1, ref[1], dtype, scale=4.0)
    out_cl = cam_features_with_grads(
        lambda f, w: ops.cam_features("cpp", f.to(memory_format=torch.channels_last), w), f0, w0, gc, gp)
    for a, r in zip(out_cl, ref):
        close(a, r, dtype, scale=4.0)
    tri = _triton()
    if tri is not None and dtype != torch.float64:
        c2, p2, _ = tri.cam_fwd(f0, w0, True)
        close(c1, c2, dtype, scale=4.0)
        close(p1, p2, dtype, scale=4.0)


def _kernel_names(fn):
    """Names of the CUDA kernels ``fn()`` launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


# (B, K, H, W): P = V (a vector never spans channels), 7x7 (two channels in most vectors), one
# channel group, several splits per image, 16 pixels with four groups per block, the largest P
@pytest.mark.parametrize("shape", [(3, 16, 2, 4), (5, 64, 7, 7), (2, 8, 3, 3), (4, 2048, 7, 7), (6, 40, 4, 4),
                                   (2, 24, 16, 32), (256, 2048, 7, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cam_vec_kernels_match_the_reference(shape, dtype, monkeypatch):
    """ICAKD_CUDA_CAM=vec: the 16-byte-vector kernels (contiguous NCHW, K % V == 0, V <= H*W <= 512)."""
    b, k, h, w = shape
    monkeypatch.setenv("ICAKD_CUDA_CAM", "vec")
    f0 = torch.randn(shape, device=DEV).to(dtype)
    w0 = (torch.randn(b, k, device=DEV) / (h * w)).to(dtype)
    gc = torch.randn(b, h, w, device=DEV).to(dtype)
    gp = torch.randn(b, k, device=DEV).to(dtype)
    run = lambda: cam_features_with_grads(lambda f, w: ops.cam_features("cpp", f, w), f0, w0, gc, gp)  # noqa: E731
    out = run()
    ref = cam_features_with_grads(reference.class_activation_features, f0, w0, gc, gp)
    for a, r in zip(out, ref):
        assert a.dtype == r.dtype and a.shape == r.shape
        close(a, r, dtype, scale=4.0)
    again = run()
    assert all(torch.equal(a, c) for a, c in zip(out, again)), "vec kernels are not deterministic"
    # grad_cam only / grad_pooled only / one input gradient at a time / no pooling
    for gcam, gpool in ((gc, None), (None, gp)):
        for need in ((True, False), (False, True)):
            fr, wr = f0.clone().requires_grad_(need[0]), w0.clone().requires_grad_(need[1])
            cam, pooled = ops.cam_features("cpp", fr, wr)
            outs = [(cam, gcam), (pooled, gpool)]
            torch.autograd.backward([o for o, g in outs if g is not None], [g for o, g in outs if g is not None])
            fe, we = f0.clone().requires_grad_(need[0]), w0.clone().requires_grad_(need[1])
            rc, rp = reference.class_activation_features(fe, we)
            routs = [(rc, gcam), (rp, gpool)]
            torch.autograd.backward([o for o, g in routs if g is not None], [g for o, g in routs if g is not None])
            got, want = (fr.grad, fe.grad) if need[0] else (wr.grad, we.grad)
            close(got, want, dtype, scale=4.0)
    cam_only = ops.cam_features("cpp", f0, w0, with_pooled=False)[0]
    close(cam_only, ref[0], dtype, scale=4.0)
    names = _kernel_names(run)  # last: the results above hold whichever kernels ran
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels here (no CUPTI?): cannot tell which kernels ran")
    assert any("cam_vec_partial_kernel" in n for n in names), names
    assert any("cam_vec_bwd_kernel" in n for n in names), names


def test_cam_vec_kernels_leave_other_inputs_to_the_classic_ones(monkeypatch):
    """K not a multiple of V, channels_last, float64, more than 512 pixels: the classic kernels."""
    monkeypatch.setenv("ICAKD_CUDA_CAM", "vec")
    for f in (torch.randn(2, 12, 7, 7, device=DEV).half(),
              torch.randn(2, 16, 7, 7, device=DEV).half().to(memory_format=torch.channels_last),
              torch.randn(2, 16, 7, 7, device=DEV).double(),
              torch.randn(2, 16, 24, 24, device=DEV).half()):
        w = torch.randn(f.shape[:2], device=DEV, dtype=f.dtype)
        c, p, _ = cpp.cam_fwd(f, w, True)
        rc, rp = reference.class_activation_features(f, w)
        close(c, rc, f.dtype, scale=4.0)
        close(p, rp, f.dtype, scale=4.0)
        names = _kernel_names(lambda: cpp.cam_fwd(f, w, True))
        if not names:
            pytest.skip("the profiler recorded no CUDA kernels here (no CUPTI?): cannot tell which kernels ran")
        assert not any("cam_vec" in n for n in names), (f.shape, f.dtype, names)


def test_spatial_mean():
    g = torch.randn(16, 300, 7, 7, device=DEV)
    close(cpp.spatial_mean(g), reference.grad_cam_weights(g))
    close(cpp.spatial_mean(g.half()), reference.grad_cam_weights(g.half()), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c,s,d,n", [(1, 1, 1, 3), (10, 4, 33, 64), (1000, 16, 512, 256), (5, 3, 700, 2000)])
def test_class_bank_matches_reference_and_is_deterministic(dtype, c, s, d, n):
    def state():
        return (
            torch.zeros(c, s, d, dtype=dtype, device=DEV),
            torch.zeros(c, dtype=torch.int64, device=DEV),
            torch.zeros(c, dtype=torch.int64, device=DEV),
            torch.zeros(c, d, dtype=torch.float32, device=DEV),
        )

    ours, again, ref = state(), state(), state()
    for step in range(8):
        feats = torch.randn(n, d, device=DEV)
        labels = torch.randint(0, c if step % 2 else min(c, 3), (n,), device=DEV)
        mask = torch.rand(n, device=DEV) > 0.2
        if n > 2:
            labels[0] = c + 1  # out of range: skipped
        cpp.class_bank_enqueue_(*ours, feats, labels, mask)
        cpp.class_bank_enqueue_(*again, feats, labels, mask)
        reference.class_bank_enqueue_(*ref, feats, labels, mask)
    for a, b, r in zip(ours, again, ref):
        assert torch.equal(a, b)  # bit-identical across runs
        if a.is_floating_point() and a.dtype == torch.float32 and a.dim() == 2:
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)  # sums
        else:
            assert torch.equal(a, r)
    classes = torch.arange(c, device=DEV)
    s1, s2 = ours[3].clone(), ours[3].clone()
    cpp.class_bank_resync_(ours[0], ours[1], s1, classes)
    reference.class_bank_resync_(ours[0], ours[1], s2, classes)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,n", [(1, 5), (37, 20), (4096, 300), (100, 1000)])
def test_fifo_bank(size, n):
    d, c = 40, 11
    ours = (torch.zeros(size, d, device=DEV), torch.full((size,), -1, device=DEV), torch.zeros((), dtype=torch.int64, device=DEV))
    ref = tuple(t.clone() for t in ours)
    for _ in range(5):
        feats = torch.randn(n, d, device=DEV)
        labels = torch.randint(-1, c, (n,), device=DEV)
        mask = torch.rand(n, device=DEV) > 0.1
        cpp.fifo_bank_enqueue_(*ours, feats, labels, mask)
        reference.fifo_bank_enqueue_(*ref, feats, labels, mask)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
    s1, n1 = cpp.fifo_bank_sums(ours[0], ours[1], c)
    s2, n2 = reference.fifo_bank_sums(ref[0], ref[1], c)
    assert torch.equal(n1, n2)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_centroids_and_intra(dtype):
    c, d, b = 300, 128, 256
    sums = torch.randn(c, d, device=DEV)
    counts = torch.randint(0, 5, (c,), device=DEV)
    feats0 = torch.randn(b, d, device=DEV).to(dtype)
    f_t = torch.randn(b, d, device=DEV).to(dtype)
    labels = torch.randint(0, c, (b,), device=DEV)
    res = []
    for fn_c, fn_i in (
        (lambda *a: ops.centroids("cpp", *a), lambda *a: ops.intra_loss("cpp", *a)),
        (reference.class_centroids, reference.intra_class_loss),
    ):
        f = feats0.clone().requires_grad_()
        mu, tot = fn_c(sums, counts, f, labels)
        mu_t = mu.detach().flip(1).clone().requires_grad_()
        valid = tot >= 2
        loss = fn_i(f, f_t, mu, mu_t, labels, valid) + mu.square().sum()
        loss.backward()
        res.append((mu, tot, loss, f.grad, mu_t.grad))
    for a, r in zip(*res):
        if a.is_floating_point():
            close(a, r, dtype, scale=4.0)
        else:
            assert torch.equal(a, r)


def _set_inter_form(form, monkeypatch):
    """direct: tiles of E; gram: the float64 Gram matrix; gram_chunks: the same in chunks of a few
    rows (the chunk loops of inter_gram.h at small shapes)."""
    monkeypatch.setenv("ICAKD_INTER_FORM", "direct" if form == "direct" else "gram")
    if form == "gram_chunks":
        monkeypatch.setenv("ICAKD_GRAM_CHUNK_ELEMS", "1000")


@pytest.mark.parametrize("form", ["direct", "gram", "gram_chunks"])
@pytest.mark.parametrize("c,ds,dt", [(1, 3, 2), (130, 24, 40), (1000, 512, 512), (5000, 64, 96)])
@pytest.mark.parametrize("use_live", [False, True])
@pytest.mark.parametrize("need_t", [False, True])
def test_inter(c, ds, dt, use_live, need_t, form, monkeypatch):
    _set_inter_form(form, monkeypatch)
    mu_s0 = torch.randn(c, ds, device=DEV)
    mu_t0 = torch.randn(c, dt, device=DEV)
    valid = torch.rand(c, device=DEV) < 0.9
    valid[0] = True
    if c > 3:
        mu_s0[1] = 0
    live = (torch.rand(c, device=DEV) < 0.2) if use_live else None

    def run(fn):
        s = mu_s0.clone().requires_grad_()
        t = mu_t0.clone().requires_grad_(need_t)
        loss = fn(s, t)
        (loss * 0.5).backward()
        return loss, s.grad, t.grad

    out = run(lambda s, t: ops.inter_loss("cpp", s, t, valid, live, EPS))
    ref = run(lambda s, t: reference.inter_class_loss(s, t, valid, live))
    close(out[0], ref[0], scale=10.0)
    for a, r in zip(out[1:], ref[1:]):
        assert (a is None) == (r is None)
        if a is not None:
            torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3 * r.abs().max().item() + 1e-9)
    tri = _triton()
    if tri is not None:
        lt = tri.inter_fwd(mu_s0, mu_t0, valid, EPS)
        close(out[0], lt, scale=10.0)


def test_auto_inter_takes_the_gram_form_eager_and_compiled(monkeypatch):
    """With float32 kept exact and C >= 2 (Ds + Dt), the automatic choice on an H100/H200 is the
    C++ Gram form; eager and torch.compile(fullgraph=True) match the reference, loss and grad."""
    from icakd_fast import _backend, functional as IF

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.delenv("ICAKD_INTER_FORM", raising=False)
    c, ds, dt = 700, 100, 200
    mu_s0 = torch.randn(c, ds, device=DEV)
    mu_t = torch.randn(c, dt, device=DEV)
    valid = torch.rand(c, device=DEV) < 0.9
    live = torch.rand(c, device=DEV) < 0.3
    if _backend._full_rate_fp64(torch.cuda.current_device()):
        assert _backend.resolve(None, "inter", mu_s0, mu_t) == "cpp"

    def run(fn):
        s = mu_s0.clone().requires_grad_()
        loss = fn(s, mu_t, valid, live=live)
        loss.backward()
        return loss.detach(), s.grad

    ref = run(reference.inter_class_loss)
    for fn in (IF.inter_class_loss, torch.compile(IF.inter_class_loss, fullgraph=True)):
        loss, grad = run(fn)
        close(loss, ref[0], scale=10.0)
        torch.testing.assert_close(grad, ref[1], rtol=1e-3, atol=1e-3 * ref[1].abs().max().item())


@pytest.mark.parametrize("form", ["direct", "gram"])
def test_inter_float64_gradcheck_on_gpu(form, monkeypatch):
    monkeypatch.setenv("ICAKD_INTER_FORM", form)
    mu_s = torch.randn(9, 4, dtype=torch.float64, device=DEV, requires_grad=True)
    mu_t = torch.randn(9, 6, dtype=torch.float64, device=DEV, requires_grad=True)
    valid = torch.ones(9, dtype=torch.bool, device=DEV)
    assert torch.autograd.gradcheck(lambda s, t: ops.inter_loss("cpp", s, t, valid, None, EPS), (mu_s, mu_t))


@pytest.mark.parametrize("form", ["direct", "gram_chunks"])
def test_no_host_sync_in_training_step_ops(form, monkeypatch):
    """The CUDA ops must not synchronise with the host (cudaStreamSynchronize / item), with
    either form of the inter loss."""
    _set_inter_form(form, monkeypatch)
    c, d, b = 100, 64, 32
    bank = (torch.zeros(c, 4, d, device=DEV), torch.zeros(c, dtype=torch.int64, device=DEV),
            torch.zeros(c, dtype=torch.int64, device=DEV), torch.zeros(c, d, device=DEV))
    feats = torch.randn(b, d, device=DEV)
    labels = torch.randint(0, c, (b,), device=DEV)
    mask = torch.ones(b, dtype=torch.bool, device=DEV)
    f = torch.randn(b, 32, 7, 7, device=DEV, requires_grad=True)
    w = torch.randn(b, 32, device=DEV, requires_grad=True)
    live = torch.zeros(c, dtype=torch.bool, device=DEV)
    live[labels] = True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cam, pooled = ops.cam_features("cpp", f, w)
        mu_s, tot = ops.centroids("cpp", bank[3], bank[1], feats.requires_grad_(), labels)
        valid = tot >= 1
        loss = cam.sum() + pooled.sum() + ops.inter_loss("cpp", mu_s, mu_s.detach() * 2, valid, live, EPS)
        loss = loss + ops.intra_loss("cpp", feats, feats.detach() * 0.5, mu_s, mu_s.detach(), labels, valid)
        loss.backward()
        cpp.class_bank_enqueue_(*bank, feats.detach(), labels, mask)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# malformed arguments on the CUDA kernels (the cases of tests/test_cpp_ops.py, moved to the GPU)
# ---------------------------------------------------------------------------------------------


def _cases():
    import test_cpp_ops as t  # the CPU module's case table (tests/ is on sys.path under pytest)

    return t


def _to(args, device):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def test_cuda_bad_arguments_raise():
    t = _cases()
    for op, name, mutate in t.BAD:
        if getattr(mutate, "value_check", False):
            continue  # values: the CUDA kernels skip out-of-range indices (test below)
        args = _to(mutate(t._good_args()[op]), DEV)
        with pytest.raises(RuntimeError, match=rf"^{name}\b"):
            t._call(op, args)
    torch.cuda.synchronize()


def test_cuda_kernels_refuse_a_cpu_argument():
    """A CPU tensor among CUDA ones dispatches to the CUDA kernel: refused, naming the argument,
    before any pointer reaches a kernel (a one-element CPU grad_out is accepted)."""
    t = _cases()
    for op, name, i in t._tensor_positions():
        args = _to(t._good_args()[op], DEV)
        if name == "grad_out" or sum(isinstance(a, torch.Tensor) for a in args) < 2:
            continue  # a lone CPU tensor runs the CPU kernel
        args[i] = args[i].cpu()
        with pytest.raises(RuntimeError, match=rf"^{name} must be a CUDA tensor"):
            t._call(op, args)
    torch.cuda.synchronize()


def test_cuda_out_of_range_indices_are_skipped():
    """Documented CUDA behaviour for index values the CPU kernels refuse: no crash, skipped."""
    c, d = 5, 4
    sums, counts = torch.zeros(c, d, device=DEV), torch.zeros(c, dtype=torch.int64, device=DEV)
    feats = torch.randn(4, d, device=DEV)
    labels = torch.tensor([0, c, -1, 2], device=DEV)
    mu, total = cpp.centroids_fwd(sums, counts, feats, labels)
    assert total.tolist() == [1, 0, 1, 0, 0]
    close(mu[0], feats[0])
    close(mu[2], feats[3])
    valid = torch.ones(c, dtype=torch.bool, device=DEV)
    f_t = torch.randn(4, d, device=DEV)
    keep = torch.tensor([0, 3], device=DEV)
    loss = cpp.intra_fwd(feats, f_t, mu, mu, labels, valid)
    ref = reference.intra_class_loss(feats[keep], f_t[keep], mu, mu, labels[keep], valid)
    close(loss, ref)
    bank, bank_labels = torch.randn(6, d, device=DEV), torch.tensor([0, c + 2, 1, -1, 1, 0], device=DEV)
    s, n = cpp.fifo_bank_sums(bank, bank_labels, c)
    assert n.tolist() == [2, 2, 0, 0, 0]
    cb = torch.randn(c, 2, d, device=DEV)
    cs = torch.zeros(c, d, device=DEV)
    cpp.class_bank_resync_(cb, torch.full((c,), 2, device=DEV), cs, torch.tensor([1, c + 7, -3], device=DEV))
    close(cs[1], cb[1].sum(0))
    assert torch.all(cs[0] == 0)
    torch.cuda.synchronize()
