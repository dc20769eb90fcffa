"""What the autograd Functions of this package share: autocast off around the backends' ops, and
constant inputs without autograd history."""

from __future__ import annotations

import contextlib

import torch

_NO_CONTEXT = contextlib.nullcontext()


def exact(t: torch.Tensor):
    """Kernels choose their own precision: autocast must not recast the ops they call inside.
    Where autocast is off for ``t``'s device there is nothing to switch off (and entering an
    autocast context costs microseconds of host time per op)."""
    if not torch.is_autocast_enabled(t.device.type):
        return _NO_CONTEXT
    return torch.autocast(device_type=t.device.type, enabled=False)


def constant(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` without autograd history: detached where it has some, else ``t`` itself (no op
    dispatched); None stays None."""
    return t.detach() if t is not None and t.requires_grad else t
