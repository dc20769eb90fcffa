"""Grad-CAM weights, class activation maps and CAM-weighted pooling (plain PyTorch).

Everything is computed in float32 (float64 stays float64) and returned in the promoted input
dtype, so that low-precision inputs are compared against an accurate oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cam_weights_from_linear(fc_weight: torch.Tensor, targets: torch.Tensor, spatial_size: int) -> torch.Tensor:
    """Closed-form Grad-CAM weights of a global-average-pool + linear head: ``W[c_b] / (H*W)``."""
    return fc_weight.index_select(0, targets) / spatial_size


def grad_cam_weights(grads: torch.Tensor) -> torch.Tensor:
    """Generic Grad-CAM weights: the spatial mean of d(score)/d(features), ``[B,K,H,W] -> [B,K]``."""
    return grads.mean(dim=(2, 3), dtype=_acc(grads.dtype)).to(grads.dtype)


def _cam_acc(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    acc = _acc(torch.promote_types(features.dtype, weights.dtype))
    return torch.relu(torch.einsum("bk,bkhw->bhw", weights.to(acc), features.to(acc)))


def grad_cam(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_k weights[b,k] * features[b,k])`` -> ``[B,H,W]``."""
    out = torch.promote_types(features.dtype, weights.dtype)
    return _cam_acc(features, weights).to(out)


def cam_pool_weights(cam: torch.Tensor) -> torch.Tensor:
    """Per-pixel pooling weights ``m / sum(m)`` from the min-max normalised CAM (stop-gradient).

    ``m = (cam - min) / (max - min + 1e-7)``; an all-zero ``m`` (constant CAM) falls back to the
    plain spatial mean. Returns ``[B, H*W]`` in the accumulation dtype.
    """
    flat = cam.detach().flatten(1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    m = (flat - lo) / (hi - lo + 1e-7)
    den = m.sum(dim=1, keepdim=True)
    uniform = torch.full_like(m, 1.0 / m.shape[1])
    return torch.where(den > 0, m / torch.where(den > 0, den, torch.ones_like(den)), uniform)


def class_activation_features(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cam [B,H,W], pooled [B,K])``: the Grad-CAM map and the CAM-weighted average of features."""
    out = torch.promote_types(features.dtype, weights.dtype)
    cam = _cam_acc(features, weights)
    pw = cam_pool_weights(cam)
    pooled = torch.einsum("bp,bkp->bk", pw, features.to(cam.dtype).flatten(2))
    return cam.to(out), pooled.to(out)


def _match_resolution(cam_s: torch.Tensor, cam_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hs, ws = cam_s.shape[-2:]
    ht, wt = cam_t.shape[-2:]
    size = (min(hs, ht), min(ws, wt))
    if (hs, ws) != size:
        cam_s = F.adaptive_avg_pool2d(cam_s.unsqueeze(1), size).squeeze(1)
    if (ht, wt) != size:
        cam_t = F.adaptive_avg_pool2d(cam_t.unsqueeze(1), size).squeeze(1)
    return cam_s, cam_t


def cam_constraint_loss(cam_s: torch.Tensor, cam_t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Attention-transfer form: ``mean_b || q_s[b] - q_t[b] ||^2`` with ``q = vec(cam) / ||vec(cam)||``.

    The larger map is adaptive-average-pooled to the smaller resolution; the teacher side is
    treated as a constant. Returns a float32 (float64 for float64 inputs) scalar.
    """
    acc = _acc(torch.promote_types(cam_s.dtype, cam_t.dtype))
    cam_s, cam_t = _match_resolution(cam_s.to(acc), cam_t.detach().to(acc))
    q_s = F.normalize(cam_s.flatten(1), dim=1, eps=eps)
    q_t = F.normalize(cam_t.flatten(1), dim=1, eps=eps)
    return (q_s - q_t).pow(2).sum(dim=1).mean()
