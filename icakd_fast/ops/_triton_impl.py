"""Triton backend: the low-level functions of ``docs/backend_contract.md``.

Each function is a registered operator (``torch.library.triton_op`` over ``wrap_triton``-launched
kernels from ``icakd_fast.kernels``), so ``torch.compile(fullgraph=True)`` traces through it and
Inductor sees the Triton kernels themselves. The fake (meta) implementation is the op body
itself: it is made only of shape-static torch ops and kernel launches.

Kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was imported (a correctness tool for CI, never a fast path). Under the interpreter the
ops are registered as opaque ``custom_op`` s instead (interpreted kernels cannot be traced into).
"""

import os
from typing import Optional, Tuple

import torch

from icakd_fast.kernels import bank as _bank
from icakd_fast.kernels import cam as _cam
from icakd_fast.kernels import structure as _st
from icakd_fast.kernels._common import current_dispatch_mode, interpreter_problem  # noqa: F401

OPS = ("cam", "grad_cam_weights", "class_bank", "fifo_bank", "centroids", "intra", "inter")
UNAVAILABLE_REASONS: tuple = ()

_NS = "icakd_fast"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_types() -> tuple:
    return ("cuda", "cpu") if _interpret() else ("cuda",)


def _opaque_op(name, fn=None, /, *, mutates_args, schema=None):
    """An opaque custom op whose fake implementation is the body itself (kernel launches are
    skipped on fake tensors by ``icakd_fast.kernels._common.launch``)."""
    from torch.library import custom_op

    def dec(f):
        op = custom_op(name, f, mutates_args=mutates_args, schema=schema)
        op.register_fake(f)
        return op

    return dec(fn) if fn is not None else dec


try:
    from torch.library import triton_op as _triton_op
except ImportError:  # pragma: no cover - torch < 2.6
    _triton_op = _opaque_op

if _interpret():
    # Interpreted kernels are plain Python, not traceable JIT functions: keep the ops opaque so
    # that torch.compile calls them instead of decomposing them (triton_op would drop the launches).
    _triton_op = _opaque_op  # noqa: F811


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _plain_eager(args) -> bool:
    """True when calling an op's body directly is the same as calling the registered op: no
    compilation, no dispatch mode (fake tensors, functionalization), no functorch transform,
    plain tensors, and nothing for autograd to record. The dispatcher round trip of a Python
    custom op costs tens of microseconds of host time per call, which small training-step ops
    cannot hide (figures: docs/performance.md)."""
    if torch.compiler.is_compiling() or current_dispatch_mode() is not None or _functorch_active():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter:
                return False
            if grad and a.requires_grad:
                return False
    return True


def _op(name: str, mutates=()):
    """Register ``fn`` as operator ``icakd_fast::name``; the returned callable runs the body directly
    in plain eager mode and the registered operator otherwise (``.op``: the operator itself)."""

    def dec(fn):
        op = _triton_op(f"{_NS}::{name}", mutates_args=tuple(mutates))(fn)

        def call(*args):
            if _plain_eager(args):
                return fn(*args)
            return call.op(*args)

        call.op = op
        call.__name__ = call.__qualname__ = fn.__name__
        call.__doc__ = fn.__doc__
        return call

    return dec


# ----------------------------------------------------------------------------------------------
# registered operators (schemas inferred from the annotations)
# ----------------------------------------------------------------------------------------------


@_op("triton_cam_fwd")
def _cam_fwd_op(features: torch.Tensor, weights: torch.Tensor, with_pooled: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cam, pooled, pool_w, _ = _cam.cam_fwd(features, weights, with_pooled)
    return cam, pooled, pool_w


@_op("triton_cam_fwd_from_grads")
def _cam_fwd_grads_op(
    features: torch.Tensor, grads: torch.Tensor, with_pooled: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cam.cam_fwd(features, None, with_pooled, grads=grads)


@_op("triton_cam_bwd")
def _cam_bwd_op(
    grad_cam: Optional[torch.Tensor],
    grad_pooled: Optional[torch.Tensor],
    features: torch.Tensor,
    weights: torch.Tensor,
    cam: torch.Tensor,
    pool_w: torch.Tensor,
    need_features: bool,
    need_weights: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _cam.cam_bwd(grad_cam, grad_pooled, features, weights, cam, pool_w, need_features, need_weights)


@_op("triton_spatial_mean")
def _spatial_mean_op(grads: torch.Tensor) -> torch.Tensor:
    return _cam.spatial_mean(grads)


@_op("triton_class_bank_enqueue_", mutates=("bank", "count", "ptr", "sums"))
def _class_enqueue_op(
    bank: torch.Tensor,
    count: torch.Tensor,
    ptr: torch.Tensor,
    sums: torch.Tensor,
    feats: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    _bank.class_bank_enqueue_(bank, count, ptr, sums, feats, labels, mask)


@_op("triton_class_bank_resync_", mutates=("sums",))
def _class_resync_op(bank: torch.Tensor, count: torch.Tensor, sums: torch.Tensor, classes: torch.Tensor) -> None:
    _bank.class_bank_resync_(bank, count, sums, classes)


@_op("triton_fifo_bank_enqueue_", mutates=("bank", "bank_labels", "ptr"))
def _fifo_enqueue_op(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    ptr: torch.Tensor,
    feats: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    _bank.fifo_bank_enqueue_(bank, bank_labels, ptr, feats, labels, mask)


@_op("triton_fifo_bank_sums")
def _fifo_sums_op(bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _bank.fifo_bank_sums(bank, bank_labels, num_classes)


@_op("triton_centroids_fwd")
def _centroids_op(
    sums: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _st.centroids_fwd(sums, counts, feats, labels)


@_op("triton_intra_fwd")
def _intra_fwd_op(
    f_s: torch.Tensor, f_t: torch.Tensor, mu_s: torch.Tensor, mu_t: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    return _st.intra_fwd(f_s, f_t, mu_s, mu_t, labels, valid)


@_op("triton_intra_bwd")
def _intra_bwd_op(
    grad_out: torch.Tensor,
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    mu_s: torch.Tensor,
    mu_t: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    return _st.intra_bwd(grad_out, f_s, f_t, mu_s, mu_t, labels, valid)


@_op("triton_inter_fwd")
def _inter_fwd_op(mu_s: torch.Tensor, mu_t: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    return _st.inter_fwd(mu_s, mu_t, valid, eps)


@_op("triton_inter_bwd")
def _inter_bwd_op(
    grad_out: torch.Tensor,
    mu_s: torch.Tensor,
    mu_t: torch.Tensor,
    valid: torch.Tensor,
    live: Optional[torch.Tensor],
    need_s: bool,
    need_t: bool,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _st.inter_bwd(grad_out, mu_s, mu_t, valid, live, need_s, need_t, eps)


# ----------------------------------------------------------------------------------------------
# the contract functions (thin: map "not asked for" outputs to None, fill optional arguments)
# ----------------------------------------------------------------------------------------------


def cam_fwd(features: torch.Tensor, weights: torch.Tensor, with_pooled: bool):
    """``(cam [B,H,W], pooled [B,K], pool_w [B,H*W])``; pooled/pool_w empty when not asked for."""
    return _cam_fwd_op(features, weights, bool(with_pooled))


def cam_fwd_from_grads(features: torch.Tensor, grads: torch.Tensor, with_pooled: bool):
    """Generic Grad-CAM in one launch: ``weights = spatial_mean(grads)`` and ``cam_fwd``.

    Returns ``(cam, pooled, pool_w, weights)`` (weights in grads' dtype, a constant).
    """
    return _cam_fwd_grads_op(features, grads.detach(), bool(with_pooled))


def cam_bwd(grad_cam, grad_pooled, features, weights, cam, pool_w, need_features: bool, need_weights: bool):
    gf, gw = _cam_bwd_op(grad_cam, grad_pooled, features, weights, cam, pool_w, bool(need_features), bool(need_weights))
    return (gf if need_features else None), (gw if need_weights else None)


def spatial_mean(grads: torch.Tensor) -> torch.Tensor:
    return _spatial_mean_op(grads)


def class_bank_enqueue_(bank, count, ptr, sums, feats, labels, mask) -> None:
    _class_enqueue_op(bank, count, ptr, sums, feats.detach(), labels, mask)


def class_bank_resync_(bank, count, sums, classes) -> None:
    _class_resync_op(bank, count, sums, classes)


def fifo_bank_enqueue_(bank, bank_labels, ptr, feats, labels, mask) -> None:
    _fifo_enqueue_op(bank, bank_labels, ptr, feats.detach(), labels, mask)


def fifo_bank_sums(bank, bank_labels, num_classes: int):
    return _fifo_sums_op(bank, bank_labels, int(num_classes))


def centroids_fwd(sums, counts, feats, labels):
    return _centroids_op(sums, counts, feats, labels)


def intra_fwd(f_s, f_t, mu_s, mu_t, labels, valid):
    return _intra_fwd_op(f_s, f_t, mu_s, mu_t, labels, valid)


def intra_bwd(grad_out, f_s, f_t, mu_s, mu_t, labels, valid):
    return _intra_bwd_op(grad_out, f_s, f_t, mu_s, mu_t, labels, valid)


def inter_fwd(mu_s, mu_t, valid, eps: float):
    return _inter_fwd_op(mu_s, mu_t, valid, float(eps))


def inter_bwd(grad_out, mu_s, mu_t, valid, live, need_s: bool, need_t: bool, eps: float):
    g_s, g_t = _inter_bwd_op(grad_out, mu_s, mu_t, valid, live, bool(need_s), bool(need_t), float(eps))
    return (g_s if need_s else None), (g_t if need_t else None)
