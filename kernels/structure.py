"""Centroids, intra-class loss and the tiled inter-class (cosine relation) loss.

Inter forward: per-row scales ``b[c] = valid[c] / max(|mu_t[c]|, eps)`` and ``q[c] = |mu_t[c]| /
|mu_s[c]|`` (one O(C*D) pass per side), then a 2-D grid of (row tile, column tile) programs over
the upper triangle. Each program streams the raw rows of both sides through ``tl.dot`` into ONE
accumulator -- ``G_s``, rescaled once by ``-q_k q_l``, then ``+ G_t`` -- so the operands go to the
tensor cores exactly as loaded; times ``-b_k b_l`` that is the relation difference
``E = cos_s - cos_t`` of the tile. Each program writes the sum of squares of its tile (x2 off the
diagonal) to its own slot of a [T*T] buffer; one ``torch.sum`` finishes. No C x C buffer and no
float atomics: extra memory is O(C) + O(T^2). Float32 dots follow PyTorch's
``torch.get_float32_matmul_precision()`` (``_common.dot_precision``: tf32x3 / tf32 / bf16).

Inter backward: rows are taken in a "work-first" order (rows whose gradient is wanted -- live and
valid -- first, sync-free ``argsort``); a (row tile, column split, output chunk) program whose
first row is not wanted exits at once, so with P wanted rows the cost is O(P*C*(Ds+Dt)) instead of
O(C^2*D). A working program streams the column tiles of its split, recomputes ``E`` for its rows
and accumulates ``E @ (a_l * mu[l, chunk])`` in registers; the splits add into the gradient with
float atomics (one split, plain stores, when ``torch.use_deterministic_algorithms`` is on). A
second per-row kernel chains the result through the row normalisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import PREC_CODE, TRITON_VERSION, acc_dtype, cdiv, dot_precision, launch, next_pow2


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, F64: tl.constexpr):
    """``acc + a @ b``; ``PREC`` is a ``PREC_CODE`` (ieee, tf32, tf32x3, bf16) for float32 operands."""
    if F64:  # no float64 tensor-core path in Triton here: a broadcast product over small blocks
        return acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif PREC == 3:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PREC == 2:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    elif PREC == 1:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


# ----------------------------------------------------------------------------------------------
# intra
# ----------------------------------------------------------------------------------------------


@triton.jit
def _intra_kernel(
    fs_ptr, ft_ptr, ms_ptr, mt_ptr, lab_ptr, valid_ptr, go_ptr, nv_ptr, out_ptr,
    B, D,
    sfs0, sfs1, sft0, sft1, sms0, sms1, smt0, smt1,
    so0, so1,
    BACKWARD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward: ``out[b, j] = valid[y_b] |d_b|^2`` over column block j. Backward:
    ``out[b] = 2 g d_b valid[y_b] / max(nv, 1)``."""
    acc_ty = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    r64 = rows.to(tl.int64)
    y = tl.load(lab_ptr + rows, mask=rmask, other=0).to(tl.int64)
    v = tl.load(valid_ptr + y, mask=rmask, other=0) != 0
    if BACKWARD:
        coef = 2.0 * tl.load(go_ptr).to(acc_ty) / tl.maximum(tl.load(nv_ptr).to(acc_ty), 1.0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # one column block per program
    d64 = d.to(tl.int64)
    m = rmask[:, None] & (d < D)[None, :]
    fs = tl.load(fs_ptr + r64[:, None] * sfs0 + d64[None, :] * sfs1, mask=m, other=0.0).to(acc_ty)
    ft = tl.load(ft_ptr + r64[:, None] * sft0 + d64[None, :] * sft1, mask=m, other=0.0).to(acc_ty)
    ms = tl.load(ms_ptr + y[:, None] * sms0 + d64[None, :] * sms1, mask=m, other=0.0).to(acc_ty)
    mt = tl.load(mt_ptr + y[:, None] * smt0 + d64[None, :] * smt1, mask=m, other=0.0).to(acc_ty)
    diff = (fs - ms) - (ft - mt)
    if BACKWARD:
        g = tl.where(v[:, None], coef * diff, 0.0)
        tl.store(out_ptr + r64[:, None] * so0 + d64[None, :] * so1, g, mask=m)
    else:
        sq = tl.sum(diff * diff, axis=1)
        tl.store(out_ptr + r64 * so0 + tl.program_id(1) * so1, tl.where(v, sq, 0.0), mask=rmask)


def _intra_blocks(D: int) -> tuple[int, int]:
    bd = min(next_pow2(D), 256)
    bb = max(1, min(64, 4096 // bd))
    return bb, bd


def intra_fwd(f_s, f_t, mu_s, mu_t, labels, valid):
    B, D = f_s.shape
    acc = acc_dtype(f_s.dtype, f_t.dtype, mu_s.dtype, mu_t.dtype)
    labels = labels.contiguous()
    vu8 = valid.to(torch.uint8)
    bb, bd = _intra_blocks(D)
    nd = max(1, cdiv(D, bd))
    rows = torch.empty((B, nd), dtype=acc, device=f_s.device)  # per row and column block
    nv = valid.index_select(0, labels.long()).sum().to(acc) if B > 0 else torch.zeros((), dtype=acc, device=f_s.device)
    if B > 0:
        launch(_intra_kernel)[(cdiv(B, bb), nd)](
            f_s, f_t, mu_s, mu_t, labels, vu8, rows, rows, rows,
            B, D, *f_s.stride(), *f_t.stride(), *mu_s.stride(), *mu_t.stride(), *rows.stride(),
            BACKWARD=False, BLOCK_B=bb, BLOCK_D=bd, num_warps=4,
        )
    return rows.sum() / nv.clamp(min=1)


def intra_bwd(grad_out, f_s, f_t, mu_s, mu_t, labels, valid):
    B, D = f_s.shape
    acc = acc_dtype(f_s.dtype, f_t.dtype, mu_s.dtype, mu_t.dtype)
    labels = labels.contiguous()
    vu8 = valid.to(torch.uint8)
    gd = torch.empty((B, D), dtype=acc, device=f_s.device)
    if B == 0 or D == 0:
        return gd
    nv = valid.index_select(0, labels.long()).sum().to(acc).reshape(1)
    go = grad_out.to(acc).reshape(1)
    bb, bd = _intra_blocks(D)
    launch(_intra_kernel)[(cdiv(B, bb), cdiv(D, bd))](
        f_s, f_t, mu_s, mu_t, labels, vu8, go, nv, gd,
        B, D, *f_s.stride(), *f_t.stride(), *mu_s.stride(), *mu_t.stride(), *gd.stride(),
        BACKWARD=True, BLOCK_B=bb, BLOCK_D=bd, num_warps=4,
    )
    return gd


# ----------------------------------------------------------------------------------------------
# inter
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_scale_kernel(
    x_ptr, valid_ptr, a_ptr,
    C, D, sx0, sx1, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``a[c] = valid[c] / max(|x[c]|, eps)``."""
    acc_ty = a_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < C
    r64 = rows.to(tl.int64)
    ss = tl.zeros([BLOCK_R], dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + r64[:, None] * sx0 + d.to(tl.int64)[None, :] * sx1, mask=rmask[:, None] & (d < D)[None, :], other=0.0)
        x = x.to(acc_ty)
        ss += tl.sum(x * x, axis=1)
    nrm = tl.maximum(tl.sqrt(ss), eps)
    v = tl.load(valid_ptr + rows, mask=rmask, other=0) != 0
    a = tl.where(v, 1.0 / nrm, 0.0)
    tl.store(a_ptr + rows, a, mask=rmask)


@triton.jit
def _gram_tile(xs_ptr, xt_ptr, rk, rl, km, lm, qk, ql,
               DS, DT, sxs0, sxs1, sxt0, sxt1,
               PREC: tl.constexpr, F64: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``G_t - (q_k q_l) G_s`` for rows ``rk`` x ``rl`` from raw (unscaled) rows.

    Operands go to ``tl.dot`` as loaded (the pipeliner streams them straight to shared memory);
    the one rescale between the two products is on the accumulator. Times ``-b_k b_l`` it is
    the relation difference ``E`` (``b = valid / |mu_t|``, ``q = |mu_t| / |mu_s|``).
    """
    if F64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k64 = rk.to(tl.int64)
    l64 = rl.to(tl.int64)
    acc = _gram_accumulate(acc, xs_ptr, k64, l64, km, lm, DS, sxs0, sxs1, PREC, F64, BLOCK_D)
    acc = acc * (-(qk[:, None] * ql[None, :]))
    return _gram_accumulate(acc, xt_ptr, k64, l64, km, lm, DT, sxt0, sxt1, PREC, F64, BLOCK_D)


@triton.jit
def _gram_accumulate(acc, x_ptr, k64, l64, km, lm, D, s0, s1, PREC: tl.constexpr, F64: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """``acc + x[rk] x[rl]^T`` over the D columns of ``x``, BLOCK_D at a time."""
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        d64 = d.to(tl.int64)
        xk = tl.load(x_ptr + k64[:, None] * s0 + d64[None, :] * s1, mask=km[:, None] & dm[None, :], other=0.0)
        xl = tl.load(x_ptr + l64[:, None] * s0 + d64[None, :] * s1, mask=lm[:, None] & dm[None, :], other=0.0)
        acc = _mma(xk, tl.trans(xl), acc, PREC, F64)
    return acc


@triton.jit
def _inter_fwd_kernel(
    xs_ptr, xt_ptr, q_ptr, b_ptr, part_ptr,
    C, DS, DT,
    sxs0, sxs1, sxt0, sxt1,
    PREC: tl.constexpr, F64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (row tile, column tile) program of the upper triangle: the sum of squared ``E`` of its tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n >= pid_m:
        rk = pid_m * BLOCK_T + tl.arange(0, BLOCK_T)
        rl = pid_n * BLOCK_T + tl.arange(0, BLOCK_T)
        km = rk < C
        lm = rl < C
        qk = tl.load(q_ptr + rk, mask=km, other=0.0)
        ql = tl.load(q_ptr + rl, mask=lm, other=0.0)
        g = _gram_tile(xs_ptr, xt_ptr, rk, rl, km, lm, qk, ql, DS, DT, sxs0, sxs1, sxt0, sxt1,
                       PREC, F64, BLOCK_T, BLOCK_T, BLOCK_D)
        bk = tl.load(b_ptr + rk, mask=km, other=0.0)
        bl = tl.load(b_ptr + rl, mask=lm, other=0.0)
        e = g * (bk[:, None] * bl[None, :])
        tot = tl.sum(tl.sum(e * e, axis=1), axis=0)
        if pid_n > pid_m:
            tot = tot * 2.0
        tl.store(part_ptr + pid_m * tl.num_programs(1) + pid_n, tot)


@triton.jit
def _inter_bwd_kernel(
    xs_ptr, xt_ptr, xo_ptr, q_ptr, b_ptr, wo_ptr, order_ptr, want_ptr, dn_ptr,
    C, DS, DT, DO, COLS_PER_SPLIT,
    sxs0, sxs1, sxt0, sxt1, sxo0, sxo1, sdn0, sdn1,
    PREC: tl.constexpr, PREC_E: tl.constexpr, F64: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """``dn[k, o] += sum_l E[k, l] w_o[l] xo[l, o]`` for the wanted rows ``k`` of one row tile,
    over the columns ``l`` of one split (``ATOMIC``: several splits add into ``dn``)."""
    offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    inr = offs < C
    rows = tl.load(order_ptr + offs, mask=inr, other=0).to(tl.int64)
    ok = inr & (tl.load(want_ptr + rows, mask=inr, other=0) != 0)
    if tl.max(ok.to(tl.int32), axis=0) > 0:
        qk = tl.load(q_ptr + rows, mask=ok, other=0.0)
        bk = tl.load(b_ptr + rows, mask=ok, other=0.0)
        o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
        om = o < DO
        o64 = o.to(tl.int64)
        if F64:
            acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
        c0 = tl.program_id(1) * COLS_PER_SPLIT
        c1 = tl.minimum(c0 + COLS_PER_SPLIT, C)
        for l0 in range(c0, c1, BLOCK_N):
            rl = l0 + tl.arange(0, BLOCK_N)
            lm = rl < c1
            ql = tl.load(q_ptr + rl, mask=lm, other=0.0)
            g = _gram_tile(xs_ptr, xt_ptr, rows, rl, ok, lm, qk, ql, DS, DT, sxs0, sxs1, sxt0, sxt1,
                           PREC, F64, BLOCK_M, BLOCK_N, BLOCK_D)
            wl = tl.load(wo_ptr + rl, mask=lm, other=0.0)  # b_l * a_o[l]
            xo = tl.load(xo_ptr + rl.to(tl.int64)[:, None] * sxo0 + o64[None, :] * sxo1,
                         mask=lm[:, None] & om[None, :], other=0.0).to(acc.dtype)
            acc = _mma(g * wl[None, :], xo, acc, PREC_E, F64)
        acc = acc * (-bk[:, None])
        ptrs = dn_ptr + rows[:, None] * sdn0 + o64[None, :] * sdn1
        if ATOMIC:
            tl.atomic_add(ptrs, acc, mask=ok[:, None] & om[None, :], sem="relaxed")
        else:
            tl.store(ptrs, acc, mask=ok[:, None] & om[None, :])


@triton.jit
def _norm_bwd_kernel(
    x_ptr, dn_ptr, coef_ptr, order_ptr, want_ptr,
    C, D, sx0, sx1, sdn0, sdn1, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """In place: ``dn <- coef * (dn - n (n . dn)) / |x|`` (``coef * dn / eps`` where ``|x| <= eps``)."""
    acc_ty = dn_ptr.dtype.element_ty
    offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    inr = offs < C
    rows = tl.load(order_ptr + offs, mask=inr, other=0).to(tl.int64)
    ok = inr & (tl.load(want_ptr + rows, mask=inr, other=0) != 0)
    if tl.max(ok.to(tl.int32), axis=0) > 0:
        ss = tl.zeros([BLOCK_R], dtype=acc_ty)
        xd = tl.zeros([BLOCK_R], dtype=acc_ty)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d64 = d.to(tl.int64)
            m = ok[:, None] & (d < D)[None, :]
            x = tl.load(x_ptr + rows[:, None] * sx0 + d64[None, :] * sx1, mask=m, other=0.0).to(acc_ty)
            g = tl.load(dn_ptr + rows[:, None] * sdn0 + d64[None, :] * sdn1, mask=m, other=0.0)
            ss += tl.sum(x * x, axis=1)
            xd += tl.sum(x * g, axis=1)
        nrm = tl.sqrt(ss)
        r = 1.0 / tl.maximum(nrm, eps)
        proj = tl.where(nrm > eps, r * r * xd, 0.0)
        coef = tl.load(coef_ptr).to(acc_ty)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d64 = d.to(tl.int64)
            m = ok[:, None] & (d < D)[None, :]
            x = tl.load(x_ptr + rows[:, None] * sx0 + d64[None, :] * sx1, mask=m, other=0.0).to(acc_ty)
            g = tl.load(dn_ptr + rows[:, None] * sdn0 + d64[None, :] * sdn1, mask=m, other=0.0)
            out = coef * r[:, None] * (g - x * proj[:, None])
            tl.store(dn_ptr + rows[:, None] * sdn0 + d64[None, :] * sdn1, out, mask=m)


def _row_scale(x, valid_u8, eps, acc):
    C, D = x.shape
    a = torch.empty((C,), dtype=acc, device=x.device)
    if C == 0:
        return a
    bd = min(next_pow2(D), 256)
    br = max(1, min(64, 4096 // bd))
    launch(_row_scale_kernel)[(cdiv(C, br),)](
        x, valid_u8, a, C, D, *x.stride(), float(eps), BLOCK_R=br, BLOCK_D=bd, num_warps=4,
    )
    return a


def _cuda_cfg(C: int) -> dict:
    """The GPU launch configuration of the inter kernels for C classes."""
    return dict(fwd_t=64 if C <= 2048 else 128, fwd_d=32, bwd_m=64, bwd_n=64, bwd_d=32, bwd_o=256,
                fwd_warps=4 if C <= 2048 else 8, bwd_warps=8, stages=4)


def _gpu_cfg(x: torch.Tensor, C: int):
    if x.device.type != "cuda":  # interpreter: few, large blocks
        return dict(fwd_t=32, fwd_d=32, bwd_m=16, bwd_n=32, bwd_d=32, bwd_o=64, fwd_warps=4, bwd_warps=4, stages=1)
    return _cuda_cfg(C)


#: tunables of the GPU launches (read at each call; the benchmark may override entries)
GPU_CFG_OVERRIDES: dict = {}


def _cfg(x, C, f64: bool = False):
    cfg = _gpu_cfg(x, C)
    if x.device.type == "cuda":
        cfg.update(GPU_CFG_OVERRIDES)
        if f64:  # [BM, BD, BN] products live in registers
            cfg.update(fwd_t=16, fwd_d=16, bwd_m=16, bwd_n=16, bwd_d=16, bwd_o=16, fwd_warps=4, bwd_warps=4, stages=1)
    return cfg


def _scales(mu_s, mu_t, valid, eps, acc):
    """``q = |mu_t| / |mu_s|`` and ``b = 1 / |mu_t|`` on valid rows (norms clamped at eps), 0 elsewhere."""
    vu8 = valid.to(torch.uint8)
    a_s = _row_scale(mu_s, vu8, eps, acc)
    b = _row_scale(mu_t, vu8, eps, acc)
    q = torch.where(b > 0, a_s / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(b))
    return a_s, q, b


def _precisions(mu_s, mu_t):
    f64 = acc_dtype(mu_s.dtype, mu_t.dtype) == torch.float64
    return PREC_CODE[dot_precision(mu_s.dtype, mu_t.dtype)], PREC_CODE[dot_precision(torch.float32)], f64


def inter_fwd(mu_s, mu_t, valid, eps: float):
    C, DS = mu_s.shape
    DT = mu_t.shape[1]
    acc = acc_dtype(mu_s.dtype, mu_t.dtype)
    nv = valid.sum().to(acc)
    if C == 0:
        return torch.zeros((), dtype=acc, device=mu_s.device)
    _, q, b = _scales(mu_s, mu_t, valid, eps, acc)
    cfg = _cfg(mu_s, C, acc == torch.float64)
    bt = cfg["fwd_t"]
    T = cdiv(C, bt)
    part = torch.zeros((T * T,), dtype=acc, device=mu_s.device)
    prec, _, f64 = _precisions(mu_s, mu_t)
    launch(_inter_fwd_kernel)[(T, T)](
        mu_s, mu_t, q, b, part, C, DS, DT, *mu_s.stride(), *mu_t.stride(),
        PREC=prec, F64=f64, BLOCK_T=bt, BLOCK_D=cfg["fwd_d"], num_warps=cfg["fwd_warps"], num_stages=cfg["stages"],
    )
    return part.sum() / (nv * nv).clamp(min=1)


def _work_order(want: torch.Tensor) -> torch.Tensor:
    """Rows with ``want`` first (stable), as a static-size permutation: no host sync."""
    return torch.argsort((~want).to(torch.int8), stable=True)


#: column splits of the inter backward (None: automatic); set by tests to cover the atomic path
BWD_SPLITS: int | None = None


def _splits(C: int, block_n: int, device) -> int:
    """Column splits of the backward: several programs per row tile add into the gradient with
    float atomics (order-dependent rounding); one split when deterministic algorithms are on."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    if BWD_SPLITS is not None:
        return max(1, int(BWD_SPLITS))
    if device.type != "cuda":
        return 1
    return max(1, min(64, cdiv(C, 4 * block_n)))


def inter_bwd(grad_out, mu_s, mu_t, valid, live, need_s: bool, need_t: bool, eps: float):
    """Returns ``(grad_mu_s, grad_mu_t)`` in the accumulation dtype; one not asked for is empty."""
    C, DS = mu_s.shape
    DT = mu_t.shape[1]
    dev = mu_s.device
    acc = acc_dtype(mu_s.dtype, mu_t.dtype)
    g_s = torch.zeros((C, DS) if need_s else (0,), dtype=acc, device=dev)
    g_t = torch.zeros((C, DT) if need_t else (0,), dtype=acc, device=dev)
    if C == 0 or not (need_s or need_t):
        return g_s, g_t
    nv = valid.sum().to(acc)
    base = grad_out.to(acc) * 4.0 / (nv * nv).clamp(min=1)
    a_s, q, b = _scales(mu_s, mu_t, valid, eps, acc)
    cfg = _cfg(mu_s, C, acc == torch.float64)
    prec, prec_e, f64 = _precisions(mu_s, mu_t)
    bm, bn, bdd = cfg["bwd_m"], cfg["bwd_n"], cfg["bwd_d"]
    nsplit = _splits(C, bn, dev)
    cols = cdiv(cdiv(C, nsplit), bn) * bn
    nsplit = cdiv(C, cols)
    for which, need in (("s", need_s), ("t", need_t)):
        if not need:
            continue
        if which == "s":
            want = valid if live is None else (valid & live)
            xo, ao, out, D, coef = mu_s, a_s, g_s, DS, base.reshape(1)
        else:
            want = valid
            xo, ao, out, D, coef = mu_t, b, g_t, DT, (-base).reshape(1)
        if D == 0:
            continue
        order = _work_order(want)
        wu8 = want.to(torch.uint8)
        wo = b * ao
        bo = max(16, min(cfg["bwd_o"], next_pow2(D)))  # tl.dot needs >= 16 on every side (Triton 3.2 checks it)
        warps = cfg["bwd_warps"]
        if prec_e == PREC_CODE["bf16"] and TRITON_VERSION < (3, 3):
            # Triton 3.2's compiler aborts (a LinearLayout assertion) on this kernel's bf16 E-product
            # with 8 warps; 3.3 to 3.8 compile it (.ci/compile_triton.py with each)
            warps = min(warps, 4)
        launch(_inter_bwd_kernel)[(cdiv(C, bm), nsplit, cdiv(D, bo))](
            mu_s, mu_t, xo, q, b, wo, order, wu8, out,
            C, DS, DT, D, cols, *mu_s.stride(), *mu_t.stride(), *xo.stride(), *out.stride(),
            PREC=prec, PREC_E=prec_e, F64=f64, ATOMIC=nsplit > 1,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bdd, BLOCK_O=bo,
            num_warps=warps, num_stages=cfg["stages"],
        )
        bd = min(next_pow2(D), 256)
        br = max(1, min(32, 4096 // bd))
        launch(_norm_bwd_kernel)[(cdiv(C, br),)](
            xo, out, coef, order, wu8, C, D, *xo.stride(), *out.stride(), float(eps),
            BLOCK_R=br, BLOCK_D=bd, num_warps=4,
        )
    return g_s, g_t


# ----------------------------------------------------------------------------------------------
# centroids
# ----------------------------------------------------------------------------------------------


@triton.jit
def _centroids_kernel(
    sums_ptr, counts_ptr, x_ptr, lab_ptr, mu_ptr, total_ptr,
    B, D,
    ssc, ssd, sxr, sxd, smc, smd,
    ACC_F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``mu[c] = (sums[c] + sum_{b: y_b = c} x[b]) / max(counts[c] + n_c, 1)``, ``total[c] = counts[c] + n_c``.

    One program per (class, column block). It scans the labels BLOCK_B at a time and loads only
    the chunks that hold rows of its class, so no sort and no per-class offsets are needed: one
    launch for the whole op. Rows of a class add in batch order chunk by chunk (deterministic).
    """
    c = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    d64 = d.to(tl.int64)
    if ACC_F64:
        acc_ty = tl.float64
    else:  # float32 sums for 16-bit outputs too (tl.sum of a 16-bit tile is float32 anyway)
        acc_ty = tl.float32
    acc = tl.zeros([BLOCK_D], dtype=acc_ty)
    hits = tl.zeros([BLOCK_B], dtype=tl.int32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        lab = tl.load(lab_ptr + rows, mask=rows < B, other=-1)
        hit = lab == c
        h = hit.to(tl.int32)
        hits += h
        if tl.max(h, axis=0) > 0:
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sxr + d64[None, :] * sxd,
                        mask=hit[:, None] & dmask[None, :], other=0.0)
            acc += tl.sum(x.to(acc_ty), axis=0)
    c64 = c.to(tl.int64)
    tot = tl.load(counts_ptr + c64) + tl.sum(hits, axis=0).to(tl.int64)
    base = tl.load(sums_ptr + c64 * ssc + d64 * ssd, mask=dmask, other=0.0).to(acc_ty)
    mu = (base + acc) / tl.maximum(tot, 1).to(acc_ty)
    tl.store(mu_ptr + c64 * smc + d64 * smd, mu.to(mu_ptr.dtype.element_ty), mask=dmask)
    if tl.program_id(1) == 0:
        tl.store(total_ptr + c64, tot)


#: labels per step of the centroid kernel's scan (None: automatic); set by tests to cover several steps
CENTROID_BLOCK_B: int | None = None


def centroids_fwd(sums, counts, feats, labels):
    """Live centroids and total counts in one launch (``labels`` int64, ``counts`` int64)."""
    C, D = sums.shape
    B = feats.shape[0]
    out_dt = torch.promote_types(sums.dtype, feats.dtype)
    mu = torch.empty((C, D), dtype=out_dt, device=sums.device)
    total = torch.empty((C,), dtype=torch.int64, device=sums.device)
    if C == 0:
        return mu, total
    if D == 0:  # nothing to average: only the counts (no launch whose every store is masked off)
        return mu, counts.to(torch.int64).index_add(0, labels, torch.ones_like(labels, dtype=torch.int64))
    # [32, 128] tiles: no spills on sm_90, where [128, 512] tiles spill (kernel_static.py --structure)
    bd = min(next_pow2(D), 128)
    bb = CENTROID_BLOCK_B or max(16, min(next_pow2(B), 32))
    launch(_centroids_kernel)[(C, cdiv(D, bd))](
        sums, counts.contiguous(), feats, labels.contiguous(), mu, total, B, D,
        *sums.stride(), *feats.stride(), *mu.stride(),
        ACC_F64=out_dt == torch.float64, BLOCK_B=bb, BLOCK_D=bd, num_warps=4,
    )
    return mu, total
