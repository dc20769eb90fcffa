"""Public functional ops (SPEC section 7).

Each op validates its arguments (a ``ValueError``/``TypeError`` naming the argument), resolves a
backend (``backend=None``: automatic, see ``icakd_fast._backend``) and runs either the reference
(plain PyTorch + autograd) or a fast backend's kernels behind a shared autograd Function.

All ops take float32, float16 and bfloat16 inputs (float64 too), contiguous or not; accumulation
is in float32. Losses are returned as float32 scalars (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import ops, reference
from ._backend import resolve

__all__ = [
    "cam_constraint_loss",
    "cam_weights_from_linear",
    "class_activation_features",
    "class_centroids",
    "grad_cam",
    "grad_cam_weights",
    "inter_class_loss",
    "intra_class_loss",
    "kd_loss",
]


def cam_weights_from_linear(fc_weight: torch.Tensor, targets: torch.Tensor, spatial_size: int) -> torch.Tensor:
    """Closed-form Grad-CAM weights of a GAP + linear head: ``fc_weight[targets] / spatial_size``.

    ``fc_weight`` [C,K], ``targets`` [B] int, ``spatial_size`` = H*W of the feature map. The
    result [B,K] carries gradient into ``fc_weight``.
    """
    V.floating("fc_weight", fc_weight, 2)
    V.integer("targets", targets, 1)
    V.same_device("fc_weight", fc_weight, targets=targets)
    if isinstance(spatial_size, bool) or not isinstance(spatial_size, int) or spatial_size < 1:
        raise ValueError(f"spatial_size must be a positive int (H*W), got {spatial_size!r}")
    V.label_range("targets", targets, fc_weight.shape[0])
    return reference.cam_weights_from_linear(fc_weight, targets.long(), spatial_size)


def grad_cam_weights(grads: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Generic Grad-CAM weights: spatial mean of ``grads`` [B,K,H,W] -> [B,K] (a constant)."""
    V.floating("grads", grads, 4)
    return ops.spatial_mean(resolve(backend, "grad_cam_weights", grads), grads)


def _check_cam_inputs(features, weights):
    V.floating("features", features, 4)
    V.floating("weights", weights, 2)
    V.same_device("features", features, weights=weights)
    if weights.shape != features.shape[:2]:
        raise ValueError(
            f"weights must have shape [B,K] = {tuple(features.shape[:2])} to match features {tuple(features.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    if features.shape[0] == 0 or features.shape[1] == 0 or features.shape[2] * features.shape[3] == 0:
        raise ValueError(f"features must have B, K, H, W >= 1, got shape {tuple(features.shape)}")


def grad_cam(features: torch.Tensor, weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Class activation map ``ReLU(sum_k weights[b,k] * features[b,k])`` -> [B,H,W]."""
    _check_cam_inputs(features, weights)
    return ops.cam_features(resolve(backend, "cam", features), features, weights, with_pooled=False)[0]


def class_activation_features(
    features: torch.Tensor, weights: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cam [B,H,W], pooled [B,K])``: the Grad-CAM map and CAM-weighted pooled features.

    The pooling weights are the per-image min-max normalised CAM, treated as a constant; an
    all-zero normalised CAM falls back to the plain spatial mean.
    """
    _check_cam_inputs(features, weights)
    return ops.cam_features(resolve(backend, "cam", features), features, weights, with_pooled=True)


def cam_constraint_loss(cam_s: torch.Tensor, cam_t: torch.Tensor) -> torch.Tensor:
    """CAM-constraint loss (attention-transfer form) between student and teacher maps [B,H,W].

    Resolutions may differ (the larger is adaptive-average-pooled to the smaller); the teacher
    map is a constant.
    """
    V.floating("cam_s", cam_s, 3)
    V.floating("cam_t", cam_t, 3)
    V.same_device("cam_s", cam_s, cam_t=cam_t)
    V.length("cam_t", cam_t, cam_s.shape[0], "cam_s")
    return reference.cam_constraint_loss(cam_s, cam_t)


def _check_labels(name, labels, n, num_classes, device, ref_name):
    V.integer(name, labels, 1)
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but {ref_name} is on {device}; move them to one device")
    V.length(name, labels, n, ref_name)
    V.label_range(name, labels, num_classes)


def class_centroids(
    sums: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class centroids over a bank (``sums`` [C,D] float32, ``counts`` [C]) plus the live batch.

    Returns ``(centroids [C,D], counts [C] = bank count + batch count)``; a class with no row has
    a zero centroid. The bank part is constant; gradient flows into ``feats``.
    """
    V.floating("sums", sums, 2)
    V.integer("counts", counts, 1)
    V.floating("feats", feats, 2)
    V.same_device("sums", sums, counts=counts, feats=feats)
    V.length("counts", counts, sums.shape[0], "sums")
    if feats.shape[1] != sums.shape[1]:
        raise ValueError(f"feats has dim {feats.shape[1]} but sums has dim {sums.shape[1]}")
    _check_labels("labels", labels, feats.shape[0], sums.shape[0], feats.device, "feats")
    return ops.centroids(resolve(backend, "centroids", feats), sums, counts, feats, labels)


def intra_class_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    mu_s: torch.Tensor,
    mu_t: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Intra-class structure (CSKD form), student centroid detached:
    ``mean_{b: y_b in V} || (f_s[b] - sg(mu_s[y_b])) - (f_t[b] - mu_t[y_b]) ||^2`` (0 if none valid)."""
    V.floating("f_s", f_s, 2)
    V.floating("f_t", f_t, 2)
    V.floating("mu_s", mu_s, 2)
    V.floating("mu_t", mu_t, 2)
    V.boolean("valid", valid, 1)
    V.same_device("f_s", f_s, f_t=f_t, mu_s=mu_s, mu_t=mu_t, valid=valid)
    if f_t.shape != f_s.shape:
        raise ValueError(f"f_t must have the shape of f_s {tuple(f_s.shape)}, got {tuple(f_t.shape)}")
    if mu_s.shape[1] != f_s.shape[1] or mu_t.shape != mu_s.shape:
        raise ValueError(
            f"mu_s and mu_t must be [C, {f_s.shape[1]}], got {tuple(mu_s.shape)} and {tuple(mu_t.shape)}"
        )
    V.length("valid", valid, mu_s.shape[0], "mu_s")
    _check_labels("labels", labels, f_s.shape[0], mu_s.shape[0], f_s.device, "f_s")
    return ops.intra_loss(resolve(backend, "intra", f_s), f_s, f_t, mu_s, mu_t, labels, valid)


def inter_class_loss(
    mu_s: torch.Tensor,
    mu_t: torch.Tensor,
    valid: torch.Tensor,
    *,
    live: torch.Tensor | None = None,
    max_live: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Inter-class structure: ``mean_{k,l in V} (cos(mu_s[k], mu_s[l]) - cos(mu_t[k], mu_t[l]))^2``.

    ``mu_s`` [C,Ds] and ``mu_t`` [C,Dt] may differ in width. ``live`` [C] bool (optional): rows
    of ``mu_s`` outside it are constants, their gradient is zero and the backward costs O(P*C*D)
    for P live rows. The fast backends never build a C x C matrix.

    ``max_live`` (optional, with ``live``): an upper bound on the number of rows both live and
    valid -- the batch size when ``live`` marks the classes of a batch. The C++ backend's float64
    Gram form then computes that many rows of the gradient instead of all C (it cannot count them
    without a host synchronisation). A bound that is too small fails a device-side assertion.
    """
    V.floating("mu_s", mu_s, 2)
    V.floating("mu_t", mu_t, 2)
    V.boolean("valid", valid, 1)
    V.same_device("mu_s", mu_s, mu_t=mu_t, valid=valid, live=live)
    V.length("mu_t", mu_t, mu_s.shape[0], "mu_s")
    V.length("valid", valid, mu_s.shape[0], "mu_s")
    if live is not None:
        V.boolean("live", live, 1)
        V.length("live", live, mu_s.shape[0], "mu_s")
    if max_live is not None:
        if isinstance(max_live, bool) or not isinstance(max_live, int) or max_live < 0:
            raise ValueError(f"max_live must be an int >= 0, got {max_live!r}")
        if live is None:
            raise ValueError("max_live bounds the rows of live: give live too")
    name = resolve(backend, "inter", mu_s, mu_t)
    if name != "reference" and max_live is not None and max_live < mu_s.shape[0]:
        torch._assert_async((valid & live).sum() <= max_live,
                            f"max_live={max_live} is below the number of rows both live and valid")
    return ops.inter_loss(name, mu_s, mu_t, valid, live, reference.NORM_EPS, max_live)


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD loss ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` averaged over the batch
    (the ``T^2`` factor is included)."""
    V.floating("logits_s", logits_s, 2)
    V.floating("logits_t", logits_t, 2)
    V.same_device("logits_s", logits_s, logits_t=logits_t)
    if logits_s.shape != logits_t.shape:
        raise ValueError(f"logits_t must have the shape of logits_s {tuple(logits_s.shape)}, got {tuple(logits_t.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return reference.kd_loss(logits_s, logits_t, float(temperature))
