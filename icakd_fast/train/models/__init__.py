"""Model registry for the trainer: CIFAR ResNets, Wide ResNets and torchvision ImageNet models."""

from __future__ import annotations

from torch import nn

from .cifar_resnet import CIFAR_RESNET_SPECS, CifarResNet
from .wrn import WideResNet

__all__ = ["build_model", "model_names", "canonical_name", "is_imagenet_model", "CifarResNet", "WideResNet"]

_WRN_SPECS = {"wrn16_2": (16, 2), "wrn40_2": (40, 2), "wrn16_1": (16, 1), "wrn40_1": (40, 1)}
_TORCHVISION = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")


def model_names() -> list[str]:
    return sorted(CIFAR_RESNET_SPECS) + sorted(_WRN_SPECS) + list(_TORCHVISION)


def canonical_name(name: str) -> str:
    """Normalise spellings: ``WRN-40-2`` / ``wrn_40_2`` -> ``wrn40_2``; ``MobileNetV2`` -> ``mobilenet_v2``."""
    key = name.strip().lower().replace("-", "_")
    if key.startswith("wrn"):
        parts = [p for p in key[3:].split("_") if p]
        if len(parts) == 2:
            key = f"wrn{parts[0]}_{parts[1]}"
    if key in ("mobilenetv2", "mobilenet_v2"):
        key = "mobilenet_v2"
    if key not in model_names():
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    return key


def is_imagenet_model(name: str) -> bool:
    return canonical_name(name) in _TORCHVISION


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build an untrained network by name with a ``num_classes``-way linear head."""
    key = canonical_name(name)
    if key in CIFAR_RESNET_SPECS:
        depth, widths = CIFAR_RESNET_SPECS[key]
        return CifarResNet(depth, widths, num_classes)
    if key in _WRN_SPECS:
        depth, widen = _WRN_SPECS[key]
        return WideResNet(depth, widen, num_classes)
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise KeyError(f"model {name!r} needs torchvision (pip install 'icakd_fast[vision]')") from exc
    return torchvision.models.get_model(key, weights=None, num_classes=num_classes)
