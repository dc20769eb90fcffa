"""Grad-CAM weighting + CAM-weighted pooling as one autograd Function over a backend's kernels."""

from __future__ import annotations

import torch

from .._backend import implementation
from ._precision import exact as _exact


class CAMFeaturesFunction(torch.autograd.Function):
    """``(cam, pooled) = class_activation_features(features, weights)``.

    Saves the inputs plus two small per-pixel maps (``cam`` [B,H,W] and the pooling weights
    [B,H*W]); the backward reads the feature map once more instead of storing any [B,K,H,W]
    intermediate.
    """

    @staticmethod
    def forward(ctx, backend: str, features: torch.Tensor, weights: torch.Tensor, with_pooled: bool):
        impl = implementation(backend)
        with _exact(features):
            cam, pooled, pool_w = impl.cam_fwd(features, weights, with_pooled)
        ctx.backend = backend
        ctx.with_pooled = with_pooled
        ctx.save_for_backward(features, weights, cam, pool_w)
        ctx.mark_non_differentiable(pool_w)
        return cam, pooled, pool_w

    @staticmethod
    def backward(ctx, grad_cam, grad_pooled, _grad_pool_w):
        features, weights, cam, pool_w = ctx.saved_tensors
        if not ctx.with_pooled:
            grad_pooled = None
        impl = implementation(ctx.backend)
        with _exact(features):
            grad_f, grad_w = impl.cam_bwd(
                grad_cam, grad_pooled, features, weights, cam, pool_w, ctx.needs_input_grad[1], ctx.needs_input_grad[2]
            )
        return None, grad_f, grad_w, None


def cam_features(backend: str, features: torch.Tensor, weights: torch.Tensor, with_pooled: bool = True):
    cam, pooled, _ = CAMFeaturesFunction.apply(backend, features, weights, with_pooled)
    return cam, pooled


def spatial_mean(backend: str, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM weights from a gradient tensor (a constant: no backward)."""
    with _exact(grads):
        return implementation(backend).spatial_mean(grads.detach())
