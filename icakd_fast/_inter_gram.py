"""Incremental Gram form of the inter-class loss, for ``ICAKDLoss`` with a class bank.

The inter loss of ``C`` centroids only needs the Gram matrix ``K = A^T A`` of the normalised,
valid-masked rows ``A = [n_s, n_t]`` ([C, Ds + Dt], float64):

    sum_{k,l in V} (cos_s[k,l] - cos_t[k,l])^2 = |K_ss|^2 + |K_tt|^2 - 2 |K_st|^2

Between two training steps only a few rows of ``A`` change: the classes of the enqueued batch
(from every rank) and the classes the bank resyncs. So the module keeps ``K_base``, the Gram
matrix of the *bank* centroids (``sums / count``, the rows every class has when it is not in the
batch), and per step

* forward: the loss of ``K = K_base + U^T Sig U``, ``U = [A_cur; A_old]`` (the batch's classes
  only: ``A_old`` their bank rows, ``A_cur`` their rows with the batch part, differentiable),
  ``Sig = diag(+1, -1)``, without forming ``K`` (see ``_LowRankInter``);
* after the enqueue: ``K_base += A_after^T A_after - A_before^T A_before`` over the classes the
  enqueue touched.

Each costs O(R D^2) with R ~ the batch size, instead of O(C D^2) (the full Gram form) or
O(C^2 D) (the direct form): at ImageNet-21k, C = 21841 against R = 256. Everything is float64,
so the three norms above can nearly cancel without losing the result, and the rounding of the
updates (about 1e-16 of |K| each) stays far below the float32 loss's.

``K_base`` is rebuilt from the banks (O(C D^2), chunked) whenever they changed outside this
module's own update: each bank carries a stamp that its enqueue, resync, reset, state loading
and device moves renew, and the rebuild happens when the stamps differ from the ones recorded
with ``K_base``. Writing a bank's buffers by hand bypasses the stamps (call ``invalidate()``).
"""

from __future__ import annotations

import torch

#: float64 elements per row chunk of the full rebuild (32 MiB)
_CHUNK_ELEMS = 1 << 22


def rows64(mu_s: torch.Tensor, mu_t: torch.Tensor, keep: torch.Tensor, eps: float) -> torch.Tensor:
    """``[n_s, n_t] * keep`` in float64 ([n, Ds + Dt]); ``n = mu / max(|mu|, eps)`` as
    ``F.normalize``. Differentiable in ``mu_s`` and ``mu_t``."""
    def unit(x):
        x = x.to(torch.float64)
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)

    return torch.cat([unit(mu_s), unit(mu_t)], dim=1) * keep.unsqueeze(1).to(torch.float64)


def first_positions(idx: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [n]: the position of the first occurrence of ``idx[i]`` in ``idx`` (no host
    synchronisation)."""
    n = idx.shape[0]
    pos = torch.arange(n, device=idx.device)
    first = torch.full((num_classes,), n, dtype=torch.int64, device=idx.device)
    return first.scatter_reduce(0, idx, pos, reduce="amin").index_select(0, idx)


def first_occurrence(idx: torch.Tensor, num_classes: int) -> torch.Tensor:
    """bool [n]: position i holds the first occurrence of ``idx[i]``, so that a class listed twice
    enters a Gram update once."""
    return first_positions(idx, num_classes) == torch.arange(idx.shape[0], device=idx.device)


def batch_centroids(sums: torch.Tensor, counts: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                    keep: torch.Tensor | None, slot: torch.Tensor):
    """The centroids of the batch's own classes only: ``(mu_rows [B, D], total [C])`` with
    ``mu_rows[b] = (sums[y_b] + sum_{b': y_b' = y_b, keep} feats[b']) / (counts[y_b] + n_{y_b})``
    (``class_centroids`` at the rows ``labels``, without any [C, D] tensor) and ``total`` the
    counts of every class with the batch. ``slot``: ``first_positions(labels, C)``."""
    out = torch.promote_types(sums.dtype, feats.dtype)
    B = labels.shape[0]
    w = feats.to(out) if keep is None else feats.to(out) * keep.unsqueeze(1).to(out)
    ones = torch.ones_like(labels) if keep is None else keep.long()
    # per class, the batch's rows summed into the slot of its first occurrence, in batch order
    batch = torch.zeros(B, feats.shape[1], dtype=out, device=feats.device).index_add(0, slot, w)
    n_slot = torch.zeros(B, dtype=torch.int64, device=labels.device).index_add_(0, slot, ones)
    rows = sums.index_select(0, labels).to(out) + batch.index_select(0, slot)
    total_rows = counts.index_select(0, labels).long() + n_slot.index_select(0, slot)
    total = counts.long() + torch.zeros_like(counts, dtype=torch.int64).index_add_(0, labels, ones)
    return rows / total_rows.clamp(min=1).unsqueeze(1).to(out), total


def column_signs(ds: int, d: int, device) -> torch.Tensor:
    """``diag(S)``: +1 on the ``ds`` student columns, -1 on the teacher's (float64 [d])."""
    s = torch.ones(d, dtype=torch.float64, device=device)
    s[ds:] = -1
    return s


class _LowRankInter(torch.autograd.Function):
    """``tr(S K S K) * scale`` for ``K = K_base + U^T Sig U`` with ``U = [cur; old]`` ([2B, D]),
    ``Sig = diag(+1 x B, -1 x B)``, and ``c0 = tr(S K_base S K_base)`` kept with ``K_base``:

        tr(S K S K) = c0 + 2 sum_r sig_r <P_r, U~_r> + sum_{r,q} sig_r sig_q G_rq^2

    with ``U~ = U S``, ``P = U~ K_base`` ([2B, D]) and ``G = U~ U^T`` ([2B, 2B]); the gradient of
    the ``cur`` rows is ``4 (U~ K S)_cur = 4 ((P + G Sig U) S)_cur``. O(B D^2) flops, one
    [2B, D] product with ``K_base`` and no [D, D] temporary (forming ``K``, its gradient and
    autograd's saved copy would take several, 128 MiB each at D = 4096).
    """

    @staticmethod
    def forward(ctx, cur, old, K_base, c0, sign, scale):
        B = cur.shape[0]
        U = torch.cat([cur, old])
        sig = torch.ones(2 * B, dtype=U.dtype, device=U.device)
        sig[B:] = -1
        Ut = U * sign
        P = Ut @ K_base
        G = Ut @ U.t()
        term2 = (sig * (P * Ut).sum(dim=1)).sum()
        term3 = ((sig.unsqueeze(1) * sig.unsqueeze(0)) * G.square()).sum()
        ctx.save_for_backward(P[:B], G[:B], U, sig, sign, scale)
        return (c0 + 2 * term2 + term3) * scale

    @staticmethod
    def backward(ctx, grad):
        P_cur, G_cur, U, sig, sign, scale = ctx.saved_tensors
        d_cur = (P_cur + (G_cur * sig) @ U) * sign * (4 * grad * scale)
        return d_cur, None, None, None, None, None


def sum_sq(K: torch.Tensor, ds: int) -> torch.Tensor:
    """``|K_ss|^2 + |K_tt|^2 - 2 |K_st|^2`` (K symmetric, the student block first)."""
    ss, tt, st = K[:ds, :ds], K[ds:, ds:], K[:ds, ds:]
    return ss.square().sum() + tt.square().sum() - 2 * st.square().sum()


class InterGramCache:
    """``K_base`` of one ``ICAKDLoss`` and the bank stamps it was built at (a plain object, not a
    module: ``torch.compile`` may set its attributes without guarding on them)."""

    def __init__(self, min_count: int, eps: float):
        self.min_count = min_count
        self.eps = eps
        self.K: torch.Tensor | None = None
        self.c0: torch.Tensor | None = None  # tr(S K S K), 0-dim, on K's device
        self.stamp: tuple | None = None

    def invalidate(self) -> None:
        """Forget ``K_base``: the next forward rebuilds it from the banks."""
        self.K = None
        self.c0 = None
        self.stamp = None

    # ------------------------------------------------------------------ bank rows

    def _key(self, bank_s, bank_t):
        return (bank_s.stamp, bank_t.stamp, bank_s.sums.device)

    @staticmethod
    def _bank_mu(bank, idx):
        """Bank centroids ``sums / max(count, 1)`` of the classes ``idx`` (in the float32 of the
        sums, as ``class_centroids`` computes them for a class without batch rows) and counts."""
        sums, count = bank.sums.index_select(0, idx), bank.count.index_select(0, idx)
        return sums / count.clamp(min=1).unsqueeze(1).to(sums.dtype), count

    def base_rows(self, bank_s, bank_t, idx, keep):
        """float64 rows of the bank centroids of ``idx``, zero where ``keep`` (if given) is False
        or the class is not valid on the bank alone."""
        mu_s, n_s = self._bank_mu(bank_s, idx)
        mu_t, n_t = self._bank_mu(bank_t, idx)
        valid = (n_s >= self.min_count) & (n_t >= self.min_count)
        if keep is not None:
            valid = valid & keep
        return rows64(mu_s, mu_t, valid, self.eps)

    # ------------------------------------------------------------------ K_base

    def ensure(self, bank_s, bank_t) -> None:
        """Make ``K_base`` (and ``c0``) those of the banks' current contents: rebuilt (O(C D^2))
        if they changed outside ``update``."""
        key = self._key(bank_s, bank_t)
        # a None stamp (a bank changed under torch.compile) matches nothing
        if self.K is None or None in key[:2] or self.stamp != key:
            # normal tensors even when called under torch.inference_mode (e.g. a validation
            # pass): the training steps after it update them in place
            with torch.inference_mode(False):
                self.K = self._build(bank_s, bank_t)
                self.c0 = sum_sq(self.K, bank_s.sums.shape[1])
            self.stamp = key

    @torch.no_grad()
    def _build(self, bank_s, bank_t) -> torch.Tensor:
        C = bank_s.sums.shape[0]
        D = bank_s.sums.shape[1] + bank_t.sums.shape[1]
        K = torch.zeros(D, D, dtype=torch.float64, device=bank_s.sums.device)
        step = max(1, _CHUNK_ELEMS // D)
        for r0 in range(0, C, step):
            idx = torch.arange(r0, min(C, r0 + step), device=K.device)
            A = self.base_rows(bank_s, bank_t, idx, None)
            K.addmm_(A.t(), A)
        return K

    @torch.no_grad()
    def update(self, bank_s, bank_t, idx, keep, before: torch.Tensor) -> None:
        """After an enqueue that may have changed only the classes ``idx`` (``keep``: their
        first occurrences), whose rows were ``before``: bring ``K_base`` up to date."""
        if self.K is None:
            return
        after = self.base_rows(bank_s, bank_t, idx, keep)
        # one rank-2n product: [after; before]^T [after; -before]
        self.K.addmm_(torch.cat([after, before]).t(), torch.cat([after, -before]))
        self.c0.copy_(sum_sq(self.K, bank_s.sums.shape[1]))  # in place: CUDA graphs replay it
        self.stamp = self._key(bank_s, bank_t)

    # ------------------------------------------------------------------ loss

    def loss(self, bank_s, bank_t, mu_s_rows, mu_t_rows, valid_rows, labels, first, n_valid):
        """Inter loss with the batch's classes live, from ``K_base`` (``ensure`` first).
        ``mu_s_rows``/``mu_t_rows`` [B, D*]: this
        step's centroids of the classes ``labels`` (``mu_s_rows`` carrying gradient),
        ``valid_rows`` [B] their validity, ``first`` [B] the first occurrence of each class,
        ``n_valid`` the number of valid classes (0-dim)."""
        acc = torch.float64 if torch.float64 in (mu_s_rows.dtype, mu_t_rows.dtype) else torch.float32
        with torch.no_grad():
            old = self.base_rows(bank_s, bank_t, labels, first)
        cur = rows64(mu_s_rows, mu_t_rows, valid_rows & first, self.eps)
        sign = column_signs(mu_s_rows.shape[1], cur.shape[1], cur.device)
        nv = n_valid.to(torch.float64)
        scale = 1.0 / (nv * nv).clamp(min=1)
        return _LowRankInter.apply(cur, old, self.K, self.c0, sign, scale).to(acc)
