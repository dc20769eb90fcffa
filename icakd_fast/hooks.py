"""Hook-based capture of the last feature map and the classifier, for drop-in use.

``FeatureTap(model)`` finds, for a model whose head is global average pooling + ``nn.Linear``
(torchvision ResNets, MobileNetV2, the CIFAR models of ``icakd_fast.train``), the module that
produces the last feature map (post-activation) and the classifier; explicit module names can be
given instead. After ``logits = model(x)``, ``tap.features`` is that map ``[B,D,H,W]`` (with its
graph, so gradients flow) and ``tap.fc_weight`` the classifier weight ``[C,D]``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureTap"]

_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d, nn.Flatten, nn.Dropout)


def _find_classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    found = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    if found is None:
        raise ValueError("could not find an nn.Linear classifier in the model; pass classifier='module.name'")
    return found


def _get(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{what}={name!r} is not a submodule of {type(model).__name__}") from None


class FeatureTap:
    """Capture ``model``'s last feature map and classifier with forward hooks.

    ``feature_layer``: name of the module whose output is the feature map (default: found on the
    first forward pass as the last module, outside the classifier and pooling layers, to finish
    with a 4-D output). ``classifier``: name of the ``nn.Linear`` head (default: the last
    ``nn.Linear`` of the model). Use as a context manager or call ``remove()``.
    """

    def __init__(self, model: nn.Module, feature_layer: str | None = None, classifier: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        if classifier is None:
            self.classifier_name, self.classifier = _find_classifier(model)
        else:
            self.classifier_name, self.classifier = classifier, _get(model, classifier, "classifier")
            if not isinstance(self.classifier, nn.Linear):
                raise ValueError(f"classifier={classifier!r} is a {type(self.classifier).__name__}, not nn.Linear")
        self.features: torch.Tensor | None = None
        self._handles: list = []
        self._probe: list = []
        self.feature_layer = feature_layer
        if feature_layer is not None:
            self._attach(feature_layer)
        else:
            self._start_probe()

    # -- discovery ------------------------------------------------------------------------
    def _start_probe(self) -> None:
        head = self.classifier_name
        self._last_4d: str | None = None
        for name, mod in self.model.named_modules():
            if name == "" or isinstance(mod, _POOLS):
                continue
            if head and (name == head or name.startswith(head + ".")):
                continue
            self._probe.append(mod.register_forward_hook(self._make_probe(name)))
        self._probe.append(self.model.register_forward_hook(self._finish_probe))

    def _make_probe(self, name: str):
        def hook(_mod, _inp, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                self._last_4d = name
                self.features = out

        return hook

    def _finish_probe(self, _mod, _inp, _out):
        for h in self._probe:
            h.remove()
        self._probe = []
        if self._last_4d is None:
            raise ValueError("no module of the model produced a 4-D feature map; pass feature_layer='module.name'")
        self._attach(self._last_4d)

    def _attach(self, name: str) -> None:
        layer = _get(self.model, name, "feature_layer")
        self.feature_layer = name

        def hook(_mod, _inp, out):
            if not isinstance(out, torch.Tensor) or out.dim() != 4:
                raise ValueError(f"feature_layer {name!r} must output a 4-D tensor, got {type(out).__name__}")
            self.features = out

        self._handles.append(layer.register_forward_hook(hook))

    # -- public -----------------------------------------------------------------------------
    @property
    def fc_weight(self) -> torch.Tensor:
        return self.classifier.weight

    @property
    def dim(self) -> int:
        return self.classifier.in_features

    def remove(self) -> None:
        for h in self._handles + self._probe:
            h.remove()
        self._handles, self._probe = [], []

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
