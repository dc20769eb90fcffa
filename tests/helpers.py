"""Small shared helpers for the tests (tolerances, random inputs)."""

from __future__ import annotations

import os
import shutil

import torch

#: the host C++ compiler the tests that build small C++ programs use (None: those tests skip)
HOST_CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

# relative-error budgets against a float64 oracle, per input dtype
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    denom = ref.norm().item()
    return (out - ref).norm().item() / max(denom, 1e-30)


def assert_close_rel(out, ref, dtype, name="", factor=1.0):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out.detach().double()).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def noncontig(x: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous layout (a strided view of a larger buffer)."""
    big = torch.empty(x.shape + (2,), dtype=x.dtype, device=x.device)
    big[..., 0] = x
    return big[..., 0]


def cam_features_with_grads(fn, features, weights, grad_cam, grad_pooled):
    """``(cam, pooled, d features, d weights)`` of ``fn(features, weights)`` run on fresh leaf copies
    (``clone`` keeps the memory format), backpropagating ``grad_cam`` and ``grad_pooled``."""
    f, w = features.clone().requires_grad_(), weights.clone().requires_grad_()
    cam, pooled = fn(f, w)
    torch.autograd.backward([cam, pooled], [grad_cam, grad_pooled])
    return cam, pooled, f.grad, w.grad
