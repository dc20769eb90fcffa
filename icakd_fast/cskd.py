"""``CSKDLoss``: category structure KD (CSKD) as its authors' CIFAR training code computes it.

``method="cskd"`` of :class:`icakd_fast.ICAKDLoss` is ICAKD without the bank and the CAM parts
(the right ablation of ICAKD, on ICAKD's KD base, normalised pooled features and weights); it is
not CSKD. This module is CSKD itself (``icakd-train --method cskd-official``), after the official
``train_cifar.py`` (xeanzheng/CSKD), re-implemented here from its description:

* features: the student's last-stage map goes through a learned 1x1 convolution to the teacher's
  channels (``branch``, no bias, trained with the student) and stays **spatial and un-normalised**
  ([B, D_T, H, W]; if the resolutions differ, the larger map is adaptive-average-pooled to the
  smaller); the teacher's map is used as it is;
* intra relation, on features **and** logits: ``mean((x_T - c_T) - (x_S - sg(c_S)))^2``, divided by
  the per-row size (``D*H*W`` for features, ``C`` for logits), where ``c`` is the row's class
  centroid in the batch. For the features the centroids come from **correctly predicted rows**
  only (each network its own predictions; ``correct_only=True``) and a row whose class has no
  correct row is its own centroid; for the logits the centroids use every row (the official code
  computes the filtered logit centroids and then overwrites them with the unfiltered ones);
* inter relation, on features and logits: the cosine-similarity matrix of the centroids of the
  P classes present in the batch (every row), ``mean((R_S - R_T)^2) / P``;
* centre term: ``mean((z_S - sg(c_S(z)))^2)``, pulling the student's logits to their class mean;
* total: ``w_ce*CE + w_intra*(intra_feat + intra_logit) + w_centre*centre
  + w_inter*(inter_feat + inter_logit) + w_mse*mean((z_T - z_S)^2)`` with the official weights
  0.9, 0.002, 0.1, 0.04 and ``0.1 * 1e-5`` (a negligible logit MSE in place of KD).

The official recipe (CIFAR-100): batch 128, SGD lr 0.1, momentum 0.9, weight decay 1e-4,
200 epochs, lr x0.1 at epochs 80 and 120 (``configs/cifar100_cskd_official.toml``).

Under ``torch.distributed`` the centroids are each rank's own batch (as in the single-process
official code, whose batch is the whole batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .loss import ICAKDOutput

__all__ = ["CSKDLoss"]

_EPS = 1e-12


def _class_means(x: torch.Tensor, labels: torch.Tensor, num_classes: int, keep: torch.Tensor | None = None):
    """Per-class means of the rows of ``x`` [B, K] (only rows with ``keep``): ([C, K], counts [C])."""
    w = torch.ones_like(labels, dtype=x.dtype) if keep is None else keep.to(x.dtype)
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, labels, x * w[:, None])
    counts = torch.zeros(num_classes, dtype=x.dtype, device=x.device).index_add(0, labels, w)
    return sums / counts.clamp(min=1)[:, None], counts


def _row_centroids(x: torch.Tensor, labels: torch.Tensor, num_classes: int, keep: torch.Tensor | None = None):
    """Row b -> the centroid of class ``labels[b]``; a row whose class has no kept row keeps itself."""
    means, counts = _class_means(x, labels, num_classes, keep)
    rows = means.index_select(0, labels)
    if keep is None:
        return rows
    has = counts.index_select(0, labels) > 0
    return torch.where(has[:, None], rows, x)


def _cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    n = x.norm(dim=1).clamp(min=_EPS)
    return (x @ x.t()) / (n[:, None] * n[None, :])


class CSKDLoss(nn.Module):
    """CSKD after its official code (see the module docstring); the forward signature of
    :class:`icakd_fast.ICAKDLoss` (the classifier weights are not read).

    Options: ``w_ce=0.9``, ``w_intra=0.002``, ``w_inter=0.04``, ``w_centre=0.1``, ``w_mse=1e-6``,
    ``correct_only=True``. **Optimise ``loss_module.parameters()`` (the 1x1 branch) with the student.**
    """

    def __init__(self, num_classes: int, student_dim: int, teacher_dim: int, *, w_ce: float = 0.9,
                 w_intra: float = 0.002, w_inter: float = 0.04, w_centre: float = 0.1, w_mse: float = 1e-6,
                 correct_only: bool = True):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("w_ce", w_ce), ("w_intra", w_intra), ("w_inter", w_inter), ("w_centre", w_centre),
                            ("w_mse", w_mse)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(correct_only, bool):
            raise ValueError(f"correct_only must be True or False, got {correct_only!r}")
        self.num_classes, self.student_dim, self.teacher_dim = num_classes, student_dim, teacher_dim
        self.w_ce, self.w_intra, self.w_inter = float(w_ce), float(w_intra), float(w_inter)
        self.w_centre, self.w_mse, self.correct_only = float(w_centre), float(w_mse), correct_only
        self.branch = nn.Conv2d(student_dim, teacher_dim, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.branch.weight, mode="fan_out", nonlinearity="relu")

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, w_ce={self.w_ce}, w_intra={self.w_intra}, "
                f"w_inter={self.w_inter}, w_centre={self.w_centre}, correct_only={self.correct_only}")

    def forward(self, student_features, student_logits, teacher_features, teacher_logits, labels,
                student_fc_weight=None, teacher_fc_weight=None) -> ICAKDOutput:
        for name, t, nd in (("student_features", student_features, 4), ("student_logits", student_logits, 2),
                            ("teacher_features", teacher_features, 4), ("teacher_logits", teacher_logits, 2),
                            ("labels", labels, 1)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dim() != nd:
                raise ValueError(f"{name} must have {nd} dimensions, got shape {tuple(t.shape)}")
        b, c = student_logits.shape
        if c != self.num_classes or teacher_logits.shape != student_logits.shape:
            raise ValueError(f"student_logits and teacher_logits must be [B, {self.num_classes}], got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
        if student_features.shape[:2] != (b, self.student_dim):
            raise ValueError(f"student_features must be [{b}, {self.student_dim}, H, W], got {tuple(student_features.shape)}")
        if teacher_features.shape[:2] != (b, self.teacher_dim):
            raise ValueError(f"teacher_features must be [{b}, {self.teacher_dim}, H, W], got {tuple(teacher_features.shape)}")
        if labels.shape != (b,) or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be an integer tensor [{b}], got {labels.dtype} {tuple(labels.shape)}")
        y = labels.long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes})")

        zs = student_logits.float()
        zt = teacher_logits.detach().float()
        fs = self.branch(student_features.to(self.branch.weight.dtype)).float()
        ft = teacher_features.detach().float()
        hs, ht = fs.shape[-2:], ft.shape[-2:]
        if hs != ht:
            if hs[0] * hs[1] > ht[0] * ht[1]:
                fs = F.adaptive_avg_pool2d(fs, ht)
            else:
                ft = F.adaptive_avg_pool2d(ft, hs)
        fs, ft = fs.flatten(1), ft.flatten(1)
        C = self.num_classes

        ce = F.cross_entropy(zs, y)
        keep_s = keep_t = None
        if self.correct_only:
            keep_s = zs.detach().argmax(1) == y
            keep_t = zt.argmax(1) == y
        # intra: deviation from the class centroid, teacher vs student (student centroid constant)
        ct_f = _row_centroids(ft, y, C, keep_t)
        cs_f = _row_centroids(fs, y, C, keep_s).detach()
        intra_f = ((ft - ct_f) - (fs - cs_f)).pow(2).mean() / fs.shape[1]
        ct_z = _row_centroids(zt, y, C)
        cs_z = _row_centroids(zs, y, C).detach()
        intra_z = ((zt - ct_z) - (zs - cs_z)).pow(2).mean() / C
        intra = intra_f + intra_z
        centre = (zs - cs_z).pow(2).mean()
        # inter: cosine relations among the centroids of the classes present in the batch
        present = torch.unique(y)
        mt_f, _ = _class_means(ft, y, C)
        ms_f, _ = _class_means(fs, y, C)
        mt_z, _ = _class_means(zt, y, C)
        ms_z, _ = _class_means(zs, y, C)
        p = present.numel()
        inter_f = (_cosine_matrix(ms_f[present]) - _cosine_matrix(mt_f[present])).pow(2).mean() / p
        inter_z = (_cosine_matrix(ms_z[present]) - _cosine_matrix(mt_z[present])).pow(2).mean() / p
        inter = inter_f + inter_z
        mse = (zt - zs).pow(2).mean()
        loss = (self.w_ce * ce + self.w_intra * intra + self.w_centre * centre + self.w_inter * inter
                + self.w_mse * mse)
        parts = {"ce": ce, "intra": intra, "inter": inter, "centre": centre, "mse": mse}
        return ICAKDOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()})
