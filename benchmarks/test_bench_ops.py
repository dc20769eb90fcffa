"""CPU/GPU op benchmarks (pytest-benchmark): forward+backward per provider at small and mid shapes.

These are benchmarks, not tests: run them with ``make bench``. Each case first checks the
provider against the eager reference, then times it.
"""

from __future__ import annotations

import pytest
import torch

from icakd_fast import ClassMemoryBank, functional as IF

from conftest import provider_available, provider_fn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CAM_SHAPES = {"small": (16, 64, 8, 8), "mid": (64, 512, 8, 8)}
BANK_SHAPES = {"small": (100, 16, 128, 64), "mid": (1000, 16, 512, 64)}
INTER_SHAPES = {"small": (256, 64, 128, 32), "mid": (2048, 256, 512, 64)}


def _check(a, b, tol=1e-3):
    for x, y in zip(a, b):
        err = (x.double() - y.double()).norm() / y.double().norm().clamp(min=1e-30)
        assert err < tol, f"provider disagrees with the reference: rel err {err:.2e}"


def _cam_step(feats, w, *, backend):
    feats.grad = w.grad = None
    cam, pooled = IF.class_activation_features(feats, w, backend=backend)
    (cam.sum() + pooled.square().sum()).backward()
    return cam.detach(), pooled.detach(), feats.grad, w.grad


@pytest.mark.parametrize("size", list(CAM_SHAPES))
def test_cam_features_fwd_bwd(benchmark, provider, size):
    reason = provider_available(provider, "cam", DEVICE)
    if reason:
        pytest.skip(reason)
    B, K, H, W = CAM_SHAPES[size]
    feats = torch.randn(B, K, H, W, device=DEVICE).relu().requires_grad_()
    w = torch.randn(B, K, device=DEVICE, requires_grad=True)
    fn = provider_fn(_cam_step, provider)
    _check([t.clone() for t in fn(feats, w)], _cam_step(feats, w, backend="reference"))
    benchmark.extra_info.update(provider=provider, shape=f"B={B} K={K} {H}x{W}")
    benchmark(fn, feats, w)


@pytest.mark.parametrize("size", list(BANK_SHAPES))
def test_bank_enqueue(benchmark, provider, size):
    reason = provider_available(provider, "class_bank", DEVICE)
    if reason:
        pytest.skip(reason)
    if provider == "compiled":
        pytest.skip("bank enqueue mutates buffers in place; it is timed eager per backend")
    C, S, D, B = BANK_SHAPES[size]
    bank = ClassMemoryBank(C, S, D, device=DEVICE, backend=provider)
    ref = ClassMemoryBank(C, S, D, device=DEVICE, backend="reference")
    feats = torch.randn(B, D, device=DEVICE)
    labels = torch.randint(0, C, (B,), device=DEVICE)
    for _ in range(3):
        bank.enqueue(feats, labels)
        ref.enqueue(feats, labels)
    assert torch.equal(bank.bank, ref.bank) and torch.equal(bank.count, ref.count)
    benchmark.extra_info.update(provider=provider, shape=f"C={C} S={S} D={D} B={B}")
    benchmark(bank.enqueue, feats, labels)


def _inter_step(mu_s, mu_t, valid, live, *, backend):
    mu_s.grad = None
    loss = IF.inter_class_loss(mu_s, mu_t, valid, live=live, backend=backend)
    loss.backward()
    return loss.detach().reshape(1), mu_s.grad


@pytest.mark.parametrize("size", list(INTER_SHAPES))
def test_inter_loss_fwd_bwd(benchmark, provider, size):
    reason = provider_available(provider, "inter", DEVICE)
    if reason:
        pytest.skip(reason)
    C, Ds, Dt, P = INTER_SHAPES[size]
    mu_s = torch.randn(C, Ds, device=DEVICE, requires_grad=True)
    mu_t = torch.randn(C, Dt, device=DEVICE)
    valid = torch.rand(C, device=DEVICE) > 0.1
    live = torch.zeros(C, dtype=torch.bool, device=DEVICE)
    live[torch.randperm(C, device=DEVICE)[:P]] = True
    fn = provider_fn(_inter_step, provider)
    _check([t.clone() for t in fn(mu_s, mu_t, valid, live)], _inter_step(mu_s, mu_t, valid, live, backend="reference"))
    benchmark.extra_info.update(provider=provider, shape=f"C={C} Ds={Ds} Dt={Dt} P={P}")
    benchmark(fn, mu_s, mu_t, valid, live)
