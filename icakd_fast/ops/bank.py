"""The update of a memory bank in one step: non-finite rows refused, the rest enqueued, and for
the class bank the rotating resync. A backend with the one-op form (``class_bank_update_`` /
``fifo_bank_update_``) runs it as one call; for the others the same steps are composed from
the backend's enqueue and resync ops."""

from __future__ import annotations

import torch

from .. import reference
from .._backend import implementation, is_available


def impl_of(backend: str):
    """The module implementing a backend's ops (the reference package for ``"reference"``)."""
    return reference if backend == "reference" else implementation(backend)


def fused_update(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` has the one-op update on ``device``."""
    return backend != "reference" and is_available(backend, "bank_update", device)


def refuse_non_finite(feats: torch.Tensor, mask: torch.Tensor, storage: torch.dtype, refused: torch.Tensor):
    """``(rows, mask)``: the rows cast to the storage dtype with non-finite values zeroed (so that
    no backend's arithmetic on skipped rows can meet a NaN), and ``mask`` without the rows that
    held any; those it took from ``mask`` are added to ``refused``. Device work only, no host
    synchronisation."""
    stored = feats.to(storage)
    # x * 0 is 0 for a finite x and NaN for inf or NaN, so a row's sum of them is 0 exactly when
    # the whole row is finite (a sum, not isfinite().all(), which is slow on CPUs)
    finite = stored.mul(0).sum(dim=1, dtype=torch.float32) == 0
    refused.add_((mask & ~finite).sum())
    return stored.nan_to_num(0.0, 0.0, 0.0), mask & finite


def _all_rows(mask, feats):
    """The backends' enqueue ops take a mask: every row's where the caller gave None."""
    return torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device) if mask is None else mask


def class_bank_update_(backend: str, fused: bool, bank, count, ptr, sums, resync_pos, refused, feats, labels, mask,
                       resync_offsets) -> None:
    """Refuse, enqueue (``mask``: bool [N], None for every row; ``feats`` may carry autograd
    history, nothing is recorded), then resync the classes ``(resync_pos + resync_offsets) % C``
    and advance ``resync_pos`` by their number."""
    impl = impl_of(backend)
    chunk = resync_offsets.shape[0]
    if fused:
        impl.class_bank_update_(bank, count, ptr, sums, resync_pos, refused, feats, labels, mask, chunk)
        return
    feats, mask = refuse_non_finite(feats.detach(), _all_rows(mask, feats), bank.dtype, refused)
    impl.class_bank_enqueue_(bank, count, ptr, sums, feats, labels, mask)
    if chunk:
        num_classes = bank.shape[0]
        impl.class_bank_resync_(bank, count, sums, (resync_pos + resync_offsets).remainder(num_classes))
        resync_pos.copy_((resync_pos + chunk).remainder(num_classes))


def fifo_bank_update_(backend: str, fused: bool, bank, bank_labels, ptr, refused, feats, labels, mask) -> None:
    """Refuse, then enqueue (``mask``: bool [N], None for every row)."""
    impl = impl_of(backend)
    if fused:
        impl.fifo_bank_update_(bank, bank_labels, ptr, refused, feats, labels, mask)
        return
    feats, mask = refuse_non_finite(feats.detach(), _all_rows(mask, feats), bank.dtype, refused)
    impl.fifo_bank_enqueue_(bank, bank_labels, ptr, feats, labels, mask)



def class_banks_update_(backend: str, fused: bool, banks, counts, ptrs, sums, resync_pos, refused, feats, labels,
                        masks, resync_offsets) -> None:
    """``class_bank_update_`` of several banks of one shape that share ``labels`` (every other
    argument but ``resync_offsets`` a list with one entry per bank): one call where the backend
    has the one-op form."""
    if fused:
        impl_of(backend).class_banks_update_(banks, counts, ptrs, sums, resync_pos, refused, feats, labels, masks,
                                             resync_offsets.shape[0])
        return
    for i in range(len(banks)):
        class_bank_update_(backend, False, banks[i], counts[i], ptrs[i], sums[i], resync_pos[i], refused[i], feats[i],
                           labels, masks[i], resync_offsets)


def fifo_banks_update_(backend: str, fused: bool, banks, bank_labels, ptrs, refused, feats, labels, masks) -> None:
    """``fifo_bank_update_`` of several banks that share ``labels`` (lists, one entry per bank):
    one call where the backend has the one-op form."""
    if fused:
        impl_of(backend).fifo_banks_update_(banks, bank_labels, ptrs, refused, feats, labels, masks)
        return
    for i in range(len(banks)):
        fifo_bank_update_(backend, False, banks[i], bank_labels[i], ptrs[i], refused[i], feats[i], labels, masks[i])
