"""C++/CUDA backend: the low-level functions of ``docs/backend_contract.md`` over ``icakd_fast._C``.

The compiled library registers its operators with ``TORCH_LIBRARY`` in the ``icakd_fast_C``
namespace (schemas in ``csrc/<op>.cpp``, CPU kernels in ``csrc/cpu``, CUDA kernels in
``csrc/cuda``). This module loads it (``icakd_fast._ext``), registers the fake (meta) kernels so
that ``torch.compile(fullgraph=True)`` traces through the ops, and exposes the contract functions
that the autograd Functions in ``icakd_fast.ops`` and the memory banks call.

Importing this module raises ImportError when the library is missing or unusable; ``_backend``
turns that into a reason.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._inter_form import inter_gram_pays

if not _ext.load():
    raise ImportError(f"icakd_fast._C is unavailable: {_ext.reason()}")

#: the compiled operators behind each op group of the registry (``icakd_fast._backend.OPS``)
KERNELS = {
    "cam": ("cam_fwd", "cam_bwd"),
    "cam_loss": ("cam_loss_fwd", "cam_loss_bwd"),
    "class_activation": ("class_activation_fwd", "class_activation_bwd"),
    "grad_cam_weights": ("spatial_mean",),
    "class_bank": ("class_bank_enqueue_", "class_bank_resync_"),
    "fifo_bank": ("fifo_bank_enqueue_", "fifo_bank_sums"),
    "bank_update": ("class_bank_update_", "fifo_bank_update_", "class_banks_update_", "fifo_banks_update_"),
    "centroids": ("centroids_fwd",),
    "intra": ("intra_fwd", "intra_bwd"),
    "inter": ("inter_fwd", "inter_bwd", "inter_gram_fwd", "inter_gram_bwd"),
    "structure": ("structure_fwd", "structure_bwd"),
}
OPS = tuple(KERNELS)
UNAVAILABLE_REASONS: tuple = ()

#: C (Ds + Dt)^2 up to this: structure_fwd's small loop form (kSmallStructure in csrc/cpu/structure_cpu.cpp)
_SMALL_STRUCTURE = 1 << 18

_C = getattr(torch.ops, _ext.NAMESPACE)
_NS = _ext.NAMESPACE

#: (op group, device type) -> the group's operators without a kernel for that device type, read
#: once here: resolution (also while torch.compile traces) is then a dictionary lookup
_MISSING = {(op, device_type): tuple(name for name in names if not _ext.has_kernel(name, key))
            for op, names in KERNELS.items() for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def device_types() -> tuple:
    """``("cpu",)``, plus ``"cuda"`` when the library was built with CUDA kernels and a GPU is present."""
    if _ext.with_cuda() and torch.cuda.is_available():
        return ("cpu", "cuda")
    return ("cpu",)


def not_supported_reasons(op: str, device: torch.device | None) -> list[str]:
    """What this backend cannot do beyond its device list: an op group whose operators the
    library registered no kernel for on that device (the one-op forms of the training step
    have CPU kernels only)."""
    if device is None:
        return []
    missing = _MISSING.get((op, device.type), ())
    if missing:
        return [f"the compiled library has no {device.type} kernel for {', '.join(missing)}"]
    return []


def preferred(op: str, device: torch.device, *tensors) -> bool:
    """Whether this backend should go first in the automatic order on CUDA tensors: the inter loss
    where the float64 Gram form pays and float32 products must keep float32 accuracy (with TF32
    allowed, or below the threshold, the Triton tiles are faster)."""
    if op != "inter" or len(tensors) < 2:
        return False
    mu_s, mu_t = tensors[0], tensors[1]
    if not (isinstance(mu_s, torch.Tensor) and isinstance(mu_t, torch.Tensor) and mu_s.dim() == 2 and mu_t.dim() == 2):
        return False
    exact = mu_s.dtype == torch.float64 or (mu_s.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return exact and inter_gram_pays(mu_s, mu_t, device)


def _acc(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


# ----------------------------------------------------------------------------------------------
# fake (meta) kernels: shapes and dtypes only, identical to what the real kernels return
# ----------------------------------------------------------------------------------------------

_fake = torch.library.register_fake


@_fake(f"{_NS}::cam_fwd")
def _cam_fwd_fake(features, weights, with_pooled):
    b, k, h, w = features.shape
    out = torch.promote_types(features.dtype, weights.dtype)
    acc = _acc(features.dtype, weights.dtype)
    cam = features.new_empty((b, h, w), dtype=out)
    if with_pooled:
        return cam, features.new_empty((b, k), dtype=out), features.new_empty((b, h * w), dtype=acc)
    return cam, features.new_empty((0,), dtype=out), features.new_empty((0,), dtype=acc)


@_fake(f"{_NS}::cam_bwd")
def _cam_bwd_fake(grad_cam, grad_pooled, features, weights, cam, pool_w, need_features, need_weights):
    gf = features.new_empty(features.shape) if need_features else features.new_empty((0,))
    gw = weights.new_empty(weights.shape) if need_weights else weights.new_empty((0,))
    return gf, gw


def _mutates_only(*args):
    """The fake of an op that only writes into its arguments (the banks' updates): no outputs."""
    return None


for _name in ("class_bank_enqueue_", "class_bank_resync_", "fifo_bank_enqueue_", "class_bank_update_",
              "fifo_bank_update_", "class_banks_update_", "fifo_banks_update_"):
    _fake(f"{_NS}::{_name}")(_mutates_only)


@_fake(f"{_NS}::spatial_mean")
def _spatial_mean_fake(grads):
    return grads.new_empty(grads.shape[:2])


@_fake(f"{_NS}::fifo_bank_sums")
def _fifo_bank_sums_fake(bank, bank_labels, num_classes):
    return (
        bank.new_empty((num_classes, bank.shape[1]), dtype=torch.float32),
        bank_labels.new_empty((num_classes,), dtype=torch.int64),
    )


@_fake(f"{_NS}::centroids_fwd")
def _centroids_fwd_fake(sums, counts, feats, labels):
    out = torch.promote_types(sums.dtype, feats.dtype)
    return sums.new_empty(sums.shape, dtype=out), counts.new_empty(counts.shape, dtype=torch.int64)


@_fake(f"{_NS}::intra_fwd")
def _intra_fwd_fake(f_s, f_t, mu_s, mu_t, labels, valid):
    return f_s.new_empty((), dtype=_acc(f_s.dtype, f_t.dtype, mu_s.dtype, mu_t.dtype))


@_fake(f"{_NS}::intra_bwd")
def _intra_bwd_fake(grad_out, f_s, f_t, mu_s, mu_t, labels, valid):
    return f_s.new_empty(f_s.shape, dtype=_acc(f_s.dtype, f_t.dtype, mu_s.dtype, mu_t.dtype))


@_fake(f"{_NS}::inter_fwd")
def _inter_fwd_fake(mu_s, mu_t, valid, eps):
    return mu_s.new_empty((), dtype=_acc(mu_s.dtype, mu_t.dtype))


@_fake(f"{_NS}::inter_bwd")
def _inter_bwd_fake(grad_out, mu_s, mu_t, valid, live, need_s, need_t, eps):
    acc = _acc(mu_s.dtype, mu_t.dtype)
    gs = mu_s.new_empty(mu_s.shape, dtype=acc) if need_s else mu_s.new_empty((0,), dtype=acc)
    gt = mu_t.new_empty(mu_t.shape, dtype=acc) if need_t else mu_t.new_empty((0,), dtype=acc)
    return gs, gt


@_fake(f"{_NS}::inter_gram_fwd")
def _inter_gram_fwd_fake(mu_s, mu_t, valid, eps):
    d = mu_s.shape[1] + mu_t.shape[1]
    return mu_s.new_empty((), dtype=_acc(mu_s.dtype, mu_t.dtype)), mu_s.new_empty((d, d), dtype=torch.float64)


@_fake(f"{_NS}::inter_gram_bwd")
def _inter_gram_bwd_fake(grad_out, gram, mu_s, mu_t, valid, live, need_s, need_t, eps, max_live=-1):
    return _inter_bwd_fake(grad_out, mu_s, mu_t, valid, live, need_s, need_t, eps)


@_fake(f"{_NS}::cam_loss_fwd")
def _cam_loss_fwd_fake(cam_s, cam_t, eps):
    acc = _acc(cam_s.dtype, cam_t.dtype)
    b = cam_s.shape[0]
    return (cam_s.new_empty((), dtype=acc), cam_s.new_empty((b, cam_s.shape[1] * cam_s.shape[2]), dtype=acc),
            cam_s.new_empty((b,), dtype=acc))


@_fake(f"{_NS}::cam_loss_bwd")
def _cam_loss_bwd_fake(grad_out, cam_s, cam_t, q_s, norm_s, eps):
    return cam_s.new_empty(cam_s.shape)


@_fake(f"{_NS}::class_activation_fwd")
def _class_activation_fwd_fake(features, fc_weight, targets, cam_t, eps):
    b, k, h, w = features.shape
    acc = _acc(features.dtype, fc_weight.dtype)
    cam, pooled, pool_w = _cam_fwd_fake(features, fc_weight.new_empty((b, k)), True)
    if cam_t is None:
        loss, q_s, norm_s, q_t = (features.new_empty((0,), dtype=acc) for _ in range(4))
    else:
        lacc = _acc(acc, cam_t.dtype)
        loss = features.new_empty((), dtype=lacc)
        q_s = features.new_empty((b, h * w), dtype=lacc)
        norm_s = features.new_empty((b,), dtype=lacc)
        q_t = features.new_empty((b, h * w), dtype=lacc)
    return cam, pooled, loss, pool_w, q_s, norm_s, q_t


@_fake(f"{_NS}::class_activation_bwd")
def _class_activation_bwd_fake(grad_pooled, grad_loss, features, fc_weight, targets, cam, pool_w, q_s, norm_s, q_t,
                               eps, need_features, need_fc_weight):
    gf = features.new_empty(features.shape) if need_features else features.new_empty((0,))
    gw = fc_weight.new_empty(fc_weight.shape) if need_fc_weight else fc_weight.new_empty((0,))
    return gf, gw


@_fake(f"{_NS}::structure_fwd")
def _structure_fwd_fake(sums_s, count_s, sums_t, count_t, f_s, f_t, labels, keep_s, keep_t, min_count, eps,
                        normalize=False, projection=None):
    if projection is not None:
        f_s = f_s.new_empty((f_s.shape[0], projection.shape[0]), dtype=_acc(f_s.dtype, projection.dtype))
    mu_s, _ = _centroids_fwd_fake(sums_s, count_s, f_s, labels)
    mu_t, _ = _centroids_fwd_fake(sums_t, count_t, f_t, labels)
    intra = _intra_fwd_fake(f_s, f_t, mu_s, mu_t, labels, None)
    inter = _inter_fwd_fake(mu_s, mu_t, None, eps)
    # the Gram matrix exists where the C++ op takes its small loop form or the Gram form
    d = mu_s.shape[1] + mu_t.shape[1]
    small = mu_s.shape[0] * d * d <= _SMALL_STRUCTURE and mu_s.dtype == mu_t.dtype
    gram = mu_s.new_empty((d, d) if small or inter_gram_pays(mu_s, mu_t) else (0,), dtype=torch.float64)
    valid = count_s.new_empty(count_s.shape, dtype=torch.bool)
    if normalize:
        units = (f_s.new_empty(f_s.shape), f_t.new_empty(f_t.shape),
                 f_s.new_empty(f_s.shape[:1], dtype=_acc(f_s.dtype)))
    else:
        units = tuple(mu_s.new_empty((0,)) for _ in range(3))
    return (intra, inter, mu_s, mu_t, valid, count_s.new_empty(count_s.shape, dtype=torch.int64), gram) + units


@_fake(f"{_NS}::structure_bwd")
def _structure_bwd_fake(grad_intra, grad_inter, f_s, f_t, mu_s, mu_t, valid, total_s, labels, keep_s, gram, eps,
                        norm_s=None, x_s=None, projection=None):
    if projection is None:
        return f_s.new_empty(f_s.shape), f_s.new_empty((0,), dtype=_acc(f_s.dtype, f_t.dtype, mu_s.dtype, mu_t.dtype))
    return x_s.new_empty(x_s.shape), projection.new_empty(projection.shape)


# ----------------------------------------------------------------------------------------------
# the contract functions (thin: map "not asked for" outputs to None, fill optional arguments)
# ----------------------------------------------------------------------------------------------


def cam_fwd(features: torch.Tensor, weights: torch.Tensor, with_pooled: bool):
    """``(cam [B,H,W], pooled [B,K], pool_w [B,H*W])``; pooled/pool_w empty when not asked for."""
    return _C.cam_fwd(features, weights, bool(with_pooled))


def cam_bwd(grad_cam, grad_pooled, features, weights, cam, pool_w, need_features: bool, need_weights: bool):
    gf, gw = _C.cam_bwd(grad_cam, grad_pooled, features, weights, cam, pool_w, bool(need_features), bool(need_weights))
    return (gf if need_features else None), (gw if need_weights else None)


def spatial_mean(grads: torch.Tensor) -> torch.Tensor:
    return _C.spatial_mean(grads.detach())


def class_bank_enqueue_(bank, count, ptr, sums, feats, labels, mask) -> None:
    _C.class_bank_enqueue_(bank, count, ptr, sums, feats.detach(), labels.long(), mask)


def class_bank_resync_(bank, count, sums, classes) -> None:
    _C.class_bank_resync_(bank, count, sums, classes.long())


def fifo_bank_enqueue_(bank, bank_labels, ptr, feats, labels, mask) -> None:
    _C.fifo_bank_enqueue_(bank, bank_labels, ptr, feats.detach(), labels.long(), mask)


def fifo_bank_sums(bank, bank_labels, num_classes: int):
    return _C.fifo_bank_sums(bank, bank_labels, int(num_classes))


def centroids_fwd(sums, counts, feats, labels):
    return _C.centroids_fwd(sums, counts.long(), feats.detach(), labels.long())


def intra_fwd(f_s, f_t, mu_s, mu_t, labels, valid):
    return _C.intra_fwd(f_s.detach(), f_t.detach(), mu_s.detach(), mu_t.detach(), labels.long(), valid)


def intra_bwd(grad_out, f_s, f_t, mu_s, mu_t, labels, valid):
    return _C.intra_bwd(grad_out, f_s.detach(), f_t.detach(), mu_s.detach(), mu_t.detach(), labels.long(), valid)


def inter_fwd(mu_s, mu_t, valid, eps: float):
    return _C.inter_fwd(mu_s.detach(), mu_t.detach(), valid, float(eps))


def inter_uses_gram(mu_s, mu_t) -> bool:
    """Whether ``inter_gram_fwd`` / ``inter_gram_bwd`` are the forms to use (optional contract
    function: a backend with a two-step form that keeps state for the backward)."""
    return inter_gram_pays(mu_s, mu_t)


def inter_gram_fwd(mu_s, mu_t, valid, eps: float):
    """``(loss, K)``: the loss by the float64 Gram form and K = A^T A, kept for the backward."""
    return _C.inter_gram_fwd(mu_s.detach(), mu_t.detach(), valid, float(eps))


def inter_gram_bwd(grad_out, gram, mu_s, mu_t, valid, live, need_s: bool, need_t: bool, eps: float,
                   max_live: int | None = None):
    """``max_live``: at most that many rows are valid and live (the caller's bound): only those
    rows of dL/dmu_s are computed, in a sync-free wanted-first order."""
    g_s, g_t = _C.inter_gram_bwd(grad_out, gram, mu_s.detach(), mu_t.detach(), valid, live, bool(need_s),
                                 bool(need_t), float(eps), -1 if max_live is None else int(max_live))
    return (g_s if need_s else None), (g_t if need_t else None)


def inter_bwd(grad_out, mu_s, mu_t, valid, live, need_s: bool, need_t: bool, eps: float):
    g_s, g_t = _C.inter_bwd(grad_out, mu_s.detach(), mu_t.detach(), valid, live, bool(need_s), bool(need_t), float(eps))
    return (g_s if need_s else None), (g_t if need_t else None)


# The one-op forms below are called where autograd records nothing (inside an autograd
# Function, or under no_grad): their tensors are passed as they are, without detach().


def cam_loss_fwd(cam_s, cam_t, eps: float):
    """``(loss, q_s, norm_s)``; see csrc/cam.cpp."""
    return _C.cam_loss_fwd(cam_s, cam_t, float(eps))


def cam_loss_bwd(grad_out, cam_s, cam_t, q_s, norm_s, eps: float):
    return _C.cam_loss_bwd(grad_out, cam_s, cam_t, q_s, norm_s, float(eps))


def class_activation_fwd(features, fc_weight, targets, cam_t, eps: float):
    """``(cam, pooled, loss, pool_w, q_s, norm_s, q_t)`` of one network's CAM step; ``loss``,
    ``q_s``, ``norm_s`` and ``q_t`` are empty when ``cam_t`` is None; see csrc/cam.cpp."""
    return _C.class_activation_fwd(features, fc_weight, targets, cam_t, float(eps))


def class_activation_bwd(grad_pooled, grad_loss, features, fc_weight, targets, cam, pool_w, q_s, norm_s, q_t,
                         eps: float, need_features: bool, need_fc_weight: bool):
    g_f, g_w = _C.class_activation_bwd(grad_pooled, grad_loss, features, fc_weight, targets, cam, pool_w, q_s, norm_s,
                                       q_t, float(eps), bool(need_features), bool(need_fc_weight))
    return (g_f if need_features else None), (g_w if need_fc_weight else None)


def class_bank_update_(bank, count, ptr, sums, resync_pos, refused, feats, labels, mask, resync_chunk: int) -> None:
    _C.class_bank_update_(bank, count, ptr, sums, resync_pos, refused, feats, labels, mask, int(resync_chunk))


def fifo_bank_update_(bank, bank_labels, ptr, refused, feats, labels, mask) -> None:
    _C.fifo_bank_update_(bank, bank_labels, ptr, refused, feats, labels, mask)


def class_banks_update_(bank, count, ptr, sums, resync_pos, refused, feats, labels, mask,
                        resync_chunk: int) -> None:
    """``class_bank_update_`` of several banks (lists, one entry per bank) under one ``labels``."""
    _C.class_banks_update_(bank, count, ptr, sums, resync_pos, refused, feats, labels, mask, int(resync_chunk))


def fifo_banks_update_(bank, bank_labels, ptr, refused, feats, labels, mask) -> None:
    """``fifo_bank_update_`` of several banks (lists, one entry per bank) under one ``labels``."""
    _C.fifo_banks_update_(bank, bank_labels, ptr, refused, feats, labels, mask)


def structure_fwd(sums_s, count_s, sums_t, count_t, f_s, f_t, labels, keep_s, keep_t, min_count: int, eps: float,
                  normalize: bool = False, projection=None):
    """``(intra, inter, mu_s, mu_t, valid, total_s, gram, unit_s, unit_t, norm_s)``; see
    csrc/structure.cpp."""
    return _C.structure_fwd(sums_s, count_s, sums_t, count_t, f_s, f_t, labels, keep_s, keep_t, int(min_count),
                            float(eps), bool(normalize), projection)


def structure_bwd(grad_intra, grad_inter, f_s, f_t, mu_s, mu_t, valid, total_s, labels, keep_s, gram, eps: float,
                  norm_s=None, x_s=None, projection=None):
    """``(grad_f_s, grad_projection)`` (the latter None without ``projection``)."""
    g, g_p = _C.structure_bwd(grad_intra, grad_inter, f_s, f_t, mu_s, mu_t, valid, total_s, labels, keep_s, gram,
                              float(eps), norm_s, x_s, projection)
    return g, (g_p if projection is not None else None)
