"""When the float64 Gram form of the inter-class loss pays (the rule of ``inter_use_gram`` in
``csrc/inter_gram.h``). A leaf module: the C++ backend, the dispatcher's automatic order and
``ICAKDLoss``'s incremental form all read the same rule from here."""

from __future__ import annotations

import os

import torch

_FULL_RATE_FP64: dict[int, bool] = {}


@torch.compiler.assume_constant_result
def full_rate_fp64(index: int) -> bool:
    """GPUs with full-rate float64 tensor cores (A100, H100/H200, B200): mirrors the C++ check."""
    hit = _FULL_RATE_FP64.get(index)
    if hit is None:
        major, minor = torch.cuda.get_device_capability(index)
        hit = _FULL_RATE_FP64[index] = (major, minor) in ((8, 0), (10, 0)) or major == 9
    return hit


def gram_shape_pays(num_classes: int, width: int, device: torch.device) -> bool:
    """The shape rule of the Gram form (no environment override): ``num_classes >= 2 width``, or
    ``64 width`` on GPUs without full-rate float64 (``width`` = Ds + Dt)."""
    factor = 2
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        factor = 2 if full_rate_fp64(index) else 64
    return num_classes >= factor * max(width, 1)


def inter_gram_pays(mu_s: torch.Tensor, mu_t: torch.Tensor, device: torch.device | None = None) -> bool:
    """Whether the C++ inter loss takes its float64 Gram form for these operands:
    ``ICAKD_INTER_FORM=direct|gram`` if set, else :func:`gram_shape_pays`. ``device``: the
    operands' device unless given."""
    form = os.environ.get("ICAKD_INTER_FORM", "")
    if form in ("direct", "gram"):
        return form == "gram"
    return gram_shape_pays(mu_s.shape[0], mu_s.shape[1] + mu_t.shape[1], mu_s.device if device is None else device)
