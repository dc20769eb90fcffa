"""Memory-bank updates: class ring buffer, FIFO ring buffer and per-class segment sums.

Enqueue is two launches and no host synchronisation:

1. ``plan``: one program per block of batch rows compares its rows with every row of the batch
   (O(N^2) integer work, tiny for N <= a few thousand) to get each kept row's rank among the
   earlier rows of its class, the class size ``n_c`` and the next kept row of the same class. It
   writes, per row: the destination slot (or -1), whether that slot was filled before, the link to
   the next writer of its class, and ``n_c`` on the class's first writing row (its "leader").
2. ``apply``: one program per (row, feature chunk); only leaders work. A leader walks its class's
   writers in batch order (at most S of them, following the links), reads each old slot, writes
   the new row and adds ``stored_new - stored_old`` to the float32 running sum in that order --
   no float atomics, so the result is bit-for-bit reproducible. The (leader, chunk 0) program
   then advances ``ptr``/``count`` (nothing in this launch reads them).

Destination slots of one class are distinct and every class has one leader, so programs never
touch the same memory. The FIFO variant is the same plan with a single class.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, launch, next_pow2


@triton.jit
def _plan_kernel(
    lab_ptr, keep_ptr, count_ptr, ptr_ptr, info_ptr,
    N, C, S,
    SINGLE_CLASS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # the O(N^2) comparisons in int32 (labels < C and row indices < N fit): int64 [BLOCK_I, BLOCK_J]
    # tiles spill registers (benchmarks/kernel_static.py --bank)
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = i < N
    li = tl.load(lab_ptr + i, mask=imask, other=-1).to(tl.int32)
    ki = tl.load(keep_ptr + i, mask=imask, other=0) != 0
    if SINGLE_CLASS:
        keep_i = imask & ki & (li >= 0)
    else:
        keep_i = imask & ki & (li >= 0) & (li < C)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    n = tl.zeros([BLOCK_I], dtype=tl.int32)
    nxt = tl.zeros([BLOCK_I], dtype=tl.int32) + N
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        jmask = j < N
        lj = tl.load(lab_ptr + j, mask=jmask, other=-1).to(tl.int32)
        kj = tl.load(keep_ptr + j, mask=jmask, other=0) != 0
        if SINGLE_CLASS:
            keep_j = jmask & kj & (lj >= 0)
            same = keep_i[:, None] & keep_j[None, :]
        else:
            keep_j = jmask & kj & (lj >= 0) & (lj < C)
            same = keep_i[:, None] & keep_j[None, :] & (li[:, None] == lj[None, :])
        before = j[None, :] < i[:, None]
        rank += tl.sum((same & before).to(tl.int32), axis=1)
        n += tl.sum(same.to(tl.int32), axis=1)
        after = j[None, :] > i[:, None]
        cand = tl.where(same & after, j[None, :], N)
        nxt = tl.minimum(nxt, tl.min(cand, axis=1))
    rank = rank.to(tl.int64)
    n = n.to(tl.int64)
    nxt = nxt.to(tl.int64)
    li = li.to(tl.int64)
    skip = tl.maximum(n - S, 0)
    write = keep_i & (rank >= skip)
    if SINGLE_CLASS:
        c = tl.zeros([BLOCK_I], dtype=tl.int64)
    else:
        c = tl.where(keep_i, li, 0)
    p0 = tl.load(ptr_ptr + c, mask=imask, other=0)
    if SINGLE_CLASS:
        cnt = tl.zeros([BLOCK_I], dtype=tl.int64)
    else:
        cnt = tl.load(count_ptr + c, mask=imask, other=0).to(tl.int64)
    slot = (p0 + tl.where(write, rank - skip, 0)) % S
    filled = slot < cnt
    leader = write & (rank == skip)
    tl.store(info_ptr + i, tl.where(write, c * S + slot, -1), mask=imask)
    tl.store(info_ptr + N + i, filled.to(tl.int64), mask=imask)
    tl.store(info_ptr + 2 * N + i, tl.where(write & (nxt < N), nxt, -1), mask=imask)
    tl.store(info_ptr + 3 * N + i, tl.where(leader, n, 0), mask=imask)


@triton.jit
def _class_apply_kernel(
    new_ptr, lab_ptr, info_ptr, bank_ptr, sums_ptr, count_ptr, ptr_ptr,
    N, D, S,
    snr, snd,
    sbc, sbs, sbd,
    ssc, ssd,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    nlead = tl.load(info_ptr + 3 * N + i)
    if nlead > 0:
        c = tl.load(lab_ptr + i).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < D
        d64 = d.to(tl.int64)
        acc = tl.load(sums_ptr + c * ssc + d64 * ssd, mask=dmask, other=0.0)
        j = i.to(tl.int64)
        while j >= 0:
            flat = tl.load(info_ptr + j)
            fil = tl.load(info_ptr + N + j)
            slot = flat % S
            row = bank_ptr + c * sbc + slot * sbs + d64 * sbd
            old = tl.load(row, mask=dmask, other=0.0)
            new = tl.load(new_ptr + j * snr + d64 * snd, mask=dmask, other=0.0)
            old_f = tl.where(fil != 0, old.to(tl.float32), 0.0)
            acc = acc + (new.to(tl.float32) - old_f)
            tl.store(row, new.to(bank_ptr.dtype.element_ty), mask=dmask)
            j = tl.load(info_ptr + 2 * N + j)
        tl.store(sums_ptr + c * ssc + d64 * ssd, acc, mask=dmask)
        if tl.program_id(1) == 0:
            pc = tl.load(ptr_ptr + c)
            cc = tl.load(count_ptr + c)
            tl.store(ptr_ptr + c, (pc + tl.minimum(nlead, S)) % S)
            tl.store(count_ptr + c, tl.minimum(cc + nlead, S))


@triton.jit
def _fifo_apply_kernel(
    new_ptr, lab_ptr, info_ptr, bank_ptr, blab_ptr, ptr_ptr,
    N, D, SIZE,
    snr, snd,
    sbr, sbd, sl,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    dest = tl.load(info_ptr + i)
    if dest >= 0:
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < D
        d64 = d.to(tl.int64)
        new = tl.load(new_ptr + i.to(tl.int64) * snr + d64 * snd, mask=dmask, other=0.0)
        tl.store(bank_ptr + dest * sbr + d64 * sbd, new.to(bank_ptr.dtype.element_ty), mask=dmask)
        if tl.program_id(1) == 0:
            tl.store(blab_ptr + dest * sl, tl.load(lab_ptr + i).to(tl.int64))
            nlead = tl.load(info_ptr + 3 * N + i)
            if nlead > 0:
                pc = tl.load(ptr_ptr)
                tl.store(ptr_ptr, (pc + tl.minimum(nlead, SIZE)) % SIZE)


@triton.jit
def _resync_kernel(
    bank_ptr, count_ptr, cls_ptr, sums_ptr,
    D, S,
    sbc, sbs, sbd,
    ssc, ssd,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c = tl.load(cls_ptr + tl.program_id(0)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    d64 = d.to(tl.int64)
    cnt = tl.load(count_ptr + c)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = (s < cnt)[:, None] & dmask[None, :]
        x = tl.load(bank_ptr + c * sbc + s.to(tl.int64)[:, None] * sbs + d64[None, :] * sbd, mask=m, other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(sums_ptr + c * ssc + d64 * ssd, acc, mask=dmask)


@triton.jit
def _segment_sum_kernel(
    x_ptr, order_ptr, start_ptr, end_ptr, out_ptr,
    D,
    sxr, sxd,
    soc, sod,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[c] = sum_{r in [start[c], end[c])} x[order[r]]``."""
    c = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    d64 = d.to(tl.int64)
    acc_ty = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_D], dtype=acc_ty)
    r0 = tl.load(start_ptr + c)
    r1 = tl.load(end_ptr + c)
    for r in range(r0, r1, BLOCK_R):
        rr = r + tl.arange(0, BLOCK_R)
        rmask = rr < r1
        rows = tl.load(order_ptr + rr, mask=rmask, other=0).to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * sxr + d64[None, :] * sxd, mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(x.to(acc_ty), axis=0)
    tl.store(out_ptr + c * soc + d64 * sod, acc, mask=dmask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _plan(labels, keep, count, ptr, num_classes, slots, single_class):
    n = labels.shape[0]
    info = torch.empty((4, n), dtype=torch.int64, device=labels.device)
    block_i = min(next_pow2(n), 16)
    block_j = min(next_pow2(n), 32)
    launch(_plan_kernel)[(cdiv(n, block_i),)](
        labels, keep, count, ptr, info, n, num_classes, slots,
        SINGLE_CLASS=single_class, BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4,
    )
    return info


def _keep_u8(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.uint8)


def _block_d(d: int) -> int:
    return min(next_pow2(d), 512)


def class_bank_enqueue_(bank, count, ptr, sums, feats, labels, mask) -> None:
    C, S, D = bank.shape
    n = feats.shape[0]
    if n == 0 or C == 0 or S == 0:
        return
    labels = labels.contiguous()
    info = _plan(labels, _keep_u8(mask), count, ptr, C, S, False)
    new = feats.detach().to(bank.dtype)
    bd = _block_d(D)
    launch(_class_apply_kernel)[(n, cdiv(D, bd) if D > 0 else 1)](
        new, labels, info, bank, sums, count, ptr,
        n, D, S, *new.stride(), *bank.stride(), *sums.stride(),
        BLOCK_D=bd, num_warps=4,
    )


def class_bank_resync_(bank, count, sums, classes) -> None:
    C, S, D = bank.shape
    k = classes.shape[0]
    if k == 0 or D == 0:
        return
    classes = classes.contiguous()
    bd = _block_d(D)
    bs = min(next_pow2(S), max(1, 4096 // bd))
    launch(_resync_kernel)[(k, cdiv(D, bd))](
        bank, count, classes, sums, D, S, *bank.stride(), *sums.stride(),
        BLOCK_S=bs, BLOCK_D=bd, num_warps=4,
    )


def fifo_bank_enqueue_(bank, bank_labels, ptr, feats, labels, mask) -> None:
    size, D = bank.shape
    n = feats.shape[0]
    if n == 0 or size == 0:
        return
    labels = labels.contiguous()
    ptr1 = ptr.view(1)
    info = _plan(labels, _keep_u8(mask), ptr1, ptr1, 1, size, True)
    new = feats.detach().to(bank.dtype)
    bd = _block_d(D)
    launch(_fifo_apply_kernel)[(n, cdiv(D, bd) if D > 0 else 1)](
        new, labels, info, bank, bank_labels, ptr1,
        n, D, size, *new.stride(), *bank.stride(), bank_labels.stride(0),
        BLOCK_D=bd, num_warps=4,
    )


def segments(labels: torch.Tensor, num_classes: int):
    """Stable order of rows by label and each class's [start, end) in that order (no host sync)."""
    lab = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    sorted_lab, order = torch.sort(lab, stable=True)
    cls = torch.arange(num_classes, device=labels.device, dtype=sorted_lab.dtype)
    start = torch.searchsorted(sorted_lab, cls, right=False)
    end = torch.searchsorted(sorted_lab, cls, right=True)
    return order, start, end


def segment_launch(x, order, start, end, out) -> None:
    """``out[c] = sum of x[order[start[c]:end[c]]]``."""
    num_classes, D = out.shape
    if num_classes == 0 or D == 0:
        return
    bd = _block_d(D)
    br = max(1, min(64, 4096 // bd))
    launch(_segment_sum_kernel)[(num_classes, cdiv(D, bd))](
        x, order, start, end, out, D, *x.stride(), *out.stride(), BLOCK_R=br, BLOCK_D=bd, num_warps=4,
    )


def segment_sum(x, labels, num_classes, out_dtype=torch.float32):
    """Per-class sums of the rows of ``x`` (batch order inside each class, deterministic).
    Returns ``(out [C, D], counts [C] int64)``."""
    out = torch.empty((num_classes, x.shape[1]), dtype=out_dtype, device=x.device)
    order, start, end = segments(labels.long(), num_classes)
    segment_launch(x, order, start, end, out)
    return out, end - start


def fifo_bank_sums(bank, bank_labels, num_classes: int):
    sums, counts = segment_sum(bank, bank_labels, num_classes, out_dtype=torch.float32)
    return sums, counts
