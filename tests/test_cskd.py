"""CSKDLoss (cskd-official) against a per-row, per-class loop written from the recipe."""

import math

import pytest
import torch
import torch.nn.functional as F

from icakd_fast.cskd import CSKDLoss


def _loop_reference(loss: CSKDLoss, fs, zs, ft, zt, y, correct_only=True):
    """The recipe term by term with Python lists (float64)."""
    C = loss.num_classes
    s = F.conv2d(fs.double(), loss.branch.weight.double())
    t = ft.double()
    zs, zt = zs.double(), zt.double()
    B = y.numel()
    s_pred, t_pred = zs.argmax(1), zt.argmax(1)

    def centroid(x, pred, filt):
        out = []
        for b in range(B):
            rows = [x[i] for i in range(B) if y[i] == y[b] and (not filt or pred[i] == y[i])]
            out.append(sum(rows) / len(rows) if rows else x[b])
        return torch.stack(out)

    per_feat = s[0].numel()
    ct = centroid(t, t_pred, correct_only)
    cs = centroid(s, s_pred, correct_only).detach()
    intra_f = ((t - ct) - (s - cs)).pow(2).mean() / per_feat
    ctz = centroid(zt, t_pred, False)
    csz = centroid(zs, s_pred, False).detach()
    intra_z = ((zt - ctz) - (zs - csz)).pow(2).mean() / C
    centre = (zs - csz).pow(2).mean()
    classes = sorted(set(y.tolist()))

    def means(x):
        return [sum(x[i] for i in range(B) if y[i] == c) / sum(1 for i in range(B) if y[i] == c) for c in classes]

    def rel(ms):
        P = len(ms)
        return torch.stack([torch.stack([(ms[k] * ms[l]).sum() / ms[k].norm() / ms[l].norm() for l in range(P)])
                            for k in range(P)])

    P = len(classes)
    inter_f = (rel(means(s)) - rel(means(t))).pow(2).mean() / P
    inter_z = (rel(means(zs)) - rel(means(zt))).pow(2).mean() / P
    ce = F.cross_entropy(zs, y)
    mse = (zt - zs).pow(2).mean()
    total = 0.9 * ce + 0.002 * (intra_f + intra_z) + 0.1 * centre + 0.04 * (inter_f + inter_z) + 1e-6 * mse
    return total, {"intra": intra_f + intra_z, "inter": inter_f + inter_z, "centre": centre, "ce": ce}


def _inputs(seed=0, B=10, C=4, Ds=3, Dt=5, H=3):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(B, Ds, H, H, generator=g)
    ft = torch.randn(B, Dt, H, H, generator=g)
    zs = torch.randn(B, C, generator=g)
    zt = torch.randn(B, C, generator=g)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2])[:B]
    # make some rows correct for each network, and class 2 correct for neither
    for b in (0, 2, 3, 6):
        zt[b, y[b]] += 10
    for b in (1, 3, 7):
        zs[b, y[b]] += 10
    return fs, zs, ft, zt, y


@pytest.mark.parametrize("correct_only", [True, False])
def test_matches_loop_reference(correct_only):
    torch.manual_seed(0)
    loss = CSKDLoss(4, 3, 5, correct_only=correct_only)
    fs, zs, ft, zt, y = _inputs()
    out = loss(fs, zs, ft, zt, y)
    ref, parts = _loop_reference(loss, fs, zs, ft, zt, y, correct_only)
    assert math.isclose(out.loss.item(), ref.item(), rel_tol=1e-5)
    for k, v in parts.items():
        assert math.isclose(out.parts[k].item(), v.item(), rel_tol=1e-5, abs_tol=1e-9), k


def test_correct_only_changes_feature_intra():
    torch.manual_seed(0)
    a = CSKDLoss(4, 3, 5, correct_only=True)
    b = CSKDLoss(4, 3, 5, correct_only=False)
    b.load_state_dict(a.state_dict())
    args = _inputs()
    assert a(*args).parts["intra"].item() != pytest.approx(b(*args).parts["intra"].item(), rel=1e-6)


def test_gradients_reach_branch_and_student_only():
    torch.manual_seed(0)
    loss = CSKDLoss(4, 3, 5)
    fs, zs, ft, zt, y = _inputs()
    fs.requires_grad_(True)
    zs.requires_grad_(True)
    ft.requires_grad_(True)
    loss(fs, zs, ft, zt, y).loss.backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert zs.grad is not None and loss.branch.weight.grad.abs().sum() > 0
    assert ft.grad is None


def test_resolution_mismatch_pools_the_larger_map():
    torch.manual_seed(0)
    loss = CSKDLoss(4, 3, 5)
    fs, zs, ft, zt, y = _inputs(H=4)
    ft_small = F.adaptive_avg_pool2d(ft, 2)
    out = loss(fs, zs, ft_small, zt, y)
    ref, _ = _loop_reference_pooled(loss, fs, zs, ft_small, zt, y)
    assert math.isclose(out.loss.item(), ref, rel_tol=1e-5)


def _loop_reference_pooled(loss, fs, zs, ft, zt, y):
    # the student's branch output pooled to the teacher's grid, then the same recipe
    s = F.adaptive_avg_pool2d(F.conv2d(fs, loss.branch.weight), ft.shape[-2:])
    ident = CSKDLoss(4, 5, 5)
    with torch.no_grad():
        ident.branch.weight.copy_(torch.eye(5)[:, :, None, None])
    return _loop_reference(ident, s, zs, ft, zt, y)[0].item(), None


def test_bad_inputs():
    loss = CSKDLoss(4, 3, 5)
    fs, zs, ft, zt, y = _inputs()
    with pytest.raises(ValueError, match="labels"):
        loss(fs, zs, ft, zt, y + 10)
    with pytest.raises(ValueError, match="student_features"):
        loss(fs[:, :2], zs, ft, zt, y)
    with pytest.raises(ValueError, match="w_intra"):
        CSKDLoss(4, 3, 5, w_intra=-1.0)
