"""GPU-only checks of the Triton backend (skipped without CUDA): bfloat16, channels_last,
torch.compile through the triton ops with Inductor, CUDA-graph capture of a full ICAKDLoss step,
and (slow) a feature map with more than 2**31 elements."""

import pytest
import torch

import icakd_fast.functional as F
import icakd_fast.reference as R

from helpers import assert_close_rel

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _triton_and_float64(f, w):
    """``(cam, pooled, grad_f, grad_w)`` of the triton op and of the float64 reference, for the
    same random output gradients (as the op's output dtype rounds them)."""
    cam, pooled = F.class_activation_features(f, w, backend="triton")
    gc, gp = torch.randn_like(cam, dtype=torch.float32), torch.randn_like(pooled, dtype=torch.float32)
    gf, gw = torch.autograd.grad((cam.float() * gc).sum() + (pooled.float() * gp).sum(), (f, w))
    f64 = f.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    rc, rp = R.class_activation_features(f64, w64)
    gc64, gp64 = gc.to(cam.dtype).double(), gp.to(pooled.dtype).double()
    rgf, rgw = torch.autograd.grad((rc * gc64).sum() + (rp * gp64).sum(), (f64, w64))
    return (cam, pooled, gf, gw), (rc, rp, rgf, rgw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["split", "image", "vec"])
def test_cam_low_precision_and_layouts(dtype, layout, mode, monkeypatch):
    """``vec`` takes the contiguous 16-bit maps; the other inputs fall back to the split kernels."""
    from icakd_fast.kernels import cam as kcam

    if mode == "vec":
        monkeypatch.setattr(kcam, "CAM_VEC", True)
    else:
        monkeypatch.setattr(kcam, "CAM_FWD_MODE", mode)
    f = torch.randn(8, 256, 7, 7, device=DEV).to(dtype)
    if layout == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    f.requires_grad_(True)
    w = (torch.randn(8, 256, device=DEV) / 49).to(dtype).requires_grad_(True)
    (cam, pooled, gf, gw), (rc, rp, rgf, rgw) = _triton_and_float64(f, w)
    assert gf.stride() == f.stride()
    assert_close_rel(cam, rc, dtype, "cam")
    assert_close_rel(pooled, rp, dtype, "pooled", factor=2)
    assert_close_rel(gf, rgf, dtype, "grad_features", factor=2)
    assert_close_rel(gw, rgw, dtype, "grad_weights", factor=2)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(16, 2048, 7, 7), (4, 1000, 8, 8), (3, 72, 11, 11)])
def test_vec_cam_kernels_bf16_on_the_tensor_cores(shape, wdtype, monkeypatch):
    """The vec kernels at training shapes: several tiles and channel blocks per image, K not a
    multiple of the tile, bfloat16 and float32 (split into pieces) weights, against float64."""
    from icakd_fast.kernels import cam as kcam

    monkeypatch.setattr(kcam, "CAM_VEC", True)
    B, K, H, W = shape
    f = torch.randn(shape, device=DEV).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(B, K, device=DEV) / (H * W)).to(wdtype).requires_grad_(True)
    assert kcam._use_vec(f, w, H * W)
    out_dt = torch.promote_types(f.dtype, w.dtype)
    (cam, pooled, gf, gw), (rc, rp, rgf, rgw) = _triton_and_float64(f, w)
    assert_close_rel(cam, rc, out_dt, "cam")
    assert_close_rel(pooled, rp, out_dt, "pooled", factor=2)
    assert_close_rel(gf, rgf, torch.bfloat16, "grad_features", factor=2)
    assert_close_rel(gw, rgw, out_dt, "grad_weights", factor=2)
    # run to run: bit-identical
    cam2, pooled2 = F.class_activation_features(f, w, backend="triton")
    assert torch.equal(cam, cam2) and torch.equal(pooled, pooled2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_structure_low_precision(dtype):
    C, Ds, Dt, B = 300, 64, 96, 40
    mu_s = torch.randn(C, Ds, device=DEV).to(dtype).requires_grad_(True)
    mu_t = torch.randn(C, Dt, device=DEV).to(dtype)
    valid = torch.rand(C, device=DEV) > 0.1
    live = torch.zeros(C, dtype=torch.bool, device=DEV)
    live[torch.randint(0, C, (B,), device=DEV)] = True
    loss = F.inter_class_loss(mu_s, mu_t, valid, live=live, backend="triton")
    s64 = mu_s.detach().double().requires_grad_(True)
    ref = R.inter_class_loss(s64, mu_t.double(), valid, live)
    (g,) = torch.autograd.grad(loss, mu_s)
    (e,) = torch.autograd.grad(ref, s64)
    assert_close_rel(loss, ref, dtype, "inter loss", factor=2)
    assert_close_rel(g, e, dtype, "inter grad", factor=4)
    feats = torch.randn(B, Ds, device=DEV).to(dtype)
    labels = torch.randint(0, C, (B,), device=DEV)
    sums = torch.randn(C, Ds, device=DEV)
    counts = torch.randint(0, 5, (C,), device=DEV)
    mu, total = F.class_centroids(sums, counts, feats, labels, backend="triton")
    rmu, rtotal = R.class_centroids(sums.double(), counts, feats.double(), labels)
    assert torch.equal(total, rtotal)
    assert_close_rel(mu, rmu, dtype, "centroids")
    # sums in the 16-bit dtype too: a 16-bit output, float32 sums inside the kernel
    mu16, _ = F.class_centroids(sums.to(dtype), counts, feats, labels, backend="triton")
    rmu16, _ = R.class_centroids(sums.to(dtype).double(), counts, feats.double(), labels)
    assert mu16.dtype == dtype
    assert_close_rel(mu16, rmu16, dtype, "centroids, sums in the input dtype")


@pytest.mark.parametrize("precision,tol", [("highest", 2e-5), ("high", 5e-3), ("medium", 4e-2)])
def test_inter_follows_float32_matmul_precision(precision, tol):
    """tf32x3 (default), tf32 and bf16 dots in the tiled inter loss, column-split backward included."""
    C, Ds, Dt = 1100, 96, 160
    mu_s = torch.randn(C, Ds, device=DEV).requires_grad_(True)
    mu_t = torch.randn(C, Dt, device=DEV)
    valid = torch.rand(C, device=DEV) > 0.1
    live = torch.rand(C, device=DEV) > 0.7
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        loss = F.inter_class_loss(mu_s, mu_t, valid, live=live, backend="triton")
        (g,) = torch.autograd.grad(loss, mu_s)
    finally:
        torch.set_float32_matmul_precision(old)
    s64 = mu_s.detach().double().requires_grad_(True)
    ref = R.inter_class_loss(s64, mu_t.double(), valid, live)
    (e,) = torch.autograd.grad(ref, s64)
    from helpers import rel_err

    assert rel_err(loss, ref) <= tol, (precision, rel_err(loss, ref))
    assert rel_err(g, e) <= 4 * tol, (precision, rel_err(g, e))


def test_bank_bf16_matches_reference_and_is_deterministic():
    from icakd_fast import ClassMemoryBank

    C, S, D = 50, 4, 64
    a = ClassMemoryBank(C, S, D, dtype=torch.bfloat16, backend="triton", device=DEV)
    b = ClassMemoryBank(C, S, D, dtype=torch.bfloat16, backend="triton", device=DEV)
    r = ClassMemoryBank(C, S, D, dtype=torch.bfloat16, backend="reference", device=DEV)
    for _ in range(10):
        x = torch.randn(64, D, device=DEV)
        y = torch.randint(0, C // 5, (64,), device=DEV)
        for m in (a, b, r):
            m.enqueue(x, y)
    assert torch.equal(a.bank, b.bank) and torch.equal(a.sums, b.sums)
    assert torch.equal(a.bank, r.bank) and torch.equal(a.count, r.count) and torch.equal(a.ptr, r.ptr)
    torch.testing.assert_close(a.sums, r.sums, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vec", [False, True])
def test_compile_inductor_fullgraph(vec, monkeypatch):
    """torch.compile(fullgraph=True) with Inductor through the triton ops (vec: the bf16 CAM map
    takes the opt-in vec kernels, whose channel loop bound is not specialised)."""
    from icakd_fast.kernels import cam as kcam

    monkeypatch.setattr(kcam, "CAM_VEC", vec)
    torch._dynamo.reset()

    def step(f, w, mu_s, mu_t, valid, live):
        cam, pooled = F.class_activation_features(f, w, backend="triton")
        return cam.float().square().mean() + pooled.float().sum() + F.inter_class_loss(
            mu_s, mu_t, valid, live=live, backend="triton")

    dt = torch.bfloat16 if vec else torch.float32
    f = torch.randn(4, 300, 7, 7, device=DEV).to(dt).requires_grad_(True)
    w = torch.randn(4, 300, device=DEV).to(dt).requires_grad_(True)
    if vec:
        assert kcam._use_vec(f, w, 49)
    mu_s = torch.randn(100, 32, device=DEV, requires_grad=True)
    mu_t = torch.randn(100, 48, device=DEV)
    valid = torch.ones(100, dtype=torch.bool, device=DEV)
    live = torch.rand(100, device=DEV) > 0.8
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(f, w, mu_s, mu_t, valid, live)
    got = torch.autograd.grad(out, (f, w, mu_s))
    ref = step(f, w, mu_s, mu_t, valid, live)
    exp = torch.autograd.grad(ref, (f, w, mu_s))
    out_tol = dict(rtol=1e-2, atol=1e-2) if vec else dict(rtol=1e-4, atol=1e-4)
    grad_tol = dict(rtol=2e-2, atol=2e-2) if vec else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out, ref, **out_tol)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.float(), b.float(), **grad_tol)


def _capture_training_step(crit, inputs):
    """A CUDA graph of one ``crit`` step (loss and the gradients of the student inputs and the
    loss module's parameters), captured after three warm-up steps on a side stream (they compile
    the kernels): ``(graph, (loss, grads))``, the outputs being the graph's static tensors."""
    fs, zs, ft, zt, y, ws, wt = inputs
    params = [fs, zs, ws] + list(crit.parameters())

    def step():
        out = crit(fs, zs, ft, zt, y, ws, wt)
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        return out.loss.detach(), grads

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outputs = step()
    return g, outputs


def test_cuda_graph_capture_of_icakd_step():
    from icakd_fast import ICAKDLoss

    torch.manual_seed(0)
    B, C, Ks, Kt = 16, 10, 32, 48
    crit = ICAKDLoss(C, Ks, Kt, backend="triton", slots_per_class=4).to(DEV).train()
    fs = torch.randn(B, Ks, 4, 4, device=DEV, requires_grad=True)
    ft = torch.randn(B, Kt, 4, 4, device=DEV)
    zs = torch.randn(B, C, device=DEV, requires_grad=True)
    zt = torch.randn(B, C, device=DEV)
    y = torch.randint(0, C, (B,), device=DEV)
    ws = torch.randn(C, Ks, device=DEV, requires_grad=True)
    wt = torch.randn(C, Kt, device=DEV)
    g, (loss, grads) = _capture_training_step(crit, (fs, zs, ft, zt, y, ws, wt))
    bank = getattr(crit, "bank_s", None)
    count_before = bank.count.clone() if bank is not None and hasattr(bank, "count") else None
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss).all()
    if count_before is not None:
        assert bank.count.sum() >= count_before.sum()


def _incremental_batch(seed, B, C, Ks, Kt):
    g = torch.Generator(device=DEV).manual_seed(seed)
    fs = torch.randn(B, Ks, 3, 3, device=DEV, generator=g).relu().requires_grad_()
    zs = torch.randn(B, C, device=DEV, generator=g).requires_grad_()
    ft = torch.randn(B, Kt, 3, 3, device=DEV, generator=g).relu()
    zt = torch.randn(B, C, device=DEV, generator=g)
    y = torch.randint(0, C, (B,), device=DEV, generator=g)
    ws = torch.randn(C, Ks, device=DEV, generator=g).requires_grad_()
    wt = torch.randn(C, Kt, device=DEV, generator=g)
    return fs, zs, ft, zt, y, ws, wt


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_incremental_inter_matches_the_full_form_on_the_gpu(backend):
    """ICAKDLoss steps with the incremental Gram form against the backend's inter op, bf16 banks;
    the Gram matrix kept up to date equals a rebuild."""
    from icakd_fast import ICAKDLoss
    from icakd_fast._backend import is_available
    from icakd_fast._inter_gram import InterGramCache

    if not is_available(backend, "inter", DEV):
        pytest.skip(f"{backend} backend unavailable on the GPU")
    B, C, Ks, Kt = 64, 300, 24, 32
    kw = dict(slots_per_class=3, resync_every=5, backend=backend, bank_dtype=torch.bfloat16, min_count=2)
    torch.manual_seed(0)
    inc = ICAKDLoss(C, Ks, Kt, incremental_inter=True, **kw).to(DEV)
    full = ICAKDLoss(C, Ks, Kt, incremental_inter=False, **kw).to(DEV)
    full.load_state_dict(inc.state_dict())
    for step in range(12):
        x1, x2 = _incremental_batch(step, B, C, Ks, Kt), _incremental_batch(step, B, C, Ks, Kt)
        o1, o2 = inc(*x1), full(*x2)
        torch.testing.assert_close(o1.parts["inter"], o2.parts["inter"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(o1.loss, o2.loss, rtol=1e-4, atol=1e-6)
        o1.loss.backward()
        o2.loss.backward()
        for a, b in ((x1[0], x2[0]), (x1[5], x2[5]), (inc.projector.weight, full.projector.weight)):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6)
        inc.zero_grad()
        full.zero_grad()
    fresh = InterGramCache(inc.min_count, R.NORM_EPS)._build(inc.bank_s, inc.bank_t)
    torch.testing.assert_close(inc._inter_gram.K, fresh, rtol=0, atol=1e-11)


def test_cuda_graph_replays_keep_the_incremental_gram_matrix_up_to_date():
    from icakd_fast import ICAKDLoss
    from icakd_fast._inter_gram import InterGramCache

    torch.manual_seed(0)
    B, C, Ks, Kt = 32, 200, 16, 24
    crit = ICAKDLoss(C, Ks, Kt, backend="triton", slots_per_class=2, resync_every=7,
                     incremental_inter=True).to(DEV).train()
    fs, zs, ft, zt, y, ws, wt = _incremental_batch(0, B, C, Ks, Kt)
    g, (loss, _) = _capture_training_step(crit, (fs, zs, ft, zt, y, ws, wt))
    for i in range(5):  # new labels each replay: other classes change
        y.copy_(torch.randint(0, C, (B,), device=DEV))
        g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss).all()
    fresh = InterGramCache(crit.min_count, R.NORM_EPS)._build(crit.bank_s, crit.bank_t)
    torch.testing.assert_close(crit._inter_gram.K, fresh, rtol=0, atol=1e-11)


@pytest.mark.slow
def test_feature_map_over_2_pow_31_elements():
    free, _ = torch.cuda.mem_get_info()
    B, K, H, W = 2, 16400, 256, 256  # more than 2**31 elements in all
    need = B * K * H * W * 2 * 3  # bf16 features + grad + slack
    if free < need:
        pytest.skip("not enough GPU memory")
    f = torch.empty(B, K, H, W, device=DEV, dtype=torch.bfloat16).normal_()
    assert f.numel() > 2**31
    w = torch.randn(B, K, device=DEV, dtype=torch.bfloat16) / K
    cam, pooled = F.class_activation_features(f, w, backend="triton")
    # check the last image (offsets beyond 2**31) on a slice of channels by the reference
    rc = R.grad_cam(f[-1:].float(), w[-1:].float())
    torch.testing.assert_close(cam[-1:].float(), rc.float(), rtol=2e-2, atol=2e-2)
    mean = F.grad_cam_weights(f, backend="triton")
    torch.testing.assert_close(mean[-1, -8:].float(), f[-1, -8:].float().mean(dim=(1, 2)), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "cpp", "reference"])
def test_non_finite_rows_never_enter_a_bank_on_the_gpu(backend):
    """Both bank layouts refuse inf/NaN rows (and bf16 overflow) without a host synchronisation;
    a CUDA-graph ICAKDLoss step fed one inf teacher row counts it and the next replay is finite."""
    from icakd_fast import ClassMemoryBank, FIFOMemoryBank, ICAKDLoss
    from icakd_fast._backend import is_available
    from icakd_fast._inter_gram import InterGramCache

    if not is_available(backend, "class_bank", DEV):
        pytest.skip(f"{backend} backend unavailable on the GPU")
    C, S, D, N = 20, 4, 64, 48
    x = torch.randn(N, D, device=DEV)
    y = torch.randint(0, C, (N,), device=DEV)
    x[-1, 3], x[-2, 0] = float("inf"), float("nan")
    x64 = x.double()
    x64[-3, 5] = 1e39  # finite in the float64 input, inf in bfloat16
    good = torch.ones(N, dtype=torch.bool, device=DEV)
    good[-3:] = False
    for make in (lambda: ClassMemoryBank(C, S, D, dtype=torch.bfloat16, backend=backend, device=DEV),
                 lambda: FIFOMemoryBank(64, D, C, dtype=torch.bfloat16, backend=backend, device=DEV)):
        bank, clean = make(), make()
        bank.enqueue(x64, y)  # first call: kernels compiled, workspaces allocated
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            bank.enqueue(x64, y)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for _ in range(2):
            clean.enqueue(x64[good], y[good])
        for (k, a), (_, b) in zip(bank.state_dict().items(), clean.state_dict().items()):
            if k == "refused":
                assert a.item() == 6 and b.item() == 0
            else:
                assert torch.equal(a, b), k
    if backend != "triton":
        return
    B, C, Ks, Kt = 32, 200, 16, 24
    crit = ICAKDLoss(C, Ks, Kt, backend="triton", slots_per_class=2, resync_every=7,
                     incremental_inter=True).to(DEV).train()
    fs, zs, ft, zt, y, ws, wt = _incremental_batch(0, B, C, Ks, Kt)
    g, (loss, grads) = _capture_training_step(crit, (fs, zs, ft, zt, y, ws, wt))
    g.replay()
    keep = ft[-1, 2, 1, 1].clone()
    ft[-1, 2, 1, 1] = float("inf")
    g.replay()  # this step's loss may be non-finite
    ft[-1, 2, 1, 1] = keep
    g.replay()
    torch.cuda.synchronize()
    assert crit.bank_t.refused.item() == 1 and crit.bank_s.refused.item() == 0
    assert torch.isfinite(loss).all()
    assert all(t is None or torch.isfinite(t).all() for t in grads)
    for bank in (crit.bank_s, crit.bank_t):
        assert torch.isfinite(bank.bank).all() and torch.isfinite(bank.sums).all()
    fresh = InterGramCache(crit.min_count, R.NORM_EPS)._build(crit.bank_s, crit.bank_t)
    torch.testing.assert_close(crit._inter_gram.K, fresh, rtol=0, atol=1e-11)
