"""Autograd Functions that run a fast backend's forward/backward ops.

A fast backend is a module (``icakd_fast.ops._triton_impl``, ``icakd_fast.ops._cpp_impl``) that
exposes ``OPS`` (the op groups it implements, see ``icakd_fast._backend.OPS``), ``device_types()``
and the low-level functions of the contract in ``docs/backend_contract.md``. The Functions here
are backend-agnostic: the same Function runs the Triton kernels or the C++ kernels, so both are
checked against the same reference by the same tests.
"""

from . import bank
from ._precision import constant
from .cam import cam_features, class_activation, spatial_mean
from .structure import StructurePlan, centroids, inter_loss, intra_loss, kept_centroids, project_rows, structure
from .step import student_step

__all__ = ["StructurePlan", "bank", "cam_features", "centroids", "class_activation", "constant", "inter_loss",
           "intra_loss", "kept_centroids", "project_rows", "spatial_mean", "structure", "student_step"]
