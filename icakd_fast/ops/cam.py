"""Grad-CAM weighting + CAM-weighted pooling as one autograd Function over a backend's kernels."""

from __future__ import annotations

import torch

from .. import reference
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
    """``(cam, pooled)`` (``pooled`` None without ``with_pooled``) on ``backend`` (any backend,
    the reference included); arguments are not checked."""
    if backend == "reference":
        if with_pooled:
            return reference.class_activation_features(features, weights)
        return reference.grad_cam(features, weights), None
    if not (torch.is_grad_enabled() and (features.requires_grad or weights.requires_grad)):
        # nothing for autograd to record (the teacher's maps): the kernel alone
        with _exact(features):
            cam, pooled, _ = implementation(backend).cam_fwd(features, weights, with_pooled)
    else:
        cam, pooled, _ = CAMFeaturesFunction.apply(backend, features, weights, with_pooled)
    return cam, (pooled if with_pooled else None)


def spatial_mean(backend: str, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM weights from a gradient tensor (a constant: no backward)."""
    if backend == "reference":
        return reference.grad_cam_weights(grads.detach())
    with _exact(grads):
        return implementation(backend).spatial_mean(grads.detach())


class CAMLossFunction(torch.autograd.Function):
    """The CAM constraint of two maps of one resolution in one backend call each way; the
    teacher map is a constant."""

    @staticmethod
    def forward(ctx, backend, cam_s, cam_t, eps):
        with _exact(cam_s):
            loss, q_s, norm_s = implementation(backend).cam_loss_fwd(cam_s, cam_t, eps)
        ctx.backend, ctx.eps = backend, eps
        ctx.save_for_backward(cam_s, cam_t, q_s, norm_s)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        cam_s, cam_t, q_s, norm_s = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[1]:
            with _exact(cam_s):
                grad = implementation(ctx.backend).cam_loss_bwd(grad_out, cam_s, cam_t, q_s, norm_s, ctx.eps)
        return None, grad, None, None


def cam_loss(backend: str, cam_s: torch.Tensor, cam_t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The CAM constraint (attention-transfer form, ``reference.cam_constraint_loss``) on
    ``backend``; maps of different resolutions, and the reference backend, take the reference
    form. Arguments are not checked."""
    if backend == "reference" or cam_s.shape != cam_t.shape:
        return reference.cam_constraint_loss(cam_s, cam_t, eps)
    return CAMLossFunction.apply(backend, cam_s, cam_t.detach(), float(eps))


class ClassActivationFunction(torch.autograd.Function):
    """One network's whole CAM step on a backend with the one-op CAM loss: Grad-CAM weights from
    the classifier (``fc_weight[targets] / (H*W)``), the map, the CAM-weighted pooled features
    and the CAM constraint against the teacher's map; the backward runs the loss's and the map's
    backward kernels back to back and scatters the weights' gradient into ``fc_weight``."""

    @staticmethod
    def forward(ctx, backend, features, fc_weight, targets, cam_t):
        impl = implementation(backend)
        spatial = features.shape[2] * features.shape[3]
        with _exact(features):
            weights = reference.cam_weights_from_linear(fc_weight, targets, spatial)
            cam, pooled, pool_w = impl.cam_fwd(features, weights, True)
            l_cam, q_s, norm_s = impl.cam_loss_fwd(cam, cam_t, reference.NORM_EPS)
        ctx.backend, ctx.spatial, ctx.fc_rows = backend, spatial, fc_weight.shape[0]
        ctx.save_for_backward(features, weights, targets, cam, pool_w, cam_t, q_s, norm_s)
        ctx.mark_non_differentiable(cam)
        return cam, pooled, l_cam

    @staticmethod
    def backward(ctx, _grad_cam, grad_pooled, grad_loss):
        features, weights, targets, cam, pool_w, cam_t, q_s, norm_s = ctx.saved_tensors
        need_f, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_f or need_w):
            return None, None, None, None, None
        impl = implementation(ctx.backend)
        with _exact(features):
            grad_cam = None
            if grad_loss is not None:
                grad_cam = impl.cam_loss_bwd(grad_loss, cam, cam_t, q_s, norm_s, reference.NORM_EPS)
            grad_f, grad_w = impl.cam_bwd(grad_cam, grad_pooled, features, weights, cam, pool_w, need_f, need_w)
            grad_fc = None
            if need_w:
                grad_fc = torch.zeros((ctx.fc_rows, weights.shape[1]), dtype=grad_w.dtype, device=grad_w.device)
                grad_fc.index_add_(0, targets, grad_w / ctx.spatial)
        return None, grad_f, grad_fc, None, None


def class_activation(backend: str, features: torch.Tensor, fc_weight: torch.Tensor, targets: torch.Tensor,
                     cam_t: torch.Tensor | None = None, fused: bool = True):
    """One network's CAM step: ``(cam, pooled, l_cam)`` from the feature map and the classifier
    weights of the target classes (Grad-CAM of a GAP + linear head), with the CAM constraint
    against the teacher's map ``cam_t`` (a constant) when given (else ``l_cam`` is None).

    ``fused``: the backend has the one-op CAM loss (``cam_loss_fwd``): the whole step is one
    autograd node; otherwise the same terms are composed from the backend's CAM op and the
    reference loss. ``cam`` carries no gradient in the fused form; ``l_cam`` does. Arguments are
    not checked (``ICAKDLoss`` validated them)."""
    one_resolution = cam_t is not None and cam_t.shape == features.shape[:1] + features.shape[2:]
    if fused and backend != "reference" and one_resolution:
        return ClassActivationFunction.apply(backend, features, fc_weight, targets, cam_t.detach())
    weights = reference.cam_weights_from_linear(fc_weight, targets, features.shape[2] * features.shape[3])
    cam, pooled = cam_features(backend, features, weights)
    l_cam = None if cam_t is None else cam_loss(backend if fused else "reference", cam, cam_t)
    return cam, pooled, l_cam
