"""ResNets for 32x32 inputs (CIFAR layout: 3 stages, 6n+2 layers).

Every network ends with ``layer3`` (post-activation) -> ``avgpool`` (AdaptiveAvgPool2d) ->
flatten -> ``fc`` (nn.Linear), the layout :class:`icakd_fast.hooks.FeatureTap` recognises.
``resnet8x4`` / ``resnet32x4`` are the 4x wider variants used in the distillation literature.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import build_stages, init_weights

__all__ = ["CifarResNet", "BasicBlock", "CIFAR_RESNET_SPECS"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """``depth = 6n + 2`` basic-block ResNet with stage widths ``widths = (stem, s1, s2, s3)``."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = build_stages(BasicBlock, widths, n)
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)

#: name -> (depth, widths)
CIFAR_RESNET_SPECS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (8, _NARROW),
    "resnet14": (14, _NARROW),
    "resnet20": (20, _NARROW),
    "resnet32": (32, _NARROW),
    "resnet44": (44, _NARROW),
    "resnet56": (56, _NARROW),
    "resnet110": (110, _NARROW),
    "resnet8x4": (8, _WIDE),
    "resnet32x4": (32, _WIDE),
}
