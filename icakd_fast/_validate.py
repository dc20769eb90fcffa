"""Argument checks shared by the functional API and the modules.

Shape, dtype and device checks are host-side metadata reads (free, traceable). Value checks on
labels (range) need the data: they run eagerly on CPU tensors; on accelerator tensors and inside
``torch.compile`` they become an asynchronous device assert (``torch._assert_async``) so that no
host synchronisation is added to the training step.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x: object, ndim: int | None = None) -> torch.Tensor:
    x = tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def integer(name: str, x: object, ndim: int | None = 1) -> torch.Tensor:
    x = tensor(name, x)
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 preferred), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def boolean(name: str, x: object, ndim: int | None = 1) -> torch.Tensor:
    x = tensor(name, x)
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def length(name: str, x: torch.Tensor, n: int, what: str, dim: int = 0) -> None:
    if x.shape[dim] != n:
        raise ValueError(f"{name} has {x.shape[dim]} entries along dim {dim} but {what} has {n}")


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def label_range(name: str, labels: torch.Tensor, num_classes: int, mask: torch.Tensor | None = None) -> None:
    """Labels must lie in [0, num_classes) (rows with mask False are not checked)."""
    if labels.numel() == 0:
        return
    on_host = labels.device.type == "cpu" and not _compiling()
    if on_host and mask is None:
        # the common case in two reads; the masked or failing case finds the first bad label below
        lo, hi = torch.aminmax(labels)
        if lo.item() >= 0 and hi.item() < num_classes:
            return
    bad = (labels < 0) | (labels >= num_classes)
    if mask is not None:
        bad = bad & mask
    if on_host:
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(f"{name} must lie in [0, {num_classes}), found {first}")
        return
    torch._assert_async(~bad.any(), f"{name} must lie in [0, {num_classes})")
