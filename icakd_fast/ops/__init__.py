"""Autograd Functions that run a fast backend's forward/backward ops.

A fast backend is a module (``icakd_fast.ops._triton_impl``, ``icakd_fast.ops._cpp_impl``) that
exposes ``OPS`` (the op groups it implements, see ``icakd_fast._backend.OPS``), ``device_types()``
and the low-level functions of the contract in ``docs/backend_contract.md``. The Functions here
are backend-agnostic: the same Function runs the Triton kernels or the C++ kernels, so both are
checked against the same reference by the same tests.
"""

from .cam import cam_features, spatial_mean
from .structure import centroids, inter_loss, intra_loss

__all__ = ["cam_features", "centroids", "inter_loss", "intra_loss", "spatial_mean"]
