"""The student's side of one ICAKD step as one autograd node: its CAM step (``class_activation``)
feeding the structure term (``structure``). A composition of those two ops, with no kernel of its
own: one node instead of two saves the host an autograd Function and a backward node per step."""

from __future__ import annotations

import torch

from .. import reference
from .._backend import implementation
from ._precision import constant
from ._precision import exact as _exact
from .cam import class_activation
from .structure import StructurePlan, structure, structure_backward


class StudentStepFunction(torch.autograd.Function):
    """``(l_cam, intra, inter, unit_s, unit_t)``: ``class_activation_fwd`` of the student (with
    the CAM constraint against ``cam_t`` when given), then ``structure_fwd`` of its pooled rows
    (projected by ``projection`` and normalised) and the teacher's rows ``v_t``. The backward runs
    ``structure_bwd`` and hands its gradient of the pooled rows to ``class_activation_bwd``.
    ``l_cam`` is empty without ``cam_t``; the unit rows take no gradient. ``targets`` None: the
    labels."""

    @staticmethod
    def forward(ctx, cam_backend, structure_backend, features, fc_weight, targets, cam_t, sums_s, count_s, sums_t,
                count_t, v_t, labels, keep_s, keep_t, min_count, eps, projection):
        if targets is None:  # the labels (one tensor is never passed twice: Dynamo refuses that)
            targets = labels
        with _exact(features):
            cam, pooled, l_cam, pool_w, q_s, norm_q, q_t = implementation(cam_backend).class_activation_fwd(
                features, fc_weight, targets, cam_t, reference.NORM_EPS)
            intra, inter, mu_s, mu_t, valid, total_s, gram, unit_s, unit_t, norm_s = implementation(
                structure_backend).structure_fwd(sums_s, count_s, sums_t, count_t, pooled, v_t, labels, keep_s,
                                                 keep_t, min_count, eps, True, projection)
        ctx.backends = (cam_backend, structure_backend)
        ctx.eps = eps
        ctx.with_loss = cam_t is not None
        ctx.pooled_dtype = pooled.dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(features, fc_weight, targets, cam, pool_w, q_s, norm_q, q_t, unit_s, unit_t, mu_s,
                              mu_t, valid, total_s, labels, keep_s, gram, norm_s, pooled, projection)
        ctx.mark_non_differentiable(unit_s, unit_t)
        return l_cam, intra, inter, unit_s, unit_t

    @staticmethod
    def backward(ctx, grad_cam, grad_intra, grad_inter, _grad_unit_s, _grad_unit_t):
        need_f, need_w, need_p = ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[16]
        (features, fc_weight, targets, cam, pool_w, q_s, norm_q, q_t, unit_s, unit_t, mu_s, mu_t, valid, total_s,
         labels, keep_s, gram, norm_s, pooled, projection) = ctx.saved_tensors
        cam_backend, structure_backend = ctx.backends
        grad_pooled = grad_projection = None
        if (need_f or need_w or need_p) and (grad_intra is not None or grad_inter is not None):
            grad_pooled, grad_projection = structure_backward(structure_backend, grad_intra, grad_inter, unit_s, unit_t,
                                                              mu_s, mu_t, valid, total_s, labels, keep_s, gram, ctx.eps,
                                                              norm_s, pooled, projection)
            if grad_pooled.dtype != ctx.pooled_dtype:
                grad_pooled = grad_pooled.to(ctx.pooled_dtype)
        if not ctx.with_loss:
            grad_cam = None
        grad_f = grad_w = None
        if (need_f or need_w) and (grad_pooled is not None or grad_cam is not None):
            with _exact(features):
                grad_f, grad_w = implementation(cam_backend).class_activation_bwd(
                    grad_pooled, grad_cam, features, fc_weight, targets, cam, pool_w, q_s, norm_q, q_t,
                    reference.NORM_EPS, need_f, need_w)
        return ((None, None, grad_f if need_f else None, grad_w if need_w else None) + (None,) * 12
                + (grad_projection if need_p else None,))


def student_step(cam_backend: str, cam_fused: bool, plan: StructurePlan, features: torch.Tensor,
                 fc_weight: torch.Tensor, targets: torch.Tensor, cam_t: torch.Tensor | None, sums_s, count_s, sums_t,
                 count_t, v_t: torch.Tensor, labels: torch.Tensor, keep_s, keep_t, min_count: int, eps: float,
                 projection: torch.Tensor):
    """The student's CAM step and the structure term of one step: ``(l_cam, intra, inter, unit_s,
    unit_t)``, what ``class_activation(cam_backend, features, fc_weight, targets, cam_t,
    fused=cam_fused)`` followed by ``structure(plan, sums_s, count_s, sums_t, count_t, pooled, v_t,
    labels, keep_s, keep_t, min_count, eps, normalize=True, projection=projection)`` give (``l_cam``
    None without ``cam_t``, the teacher's map, a constant). Where both have their one-op forms
    (``cam_fused``, ``plan.fused``) and the maps share one resolution, it is one autograd node over
    those two ops; otherwise that composition runs. Arguments are not checked."""
    one_resolution = cam_t is None or cam_t.shape == features.shape[:1] + features.shape[2:]
    if cam_fused and cam_backend != "reference" and plan.fused is not None and one_resolution:
        l_cam, intra, inter, unit_s, unit_t = StudentStepFunction.apply(
            cam_backend, plan.fused, features, fc_weight, None if targets is labels else targets, constant(cam_t),
            sums_s, count_s, sums_t, count_t, constant(v_t), labels, keep_s, keep_t, int(min_count), float(eps),
            projection)
        return (None if cam_t is None else l_cam), intra, inter, unit_s, unit_t
    _, pooled, l_cam = class_activation(cam_backend, features, fc_weight, targets, cam_t, fused=cam_fused)
    intra, inter, unit_s, unit_t = structure(plan, sums_s, count_s, sums_t, count_t, pooled, v_t, labels, keep_s,
                                             keep_t, min_count, eps, normalize=True, projection=projection)
    return l_cam, intra, inter, unit_s, unit_t
