"""Reference implementations: plain PyTorch, differentiated by autograd.

These are the oracle every fast backend is tested against and the fallback that runs on any
device. They import only torch.
"""

from .bank import class_bank_enqueue_, class_bank_resync_, fifo_bank_enqueue_, fifo_bank_sums
from .cam import (
    cam_constraint_loss,
    cam_pool_weights,
    cam_weights_from_linear,
    class_activation_features,
    grad_cam,
    grad_cam_weights,
)
from .structure import NORM_EPS, class_centroids, inter_class_loss, intra_class_loss, kd_loss

__all__ = [
    "NORM_EPS",
    "cam_constraint_loss",
    "cam_pool_weights",
    "cam_weights_from_linear",
    "class_activation_features",
    "class_bank_enqueue_",
    "class_bank_resync_",
    "class_centroids",
    "fifo_bank_enqueue_",
    "fifo_bank_sums",
    "grad_cam",
    "grad_cam_weights",
    "inter_class_loss",
    "intra_class_loss",
    "kd_loss",
]
