"""The reference ops: float64 gradchecks, independent re-derivations, Grad-CAM on real models.

Every op is called with ``backend="reference"``: the automatic choice would test another backend
(the C++ one where it is built); the fast backends have their own files.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from icakd_fast import FeatureTap, functional as IF, reference as R

from helpers import noncontig

D64 = torch.float64


def rnd(*shape, dtype=D64, grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


# ------------------------------------------------------------------ gradchecks (float64)


def test_gradcheck_grad_cam():
    f, w = rnd(3, 5, 4, 3, grad=True), rnd(3, 5, grad=True)
    assert gradcheck(lambda a, b: IF.grad_cam(a, b, backend="reference"), (f, w))


def test_gradcheck_cam_output_of_class_activation_features():
    f, w = rnd(2, 4, 3, 5, grad=True), rnd(2, 4, grad=True)
    assert gradcheck(lambda a, b: IF.class_activation_features(a, b, backend="reference")[0], (f, w))


def test_pooled_gradient_treats_minmax_weights_as_constant():
    f, w = rnd(3, 6, 4, 4, grad=True), rnd(3, 6, grad=True)
    _, pooled = IF.class_activation_features(f, w, backend="reference")
    g = torch.randn_like(pooled)
    gf, gw = torch.autograd.grad(pooled, (f, w), g, allow_unused=True)
    # independent derivation: pooled = sum_p pw[b,p] f[b,k,p] with pw held fixed
    cam = torch.relu(torch.einsum("bk,bkhw->bhw", w, f)).detach().flatten(1)
    m = (cam - cam.min(1, keepdim=True).values) / (cam.max(1, keepdim=True).values - cam.min(1, keepdim=True).values + 1e-7)
    pw = m / m.sum(1, keepdim=True)
    expect = g.unsqueeze(2) * pw.unsqueeze(1)
    torch.testing.assert_close(gf.flatten(2), expect)
    assert gw is None or gw.abs().max() == 0


def test_gradcheck_cam_constraint_loss_same_and_mixed_resolution():
    cs, ct = rnd(3, 4, 4, grad=True).abs(), rnd(3, 4, 4).abs()
    assert gradcheck(lambda a: IF.cam_constraint_loss(a, ct), (cs.detach().requires_grad_(),))
    big = rnd(3, 8, 8).abs().requires_grad_()
    assert gradcheck(lambda a: IF.cam_constraint_loss(a, ct), (big,))


def test_gradcheck_class_centroids():
    sums, counts = rnd(5, 3), torch.tensor([2, 0, 1, 0, 4])
    feats, labels = rnd(6, 3, grad=True), torch.tensor([0, 1, 1, 4, 0, 2])
    assert gradcheck(lambda x: IF.class_centroids(sums, counts, x, labels, backend="reference")[0], (feats,))


def test_gradcheck_intra_class_loss():
    C, D = 4, 5
    fs, ft, mt = rnd(7, D, grad=True), rnd(7, D, grad=True), rnd(C, D, grad=True)
    ms = rnd(C, D)
    y, valid = torch.tensor([0, 1, 2, 3, 0, 1, 3]), torch.tensor([True, True, False, True])
    assert gradcheck(lambda a, b, c: IF.intra_class_loss(a, b, ms, c, y, valid, backend="reference"), (fs, ft, mt))


def test_gradcheck_inter_class_loss_mixed_widths():
    ms, mt = rnd(6, 4, grad=True), rnd(6, 7, grad=True)
    valid = torch.tensor([True, False, True, True, True, False])
    assert gradcheck(lambda a, b: IF.inter_class_loss(a, b, valid, backend="reference"), (ms, mt))


def test_gradcheck_kd_loss():
    zs, zt = rnd(4, 6, grad=True), rnd(4, 6, grad=True)
    assert gradcheck(lambda a, b: IF.kd_loss(a, b, 3.0), (zs, zt))


# ------------------------------------------------------------------ math re-derived


def test_inter_class_loss_matches_loop_definition_and_live_semantics():
    C = 5
    ms, mt = rnd(C, 3, grad=True), rnd(C, 4)
    valid = torch.tensor([True, True, False, True, True])
    V = [k for k in range(C) if valid[k]]
    cos = lambda a, b: (a @ b) / (a.norm() * b.norm())
    brute = sum((cos(ms[k], ms[l]) - cos(mt[k], mt[l])) ** 2 for k in V for l in V) / len(V) ** 2
    full = IF.inter_class_loss(ms, mt, valid, backend="reference")
    torch.testing.assert_close(full, brute)
    g_full = torch.autograd.grad(full, ms)[0]
    live = torch.tensor([False, True, False, False, True])
    g_live = torch.autograd.grad(IF.inter_class_loss(ms, mt, valid, live=live, backend="reference"), ms)[0]
    torch.testing.assert_close(g_live[live], g_full[live])
    assert (g_live[~live] == 0).all()


def test_intra_class_loss_detaches_student_centroid_and_skips_invalid():
    C, D = 3, 4
    fs, ft = rnd(5, D), rnd(5, D)
    ms, mt = rnd(C, D, grad=True), rnd(C, D)
    y = torch.tensor([0, 0, 1, 2, 2])
    valid = torch.tensor([True, False, True])
    loss = IF.intra_class_loss(fs, ft, ms, mt, y, valid, backend="reference")
    rows = [b for b in range(5) if valid[y[b]]]
    brute = sum(((fs[b] - ms[y[b]]) - (ft[b] - mt[y[b]])).pow(2).sum() for b in rows) / len(rows)
    torch.testing.assert_close(loss, brute.detach())
    assert not loss.requires_grad or torch.autograd.grad(loss, ms, allow_unused=True)[0] is None
    none_valid = IF.intra_class_loss(fs, ft, ms, mt, y, torch.zeros(C, dtype=torch.bool), backend="reference")
    assert none_valid.item() == 0.0


def test_class_centroids_live_rows_and_empty_classes():
    sums = torch.tensor([[2.0, 2.0], [0.0, 0.0], [3.0, 0.0]])
    counts = torch.tensor([2, 0, 1])
    feats = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.bfloat16)
    mu, total = IF.class_centroids(sums, counts, feats, torch.tensor([0, 0]), backend="reference")
    assert mu.dtype == torch.float32 and total.tolist() == [4, 0, 1]
    torch.testing.assert_close(mu, torch.tensor([[0.75, 1.5], [0.0, 0.0], [3.0, 0.0]]))


def test_constant_cam_falls_back_to_spatial_mean():
    f = rnd(2, 3, 4, 4)
    w = torch.zeros(2, 3, dtype=D64)  # all-zero CAM
    cam, pooled = IF.class_activation_features(f, w, backend="reference")
    assert (cam == 0).all()
    torch.testing.assert_close(pooled, f.mean(dim=(2, 3)))


def test_class_activation_features_matches_spec_formula():
    f, w = rnd(3, 5, 6, 4), rnd(3, 5)
    cam, pooled = IF.class_activation_features(f, w, backend="reference")
    for b in range(3):
        s = torch.relu((w[b, :, None, None] * f[b]).sum(0))
        torch.testing.assert_close(cam[b], s)
        m = (s - s.min()) / (s.max() - s.min() + 1e-7)
        torch.testing.assert_close(pooled[b], (m * f[b]).sum((1, 2)) / m.sum())


def test_cam_constraint_pools_the_larger_map():
    cs, ct = torch.rand(2, 8, 8, dtype=D64), torch.rand(2, 4, 4, dtype=D64)
    pooled = F.adaptive_avg_pool2d(cs.unsqueeze(1), (4, 4)).squeeze(1)
    torch.testing.assert_close(IF.cam_constraint_loss(cs, ct), IF.cam_constraint_loss(pooled, ct))
    q = lambda c: F.normalize(c.flatten(1), dim=1)
    torch.testing.assert_close(IF.cam_constraint_loss(pooled, ct), (q(pooled) - q(ct)).pow(2).sum(1).mean())


def test_kd_loss_includes_temperature_squared():
    zs, zt, T = rnd(3, 5), rnd(3, 5), 4.0
    p_t = F.softmax(zt / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(zs / T, 1))).sum(1).mean()
    torch.testing.assert_close(IF.kd_loss(zs, zt, T), kl * T * T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    f, w = torch.randn(2, 64, 5, 5), torch.randn(2, 64)
    cam, pooled = IF.class_activation_features(f.to(dtype), w.to(dtype), backend="reference")
    ref_cam, ref_pooled = IF.class_activation_features(f.to(dtype).double(), w.to(dtype).double(), backend="reference")
    assert cam.dtype == dtype and pooled.dtype == dtype
    # only the final rounding to `dtype` separates them
    eps = torch.finfo(dtype).eps
    assert (cam.double() - ref_cam).abs().max() <= eps * ref_cam.abs().max() + 1e-6
    assert (pooled.double() - ref_pooled).abs().max() <= 4 * eps * ref_pooled.abs().max() + 1e-6


def test_non_contiguous_inputs_give_identical_results():
    f, w = rnd(3, 4, 5, 6), rnd(3, 4)
    a = IF.class_activation_features(f, w, backend="reference")
    b = IF.class_activation_features(noncontig(f), noncontig(w), backend="reference")
    cl = IF.class_activation_features(f.to(memory_format=torch.channels_last), w, backend="reference")
    for x, y, z in zip(a, b, cl):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, z)


# ------------------------------------------------------------------ Grad-CAM on real models


def _models():
    tv = pytest.importorskip("torchvision")
    return {
        "resnet18": lambda: tv.models.resnet18(num_classes=10),
        "mobilenet_v2": lambda: tv.models.mobilenet_v2(num_classes=10),
    }


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_closed_form_grad_cam_equals_autograd(arch, mode):
    model = _models()[arch]().double()
    model.train(mode == "train")
    if mode == "train":
        # dropout before the classifier makes the exact gradient depend on the dropout mask;
        # the closed form is exact for GAP + linear, so dropout is switched off here
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    x = torch.randn(3, 3, 64, 64, dtype=D64)
    y = torch.tensor([1, 7, 3])
    with FeatureTap(model) as tap:
        logits = model(x)
        feats = tap.features
        grads = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), feats)[0]
        w_auto = IF.grad_cam_weights(grads, backend="reference")
        w_closed = IF.cam_weights_from_linear(tap.fc_weight, y, feats.shape[2] * feats.shape[3])
    torch.testing.assert_close(w_auto, w_closed.detach())
    torch.testing.assert_close(IF.grad_cam(feats, w_auto, backend="reference"),
                               IF.grad_cam(feats, w_closed.detach(), backend="reference"))
