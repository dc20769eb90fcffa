"""Pieces shared by the CIFAR ResNets and the Wide ResNets."""

from __future__ import annotations

from typing import Callable

from torch import nn


def build_stages(make_block: Callable[[int, int, int], nn.Module], widths, n: int) -> tuple[list[nn.Sequential], int]:
    """Stages of ``n`` blocks for the widths ``widths[1:]`` (``widths[0]``: the stem's output); the
    first block of every stage but the first has stride 2. ``make_block(in, out, stride)``.
    Returns the stages and the last stage's width."""
    in_planes = widths[0]
    stages = []
    for i, planes in enumerate(widths[1:]):
        blocks = []
        for j in range(n):
            blocks.append(make_block(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
            in_planes = planes
        stages.append(nn.Sequential(*blocks))
    return stages, in_planes


def init_weights(model: nn.Module, zero_linear_bias: bool = False) -> None:
    """He-normal convolutions (fan_out), BatchNorm weight 1 and bias 0; optionally Linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif zero_linear_bias and isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
