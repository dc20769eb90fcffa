"""icakd_fast: fast ICAKD knowledge distillation for PyTorch.

* ``icakd_fast.functional`` -- the loss ops (Grad-CAM weighting, CAM-weighted pooling, centroids,
  intra/inter category-structure losses, KD), each with a ``backend=`` choice.
* ``ClassMemoryBank`` / ``FIFOMemoryBank`` -- incremental feature memory banks.
* ``ICAKDLoss`` -- the whole objective as one module; ``CSKDLoss`` -- CSKD as its official code
  computes it (a baseline).
* ``FeatureTap`` -- hooks that capture a model's last feature map and classifier.
"""

from . import functional
from ._backend import BackendUnavailableError, probe_all
from .cskd import CSKDLoss
from .hooks import FeatureTap
from .loss import ICAKDLoss, ICAKDOutput
from .memory import ClassMemoryBank, FIFOMemoryBank

__version__ = "0.1.0"

probe_all()

__all__ = [
    "BackendUnavailableError",
    "CSKDLoss",
    "ClassMemoryBank",
    "FIFOMemoryBank",
    "FeatureTap",
    "ICAKDLoss",
    "ICAKDOutput",
    "functional",
    "__version__",
]
