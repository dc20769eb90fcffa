"""Grad-CAM weighting + CAM-weighted pooling as one autograd Function over a backend's kernels."""

from __future__ import annotations

import torch

from .. import reference
from .._backend import implementation, is_available
from ._precision import constant
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


class ClassActivationFunction(torch.autograd.Function):
    """One network's whole CAM step on a backend with the one-op form (``class_activation_fwd``
    / ``class_activation_bwd``): Grad-CAM weights from the classifier (``fc_weight[targets] /
    (H*W)``), the map, the CAM-weighted pooled features and, given the teacher's map, the CAM
    constraint against it, one backend call each way. Saves the inputs, the two per-pixel maps and
    the loss's unit rows (no [B,K,H,W] intermediate and no weights: the backward gathers them
    again). ``cam`` carries no gradient; ``l_cam`` is an empty tensor without ``cam_t``."""

    @staticmethod
    def forward(ctx, backend, features, fc_weight, targets, cam_t):
        with _exact(features):
            cam, pooled, l_cam, pool_w, q_s, norm_s, q_t = implementation(backend).class_activation_fwd(
                features, fc_weight, targets, cam_t, reference.NORM_EPS)
        ctx.backend = backend
        ctx.with_loss = cam_t is not None
        ctx.save_for_backward(features, fc_weight, targets, cam, pool_w, q_s, norm_s, q_t)
        ctx.mark_non_differentiable(cam)
        # an output that the graph does not use gets no gradient (None), not a tensor of zeros
        ctx.set_materialize_grads(False)
        return cam, pooled, l_cam

    @staticmethod
    def backward(ctx, _grad_cam, grad_pooled, grad_loss):
        need_f, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_f or need_w):
            return None, None, None, None, None
        features, fc_weight, targets, cam, pool_w, q_s, norm_s, q_t = ctx.saved_tensors
        if not ctx.with_loss:
            grad_loss = None
        with _exact(features):
            grad_f, grad_fc = implementation(ctx.backend).class_activation_bwd(
                grad_pooled, grad_loss, features, fc_weight, targets, cam, pool_w, q_s, norm_s, q_t,
                reference.NORM_EPS, need_f, need_w)
        return None, grad_f, grad_fc, None, None


def class_activation(backend: str, features: torch.Tensor, fc_weight: torch.Tensor, targets: torch.Tensor,
                     cam_t: torch.Tensor | None = None, fused: bool | None = None):
    """One network's CAM step: ``(cam, pooled, l_cam)`` from the feature map and the classifier
    weights of the target classes (Grad-CAM of a GAP + linear head), with the CAM constraint
    against the teacher's map ``cam_t`` (a constant) when given (else ``l_cam`` is None).

    ``fused``: the backend has the one-op CAM step (op group ``class_activation``; None: ask the
    registry for ``features``' device). Then the step is one backend call each way (one
    autograd node; without a gradient to record, the forward call alone) and ``cam`` carries no
    gradient; otherwise (and for a teacher map of another resolution) the same terms are composed
    from the backend's CAM op and the reference loss. Arguments are not checked (``ICAKDLoss``
    validated them)."""
    if fused is None:
        fused = backend != "reference" and is_available(backend, "class_activation", features.device)
    one_resolution = cam_t is None or cam_t.shape == features.shape[:1] + features.shape[2:]
    if fused and backend != "reference" and one_resolution:
        const_t = constant(cam_t)  # the teacher's map
        if not (torch.is_grad_enabled() and (features.requires_grad or fc_weight.requires_grad)):
            # nothing for autograd to record (the teacher's step): the forward op alone
            with _exact(features):
                cam, pooled, l_cam = implementation(backend).class_activation_fwd(
                    features, fc_weight, targets, const_t, reference.NORM_EPS)[:3]
        else:
            cam, pooled, l_cam = ClassActivationFunction.apply(backend, features, fc_weight, targets, const_t)
        return cam, pooled, (None if cam_t is None else l_cam)
    weights = reference.cam_weights_from_linear(fc_weight, targets, features.shape[2] * features.shape[3])
    cam, pooled = cam_features(backend, features, weights)
    l_cam = None if cam_t is None else reference.cam_constraint_loss(cam, cam_t)
    return cam, pooled, l_cam
