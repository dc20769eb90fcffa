"""Methods by name (icakd_fast.methods) and the CAT-KD-style CAM term."""

import math

import pytest
import torch

from icakd_fast import ClassMemoryBank, FIFOMemoryBank, ICAKDLoss
from icakd_fast.cskd import CSKDLoss
from icakd_fast.loss import catkd_cam_loss
from icakd_fast.methods import build_loss, method_names, method_spec
from icakd_fast.train.config import METHODS, TrainConfig
from icakd_fast.train.errors import UserError

ABLATIONS = ("icakd-nobank", "icakd-nocamloss", "icakd-nocamweight", "icakd-fifo", "icakd-catkd")


def test_names_and_trainer_accepts_them():
    names = method_names()
    for n in ("ce", "kd", "cskd", "icakd", "cskd-official", *ABLATIONS):
        assert n in names and n in METHODS
        TrainConfig(method=n).validate()
    with pytest.raises(UserError, match="unknown method"):
        TrainConfig(method="icakd-nothing").validate()
    with pytest.raises(ValueError, match="unknown method"):
        method_spec("nope")


def test_ablation_options_applied():
    nb = build_loss("icakd-nobank", 5, 4, 6)
    assert nb.bank_s is None and nb.use_structure and nb.cam_weighting and nb.use_cam_loss
    assert not build_loss("icakd-nocamloss", 5, 4, 6).use_cam_loss
    ncw = build_loss("icakd-nocamweight", 5, 4, 6)
    assert not ncw.cam_weighting and ncw.use_cam_loss
    assert isinstance(build_loss("icakd-fifo", 5, 4, 6).bank_s, FIFOMemoryBank)
    assert isinstance(build_loss("icakd", 5, 4, 6).bank_s, ClassMemoryBank)
    assert build_loss("icakd-catkd", 5, 4, 6).cam_loss == "catkd"
    cskd = build_loss("cskd", 5, 4, 6)
    assert isinstance(cskd, ICAKDLoss) and cskd.bank_s is None and not cskd.cam_weighting and not cskd.use_cam_loss
    assert isinstance(build_loss("cskd-official", 5, 4, 6), CSKDLoss)
    # user options override the name's own
    assert isinstance(build_loss("icakd-nobank", 5, 4, 6, bank="fifo").bank_s, FIFOMemoryBank)
    assert build_loss("cskd-official", 5, 4, 6, w_intra=0.5).w_intra == 0.5


def _catkd_loop(fs, ft, ws, wt, pool):
    """Per image and class: raw map, block-average pooling (H divisible by pool), unit norm, squared distance."""
    B, _, H, W = fs.shape
    C = ws.shape[0]

    def pooled(a, w, b, c):
        m = (w[c][:, None, None] * a[b]).sum(0)
        kh, kw = a.shape[2] // pool, a.shape[3] // pool
        cells = [m[i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean() for i in range(pool) for j in range(pool)]
        v = torch.stack(cells)
        return v / v.norm()

    total = 0.0
    for b in range(B):
        for c in range(C):
            total += (pooled(fs.double(), ws.double(), b, c) - pooled(ft.double(), wt.double(), b, c)).pow(2).sum()
    return total / (B * C)


def test_catkd_cam_loss_matches_loop():
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 6, 8, 8, generator=g)
    ws, wt = torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g)
    got = catkd_cam_loss(fs, ft, ws, wt, pool=2)
    assert math.isclose(got.item(), _catkd_loop(fs, ft, ws, wt, 2).item(), rel_tol=1e-5)
    fs.requires_grad_(True)
    ws.requires_grad_(True)
    ft.requires_grad_(True)
    catkd_cam_loss(fs, ft, ws, wt, pool=2).backward()
    assert fs.grad.abs().sum() > 0 and ws.grad.abs().sum() > 0 and ft.grad is None


def test_icakd_with_catkd_term_reports_it():
    g = torch.Generator().manual_seed(2)
    B, C, Ds, Dt = 6, 5, 4, 6
    fs, ft = torch.randn(B, Ds, 4, 4, generator=g), torch.randn(B, Dt, 4, 4, generator=g)
    zs, zt = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)
    ws, wt = torch.randn(C, Ds, generator=g), torch.randn(C, Dt, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = build_loss("icakd-catkd", C, Ds, Dt, cam_pool=2)
    out = loss(fs, zs, ft, zt, y, ws, wt)
    assert math.isclose(out.parts["cam"].item(), _catkd_loop(fs, ft, ws, wt, 2).item(), rel_tol=1e-5)
    at = build_loss("icakd", C, Ds, Dt)(fs, zs, ft, zt, y, ws, wt)
    assert not math.isclose(out.parts["cam"].item(), at.parts["cam"].item(), rel_tol=1e-3)
    with pytest.raises(ValueError, match="cam_loss"):
        ICAKDLoss(C, Ds, Dt, cam_loss="grad")
    with pytest.raises(ValueError, match="cam_pool"):
        ICAKDLoss(C, Ds, Dt, cam_pool=0)
