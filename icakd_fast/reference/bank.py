"""Memory-bank updates in plain PyTorch (vectorised, no host synchronisation).

All functions mutate the buffers they are given and return nothing. Rows whose mask is False or
whose label is out of range are skipped (the modules validate labels before calling). Writes are
expressed as one ``index_put_`` per buffer: rows that write nothing are redirected to repeat an
identical write, so duplicate indices always carry identical values and the result does not
depend on the order in which the device applies them.
"""

from __future__ import annotations

import torch


def _ranks_within_class(lab: torch.Tensor) -> torch.Tensor:
    """For each row, how many earlier rows (batch order) have the same label."""
    n = lab.shape[0]
    sorted_lab, order = torch.sort(lab, stable=True)
    first = torch.searchsorted(sorted_lab, sorted_lab, right=False)
    rank_sorted = torch.arange(n, device=lab.device) - first
    return torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)


def _redirect_idle(write: torch.Tensor, index: torch.Tensor, values: torch.Tensor, fallback_index, fallback_value):
    """Rows with ``write`` False repeat the first writing row's (index, value), or rewrite
    ``fallback_value`` at ``fallback_index`` (its current content) when no row writes."""
    any_write = write.any()
    first = torch.argmax(write.to(torch.uint8)).view(1)
    dummy_index = torch.where(any_write, index.index_select(0, first)[0], fallback_index)
    dummy_value = torch.where(any_write, values.index_select(0, first)[0], fallback_value)
    shape = (-1,) + (1,) * (values.dim() - 1)
    index = torch.where(write, index, dummy_index)
    values = torch.where(write.view(shape), values, dummy_value)
    return index, values


def class_bank_enqueue_(
    bank: torch.Tensor,
    count: torch.Tensor,
    ptr: torch.Tensor,
    sums: torch.Tensor,
    feats: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """Class ring buffer: write each class's rows (last ``S`` if more) at ``(ptr[c] + r) % S``."""
    num_classes, slots, dim = bank.shape
    if feats.shape[0] == 0:
        return
    labels = labels.long()
    keep = mask & (labels >= 0) & (labels < num_classes)
    lab = torch.where(keep, labels, num_classes)  # skipped rows form the sentinel class C
    n = torch.zeros(num_classes + 1, dtype=torch.int64, device=lab.device).index_add_(0, lab, torch.ones_like(lab))[:num_classes]
    rank = _ranks_within_class(lab)
    cls = lab.clamp(max=num_classes - 1)
    n_row = n.index_select(0, cls)
    skip = (n_row - slots).clamp(min=0)
    write = keep & (rank >= skip)
    slot = (ptr.index_select(0, cls) + rank - skip).remainder(slots)
    flat = cls * slots + slot

    flat_bank = bank.view(num_classes * slots, dim)
    new = feats.detach().to(bank.dtype)
    old = flat_bank.index_select(0, flat)
    was_filled = slot < count.index_select(0, cls)
    delta = new.float() - torch.where(was_filled.unsqueeze(1), old.float(), torch.zeros_like(old, dtype=torch.float32))
    sums.index_add_(0, cls, delta * write.unsqueeze(1).to(delta.dtype))

    flat, new = _redirect_idle(write, flat, new, torch.zeros_like(flat[0]), flat_bank[0])
    flat_bank.index_put_((flat,), new)
    taken = torch.minimum(n, torch.full_like(n, slots))
    count.copy_(torch.minimum(count + n, torch.full_like(n, slots)))
    ptr.copy_((ptr + taken).remainder(slots))


def class_bank_resync_(bank: torch.Tensor, count: torch.Tensor, sums: torch.Tensor, classes: torch.Tensor) -> None:
    """Recompute ``sums[classes]`` exactly (float32) from the stored rows."""
    slots = bank.shape[1]
    rows = bank.index_select(0, classes).float()
    filled = torch.arange(slots, device=bank.device).unsqueeze(0) < count.index_select(0, classes).unsqueeze(1)
    exact = (rows * filled.unsqueeze(2).float()).sum(dim=1)
    sums.index_copy_(0, classes, exact)


def fifo_bank_enqueue_(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    ptr: torch.Tensor,
    feats: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """FIFO ring buffer: kept rows go to ``(ptr + i) % N`` in batch order (last ``N`` if more)."""
    size = bank.shape[0]
    if feats.shape[0] == 0:
        return
    labels = labels.long()
    keep = mask & (labels >= 0)
    rank = torch.cumsum(keep.long(), 0) - 1
    n = keep.long().sum()
    skip = (n - size).clamp(min=0)
    write = keep & (rank >= skip)
    index = (ptr + rank - skip).remainder(size)
    new = feats.detach().to(bank.dtype)
    zero = torch.zeros_like(index[0])
    b_index, b_values = _redirect_idle(write, index, new, zero, bank[0])
    l_index, l_values = _redirect_idle(write, index, labels, zero, bank_labels[0])
    bank.index_put_((b_index,), b_values)
    bank_labels.index_put_((l_index,), l_values)
    ptr.copy_((ptr + torch.clamp(n, max=size)).remainder(size))


def fifo_bank_sums(bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class float32 sums and counts of a FIFO bank by segment sum over its labels."""
    filled = bank_labels >= 0
    lab = torch.where(filled, bank_labels, torch.zeros_like(bank_labels))
    sums = torch.zeros(num_classes, bank.shape[1], dtype=torch.float32, device=bank.device)
    sums.index_add_(0, lab, bank.float() * filled.unsqueeze(1).float())
    counts = torch.zeros(num_classes, dtype=torch.int64, device=bank.device).index_add_(0, lab, filled.long())
    return sums, counts
