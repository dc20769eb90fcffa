"""``ICAKDLoss`` over several training steps against an oracle of SPEC sections 2-6.

The oracle below imports nothing from the package. It is written in plain loops over rows,
classes, channels and pixels, with float64 tensors used only as number containers (elementwise
arithmetic and sums), and keeps its own bank history: a class ring buffer (per class ``S`` slots,
``ptr``, ``count``, the last ``S`` rows of a class that has more) and a FIFO ring buffer (labels
-1 = empty), updated in the SPEC's order: read the banks (previous batches only) -> losses ->
backward -> enqueue the batch. Its gradients come from autograd through those loops.

Every step compares each reported term, the total, the gradients of the student features,
logits, classifier weight and the projector, and the banks' contents. Tolerances are relative
(float32 package against the float64 oracle); a gradient the oracle says is non-zero must be
non-negligible, so that a zero gradient cannot pass. ``test_the_comparison_catches_a_wrong_step``
runs deliberately wrong oracles (swapped networks or labels in the enqueue, swapped centroids,
the current batch in the bank, no stop-gradient) and checks that each one fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

from icakd_fast import ICAKDLoss
from icakd_fast._backend import is_available

D64 = torch.float64
NORM_EPS = 1e-12  # SPEC: f = u / max(||u||, eps), q = vec / max(||vec||, eps)
MINMAX_EPS = 1e-7  # SPEC section 3

RTOL = 1e-4  # float32 package against the float64 oracle
PART_ATOL = 1e-7  # absolute floor of a reported term (a term the math says is zero)
GRAD_ATOL = 1e-5  # elementwise floor of a gradient, as a fraction of its largest entry
GRAD_FLOOR = 1e-6  # an oracle gradient smaller than this would make the comparison vacuous


# =============================================================================================
# the oracle (no package code)
# =============================================================================================


def _norm_floor(vec):
    """``max(||vec||, eps)`` with the subgradient of the max at the kink (no sqrt at zero)."""
    ss = (vec * vec).sum()
    if ss.item() <= NORM_EPS * NORM_EPS:
        return torch.tensor(NORM_EPS, dtype=D64)
    return ss.sqrt()


def _cam(maps, alpha):
    """``ReLU(sum_k alpha[k] * maps[k])`` for one image: maps [K,H,W], alpha [K]."""
    s = maps[0] * alpha[0]
    for k in range(1, maps.shape[0]):
        s = s + maps[k] * alpha[k]
    return s * (s > 0).to(D64)


def _adaptive_pool(cam, h, w):
    """Adaptive average pooling of one map [H,W] to [h,w] (bin i: rows floor(iH/h) .. ceil((i+1)H/h))."""
    H, W = cam.shape
    out = []
    for i in range(h):
        r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
        row = []
        for j in range(w):
            c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
            total = cam[r0, c0] * 0
            for r in range(r0, r1):
                for c in range(c0, c1):
                    total = total + cam[r, c]
            row.append(total / ((r1 - r0) * (c1 - c0)))
        out.append(torch.stack(row))
    return torch.stack(out)


def _cam_pooled(maps, cam):
    """``v[k] = sum_hw m * maps[k] / sum_hw m`` with the min-max normalised CAM ``m`` held
    constant; the plain spatial mean when ``sum m = 0``."""
    c = cam.detach()
    lo, hi = c.min().item(), c.max().item()
    m = (c - lo) / ((hi - lo) + MINMAX_EPS)
    den = m.sum().item()
    out = []
    for k in range(maps.shape[0]):
        if den > 0:
            out.append((m * maps[k]).sum() / den)
        else:
            out.append(maps[k].sum() / maps[k].numel())
    return torch.stack(out)


def _unit(vec):
    return vec / _norm_floor(vec)


def _log_softmax(row):
    mx = row.max().item()
    return row - (mx + (row - mx).exp().sum().log())


class OracleClassBank:
    """SPEC section 4, class ring buffer: per class ``S`` slots, ``ptr``, ``count``."""

    def __init__(self, num_classes, slots, dim, seen):
        self.C, self.S, self.D = num_classes, slots, dim
        self.seen = seen
        self.slots = [[None] * slots for _ in range(num_classes)]
        self.ptr = [0] * num_classes
        self.count = [0] * num_classes

    def sums_counts(self):
        sums = []
        for c in range(self.C):
            total = torch.zeros(self.D, dtype=D64)
            for row in self.slots[c]:
                if row is not None:
                    total = total + row
            sums.append(total)
        return sums, list(self.count)

    def enqueue(self, rows, labels, keep):
        for c in range(self.C):
            mine = [rows[b] for b in range(len(labels)) if keep[b] and labels[b] == c]
            n = len(mine)
            written = mine[n - self.S:] if n > self.S else mine
            if n > self.S:
                self.seen.add("ring_overflow")
            for r, row in enumerate(written):
                if self.slots[c][(self.ptr[c] + r) % self.S] is not None:
                    self.seen.add("ring_replace")
                self.slots[c][(self.ptr[c] + r) % self.S] = row.detach().clone()
            self.ptr[c] = (self.ptr[c] + len(written)) % self.S
            self.count[c] = min(self.count[c] + n, self.S)


class OracleFIFOBank:
    """SPEC section 4, FIFO ring buffer: ``size`` rows, labels -1 when empty, one pointer."""

    def __init__(self, size, dim, num_classes, seen):
        self.N, self.D, self.C = size, dim, num_classes
        self.seen = seen
        self.rows = [None] * size
        self.labels = [-1] * size
        self.ptr = 0

    def sums_counts(self):
        sums = [torch.zeros(self.D, dtype=D64) for _ in range(self.C)]
        counts = [0] * self.C
        for row, lab in zip(self.rows, self.labels):
            if lab >= 0:
                sums[lab] = sums[lab] + row
                counts[lab] += 1
        return sums, counts

    def enqueue(self, rows, labels, keep):
        i = 0
        for b in range(len(labels)):
            if keep[b]:
                pos = (self.ptr + i) % self.N
                if self.labels[pos] >= 0:
                    self.seen.add("fifo_replace")
                self.rows[pos] = rows[b].detach().clone()
                self.labels[pos] = int(labels[b])
                i += 1
        self.ptr = (self.ptr + i) % self.N


class Oracle:
    """The whole step of SPEC sections 2-6 for one configuration, with its own banks.

    ``mutation`` (tests only): a deliberately wrong variant, to show the comparison can fail.
    """

    def __init__(self, C, ds, dt, *, method="icakd", w_ce=1.0, w_kd=1.0, tau=4.0, w_cam=None, w_intra=1.0,
                 w_inter=1.0, bank="auto", slots_per_class=16, bank_size=None, cam_weighting=None,
                 target="label", correct_only=False, min_count=1, mutation=None, **_ignored):
        self.C, self.ds, self.dt = C, ds, dt
        self.method = method
        self.w = dict(ce=w_ce, kd=w_kd, cam=w_cam, intra=w_intra, inter=w_inter)
        self.tau = tau
        self.use_kd = method in ("kd", "cskd", "icakd")
        self.use_structure = method in ("cskd", "icakd")
        self.use_cam_loss = method == "icakd" and w_cam != 0
        self.cam_weighting = (method == "icakd") if cam_weighting is None else cam_weighting
        self.target, self.correct_only, self.min_count = target, correct_only, min_count
        self.mutation = mutation
        #: what the steps went through (rings that wrapped, masked rows, classes outside V, ...)
        self.seen = set()
        if bank == "auto":
            bank = "class" if method == "icakd" else None
        self.banks = None
        if self.use_structure and bank == "class":
            self.banks = tuple(OracleClassBank(C, slots_per_class, dt, self.seen) for _ in range(2))
        elif self.use_structure and bank == "fifo":
            size = bank_size or C * slots_per_class
            self.banks = tuple(OracleFIFOBank(size, dt, C, self.seen) for _ in range(2))

    # ------------------------------------------------------------------------------ losses

    def _ce_kd(self, zs, zt, y):
        B = zs.shape[0]
        ce = zs.sum() * 0
        kd = zs.sum() * 0
        for b in range(B):
            ce = ce - _log_softmax(zs[b])[int(y[b])]
            if self.use_kd:
                log_ps = _log_softmax(zs[b] / self.tau)
                log_pt = _log_softmax(zt[b] / self.tau)
                kd = kd + (log_pt.exp() * (log_pt - log_ps)).sum()
        return ce / B, kd / B * self.tau * self.tau

    def _bank_part(self, net):
        if self.banks is None:
            return [torch.zeros(self.dt, dtype=D64) for _ in range(self.C)], [0] * self.C
        return self.banks[net].sums_counts()

    def _centroids(self, sums, counts, f, y, keep):
        mus, totals = [], []
        for c in range(self.C):
            total = sums[c]
            n = counts[c]
            for b in range(len(y)):
                if y[b] == c and keep[b]:
                    total = total + f[b]
                    n += 1
            mus.append(total / n if n > 0 else total * 0)
            totals.append(n)
        return mus, totals

    def step(self, fs, zs, ft, zt, y, ws, wt, proj):
        """Losses and the student gradients of one training step; then the enqueue."""
        fs, zs, ws, proj = (t.detach().to(D64).requires_grad_() for t in (fs, zs, ws, proj))
        ft, zt, wt = (t.detach().to(D64) for t in (ft, zt, wt))
        y = [int(v) for v in y]
        B = len(y)
        parts = {}
        ce, kd = self._ce_kd(zs, zt, y)
        parts["ce"] = ce
        if self.use_kd:
            parts["kd"] = kd
        if self.use_structure:
            f_s, f_t, cam_loss = self._features(fs, ft, zt, y, ws, wt, proj)
            if cam_loss is not None:
                parts["cam"] = cam_loss
            keep_s = [True] * B
            keep_t = [True] * B
            if self.correct_only:
                keep_s = [int(torch.argmax(zs[b].detach())) == y[b] for b in range(B)]
                keep_t = [int(torch.argmax(zt[b])) == y[b] for b in range(B)]
                if not all(keep_s) and not all(keep_t):
                    self.seen.add("masked_rows")
            if self.mutation == "current_batch_in_bank":
                self._enqueue(f_s, f_t, y, keep_s, keep_t)
            sums_s, counts_s = self._bank_part(0)
            sums_t, counts_t = self._bank_part(1)
            mu_s, n_s = self._centroids(sums_s, counts_s, f_s, y, keep_s)
            mu_t, n_t = self._centroids(sums_t, counts_t, f_t, y, keep_t)
            if self.mutation == "swap_centroids":
                mu_s, mu_t = mu_t, mu_s
            valid = [n_s[c] >= self.min_count and n_t[c] >= self.min_count for c in range(self.C)]
            for c in range(self.C):
                if c in y and not valid[c]:
                    self.seen.add("batch_class_not_valid")
                if c not in y and valid[c]:
                    self.seen.add("bank_only_class_valid")
            parts["intra"] = self._intra(f_s, f_t, mu_s, mu_t, y, valid)
            parts["inter"] = self._inter(mu_s, mu_t, valid)
            if self.mutation != "current_batch_in_bank":
                self._enqueue(f_s, f_t, y, keep_s, keep_t)
        w = dict(self.w)
        if w["cam"] is None:
            w["cam"] = 1000.0 / (fs.shape[2] * fs.shape[3])
        loss = sum(w[k] * v for k, v in parts.items())
        leaves = (fs, zs, ws, proj)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        names = ("student_features", "student_logits", "student_fc_weight", "projector")
        return ({k: v.detach() for k, v in parts.items()}, loss.detach(), dict(zip(names, grads)))

    def _features(self, fs, ft, zt, y, ws, wt, proj):
        B = len(y)
        hs, ws_ = fs.shape[2], fs.shape[3]
        ht, wt_ = ft.shape[2], ft.shape[3]
        cam_loss = None
        v_s, v_t = [], []
        cams = []
        if self.cam_weighting or self.use_cam_loss:
            for b in range(B):
                c = int(torch.argmax(zt[b])) if self.target == "teacher" else y[b]
                if c != y[b]:
                    self.seen.add("target_not_label")
                alpha_s = ws[c] / (hs * ws_)
                alpha_t = wt[c] / (ht * wt_)
                cams.append((_cam(fs[b], alpha_s), _cam(ft[b], alpha_t)))
        if self.use_cam_loss:
            h, w = min(hs, ht), min(ws_, wt_)
            total = fs.sum() * 0
            for cam_s, cam_t in cams:
                if cam_s.shape != (h, w):
                    cam_s = _adaptive_pool(cam_s, h, w)
                if cam_t.shape != (h, w):
                    cam_t = _adaptive_pool(cam_t, h, w)
                d = _unit(cam_s.flatten()) - _unit(cam_t.flatten())
                total = total + (d * d).sum()
            cam_loss = total / B
        for b in range(B):
            if self.cam_weighting:
                if cams[b][0].max().item() == 0:
                    self.seen.add("zero_map_spatial_mean")
                v_s.append(_cam_pooled(fs[b], cams[b][0]))
                v_t.append(_cam_pooled(ft[b], cams[b][1]))
            else:
                v_s.append(torch.stack([fs[b, k].sum() / (hs * ws_) for k in range(fs.shape[1])]))
                v_t.append(torch.stack([ft[b, k].sum() / (ht * wt_) for k in range(ft.shape[1])]))
        f_s, f_t = [], []
        for b in range(B):
            u = torch.stack([(proj[j] * v_s[b]).sum() for j in range(proj.shape[0])])
            f_s.append(_unit(u))
            f_t.append(_unit(v_t[b]))
        return f_s, f_t, cam_loss

    def _intra(self, f_s, f_t, mu_s, mu_t, y, valid):
        total = f_s[0].sum() * 0
        rows = 0
        for b in range(len(y)):
            if valid[y[b]]:
                mu_sb = mu_s[y[b]] if self.mutation == "no_stop_gradient" else mu_s[y[b]].detach()
                d = (f_s[b] - mu_sb) - (f_t[b] - mu_t[y[b]])
                total = total + (d * d).sum()
                rows += 1
        return total / rows if rows else total

    def _inter(self, mu_s, mu_t, valid):
        V = [c for c in range(self.C) if valid[c]]
        n_s = {c: _unit(mu_s[c]) for c in V}
        n_t = {c: _unit(mu_t[c]) for c in V}
        total = mu_s[0].sum() * 0
        for k in V:
            for l in V:
                d = (n_s[k] * n_s[l]).sum() - (n_t[k] * n_t[l]).sum()
                total = total + d * d
        return total / (len(V) * len(V)) if V else total

    def _enqueue(self, f_s, f_t, y, keep_s, keep_t):
        if self.banks is None:
            return
        f_s = [r.detach() for r in f_s]
        f_t = [r.detach() for r in f_t]
        if self.mutation == "swap_networks_in_enqueue":
            f_s, f_t = f_t, f_s
        labels = y[1:] + y[:1] if self.mutation == "permute_labels_in_enqueue" else y
        self.banks[0].enqueue(f_s, labels, keep_s)
        self.banks[1].enqueue(f_t, labels, keep_t)


# =============================================================================================
# the comparison
# =============================================================================================

C, DS, DT, B = 6, 3, 4, 8


def make_batch(step, hw_s=3, hw_t=3, correct_rate=0.5):
    """One step's inputs: labels that repeat (at least three rows of one class, so a 2-slot ring
    takes only its last rows), class C-1 never present, some rows classified correctly, an
    all-zero student map."""
    g = torch.Generator().manual_seed(1000 + step)
    y = torch.randint(0, C - 1, (B,), generator=g)
    y[:3] = int(torch.randint(0, C - 1, (1,), generator=g))
    fs = torch.randn(B, DS, hw_s, hw_s, generator=g).relu() + 0.05 * torch.rand(B, DS, hw_s, hw_s, generator=g)
    ft = torch.randn(B, DT, hw_t, hw_t, generator=g).relu() + 0.05 * torch.rand(B, DT, hw_t, hw_t, generator=g)
    onehot = torch.nn.functional.one_hot(y, C).float()
    right_s = (torch.rand(B, generator=g) < correct_rate).float().unsqueeze(1)
    right_t = (torch.rand(B, generator=g) < 0.7).float().unsqueeze(1)
    zs = torch.randn(B, C, generator=g) + 4.0 * onehot * right_s
    zt = torch.randn(B, C, generator=g) + 4.0 * onehot * right_t
    ws = torch.randn(C, DS, generator=g)
    wt = torch.randn(C, DT, generator=g)
    # a positive weight on every classifier row: no map is all zero by chance. An all-zero teacher
    # map makes the CAM term's gradient zero in exact arithmetic but leaves float32 rounding noise
    # of the size of its summands (w_cam / ||cam_s||), which no relative tolerance can judge.
    wt[:, 0] = wt[:, 0].abs() + 0.1
    ws[:, 0] = ws[:, 0].abs() + 0.1
    # ... except the student's maps of the last row's class: all zero (pooling falls back to the
    # spatial mean, and the CAM term sends them no gradient)
    ws[y[-1]] = -ws[y[-1]].abs()
    return fs, zs, ft, zt, y, ws, wt


def _close_part(name, got, want, where):
    got, want = float(got.detach()), float(want)
    assert abs(got - want) <= RTOL * abs(want) + PART_ATOL, f"{where}: {name} = {got!r}, the oracle says {want!r}"


def _close_grad(name, got, want, where):
    if want is None:  # the math has no path from the loss to this input
        assert got is None or bool((got == 0).all()), f"{where}: {name} has a gradient where the math has none"
        return
    scale = want.abs().max().item()
    assert scale > GRAD_FLOOR, f"{where}: the oracle's {name} gradient is negligible ({scale:.1e}): nothing is checked"
    assert got is not None, f"{where}: no {name} gradient"
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=GRAD_ATOL * scale,
                               msg=lambda m: f"{where}: {name} gradient\n{m}")


def _check_banks(mod, oracle, where):
    if oracle.banks is None:
        assert mod.bank_s is None and mod.bank_t is None
        return
    for net, bank, obank in ((0, mod.bank_s, oracle.banks[0]), (1, mod.bank_t, oracle.banks[1])):
        label = f"{where}: {'student' if net == 0 else 'teacher'} bank"
        sums, counts = bank.sums_counts()
        o_sums, o_counts = obank.sums_counts()
        assert counts.tolist() == o_counts, f"{label} counts {counts.tolist()} != oracle {o_counts}"
        torch.testing.assert_close(sums.double(), torch.stack(o_sums), rtol=RTOL, atol=1e-6,
                                   msg=lambda m: f"{label} sums\n{m}")
        if isinstance(obank, OracleClassBank):
            assert bank.ptr.tolist() == obank.ptr, f"{label} ptr {bank.ptr.tolist()} != oracle {obank.ptr}"
            for c in range(obank.C):
                for s in range(obank.S):
                    want = obank.slots[c][s]
                    if want is None:
                        continue  # an empty slot's content is not part of the state
                    torch.testing.assert_close(bank.bank[c, s].double(), want, rtol=RTOL, atol=1e-6,
                                               msg=lambda m: f"{label} class {c} slot {s}\n{m}")
        else:
            # rows and pointer may differ by a rotation when a batch keeps more than N rows (the
            # package writes the last N from the pointer on); what is stored, and so which row is
            # evicted next, is the same
            filled = sorted(int(v) for v in bank.labels if v >= 0)
            assert filled == sorted(v for v in obank.labels if v >= 0), f"{label} labels"


def run_steps(opts, *, steps=5, backend="reference", hw_t=3, mutation=None, lr=0.5, check_banks=True):
    """Drive ``ICAKDLoss`` and the oracle side by side for ``steps`` training steps."""
    mod = ICAKDLoss(C, DS, DT, backend=backend, **opts)
    oracle = Oracle(C, DS, DT, mutation=mutation, **opts)
    for step in range(steps):
        where = f"step {step}"
        fs, zs, ft, zt, y, ws, wt = make_batch(step, hw_t=hw_t)
        proj = mod.projector.weight.detach().clone() if mod.projector is not None else torch.zeros(DT, DS)
        want_parts, want_loss, want_grads = oracle.step(fs, zs, ft, zt, y, ws, wt, proj)

        leaves = [t.clone().requires_grad_() for t in (fs, zs, ws)]
        mod.zero_grad(set_to_none=True)
        out = mod(leaves[0], leaves[1], ft, zt, y, leaves[2], wt)
        out.loss.backward()
        assert set(out.parts) == set(want_parts), f"{where}: parts {sorted(out.parts)} != {sorted(want_parts)}"
        for k in want_parts:
            _close_part(k, out.parts[k], want_parts[k], where)
        _close_part("loss", out.loss, want_loss, where)
        got_grads = {
            "student_features": leaves[0].grad,
            "student_logits": leaves[1].grad,
            "student_fc_weight": leaves[2].grad,
            "projector": mod.projector.weight.grad if mod.projector is not None else None,
        }
        for name, want in want_grads.items():
            if name == "projector" and mod.projector is None:
                continue
            _close_grad(name, got_grads[name], want, where)
        if check_banks:
            _check_banks(mod, oracle, where)
        if mod.projector is not None:  # the projector moves between steps, as in training
            with torch.no_grad():
                mod.projector.weight -= lr * mod.projector.weight.grad
    return oracle.seen


def _backend_or_skip(backend):
    if not is_available(backend, "inter", "cpu") or not is_available(backend, "class_bank", "cpu"):
        pytest.skip(f"backend {backend} cannot run on CPU tensors here")


# (id, options, teacher map size): the class ring has 2 or 3 slots and the FIFO 7 rows, so that
# every bank wraps within the steps
CONFIGS = [
    ("class", dict(slots_per_class=2, incremental_inter=False), 3),
    ("class-incremental", dict(slots_per_class=2, incremental_inter=True), 3),
    ("fifo", dict(bank="fifo", bank_size=7), 3),
    ("correct-only", dict(slots_per_class=3, correct_only=True, incremental_inter=False), 3),
    ("correct-only-incremental", dict(slots_per_class=3, correct_only=True, incremental_inter=True), 3),
    ("correct-only-fifo", dict(bank="fifo", bank_size=7, correct_only=True), 3),
    ("min-count-2", dict(slots_per_class=2, min_count=2, incremental_inter=False), 3),
    ("min-count-2-incremental", dict(slots_per_class=2, min_count=2, incremental_inter=True), 3),
    ("min-count-2-fifo", dict(bank="fifo", bank_size=7, min_count=2), 3),
    ("target-teacher", dict(slots_per_class=2, target="teacher", w_cam=3.0), 3),
    ("no-cam-weighting", dict(slots_per_class=3, cam_weighting=False), 3),
    ("no-bank", dict(bank=None), 3),
    ("teacher-map-2x2", dict(slots_per_class=2, w_kd=0.5, w_intra=2.0, w_inter=3.0), 2),
    ("cskd", dict(method="cskd"), 3),
    ("cskd-class-bank", dict(method="cskd", bank="class", slots_per_class=2), 3),
]
# the interpreted Triton kernels are slow on CPU: a few configurations only
TRITON_CONFIGS = {"class", "correct-only-fifo", "min-count-2-incremental"}


def _cases():
    out = []
    for backend in ("reference", "cpp", "triton"):
        for name, opts, hw_t in CONFIGS:
            if backend == "triton" and name not in TRITON_CONFIGS:
                continue
            out.append(pytest.param(backend, opts, hw_t, id=f"{backend}-{name}"))
    return out


def _expected_events(opts):
    """What a configuration's steps must go through, or it does not test what its name says."""
    method = opts.get("method", "icakd")
    bank = opts.get("bank", "class" if method == "icakd" else None)
    want = set()
    if bank == "class":
        want |= {"ring_overflow", "ring_replace", "bank_only_class_valid"}
    if bank == "fifo":
        want |= {"fifo_replace", "bank_only_class_valid"}
    if opts.get("correct_only"):
        want |= {"masked_rows", "batch_class_not_valid"}
    if opts.get("min_count", 1) > 1:
        want.add("batch_class_not_valid")
    if opts.get("target") == "teacher":
        want.add("target_not_label")
    if method == "icakd" and opts.get("cam_weighting", True):
        want.add("zero_map_spatial_mean")
    return want


@pytest.mark.parametrize("backend,opts,hw_t", _cases())
def test_step_matches_the_oracle(backend, opts, hw_t):
    _backend_or_skip(backend)
    steps = 3 if backend == "triton" else 6
    seen = run_steps(opts, steps=steps, backend=backend, hw_t=hw_t)
    missing = _expected_events(opts) - seen
    assert not missing, f"the steps never went through {sorted(missing)}"


# (mutation, options, first step it can show in the losses: a wrong enqueue only changes what
# later steps read)
MUTATIONS = [
    ("swap_networks_in_enqueue", dict(slots_per_class=2), 1),
    ("permute_labels_in_enqueue", dict(slots_per_class=2), 1),
    ("permute_labels_in_enqueue", dict(bank="fifo", bank_size=7), 1),
    ("swap_centroids", dict(slots_per_class=2), 0),
    ("current_batch_in_bank", dict(slots_per_class=2), 0),
    ("no_stop_gradient", dict(slots_per_class=2), 1),  # at step 0 the centroid's own term sums to zero
]


@pytest.mark.parametrize("mutation,opts,first", MUTATIONS,
                         ids=[f"{m}-{o.get('bank', 'class')}" for m, o, _ in MUTATIONS])
def test_the_comparison_catches_a_wrong_step(mutation, opts, first):
    """A wrong oracle fails against the package, through the terms and gradients alone (without
    the bank-state check) and, for a wrong enqueue, through the bank state too: the comparison
    is not vacuous. The label permutation keeps every class's count, so only the sums (and
    what they feed) can tell."""
    with pytest.raises(AssertionError) as caught:
        run_steps(opts, steps=4, mutation=mutation, check_banks=False)
    step = int(caught.value.args[0].split(":")[0].split()[-1])
    assert step >= first, f"{mutation} failed at step {step}, before it can change anything: {caught.value}"
    if "enqueue" in mutation:
        with pytest.raises(AssertionError, match=r"^step 0: \w+ bank"):
            run_steps(opts, steps=1, mutation=mutation)


def test_oracle_sanity_on_a_hand_computed_case():
    """The oracle's own building blocks on numbers worked out by hand."""
    # one image, one channel: cam = relu(0.5 * [[2, -1], [0, 4]]) = [[1, 0], [0, 2]]
    maps = torch.tensor([[[2.0, -1.0], [0.0, 4.0]]], dtype=D64)
    cam = _cam(maps, torch.tensor([0.5], dtype=D64))
    assert cam.tolist() == [[1.0, 0.0], [0.0, 2.0]]
    # m = cam / (2 + 1e-7): pooled = sum m * maps / sum m = (2*1 + 4*2) / 3
    assert math.isclose(_cam_pooled(maps, cam)[0].item(), 10.0 / 3.0, rel_tol=1e-12)
    # adaptive pooling 3 -> 2 uses the overlapping bins [0, 2) and [1, 3)
    grid = torch.arange(9, dtype=D64).view(3, 3)
    assert _adaptive_pool(grid, 2, 2).tolist() == [[2.0, 3.0], [5.0, 6.0]]
    # class ring with 2 slots: three rows of one class keep the last two, ptr advances by 2
    bank = OracleClassBank(2, 2, 1, set())
    rows = [torch.tensor([float(v)], dtype=D64) for v in (1, 2, 3, 10)]
    bank.enqueue(rows, [0, 0, 0, 1], [True] * 4)
    assert bank.count == [2, 1] and bank.ptr == [0, 1]
    assert [r.item() for r in bank.slots[0]] == [2.0, 3.0]
    bank.enqueue(rows[:1], [0], [True])
    assert [r.item() for r in bank.slots[0]] == [1.0, 3.0] and bank.ptr[0] == 1
    # FIFO of 3: the fourth row replaces the oldest
    fifo = OracleFIFOBank(3, 1, 2, set())
    fifo.enqueue(rows, [0, 1, 0, 1], [True] * 4)
    sums, counts = fifo.sums_counts()
    assert counts == [1, 2] and sums[0].item() == 3.0 and sums[1].item() == 12.0
