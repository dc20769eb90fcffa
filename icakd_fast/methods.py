"""Methods by name: the baselines, ICAKD, its ablations and a faithful CSKD.

Each name maps to a loss module the trainer builds with :func:`build_loss` (``icakd-train
--method NAME``, ``icakd-study --methods a,b,..``):

=====================  ==========================================================================
``ce``                 cross-entropy only (how a teacher is trained)
``kd``                 CE + Hinton KD
``cskd``               ICAKD without the bank and the CAM parts: CE + KD + intra + inter over
                       batch-only centroids of pooled features. **The ablation, not CSKD**: see
                       ``cskd-official``
``icakd``              the full objective (CAM loss, CAM-weighted features, class memory bank)
``icakd-nobank``       icakd with batch-only centroids (``bank=None``)
``icakd-nocamloss``    icakd without the CAM constraint (``w_cam=0``)
``icakd-nocamweight``  icakd with pooled instead of CAM-weighted features (``cam_weighting=False``)
``icakd-fifo``         icakd with a FIFO bank in place of the per-class bank (``bank="fifo"``)
``icakd-catkd``        icakd with a CAT-KD-style CAM term (``cam_loss="catkd"``: class maps pooled
                       to a small fixed grid, MSE) in place of the attention-transfer form
``cskd-official``      :class:`icakd_fast.cskd.CSKDLoss`, CSKD as its authors' code trains it
=====================  ==========================================================================

Options given by the user (``[loss]`` table, ``--loss-opt``) override a name's own options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["MethodSpec", "METHOD_SPECS", "method_names", "method_spec", "build_loss"]


@dataclass(frozen=True)
class MethodSpec:
    """``base``: the ``ICAKDLoss`` method (or ``"cskd-official"``); ``options``: its keyword
    options; ``ablation_of``: the method this one removes or swaps a part of (None for a method
    in its own right)."""

    base: str
    options: dict[str, Any] = field(default_factory=dict)
    ablation_of: str | None = None
    doc: str = ""


METHOD_SPECS: dict[str, MethodSpec] = {
    "ce": MethodSpec("ce", doc="cross-entropy only"),
    "kd": MethodSpec("kd", doc="CE + KD"),
    "cskd": MethodSpec("cskd", ablation_of="icakd",
                       doc="ICAKD without bank and CAM parts (an ablation, not CSKD: see cskd-official)"),
    "icakd": MethodSpec("icakd", doc="the full ICAKD objective"),
    "icakd-nobank": MethodSpec("icakd", {"bank": None}, "icakd", "icakd with batch-only centroids"),
    "icakd-nocamloss": MethodSpec("icakd", {"w_cam": 0.0}, "icakd", "icakd without the CAM constraint"),
    "icakd-nocamweight": MethodSpec("icakd", {"cam_weighting": False}, "icakd",
                                    "icakd with pooled instead of CAM-weighted features"),
    "icakd-fifo": MethodSpec("icakd", {"bank": "fifo"}, "icakd", "icakd with a FIFO bank"),
    "icakd-catkd": MethodSpec("icakd", {"cam_loss": "catkd"}, "icakd",
                              "icakd with a CAT-KD-style CAM term (pooled class maps, MSE)"),
    "cskd-official": MethodSpec("cskd-official", doc="CSKD as its authors' code trains it"),
}


def method_names() -> tuple[str, ...]:
    """Every method name the trainer and the study accept."""
    return tuple(METHOD_SPECS)


def method_spec(name: str) -> MethodSpec:
    try:
        return METHOD_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHOD_SPECS)}") from None


def build_loss(name: str, num_classes: int, student_dim: int, teacher_dim: int, **options: Any) -> nn.Module:
    """The loss module of method ``name`` (forward signature of :class:`icakd_fast.ICAKDLoss`).

    ``options`` override the method's own options.
    """
    spec = method_spec(name)
    opts = {**spec.options, **options}
    if spec.base == "cskd-official":
        from .cskd import CSKDLoss

        return CSKDLoss(num_classes, student_dim, teacher_dim, **opts)
    from .loss import ICAKDLoss

    return ICAKDLoss(num_classes, student_dim, teacher_dim, method=spec.base, **opts)
