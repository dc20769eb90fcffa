"""Centroids, intra-class and inter-class losses as autograd Functions over a backend's kernels."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import reference
from .._backend import implementation
from ._precision import exact as _exact


class CentroidsFunction(torch.autograd.Function):
    """Live centroids ``(sums + batch sum) / (counts + n)``; gradient flows to the batch rows only."""

    @staticmethod
    def forward(ctx, backend, sums, counts, feats, labels):
        with _exact(feats):
            mu, total = implementation(backend).centroids_fwd(sums, counts, feats, labels)
        ctx.save_for_backward(labels, total)
        ctx.feats_dtype = feats.dtype
        ctx.mark_non_differentiable(total)
        return mu, total

    @staticmethod
    def backward(ctx, grad_mu, _grad_total):
        labels, total = ctx.saved_tensors
        grad_feats = None
        if ctx.needs_input_grad[3] and grad_mu is not None:
            scale = total.index_select(0, labels).clamp(min=1).to(grad_mu.dtype).unsqueeze(1)
            grad_feats = (grad_mu.index_select(0, labels) / scale).to(ctx.feats_dtype)
        grad_sums = None
        if ctx.needs_input_grad[1] and grad_mu is not None:
            grad_sums = grad_mu / total.clamp(min=1).to(grad_mu.dtype).unsqueeze(1)
        return None, grad_sums, None, grad_feats, None


def centroids(backend, sums, counts, feats, labels):
    """``(mu [C, D], total [C])`` on ``backend`` (the reference included); not checked."""
    if backend == "reference":
        return reference.class_centroids(sums, counts, feats, labels)
    return CentroidsFunction.apply(backend, sums, counts.long(), feats, labels.long())


class IntraFunction(torch.autograd.Function):
    """CSKD intra loss with the student centroid detached; one backend call gives dL/dd, from which
    the gradients of f_s, f_t and mu_t follow (``d = f_s - sg(mu_s[y]) - f_t + mu_t[y]``)."""

    @staticmethod
    def forward(ctx, backend, f_s, f_t, mu_s, mu_t, labels, valid):
        with _exact(f_s):
            loss = implementation(backend).intra_fwd(f_s, f_t, mu_s.detach(), mu_t, labels, valid)
        ctx.backend = backend
        ctx.save_for_backward(f_s, f_t, mu_s, mu_t, labels, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        f_s, f_t, mu_s, mu_t, labels, valid = ctx.saved_tensors
        with _exact(f_s):
            gd = implementation(ctx.backend).intra_bwd(grad_out, f_s, f_t, mu_s.detach(), mu_t, labels, valid)
        g_fs = gd.to(f_s.dtype) if ctx.needs_input_grad[1] else None
        g_ft = (-gd).to(f_t.dtype) if ctx.needs_input_grad[2] else None
        g_mt = None
        if ctx.needs_input_grad[4]:
            g_mt = torch.zeros(mu_t.shape, dtype=gd.dtype, device=gd.device).index_add_(0, labels.long(), gd)
            g_mt = g_mt.to(mu_t.dtype)
        return None, g_fs, g_ft, None, g_mt, None, None


def intra_loss(backend, f_s, f_t, mu_s, mu_t, labels, valid):
    """The intra loss on ``backend`` (the reference included); arguments are not checked."""
    if backend == "reference":
        return reference.intra_class_loss(f_s, f_t, mu_s, mu_t, labels, valid)
    return IntraFunction.apply(backend, f_s, f_t, mu_s, mu_t, labels.long(), valid)


class InterFunction(torch.autograd.Function):
    """Tiled cosine-relation loss; never materialises a C x C matrix.

    With ``live`` the backward computes rows of ``mu_s`` in ``live`` only (O(P*C*D)). A backend
    with a two-step form (``inter_uses_gram`` / ``inter_gram_fwd`` / ``inter_gram_bwd``: the C++
    float64 Gram form) keeps its [D, D] state from the forward for the backward; ``max_live``
    (an upper bound on the live rows, or None) lets that form's backward take only that many rows
    without a host synchronisation.
    """

    @staticmethod
    def forward(ctx, backend, mu_s, mu_t, valid, live, eps, max_live=None):
        impl = implementation(backend)
        gram = None
        with _exact(mu_s):
            uses_gram = getattr(impl, "inter_uses_gram", None)
            if uses_gram is not None and uses_gram(mu_s, mu_t):
                loss, gram = impl.inter_gram_fwd(mu_s, mu_t, valid, eps)
            else:
                loss = impl.inter_fwd(mu_s, mu_t, valid, eps)
        ctx.backend = backend
        ctx.eps = eps
        ctx.max_live = max_live
        ctx.save_for_backward(mu_s, mu_t, valid, live, gram)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        mu_s, mu_t, valid, live, gram = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        impl = implementation(ctx.backend)
        with _exact(mu_s):
            if gram is not None:
                g_s, g_t = impl.inter_gram_bwd(grad_out, gram, mu_s, mu_t, valid, live, need_s, need_t, ctx.eps,
                                               ctx.max_live)
            else:
                g_s, g_t = impl.inter_bwd(grad_out, mu_s, mu_t, valid, live, need_s, need_t, ctx.eps)
        return (None, (g_s.to(mu_s.dtype) if need_s else None), (g_t.to(mu_t.dtype) if need_t else None),
                None, None, None, None)


def inter_loss(backend, mu_s, mu_t, valid, live, eps, max_live=None):
    """The inter loss on ``backend`` (the reference included); arguments are not checked, and
    ``max_live`` must bound the rows both live and valid."""
    if backend == "reference":
        return reference.inter_class_loss(mu_s, mu_t, valid, live, eps)
    return InterFunction.apply(backend, mu_s, mu_t, valid, live, eps, max_live)


class StructureFunction(torch.autograd.Function):
    """The structure term of one step in one backend call each way: ``(intra, inter, unit_s,
    unit_t)`` from both networks' bank sums and counts and the batch (the teacher side is a
    constant); the backward gives dL/df_s (and dL/dprojection) only. With ``normalize`` the batch
    rows are raw and the op normalises them first, after projecting the student's rows by
    ``projection`` when given (``unit_*``, constants, are the unit rows; else they are empty)."""

    @staticmethod
    def forward(ctx, backend, sums_s, count_s, sums_t, count_t, f_s, f_t, labels, keep_s, keep_t, min_count, eps,
                normalize, projection):
        with _exact(f_s):
            intra, inter, mu_s, mu_t, valid, total_s, gram, unit_s, unit_t, norm_s = implementation(
                backend).structure_fwd(sums_s, count_s, sums_t, count_t, f_s, f_t, labels, keep_s, keep_t, min_count,
                                       eps, normalize, projection)
        ctx.backend, ctx.eps = backend, eps
        ctx.set_materialize_grads(False)  # the unit rows take no gradient: no zeros made for them
        if normalize:
            raw = f_s if projection is not None else None
            ctx.save_for_backward(unit_s, unit_t, mu_s, mu_t, valid, total_s, labels, keep_s, gram, norm_s, raw,
                                  projection)
        else:
            ctx.save_for_backward(f_s, f_t, mu_s, mu_t, valid, total_s, labels, keep_s, gram, None, None, None)
        ctx.mark_non_differentiable(unit_s, unit_t)
        return intra, inter, unit_s, unit_t

    @staticmethod
    def backward(ctx, grad_intra, grad_inter, _grad_unit_s, _grad_unit_t):
        f_s, f_t, mu_s, mu_t, valid, total_s, labels, keep_s, gram, norm_s, raw, projection = ctx.saved_tensors
        grad_f_s = grad_projection = None
        if ctx.needs_input_grad[5] or ctx.needs_input_grad[13]:
            grad_f_s, grad_projection = structure_backward(ctx.backend, grad_intra, grad_inter, f_s, f_t, mu_s, mu_t,
                                                           valid, total_s, labels, keep_s, gram, ctx.eps, norm_s, raw,
                                                           projection)
        return ((None,) * 5 + (grad_f_s if ctx.needs_input_grad[5] else None,) + (None,) * 7
                + (grad_projection if ctx.needs_input_grad[13] else None,))


def structure_backward(backend, grad_intra, grad_inter, f_s, f_t, mu_s, mu_t, valid, total_s, labels, keep_s, gram,
                       eps, norm_s, raw, projection):
    """``structure_bwd`` of ``backend`` with what the forward saved: ``(grad_f_s,
    grad_projection)``; an upstream gradient autograd left out (None: that loss is unused) counts
    as zero."""
    zero = None
    if grad_intra is None or grad_inter is None:
        zero = torch.zeros((), dtype=torch.float32, device=f_s.device)
    with _exact(f_s):
        return implementation(backend).structure_bwd(
            zero if grad_intra is None else grad_intra, zero if grad_inter is None else grad_inter,
            f_s, f_t, mu_s, mu_t, valid, total_s, labels, keep_s, gram, eps, norm_s, raw, projection)


def project_rows(f: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """``f @ projection.T`` in float32 (float64 if either is float64): the student's rows through
    the bias-free projector, as the one-op structure form computes them."""
    acc = torch.float64 if torch.float64 in (f.dtype, projection.dtype) else torch.float32
    return F.linear(f.to(acc), projection.to(acc))


class StructurePlan(NamedTuple):
    """The backends of one step's structure term: ``fused`` runs it as one op each way (None:
    the composition of the ``centroids``, ``intra`` and ``inter`` backends' ops)."""

    fused: str | None
    centroids: str
    intra: str
    inter: str


def kept_centroids(backend, sums, counts, feats, labels, keep):
    """Centroids over a bank's ``(sums, counts)`` plus the batch rows that ``keep`` marks (None:
    every row): ``(mu [C, D], total [C])``; masked rows drop out without changing any shape."""
    if keep is None:
        return centroids(backend, sums, counts, feats, labels)
    out = torch.promote_types(sums.dtype, feats.dtype)
    batch = torch.zeros(sums.shape[0], feats.shape[1], dtype=out, device=feats.device)
    batch = batch.index_add(0, labels, feats.to(out) * keep.unsqueeze(1).to(out))
    total = counts + torch.zeros_like(counts).index_add_(0, labels, keep.long())
    return (sums.to(out) + batch) / total.clamp(min=1).unsqueeze(1).to(out), total


def structure(plan: StructurePlan, sums_s, count_s, sums_t, count_t, f_s, f_t, labels, keep_s, keep_t,
              min_count: int, eps: float, normalize: bool = False, projection=None):
    """``(intra, inter)`` of one step: both networks' centroids over the banks' ``(sums, counts)``
    and the batch rows kept by ``keep_*`` (None: every row), the classes valid in both
    (``total >= min_count``), the intra loss and the inter loss with the batch's classes live.
    The bank sums and ``f_t`` are constants. Arguments are not checked (``ICAKDLoss`` validated
    them): int64 ``labels`` and ``counts``, bool ``keep_*``.

    ``normalize``: ``f_s`` and ``f_t`` are raw rows, normalised here as ``F.normalize(dim=1)``
    does with ``eps`` (inside the one-op form), and the result is ``(intra, inter, unit_s,
    unit_t)`` with the unit rows (no gradient) the banks store. ``projection`` (``[D, Dx]``,
    with ``normalize`` only): the student's raw rows are ``project_rows(f_s, projection)`` (the
    bias-free projector), and the gradient reaches ``projection`` too."""
    if projection is not None and not normalize:
        raise ValueError("projection needs normalize=True")
    if plan.fused is not None:
        intra, inter, unit_s, unit_t = StructureFunction.apply(
            plan.fused, sums_s, count_s, sums_t, count_t, f_s, f_t, labels, keep_s, keep_t, int(min_count),
            float(eps), bool(normalize), projection)
        return (intra, inter, unit_s, unit_t) if normalize else (intra, inter)
    if projection is not None:
        f_s = project_rows(f_s, projection)
    if normalize:
        f_s, f_t = F.normalize(f_s, dim=1, eps=eps), F.normalize(f_t, dim=1, eps=eps)
    sums_s, sums_t, f_t = sums_s.detach(), sums_t.detach(), f_t.detach()
    mu_s, n_s = kept_centroids(plan.centroids, sums_s, count_s, f_s, labels, keep_s)
    with torch.no_grad():
        mu_t, n_t = kept_centroids(plan.centroids, sums_t, count_t, f_t, labels, keep_t)
    valid = (n_s >= min_count) & (n_t >= min_count)
    live = torch.zeros(valid.shape[0], dtype=torch.bool, device=labels.device).index_fill_(0, labels, True)
    # live marks the batch's labels, so at most B rows are live: the C++ Gram form's backward then
    # takes B rows, not C (no device-side check needed)
    intra = intra_loss(plan.intra, f_s, f_t, mu_s, mu_t, labels, valid)
    inter = inter_loss(plan.inter, mu_s, mu_t, valid, live, eps, labels.shape[0])
    return (intra, inter, f_s.detach(), f_t) if normalize else (intra, inter)
