"""Centroids, intra-class and inter-class losses as autograd Functions over a backend's kernels."""

from __future__ import annotations

import torch

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
    return CentroidsFunction.apply(backend, sums, counts, feats, labels)


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
    return IntraFunction.apply(backend, f_s, f_t, mu_s, mu_t, labels, valid)


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
    return InterFunction.apply(backend, mu_s, mu_t, valid, live, eps, max_live)
