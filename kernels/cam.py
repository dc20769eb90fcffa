"""Grad-CAM weighting and CAM-weighted pooling.

Forward (``cam_fwd``), ``H*W <= MAX_FUSED_HW``: the channels are split across programs, one per
(image, channel block), each holding a whole padded map (``BLOCK_P = next_pow2(H*W)``):

1. ``_cam_partial_kernel`` writes ``part[b, kb, p] = sum_{k in kb} w_k A[k, p]`` (float32, small);
   with ``FROM_GRADS`` the weights are the spatial mean of a gradient tensor, computed (and
   written) by the same programs.
2. ``_cam_pool_kernel`` recomputes its image's reduction of the partials in a fixed order (so
   every program gets bit-identical values), ReLU, min-max and ``pool_w``; the program of block 0
   stores cam and pool_w; each program writes ``pooled[k] = sum_p pool_w[p] A[k, p]`` for its
   block. When the partials of one image are large, ``_cam_norm_kernel`` (one program per image)
   does the reduction once and the pooling programs load pool_w instead. Deterministic: no atomics.

The feature map is read twice. Larger maps take a tiled path: one kernel for ``s`` per (image,
pixel tile), the tiny [B, H*W] min-max in torch, one pooling kernel per (image, channel tile).

Backward (``cam_bwd``): one program per (image, channel block): ``g_s = grad_cam * (cam > 0)``,
``dA = w g_s^T + g_pooled pool_w^T`` (one write of dA) and ``dw = sum_p g_s A`` (one read of A)
-- nothing of size [B, K, H, W] is stored by the forward.

Every feature-map offset is int64 and every NCHW stride is honoured (channels_last included);
maps whose rows are evenly spaced (``stride_h == W * stride_w``: NCHW- and NHWC-contiguous) are
addressed by flat pixel index (``FLAT``), without a per-element division. Eager calls launch the
kernels directly; under tracing they go through ``launch`` (``wrap_triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, cdiv, interpreter_kernel, launch, next_pow2

_launch = launch

#: largest H*W handled by the single-launch forward (the padded map lives in registers)
MAX_FUSED_HW = 4096


@triton.jit
def _ix(x, OFF64: tl.constexpr):
    """Offsets inside one image: int32 (half the registers and address arithmetic of int64) unless
    the launcher found an image spanning 2^31 elements or more (``OFF64``)."""
    if OFF64:
        return x.to(tl.int64)
    else:
        return x


@triton.jit
def _split_p(p, WIDTH, FLAT: tl.constexpr, OFF64: tl.constexpr):
    """(row, column) of flat pixel ``p``; ``FLAT``: every map has ``stride_h == W stride_w``, so
    ``(0, p)`` addresses the same element without a division."""
    if FLAT:
        return _ix(tl.zeros_like(p), OFF64), _ix(p, OFF64)
    else:
        return _ix(p // WIDTH, OFF64), _ix(p % WIDTH, OFF64)


@triton.jit
def _cam_partial_kernel(
    a_ptr, w_ptr, g_ptr, part_ptr, wout_ptr,
    K, HW, WIDTH, NKB,
    sab, sak, sah, saw,
    swb, swk,
    sgb, sgk, sgh, sgw,
    FROM_GRADS: tl.constexpr, FLAT: tl.constexpr, OFF64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Pass 1, one program per (image, channel block): ``part[b, kb, p] = sum_{k in kb} w_k A[k, p]``."""
    acc_ty = part_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NKB
    kb = (pid % NKB).to(tl.int32)
    p = tl.arange(0, BLOCK_P)
    pmask = p < HW
    hh, ww = _split_p(p, WIDTH, FLAT, OFF64)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    ki = _ix(k, OFF64)
    m2 = kmask[:, None] & pmask[None, :]
    if FROM_GRADS:
        g = tl.load(g_ptr + b * sgb + ki[:, None] * sgk + (hh * sgh + ww * sgw)[None, :], mask=m2, other=0.0)
        wk = tl.sum(g.to(acc_ty), axis=1) / HW
        wk_out = wk.to(wout_ptr.dtype.element_ty)
        tl.store(wout_ptr + b * K + ki, wk_out, mask=kmask)
        wk = wk_out.to(acc_ty)
    else:
        wk = tl.load(w_ptr + b * swb + ki * swk, mask=kmask, other=0.0).to(acc_ty)
    a = tl.load(a_ptr + b * sab + ki[:, None] * sak + (hh * sah + ww * saw)[None, :], mask=m2, other=0.0)
    s = tl.sum(a.to(acc_ty) * wk[:, None], axis=0)
    tl.store(part_ptr + pid * BLOCK_P + p, s)


@triton.jit
def _cam_from_partials(part_ptr, b, NKB, HW, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """Reduces the partial sums of image ``b`` in a fixed order; returns ``(cam, pool_w)`` (padded lanes 0)."""
    acc_ty = part_ptr.dtype.element_ty
    p = tl.arange(0, BLOCK_P)
    pmask = p < HW
    base = part_ptr + b * NKB * BLOCK_P
    acc = tl.zeros([BLOCK_R, BLOCK_P], dtype=acc_ty)
    for r0 in range(0, NKB, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(base + r.to(tl.int64)[:, None] * BLOCK_P + p[None, :], mask=(r < NKB)[:, None], other=0.0)
    cam = tl.maximum(tl.sum(acc, axis=0), 0.0)
    return cam, _pool_weights(cam, pmask, HW)


@triton.jit
def _pool_weights(cam, pmask, HW):
    """Min-max normalised map over the valid lanes, divided by its sum (uniform 1/HW when the
    map is constant); 0 on padded lanes."""
    lo = tl.min(tl.where(pmask, cam, float("inf")), axis=0)
    hi = tl.max(tl.where(pmask, cam, float("-inf")), axis=0)
    m = tl.where(pmask, (cam - lo) / (hi - lo + 1e-7), 0.0)
    den = tl.sum(m, axis=0)
    safe = tl.where(den > 0, den, 1.0)
    pw = tl.where(den > 0, m / safe, 1.0 / HW)
    return tl.where(pmask, pw, 0.0)


@triton.jit
def _cam_norm_kernel(
    part_ptr, cam_ptr, pw_ptr, NKB, HW,
    WITH_POOLED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Pass 2, one program per image: cam and pool_w from the partial sums."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    pmask = p < HW
    cam, pw = _cam_from_partials(part_ptr, b, NKB, HW, BLOCK_P, BLOCK_R)
    tl.store(cam_ptr + b * HW + p, cam.to(cam_ptr.dtype.element_ty), mask=pmask)
    if WITH_POOLED:
        tl.store(pw_ptr + b * HW + p, pw.to(pw_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _cam_pool_kernel(
    a_ptr, part_ptr, cam_ptr, pw_ptr, pooled_ptr,
    K, HW, WIDTH, NKB,
    sab, sak, sah, saw,
    FUSED: tl.constexpr, FLAT: tl.constexpr, OFF64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Pass 3, one program per (image, channel block): ``pooled[b, k] = sum_p pool_w[b, p] A[b, k, p]``.

    ``FUSED``: every program recomputes its image's (small) partial-sum reduction and min-max
    itself; the program of channel block 0 stores cam and pool_w. Otherwise pool_w is loaded.
    """
    acc_ty = part_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NKB
    kb = (pid % NKB).to(tl.int32)
    p = tl.arange(0, BLOCK_P)
    pmask = p < HW
    if FUSED:
        cam, pw = _cam_from_partials(part_ptr, b, NKB, HW, BLOCK_P, BLOCK_R)
        first = pmask & (kb == 0)
        tl.store(cam_ptr + b * HW + p, cam.to(cam_ptr.dtype.element_ty), mask=first)
        tl.store(pw_ptr + b * HW + p, pw.to(pw_ptr.dtype.element_ty), mask=first)
    else:
        pw = tl.load(pw_ptr + b * HW + p, mask=pmask, other=0.0).to(acc_ty)
    hh, ww = _split_p(p, WIDTH, FLAT, OFF64)
    _pool_block(a_ptr + b * sab, pooled_ptr + b * K, kb * BLOCK_K, K, pw, hh * sah + ww * saw, pmask, sak, OFF64, BLOCK_K)


@triton.jit
def _pool_block(img_ptr, out_ptr, k0, K, pw, sp, pmask, sak, OFF64: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[k] = sum_p pw[p] A[k, p]`` for channels ``k0 .. k0 + BLOCK_K`` of one image
    (``sp``: the pixels' offsets)."""
    k = k0 + tl.arange(0, BLOCK_K)
    kmask = k < K
    ki = _ix(k, OFF64)
    a = tl.load(img_ptr + ki[:, None] * sak + sp[None, :], mask=kmask[:, None] & pmask[None, :], other=0.0)
    pooled = tl.sum(a.to(pw.dtype) * pw[None, :], axis=1)
    tl.store(out_ptr + ki, pooled.to(out_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _cam_image_kernel(
    a_ptr, w_ptr, g_ptr, cam_ptr, pw_ptr, pooled_ptr, wout_ptr,
    K, HW, WIDTH,
    sab, sak, sah, saw,
    swb, swk,
    sgb, sgk, sgh, sgw,
    FROM_GRADS: tl.constexpr, WITH_POOLED: tl.constexpr, FLAT: tl.constexpr, ACC_F64: tl.constexpr, OFF64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program per image, the whole forward: the weighted channel sum over channel chunks,
    ReLU, min-max and pool_w in registers, then the pooling sweep over the same chunks (its reads
    of the image come back from L2, so the feature map crosses DRAM about once)."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    pmask = p < HW
    hh, ww = _split_p(p, WIDTH, FLAT, OFF64)
    if ACC_F64:
        s = tl.zeros([BLOCK_P], dtype=tl.float64)
    else:
        s = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_ty = s.dtype
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        ki = _ix(k, OFF64)
        m2 = kmask[:, None] & pmask[None, :]
        if FROM_GRADS:
            g = tl.load(g_ptr + b * sgb + ki[:, None] * sgk + (hh * sgh + ww * sgw)[None, :], mask=m2, other=0.0)
            wk_out = (tl.sum(g.to(acc_ty), axis=1) / HW).to(wout_ptr.dtype.element_ty)
            tl.store(wout_ptr + b * K + ki, wk_out, mask=kmask)
            wk = wk_out.to(acc_ty)
        else:
            wk = tl.load(w_ptr + b * swb + ki * swk, mask=kmask, other=0.0).to(acc_ty)
        a = tl.load(a_ptr + b * sab + ki[:, None] * sak + (hh * sah + ww * saw)[None, :], mask=m2, other=0.0)
        s += tl.sum(a.to(acc_ty) * wk[:, None], axis=0)
    cam = tl.maximum(s, 0.0)
    tl.store(cam_ptr + b * HW + p, cam.to(cam_ptr.dtype.element_ty), mask=pmask)
    if WITH_POOLED:
        pw = _pool_weights(cam, pmask, HW)
        tl.store(pw_ptr + b * HW + p, pw.to(pw_ptr.dtype.element_ty), mask=pmask)
        for k0 in range(0, K, BLOCK_K):
            _pool_block(a_ptr + b * sab, pooled_ptr + b * K, k0, K, pw, hh * sah + ww * saw, pmask, sak, OFF64, BLOCK_K)


@triton.jit
def _cam_map_kernel(
    a_ptr, w_ptr, cam_ptr, camf_ptr,
    K, HW, WIDTH,
    sab, sak, sah, saw,
    swb, swk,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Tiled path: ``relu(sum_k w A)`` for one (image, pixel tile)."""
    acc_ty = camf_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    a_sp = (p // WIDTH).to(tl.int64) * sah + (p % WIDTH).to(tl.int64) * saw
    s = tl.zeros([BLOCK_P], dtype=acc_ty)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        k64 = k.to(tl.int64)
        wk = tl.load(w_ptr + b * swb + k64 * swk, mask=kmask, other=0.0).to(acc_ty)
        a = tl.load(a_ptr + b * sab + k64[:, None] * sak + a_sp[None, :], mask=kmask[:, None] & pmask[None, :], other=0.0)
        s += tl.sum(a.to(acc_ty) * wk[:, None], axis=0)
    cam = tl.maximum(s, 0.0)
    tl.store(camf_ptr + b * HW + p, cam, mask=pmask)
    tl.store(cam_ptr + b * HW + p, cam.to(cam_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _pool_kernel(
    a_ptr, pw_ptr, out_ptr,
    K, HW, WIDTH,
    sab, sak, sah, saw,
    UNIFORM: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``out[b, k] = sum_p pw[b, p] A[b, k, p]`` (``UNIFORM``: the spatial mean) per (image, channel tile)."""
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    k64 = k.to(tl.int64)
    if ACC_F64:
        acc = tl.zeros([BLOCK_K], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < HW
        a_sp = (p // WIDTH).to(tl.int64) * sah + (p % WIDTH).to(tl.int64) * saw
        a = tl.load(a_ptr + b * sab + k64[:, None] * sak + a_sp[None, :], mask=kmask[:, None] & pmask[None, :], other=0.0)
        a = a.to(acc.dtype)
        if UNIFORM:
            acc += tl.sum(a, axis=1)
        else:
            pw = tl.load(pw_ptr + b * HW + p, mask=pmask, other=0.0).to(acc.dtype)
            acc += tl.sum(a * pw[None, :], axis=1)
    if UNIFORM:
        acc = acc / HW
    tl.store(out_ptr + b * K + k64, acc.to(out_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _cam_bwd_tile(
    a_img, ga_img, cam_img, pw_img, gc_img, wk, gp, ki, kmask, p0, HW, WIDTH,
    sak, sah, saw, sgch, sgcw, sgak, sgah, sgaw,
    HAS_GCAM: tl.constexpr, HAS_GPOOL: tl.constexpr, NEED_F: tl.constexpr, NEED_W: tl.constexpr,
    FLAT: tl.constexpr, OFF64: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One [BLOCK_K, BLOCK_P] tile of the backward: writes dA, returns its share of dw."""
    acc_ty = wk.dtype
    p = p0 + tl.arange(0, BLOCK_P)
    pmask = p < HW
    hh, ww = _split_p(p, WIDTH, FLAT, OFF64)
    m2 = kmask[:, None] & pmask[None, :]
    if HAS_GCAM:
        gc = tl.load(gc_img + hh * sgch + ww * sgcw, mask=pmask, other=0.0).to(acc_ty)
        cv = tl.load(cam_img + p, mask=pmask, other=0.0).to(acc_ty)
        gs = tl.where(cv > 0, gc, 0.0)
    else:
        gs = tl.zeros([BLOCK_P], dtype=acc_ty)
    if NEED_F:
        ga = wk[:, None] * gs[None, :]
        if HAS_GPOOL:
            pw = tl.load(pw_img + p, mask=pmask, other=0.0).to(acc_ty)
            ga += gp[:, None] * pw[None, :]
        tl.store(ga_img + ki[:, None] * sgak + (hh * sgah + ww * sgaw)[None, :], ga.to(ga_img.dtype.element_ty), mask=m2)
    if NEED_W and HAS_GCAM:
        a = tl.load(a_img + ki[:, None] * sak + (hh * sah + ww * saw)[None, :], mask=m2, other=0.0)
        return tl.sum(a.to(acc_ty) * gs[None, :], axis=1)
    else:
        return tl.zeros_like(wk)


@triton.jit
def _cam_bwd_kernel(
    a_ptr, w_ptr, cam_ptr, pw_ptr, gc_ptr, gp_ptr, ga_ptr, gw_ptr,
    K, HW, WIDTH, NKB,
    sab, sak, sah, saw,
    swb, swk,
    sgcb, sgch, sgcw,
    sgpb, sgpk,
    sgab, sgak, sgah, sgaw,
    HAS_GCAM: tl.constexpr, HAS_GPOOL: tl.constexpr,
    NEED_F: tl.constexpr, NEED_W: tl.constexpr, ACC_F64: tl.constexpr, FLAT: tl.constexpr, OFF64: tl.constexpr,
    ONE_TILE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program per (image, channel block); ``ONE_TILE``: the whole map is one pixel tile (no
    loop, so the tile's values need not stay live across iterations)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NKB
    k = (pid % NKB).to(tl.int32) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    ki = _ix(k, OFF64)
    wk = tl.load(w_ptr + b * swb + ki * swk, mask=kmask, other=0.0)
    if ACC_F64:
        wk = wk.to(tl.float64)
    else:
        wk = wk.to(tl.float32)
    if HAS_GPOOL:
        gp = tl.load(gp_ptr + b * sgpb + ki * sgpk, mask=kmask, other=0.0).to(wk.dtype)
    else:
        gp = wk
    # the image's base pointers (named one by one: Triton 3.2 compiles no tuples or *args)
    a_img = a_ptr + b * sab
    ga_img = ga_ptr + b * sgab
    cam_img = cam_ptr + b * HW
    pw_img = pw_ptr + b * HW
    gc_img = gc_ptr + b * sgcb
    if ONE_TILE:
        gw = _cam_bwd_tile(a_img, ga_img, cam_img, pw_img, gc_img, wk, gp, ki, kmask, 0, HW, WIDTH,
                           sak, sah, saw, sgch, sgcw, sgak, sgah, sgaw,
                           HAS_GCAM, HAS_GPOOL, NEED_F, NEED_W, FLAT, OFF64, BLOCK_P)
    else:
        gw = tl.zeros([BLOCK_K], dtype=wk.dtype)
        for p0 in range(0, HW, BLOCK_P):
            gw += _cam_bwd_tile(a_img, ga_img, cam_img, pw_img, gc_img, wk, gp, ki, kmask, p0, HW, WIDTH,
                                sak, sah, saw, sgch, sgcw, sgak, sgah, sgaw,
                                HAS_GCAM, HAS_GPOOL, NEED_F, NEED_W, FLAT, OFF64, BLOCK_P)
    if NEED_W:
        tl.store(gw_ptr + b * K + ki, gw.to(gw_ptr.dtype.element_ty), mask=kmask)


# ----------------------------------------------------------------------------------------------
# "vec" kernels (opt-in, ``CAM_VEC``): NCHW-contiguous 16-bit maps, read in memory order, reduced
# on the tensor cores
# ----------------------------------------------------------------------------------------------
# The channel-block kernels above load [BLOCK_K, BLOCK_P] tiles whose rows are H*W elements long:
# for a 7x7 map a row is 98 bytes, unaligned, so every element is a scalar 2-byte access with its
# own address arithmetic, and every channel or pixel sum is a cross-thread reduction -- tens of
# instructions per element (``benchmarks/kernel_static.py``). Here 8 channels (8*HW contiguous
# elements, a multiple of 8) form one "step" and a tile is U steps: [U, BLOCK_J] with
# BLOCK_J = next_pow2(8*HW), row u = channels k0 + 8u .. k0 + 8u + 7, column j = flat slot; the
# channel of slot j within its step is j // HW and its pixel j % HW, the same in every row. Rows
# are 16-byte aligned when the image is, so loads are 16-byte vectors the compiler streams into
# shared memory, and every sum is a product with a small constant matrix on the tensor cores:
#   per-slot CAM partials  acc[j, n] += A^T[j, u] W[u, n]        (W[u, c] = w[k0 + 8u + c])
#   per-channel sums       out[u, n]  = A[u, j] M[j, n]          (M[j, c] = v[j % HW] if j // HW == c)
# Products of 16-bit values with 0/1 or 16-bit entries are exact and accumulate in float32; a
# float32 factor (pool_w, float32 weights or gradients) is split into PIECES 16-bit parts placed
# in separate column blocks (n = piece * 16 + c) that are summed afterwards, which keeps float32
# accuracy (bfloat16 parts have float32's exponent range; float16 maps take float16 factors only,
# see ``_use_vec``). dA (= w g_s + g_pooled pool_w) needs no read of A: the per-channel factors
# are spread over the slots by a product with the 0/1 matrix E[c, j] = [j // HW == c]. Partial
# CAM sums are kept per slot; pixel p is the sum of slots p + m*HW, m < 8, in a fixed order,
# reduced by each pooling program for its image (or once per image by ``_cam_norm_vec_kernel``).


@triton.jit
def _vec_program(NKB, HW: tl.constexpr, BLOCK_J: tl.constexpr):
    """This program's image (int64) and channel block, the slots and which of them are used."""
    pid = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_J)
    return pid // NKB, (pid % NKB).to(tl.int32), j, j < 8 * HW


@triton.jit
def _vec_rows_mask(ks, j, HW: tl.constexpr, K, EVEN_K: tl.constexpr):
    """Mask of a [U, BLOCK_J] tile whose rows start at channels ``ks`` ([U])."""
    if EVEN_K:  # K % 8 == 0: a step is in or out as a whole
        return (j < 8 * HW)[None, :] & (ks < K)[:, None]
    else:
        return (j < 8 * HW)[None, :] & (ks[:, None] + (j // HW)[None, :] < K)


@triton.jit
def _vec_pieces(v, q, PIECES: tl.constexpr, dt: tl.constexpr):
    """``v`` (float32, the same value in every piece's columns) -> in column block q, the q-th
    ``dt`` part of v; the parts sum to v (exactly when PIECES 16-bit parts cover its mantissa)."""
    rem = v
    out = tl.zeros_like(v)
    for i in tl.static_range(PIECES):
        h = rem.to(dt).to(tl.float32)
        out = tl.where(q == i, h, out)
        rem = rem - h
    return out.to(dt)


@triton.jit
def _vec_channel_matrix(v, kk, jvalid, PIECES: tl.constexpr, dt: tl.constexpr):
    """M [BLOCK_J, 16 * PIECES]: column (piece, c) holds that piece of ``v[j]`` where slot j is
    in channel c of the step, else 0."""
    n = tl.arange(0, 16 * PIECES)
    hit = (kk[:, None] == (n % 16)[None, :]) & jvalid[:, None]
    return _vec_pieces(tl.where(hit, v[:, None], 0.0), (n // 16)[None, :], PIECES, dt)


@triton.jit
def _vec_sum_pieces(o, ROWS: tl.constexpr, PIECES: tl.constexpr):
    """[ROWS, 16 * PIECES] -> [ROWS, 16]: the column blocks added."""
    return tl.sum(tl.reshape(o, [ROWS, PIECES, 16]), axis=1)


@triton.jit
def _vec_store_channels(ptr, out, ks, K):
    """``ptr[ks[u] + c] = out[u, c]`` for c < 8 (and < K)."""
    c = tl.arange(0, 16)[None, :]
    kc = ks[:, None] + c
    tl.store(ptr + kc, out.to(ptr.dtype.element_ty), mask=(c < 8) & (kc < K))


@triton.jit(do_not_specialize=["ITERS"])
def _cam_partial_vec_kernel(
    a_ptr, w_ptr, part_ptr, K, NKB, sab, swb, swk,
    ITERS, HW: tl.constexpr, U: tl.constexpr, BLOCK_J: tl.constexpr, PIECES: tl.constexpr,
    OFF64: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Pass 1, one program per (image, block of 8*U*ITERS channels): per-slot partial sums
    ``part[pid, j] = sum_u w[k(u, j)] A[u, j]``."""
    dt = a_ptr.dtype.element_ty
    b, kb, j, _ = _vec_program(NKB, HW, BLOCK_J)
    pid = b * NKB + kb
    u = tl.arange(0, U)
    n = tl.arange(0, 16 * PIECES)
    c = n % 16
    img = a_ptr + b * sab
    wrow = w_ptr + b * swb
    acc = tl.zeros([BLOCK_J, 16 * PIECES], dtype=tl.float32)
    for it in range(ITERS):
        ks = (kb * ITERS + it) * (8 * U) + 8 * u
        a = tl.load(img + (_ix(ks, OFF64) * HW)[:, None] + j[None, :], mask=_vec_rows_mask(ks, j, HW, K, EVEN_K), other=0.0)
        kc = ks[:, None] + c[None, :]
        wv = tl.load(wrow + kc * swk, mask=(c < 8)[None, :] & (kc < K), other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(a), _vec_pieces(wv, (n // 16)[None, :], PIECES, dt), acc)
    s = _vec_sum_pieces(acc, BLOCK_J, PIECES)
    s = tl.sum(tl.where((j // HW)[:, None] == tl.arange(0, 16)[None, :], s, 0.0), axis=1)
    tl.store(part_ptr + pid * BLOCK_J + j, s)


@triton.jit
def _cam_norm_vec_kernel(
    part_ptr, cam_ptr, pw_ptr, NKB,
    HW: tl.constexpr, WITH_POOLED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Pass 2, one program per image: pixel p = sum over blocks and m < 8 of slot p + m*HW."""
    acc_ty = part_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    pmask = p < HW
    base = part_ptr + b * NKB * BLOCK_J
    acc = tl.zeros([BLOCK_N, BLOCK_P], dtype=acc_ty)
    for n0 in range(0, NKB, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = (n < NKB)[:, None] & pmask[None, :]
        rows = base + n.to(tl.int64)[:, None] * BLOCK_J
        for m in tl.static_range(8):
            acc += tl.load(rows + (p + m * HW)[None, :], mask=nmask, other=0.0)
    cam = tl.maximum(tl.sum(acc, axis=0), 0.0)
    tl.store(cam_ptr + b * HW + p, cam.to(cam_ptr.dtype.element_ty), mask=pmask)
    if WITH_POOLED:
        pw = _pool_weights(cam, pmask, HW)
        tl.store(pw_ptr + b * HW + p, pw.to(pw_ptr.dtype.element_ty), mask=pmask)


@triton.jit(do_not_specialize=["ITERS"])
def _cam_pool_vec_kernel(
    a_ptr, part_ptr, cam_ptr, pw_ptr, pooled_ptr, K, NKB, sab,
    ITERS, HW: tl.constexpr, U: tl.constexpr, BLOCK_J: tl.constexpr, PIECES: tl.constexpr,
    OFF64: tl.constexpr, EVEN_K: tl.constexpr, FUSED: tl.constexpr,
):
    """Pass 3, one program per (image, channel block): ``pooled[k] = sum_p pool_w[p] A[k, p]``.

    ``FUSED`` (few partials per image): every program reduces its image's partial sums itself,
    per slot and in one fixed order (so all programs of an image get bit-identical pool_w), and
    the program of channel block 0 stores cam and pool_w -- pass 2 is not launched."""
    dt = a_ptr.dtype.element_ty
    b, kb, j, jvalid = _vec_program(NKB, HW, BLOCK_J)
    if FUSED:
        s = tl.zeros([BLOCK_J], dtype=tl.float32)
        for n in range(NKB):
            row = part_ptr + (b * NKB + n) * BLOCK_J + j % HW
            for m in tl.static_range(8):
                s += tl.load(row + m * HW, mask=jvalid, other=0.0)
        cam = tl.maximum(s, 0.0)
        pmask = j < HW  # slot j < HW is pixel j (channel 0 of the step)
        lo = tl.min(tl.where(pmask, cam, float("inf")), axis=0)
        hi = tl.max(tl.where(pmask, cam, float("-inf")), axis=0)
        mm = tl.where(jvalid, (cam - lo) / (hi - lo + 1e-7), 0.0)
        den = tl.sum(tl.where(pmask, mm, 0.0), axis=0)
        pw = tl.where(jvalid, tl.where(den > 0, mm / tl.where(den > 0, den, 1.0), 1.0 / HW), 0.0)
        first = pmask & (kb == 0)
        tl.store(cam_ptr + b * HW + j, cam.to(cam_ptr.dtype.element_ty), mask=first)
        tl.store(pw_ptr + b * HW + j, pw.to(pw_ptr.dtype.element_ty), mask=first)
    else:
        pw = tl.load(pw_ptr + b * HW + j % HW, mask=jvalid, other=0.0).to(tl.float32)
    m = _vec_channel_matrix(pw, j // HW, jvalid, PIECES, dt)
    u = tl.arange(0, U)
    img = a_ptr + b * sab
    for it in range(ITERS):
        ks = (kb * ITERS + it) * (8 * U) + 8 * u
        a = tl.load(img + (_ix(ks, OFF64) * HW)[:, None] + j[None, :], mask=_vec_rows_mask(ks, j, HW, K, EVEN_K), other=0.0)
        _vec_store_channels(pooled_ptr + b * K, _vec_sum_pieces(tl.dot(a, m), U, PIECES), ks, K)


@triton.jit
def _vec_channel_values(ptr, stride, ks, K, PIECES: tl.constexpr, dt: tl.constexpr):
    """[U, 16 * PIECES]: column (piece, c) holds that ``dt`` piece of ``ptr[(ks[u] + c) * stride]``
    (c < 8; 0 past K)."""
    n = tl.arange(0, 16 * PIECES)
    kc = ks[:, None] + (n % 16)[None, :]
    v = tl.load(ptr + kc * stride, mask=((n % 16) < 8)[None, :] & (kc < K), other=0.0).to(tl.float32)
    return _vec_pieces(v, (n // 16)[None, :], PIECES, dt)


@triton.jit(do_not_specialize=["ITERS"])
def _cam_bwd_vec_kernel(
    a_ptr, w_ptr, cam_ptr, pw_ptr, gc_ptr, gp_ptr, ga_ptr, gw_ptr,
    K, NKB, WIDTH, sab, swb, swk, sgcb, sgch, sgcw, sgpb, sgpk,
    ITERS, HW: tl.constexpr, U: tl.constexpr, BLOCK_J: tl.constexpr,
    PIECES_W: tl.constexpr, PIECES_P: tl.constexpr, PIECES_G: tl.constexpr,
    OFF64: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_GCAM: tl.constexpr, HAS_GPOOL: tl.constexpr, NEED_F: tl.constexpr, NEED_W: tl.constexpr,
):
    """Backward, one program per (image, channel block), two sweeps over its tiles:
    ``dA = w g_s + g_pooled pool_w`` (no read of A: the per-channel factors are spread over the
    slots by a product with the 0/1 matrix E[c, j] = [j // HW == c]), then
    ``dw[k] = sum_p g_s[p] A[k, p]`` (A times a constant matrix); g_s = grad_cam where cam > 0.
    ``cam``, ``pool_w`` and dA are contiguous, ``grad_cam`` has any [B, H, W] strides.
    PIECES_*: 16-bit parts of the weights, grad_pooled and g_s (1 when of the map's dtype)."""
    dt = a_ptr.dtype.element_ty
    b, kb, j, jvalid = _vec_program(NKB, HW, BLOCK_J)
    kk = j // HW
    p = j % HW
    u = tl.arange(0, U)
    if HAS_GCAM:
        gs = tl.where(tl.load(cam_ptr + b * HW + p, mask=jvalid, other=0.0) > 0,
                      tl.load(gc_ptr + b * sgcb + (p // WIDTH) * sgch + (p % WIDTH) * sgcw, mask=jvalid, other=0.0),
                      0.0).to(tl.float32)
    else:
        gs = tl.zeros([BLOCK_J], dtype=tl.float32)
    img = b * sab
    if NEED_F:
        if HAS_GPOOL:
            pw = tl.load(pw_ptr + b * HW + p, mask=jvalid, other=0.0).to(tl.float32)
        nw = tl.arange(0, 16 * PIECES_W)
        ew = tl.where(((nw % 16)[:, None] == kk[None, :]) & jvalid[None, :], 1.0, 0.0).to(dt)
        np_ = tl.arange(0, 16 * PIECES_P)
        ep = tl.where(((np_ % 16)[:, None] == kk[None, :]) & jvalid[None, :], 1.0, 0.0).to(dt)
        for it in range(ITERS):
            ks = (kb * ITERS + it) * (8 * U) + 8 * u
            ga = tl.dot(_vec_channel_values(w_ptr + b * swb, swk, ks, K, PIECES_W, dt), ew) * gs[None, :]
            if HAS_GPOOL:
                ga += tl.dot(_vec_channel_values(gp_ptr + b * sgpb, sgpk, ks, K, PIECES_P, dt), ep) * pw[None, :]
            tl.store(ga_ptr + img + (_ix(ks, OFF64) * HW)[:, None] + j[None, :], ga.to(ga_ptr.dtype.element_ty),
                     mask=_vec_rows_mask(ks, j, HW, K, EVEN_K))
    if NEED_W:
        if HAS_GCAM:
            mg = _vec_channel_matrix(gs, kk, jvalid, PIECES_G, dt)
        for it in range(ITERS):
            ks = (kb * ITERS + it) * (8 * U) + 8 * u
            if HAS_GCAM:
                a = tl.load(a_ptr + img + (_ix(ks, OFF64) * HW)[:, None] + j[None, :],
                            mask=_vec_rows_mask(ks, j, HW, K, EVEN_K), other=0.0)
                out = _vec_sum_pieces(tl.dot(a, mg), U, PIECES_G)
            else:
                out = tl.zeros([U, 16], dtype=tl.float32)
            _vec_store_channels(gw_ptr + b * K, out, ks, K)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


#: elements per [BLOCK_K, BLOCK_P] tile: forward passes (loads only) and backward (load + store)
_FWD_TILE = 8192
_BWD_TILE = 4096
#: the pooling pass recomputes its image's partial-sum reduction when it is at most this many elements
_FUSE_PARTIALS = 8192


_BWD_WARPS = 4

#: forward strategy: "split" (channel blocks across programs, partial sums) or "image" (one
#: program per image, one launch, second read from L2). "auto" is "split", the faster on the GPU
#: at ImageNet shapes (figures: docs/kernels.md, section 1); "image" saves a launch where the
#: host is the bottleneck.
CAM_FWD_MODE = "auto"
#: tunables of the GPU launches, read at each call (the benchmark may override entries)
CAM_CFG: dict = {"image_tile": 4096, "image_warps": 8,
                 "fwd_tile": _FWD_TILE, "bwd_tile": _BWD_TILE, "bwd_warps": _BWD_WARPS,
                 "vec_tile": 16384, "vec_iters": 4, "vec_warps": 8, "vec_stages": 2}

def _use_image_mode(B: int, dev: torch.device) -> bool:
    return CAM_FWD_MODE == "image"


#: opt-in "vec" kernels (see above) for NCHW-contiguous bfloat16 maps (weights of any float type
#: but float64) and float16 maps (float16 weights) with 8 <= H*W <= CAM_VEC_MAX_HW; off until timed on a GPU
#: (``benchmarks/gpu_bench.py`` times them as ``triton_vec``; ``benchmarks/kernel_static.py``
#: shows what they compile to)
CAM_VEC = False
CAM_VEC_MAX_HW = 128
_VEC_DTYPES = (torch.float16, torch.bfloat16)
#: the pooling pass reduces its image's partial sums itself (no pass 2) up to this many channel
#: blocks per image (each program then reads 8 * blocks * BLOCK_J partials, from L2)
_VEC_FUSE_BLOCKS = 8


#: float16 maps with wider weights (their float32 factors would be split into float16 parts, which
#: overflow beyond 65504): off, they take the split kernels. The CPU tests, which cannot run
#: bfloat16 under the interpreter, switch it on to exercise the splitting with in-range values.
_VEC_FP16_WIDE_FACTORS = False


def _use_vec(features: torch.Tensor, weights: torch.Tensor, hw: int) -> bool:
    if features.dtype == torch.float16 and weights.dtype != torch.float16 and not _VEC_FP16_WIDE_FACTORS:
        return False
    return (bool(CAM_VEC) and 8 <= hw <= CAM_VEC_MAX_HW and features.is_contiguous()
            and features.dtype in _VEC_DTYPES and weights.dtype != torch.float64)


def _vec_grid(hw: int, k: int) -> tuple[int, int, int, int]:
    """``(BLOCK_J, U, ITERS, number of channel blocks)`` of the vec kernels: tiles of U steps of 8
    channels (U >= 16, the smallest ``tl.dot``; U * BLOCK_J ~ ``CAM_CFG["vec_tile"]``), ITERS
    tiles per program."""
    block_j = next_pow2(8 * hw)
    u = max(16, min(next_pow2(cdiv(k, 8)), int(CAM_CFG["vec_tile"]) // block_j))
    iters = max(1, min(int(CAM_CFG["vec_iters"]), cdiv(k, 8 * u)))
    return block_j, u, iters, cdiv(k, 8 * u * iters)


def _pieces(value_dtype: torch.dtype, map_dtype: torch.dtype, out_dtype: torch.dtype) -> int:
    """16-bit parts of a ``value_dtype`` factor in products with the map: 1 when it has the map's
    dtype (exact), 2 (16 significant bits, below a 16-bit output's rounding) or 4 (float32)."""
    if value_dtype == map_dtype:
        return 1
    return 2 if out_dtype in _VEC_DTYPES else 4


def _vec_opts() -> dict:
    return {"num_warps": int(CAM_CFG["vec_warps"]), "num_stages": int(CAM_CFG["vec_stages"])}


def _flat(width: int, *maps) -> bool:
    """Whether every given map (``[..., H, W]``) has ``stride(-2) == W * stride(-1)``."""
    for t in maps:
        if t is not None and t.dim() >= 2 and t.shape[-2] > 1 and t.stride(-2) != width * t.stride(-1):
            return False
    return True


def _off64(*tensors) -> bool:
    """Whether the offsets inside one image of some tensor (every dim but the batch one) reach
    2^31: the kernels then compute them in int64 (the image's base offset always is)."""
    for t in tensors:
        if t is None:
            continue
        n = t.numel()
        if n < 2**31 and t.is_contiguous():  # offsets below numel: the common case, no stride walk
            continue
        if n and sum((d - 1) * abs(st) for d, st in zip(t.shape[1:], t.stride()[1:])) >= 2**31 - 1:
            return True
    return False


def _fused_blocks(hw: int, k: int, tile: int = _FWD_TILE) -> tuple[int, int]:
    """Whole padded map per program: ``(BLOCK_K, BLOCK_P)`` with ``BLOCK_K * BLOCK_P ~ tile``."""
    block_p = next_pow2(hw)
    block_k = max(1, min(next_pow2(k), tile // block_p))
    return block_k, block_p


def _tile_blocks(hw: int, k: int) -> tuple[int, int]:
    block_p = min(next_pow2(hw), 128)
    block_k = max(1, min(next_pow2(k), 4096 // block_p))
    return block_k, block_p


def cam_fwd(features: torch.Tensor, weights: torch.Tensor | None, with_pooled: bool, grads: torch.Tensor | None = None,
            max_fused_hw: int | None = None):
    """Returns ``(cam [B,H,W], pooled [B,K], pool_w [B,H*W], weights_out)``.

    ``grads`` given: the weights are its spatial mean (``weights_out``, grads' dtype), computed
    in the same launch; otherwise ``weights`` is used and ``weights_out`` is empty.
    """
    if max_fused_hw is None:
        max_fused_hw = MAX_FUSED_HW
    B, K, H, W = features.shape
    HW = H * W
    wdt = grads.dtype if grads is not None else weights.dtype
    out_dt = torch.promote_types(features.dtype, wdt)
    acc = acc_dtype(features.dtype, wdt)
    dev = features.device
    cam = torch.empty((B, H, W), dtype=out_dt, device=dev)
    pooled = torch.empty((B, K) if with_pooled else (0,), dtype=out_dt, device=dev)
    pool_w = torch.empty((B, HW) if with_pooled else (0,), dtype=acc, device=dev)
    w_out = torch.empty((B, K) if grads is not None else (0,), dtype=wdt, device=dev)
    if B == 0 or HW == 0:
        if with_pooled:
            pooled.zero_()
            pool_w.fill_(1.0 / max(HW, 1))
        return cam, pooled, pool_w, w_out
    if K == 0:  # empty sum: cam = 0, uniform pooling of nothing
        cam.zero_()
        if with_pooled:
            pool_w.fill_(1.0 / HW)
        if grads is not None:
            w_out.zero_()
        return cam, pooled, pool_w, w_out
    if HW > max_fused_hw and grads is not None:
        w_out = spatial_mean(grads)
        weights, grads = w_out, None
    if grads is None and _use_vec(features, weights, HW):
        block_j, u, iters, nkb = _vec_grid(HW, K)
        tile = dict(HW=HW, U=u, ITERS=iters, BLOCK_J=block_j, OFF64=_off64(features, weights), EVEN_K=K % 8 == 0)
        part = torch.empty((B * nkb, block_j), dtype=acc, device=dev)
        _launch(_cam_partial_vec_kernel)[(B * nkb,)](
            features, weights, part, K, nkb, features.stride(0), *weights.stride(),
            PIECES=_pieces(weights.dtype, features.dtype, out_dt), **tile, **_vec_opts(),
        )
        fused = with_pooled and nkb <= _VEC_FUSE_BLOCKS
        if not fused:
            block_p = next_pow2(HW)
            _launch(_cam_norm_vec_kernel)[(B,)](
                part, cam, pool_w if with_pooled else part, nkb,
                HW=HW, WITH_POOLED=with_pooled, BLOCK_P=block_p, BLOCK_J=block_j,
                BLOCK_N=max(1, min(next_pow2(nkb), _FWD_TILE // block_p)), num_warps=4,
            )
        if with_pooled:
            _launch(_cam_pool_vec_kernel)[(B * nkb,)](
                features, part, cam, pool_w, pooled, K, nkb, features.stride(0),
                PIECES=_pieces(pool_w.dtype, features.dtype, pooled.dtype), FUSED=fused, **tile, **_vec_opts(),
            )
        return cam, pooled, pool_w, w_out
    if HW <= max_fused_hw and _use_image_mode(B, dev):
        block_p = next_pow2(HW)
        block_k = max(1, min(next_pow2(K), CAM_CFG["image_tile"] // block_p))
        if grads is not None:
            g, gs, w_arg, ws = grads, grads.stride(), grads, (0, 0)
        else:
            g, gs, w_arg, ws = weights, (0, 0, 0, 0), weights, weights.stride()
        _launch(_cam_image_kernel)[(B,)](
            features, w_arg, g, cam, pool_w if with_pooled else cam, pooled if with_pooled else cam,
            w_out if grads is not None else cam,
            K, HW, W, *features.stride(), *ws, *gs,
            FROM_GRADS=grads is not None, WITH_POOLED=with_pooled, FLAT=_flat(W, features, grads),
            ACC_F64=acc == torch.float64, OFF64=_off64(features, weights, grads), BLOCK_K=block_k, BLOCK_P=block_p,
            num_warps=CAM_CFG["image_warps"],
        )
        return cam, pooled, pool_w, w_out
    if HW <= max_fused_hw:
        block_k, block_p = _fused_blocks(HW, K, CAM_CFG["fwd_tile"])
        nkb = cdiv(K, block_k)
        block_r = max(1, min(next_pow2(nkb), _FWD_TILE // block_p))
        part = torch.empty((B, nkb, block_p), dtype=acc, device=dev)
        if grads is not None:
            g, gs, w_arg, ws = grads, grads.stride(), grads, (0, 0)
        else:
            g, gs, w_arg, ws = weights, (0, 0, 0, 0), weights, weights.stride()
        _launch(_cam_partial_kernel)[(B * nkb,)](
            features, w_arg, g, part, w_out if grads is not None else part,
            K, HW, W, nkb,
            *features.stride(), *ws, *gs,
            FROM_GRADS=grads is not None, FLAT=_flat(W, features, grads), OFF64=_off64(features, weights, grads),
            BLOCK_K=block_k, BLOCK_P=block_p, num_warps=4,
        )
        fused = with_pooled and nkb * block_p <= _FUSE_PARTIALS
        if not fused:
            _launch(_cam_norm_kernel)[(B,)](
                part, cam, pool_w if with_pooled else part, nkb, HW,
                WITH_POOLED=with_pooled, BLOCK_P=block_p, BLOCK_R=block_r, num_warps=4,
            )
        if with_pooled:
            _launch(_cam_pool_kernel)[(B * nkb,)](
                features, part, cam, pool_w, pooled,
                K, HW, W, nkb,
                *features.stride(),
                FUSED=fused, FLAT=_flat(W, features), OFF64=_off64(features), BLOCK_K=block_k, BLOCK_P=block_p,
                BLOCK_R=block_r, num_warps=4,
            )
        return cam, pooled, pool_w, w_out
    # tiled path for large maps
    block_k, block_p = _tile_blocks(HW, K)
    camf = torch.empty((B, HW), dtype=acc, device=dev)
    _launch(_cam_map_kernel)[(B, cdiv(HW, block_p))](
        features, weights, cam, camf, K, HW, W, *features.stride(), *weights.stride(),
        BLOCK_K=block_k, BLOCK_P=block_p, num_warps=4,
    )
    if with_pooled:
        lo = camf.amin(dim=1, keepdim=True)
        hi = camf.amax(dim=1, keepdim=True)
        m = (camf - lo) / (hi - lo + 1e-7)
        den = m.sum(dim=1, keepdim=True)
        pw = torch.where(den > 0, m / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(m, 1.0 / HW))
        pool_w.copy_(pw)
        pk, pp = _tile_blocks(HW, K)
        _launch(_pool_kernel)[(B, cdiv(K, pk))](
            features, pool_w, pooled, K, HW, W, *features.stride(),
            UNIFORM=False, ACC_F64=acc == torch.float64, BLOCK_K=pk, BLOCK_P=pp, num_warps=4,
        )
    return cam, pooled, pool_w, w_out


def spatial_mean(grads: torch.Tensor) -> torch.Tensor:
    B, K, H, W = grads.shape
    HW = H * W
    out = torch.empty((B, K), dtype=grads.dtype, device=grads.device)
    if out.numel() == 0:
        return out
    if HW == 0:
        return out.fill_(float("nan"))
    block_k, block_p = _tile_blocks(HW, K)
    _launch(_pool_kernel)[(B, cdiv(K, block_k))](
        grads, out, out, K, HW, W, *grads.stride(),
        UNIFORM=True, ACC_F64=grads.dtype == torch.float64, BLOCK_K=block_k, BLOCK_P=block_p, num_warps=4,
    )
    return out


def cam_bwd(grad_cam, grad_pooled, features, weights, cam, pool_w, need_features: bool, need_weights: bool):
    """Returns ``(grad_features, grad_weights)``; an output not asked for is an empty tensor."""
    B, K, H, W = features.shape
    HW = H * W
    dev = features.device
    acc = acc_dtype(features.dtype, weights.dtype)
    has_gc = grad_cam is not None
    has_gp = grad_pooled is not None and pool_w.numel() > 0
    ga = torch.empty_like(features) if need_features else torch.empty((0,), dtype=features.dtype, device=dev)
    gw = torch.empty((B, K), dtype=weights.dtype, device=dev) if need_weights else torch.empty((0,), dtype=weights.dtype, device=dev)
    if not (need_features or need_weights):
        return ga, gw
    if features.numel() == 0:
        if need_weights:
            gw.zero_()
        return ga, gw
    if not has_gc and not has_gp:
        if need_features:
            ga.zero_()
        if need_weights:
            gw.zero_()
        return ga, gw
    gc = grad_cam if has_gc else cam
    gp = grad_pooled if has_gp else weights
    ga_arg = ga if need_features else features
    gw_arg = gw if need_weights else weights
    if _use_vec(features, weights, HW) and cam.is_contiguous() and (not has_gp or pool_w.is_contiguous()) \
            and (not need_features or ga.is_contiguous()):
        block_j, u, iters, nkb = _vec_grid(HW, K)
        _launch(_cam_bwd_vec_kernel)[(B * nkb,)](
            features, weights, cam, pool_w if has_gp else cam, gc, gp, ga_arg, gw_arg,
            K, nkb, W, features.stride(0), *weights.stride(),
            *(gc.stride() if has_gc else (0, 0, 0)),
            *(gp.stride() if has_gp else (0, 0)),
            HW=HW, U=u, ITERS=iters, BLOCK_J=block_j, PIECES_W=_pieces(weights.dtype, features.dtype, features.dtype),
            PIECES_P=_pieces(gp.dtype, features.dtype, features.dtype), PIECES_G=_pieces(gc.dtype, features.dtype, weights.dtype),
            OFF64=_off64(features, weights, grad_cam, grad_pooled), EVEN_K=K % 8 == 0,
            HAS_GCAM=has_gc, HAS_GPOOL=has_gp, NEED_F=need_features, NEED_W=need_weights, **_vec_opts(),
        )
        return ga, gw
    if HW <= MAX_FUSED_HW:
        block_k, block_p = _fused_blocks(HW, K, CAM_CFG["bwd_tile"])
    else:
        block_k, block_p = _tile_blocks(HW, K)
    nkb = cdiv(K, block_k)
    _launch(_cam_bwd_kernel)[(B * nkb,)](
        features, weights, cam, pool_w if has_gp else cam, gc, gp, ga_arg, gw_arg,
        K, HW, W, nkb,
        *features.stride(), *weights.stride(),
        *(gc.stride() if has_gc else (0, 0, 0)),
        *(gp.stride() if has_gp else (0, 0)),
        *(ga.stride() if need_features else (0, 0, 0, 0)),
        HAS_GCAM=has_gc, HAS_GPOOL=has_gp, NEED_F=need_features, NEED_W=need_weights,
        ACC_F64=acc == torch.float64, FLAT=_flat(W, features, grad_cam, ga if need_features else None),
        OFF64=_off64(features, weights, grad_cam, grad_pooled, ga if need_features else None), ONE_TILE=HW <= block_p,
        BLOCK_K=block_k, BLOCK_P=block_p, num_warps=CAM_CFG["bwd_warps"],
    )
    return ga, gw
