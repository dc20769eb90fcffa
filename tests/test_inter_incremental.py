"""ICAKDLoss's incremental Gram form of the inter loss against the full form, step by step."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from icakd_fast import ICAKDLoss, reference
from icakd_fast._inter_gram import InterGramCache, batch_centroids, first_occurrence, first_positions

C, DS, DT, B = 13, 6, 5, 10


def batch(seed, n=B):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(n, DS, 3, 3, generator=g).relu().requires_grad_()
    zs = torch.randn(n, C, generator=g).requires_grad_()
    ft = torch.randn(n, DT, 2, 2, generator=g).relu()
    zt = torch.randn(n, C, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    ws = torch.randn(C, DS, generator=g).requires_grad_()
    wt = torch.randn(C, DT, generator=g)
    return fs, zs, ft, zt, y, ws, wt


def pair(**kw):
    """The same module twice: incremental Gram form on, and off (the backend's op)."""
    inc = ICAKDLoss(C, DS, DT, incremental_inter=True, **kw)
    full = ICAKDLoss(C, DS, DT, incremental_inter=False, **kw)
    full.load_state_dict(inc.state_dict())
    return inc, full


def fresh_gram(mod):
    """K_base built from scratch from the module's banks."""
    return InterGramCache(mod.min_count, reference.NORM_EPS)._build(mod.bank_s, mod.bank_t)


def step_both(inc, full, seed, msg=""):
    x1, x2 = batch(seed), batch(seed)
    o1, o2 = inc(*x1), full(*x2)
    for k in o2.parts:
        torch.testing.assert_close(o1.parts[k], o2.parts[k], rtol=2e-5, atol=1e-7, msg=lambda m: f"{k} {msg}\n{m}")
    torch.testing.assert_close(o1.loss, o2.loss, rtol=2e-5, atol=1e-7, msg=lambda m: f"loss {msg}\n{m}")
    if torch.is_grad_enabled():
        o1.loss.backward()
        o2.loss.backward()
        for name, a, b in (("student_features", x1[0], x2[0]), ("student_logits", x1[1], x2[1]),
                           ("student_fc_weight", x1[5], x2[5]),
                           ("projector", inc.projector.weight, full.projector.weight)):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} gradient {msg}\n{m}")
        inc.zero_grad()
        full.zero_grad()
    return o1


@pytest.mark.parametrize("kw", [
    dict(slots_per_class=2, resync_every=3, min_count=2),
    dict(slots_per_class=3, resync_every=0, bank_dtype=torch.float16),
    dict(slots_per_class=2, resync_every=4, correct_only=True, bank_dtype=torch.bfloat16),
], ids=["resync-min2", "fp16-noresync", "bf16-correct-only"])
def test_training_steps_match_the_full_form_and_the_gram_matrix_does_not_drift(kw):
    inc, full = pair(**kw)
    for step in range(14):  # 14 x 10 rows over 13 classes x 2-3 slots: every ring wraps
        step_both(inc, full, step, msg=f"step {step}")
        assert inc._inter_gram.K is not None
        # the updated K_base is the Gram matrix of the banks as they are now
        torch.testing.assert_close(inc._inter_gram.K, fresh_gram(inc), rtol=0, atol=1e-12)
    for (k, a), (_, b) in zip(inc.state_dict().items(), full.state_dict().items()):
        if a.is_floating_point():
            # the full form normalises the rows inside the structure op, the incremental form with
            # F.normalize: the stored rows agree up to that rounding
            torch.testing.assert_close(a, b, msg=k)
        else:
            assert torch.equal(a, b), k


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_every_backend_matches_its_own_full_form(backend):
    """The intra loss over row-indexed centroids and the inter loss through each backend's ops."""
    from icakd_fast._backend import is_available

    if not is_available(backend, "intra", "cpu"):
        pytest.skip(f"backend {backend} cannot run on this machine")
    inc, full = pair(slots_per_class=2, resync_every=3, backend=backend)
    for step in range(4):
        step_both(inc, full, step, msg=f"{backend} step {step}")


def test_changes_made_outside_the_loss_rebuild_the_gram_matrix():
    inc, full = pair(slots_per_class=2, resync_every=3)
    step_both(inc, full, 0)
    extra = batch(100)
    fe = torch.nn.functional.normalize(torch.randn(B, DT), dim=1)
    for mod in (inc, full):  # a direct enqueue
        mod.bank_s.enqueue(fe, extra[4])
        mod.bank_t.enqueue(fe.flip(1), extra[4])
    step_both(inc, full, 1, "after a direct enqueue")
    for mod in (inc, full):
        mod.bank_s.sums.mul_(1.5)  # out of sync on purpose, then resync() repairs it
        mod.bank_s.resync()
    step_both(inc, full, 2, "after resync()")
    other = ICAKDLoss(C, DS, DT, slots_per_class=2, resync_every=3)
    for s in range(3):
        other(*batch(50 + s))
    for mod in (inc, full):
        mod.load_state_dict(other.state_dict())
    step_both(inc, full, 3, "after load_state_dict")
    inc.eval()
    full.eval()
    with torch.no_grad():
        step_both(inc, full, 4, "eval mode (no enqueue)")
    for mod in (inc, full):
        mod.bank_s.resync()
    with torch.inference_mode():  # a validation pass rebuilds K_base (stale after resync())
        step_both(inc, full, 4, "under inference_mode")
    inc.train()
    full.train()
    step_both(inc, full, 4, "training after inference_mode")  # K_base is updated in place
    for mod in (inc, full):
        mod.to("cpu", torch.float32)
        mod.bank_t.reset()
    step_both(inc, full, 5, "after .to() and reset()")
    step_both(inc, full, 6)


def test_the_stamps_are_what_keeps_the_cache_right(monkeypatch):
    """With the stamps frozen, a direct enqueue goes unseen and the losses part: the check above
    can fail."""
    from icakd_fast.memory import _BankBase

    inc, full = pair(slots_per_class=2, resync_every=0)
    step_both(inc, full, 0)
    monkeypatch.setattr(_BankBase, "_renew_stamp", lambda self: None)
    fe = torch.nn.functional.normalize(torch.randn(3 * B, DT), dim=1)
    ye = torch.arange(3 * B) % C
    for mod in (inc, full):
        mod.bank_s.enqueue(fe, ye)
    with pytest.raises(AssertionError):
        step_both(inc, full, 1)
    inc.reset_inter_cache()  # what a caller does after writing bank buffers by hand
    step_both(inc, full, 2, "after reset_inter_cache()")


def test_near_cancellation_is_accurate():
    """Student relations within 1e-4 of the teacher's: the three Gram norms cancel to ~1e-8 of
    their size; the float64 form still matches a float64 oracle."""
    mod = ICAKDLoss(C, DT, DT, incremental_inter=True, slots_per_class=2, resync_every=0)
    bs, bt = mod.bank_s, mod.bank_t
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        f = torch.nn.functional.normalize(torch.randn(B, DT, generator=g), dim=1)
        y = torch.randint(0, C, (B,), generator=g)
        bt.enqueue(f, y)
        bs.enqueue(f + 1e-4 * torch.randn(B, DT, generator=g), y)
    mod._inter_gram.ensure(bs, bt)
    y = torch.randint(0, C, (B,), generator=g)
    f_t = torch.nn.functional.normalize(torch.randn(B, DT, generator=g), dim=1)
    f_s = f_t + 1e-4 * torch.randn(B, DT, generator=g)
    slot = first_positions(y, C)
    first = slot == torch.arange(B)
    mu_s, n_s = batch_centroids(bs.sums, bs.count, f_s, y, None, slot)
    mu_t, n_t = batch_centroids(bt.sums, bt.count, f_t, y, None, slot)
    valid = (n_s >= 1) & (n_t >= 1)
    got = mod._inter_gram.loss(bs, bt, mu_s, mu_t, valid[y], y, first, valid.sum())
    full_s, _ = reference.class_centroids(bs.sums, bs.count, f_s, y)
    full_t, _ = reference.class_centroids(bt.sums, bt.count, f_t, y)
    want = reference.inter_class_loss(full_s.double(), full_t.double(), valid)
    assert 0 < want.item() < 1e-6
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_batch_centroids_are_class_centroids_at_the_labels():
    g = torch.Generator().manual_seed(3)
    sums, counts = torch.randn(C, DT, generator=g), torch.randint(0, 4, (C,), generator=g)
    f = torch.randn(B, DT, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (B,), generator=g)
    keep = torch.rand(B, generator=g) > 0.3
    rows, total = batch_centroids(sums, counts, f, y, keep, first_positions(y, C))
    # ICAKDLoss's correct_only centroids over all C: rows outside keep drop out of sum and count
    want_total = counts + torch.zeros_like(counts).index_add_(0, y, keep.long())
    batch = torch.zeros(C, DT, dtype=torch.float64).index_add(0, y, f * keep.unsqueeze(1).double())
    full = (sums.double() + batch) / want_total.clamp(min=1).unsqueeze(1).double()
    torch.testing.assert_close(rows, full[y])
    assert torch.equal(total, want_total)
    assert rows.dtype == torch.float64
    torch.autograd.gradcheck(lambda x: batch_centroids(sums.double(), counts, x, y, keep, first_positions(y, C))[0],
                             (f,))


def test_low_rank_loss_equals_the_formed_gram_matrix_and_gradchecks():
    from icakd_fast._inter_gram import _LowRankInter, column_signs, sum_sq

    g = torch.Generator().manual_seed(5)
    ds, dt, n_base, b = 4, 6, 30, 5
    A = torch.randn(n_base, ds + dt, generator=g, dtype=torch.float64)
    K_base = A.t() @ A
    c0 = sum_sq(K_base, ds)
    cur = torch.randn(b, ds + dt, generator=g, dtype=torch.float64, requires_grad=True)
    old = torch.randn(b, ds + dt, generator=g, dtype=torch.float64)
    sign = column_signs(ds, ds + dt, "cpu")
    scale = torch.tensor(0.37, dtype=torch.float64)
    got = _LowRankInter.apply(cur, old, K_base, c0, sign, scale)
    want = sum_sq(K_base + cur.t() @ cur - old.t() @ old, ds) * scale
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (g_got,) = torch.autograd.grad(got, cur)
    (g_want,) = torch.autograd.grad(want, cur)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    torch.autograd.gradcheck(lambda x: _LowRankInter.apply(x, old, K_base, c0, sign, scale), (cur,))


def test_first_occurrence():
    idx = torch.tensor([3, 1, 3, 0, 1, 1, 7])
    assert first_occurrence(idx, 8).tolist() == [True, True, False, True, False, False, True]
    assert first_occurrence(torch.zeros(0, dtype=torch.int64), 4).tolist() == []


def test_automatic_choice_and_arguments():
    cpu = torch.device("cpu")
    assert not ICAKDLoss(C, DS, DT)._incremental(cpu, 2)  # 13 < 2 * 2 * 5
    assert ICAKDLoss(40, DS, DT)._incremental(cpu, 10)  # 40 >= 20 and 40 >= 4 * 10
    assert not ICAKDLoss(40, DS, DT)._incremental(cpu, 11)  # 40 < 4 * 11: the batch is too large a part
    assert ICAKDLoss(40, DS, DT, incremental_inter=True)._incremental(cpu, 11)
    assert not ICAKDLoss(40, DS, DT, incremental_inter=False)._incremental(cpu, 10)
    assert not ICAKDLoss(40, DS, DT, bank="fifo")._incremental(cpu, 10)
    assert not ICAKDLoss(40, DS, DT, method="cskd")._incremental(cpu, 10)
    with pytest.raises(ValueError, match="incremental_inter"):
        ICAKDLoss(C, DS, DT, bank="fifo", incremental_inter=True)
    with pytest.raises(ValueError, match="incremental_inter"):
        ICAKDLoss(C, DS, DT, incremental_inter="yes")


def test_compiled_steps_take_the_op_and_eager_steps_after_them_rebuild():
    import torch._dynamo as dynamo

    dynamo.reset()
    inc, full = pair(slots_per_class=2, resync_every=3)
    step_both(inc, full, 0)
    compiled = torch.compile(inc, fullgraph=True, backend="aot_eager")
    with dynamo.config.patch(error_on_recompile=True):
        for step in range(1, 4):
            x1, x2 = batch(step), batch(step)
            o1, o2 = compiled(*x1), full(*x2)
            torch.testing.assert_close(o1.loss, o2.loss, rtol=2e-5, atol=1e-7)
            o1.loss.backward()
            o2.loss.backward()
            inc.zero_grad()
            full.zero_grad()
    assert inc.bank_s.stamp is None  # changed under compile: unknown
    for step in range(4, 7):  # eager again: K_base is rebuilt, then kept up to date
        step_both(inc, full, step, msg=f"eager step {step}")
        torch.testing.assert_close(inc._inter_gram.K, fresh_gram(inc), rtol=0, atol=1e-12)


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)  # the same projector on both ranks
    mod = ICAKDLoss(C, DS, DT, incremental_inter=True, slots_per_class=2, resync_every=3)
    for step in range(4):
        x = batch(10 * step + rank, n=4 + 2 * rank)  # each rank its own classes, uneven sizes
        mod(*x).loss.backward()
    torch.save({"K": mod._inter_gram.K, "fresh": fresh_gram(mod), "banks": mod.state_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)  # no process-group teardown (see test_memory.py)


def test_ddp_gloo_two_ranks_track_every_ranks_classes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for r in (r0, r1):
        torch.testing.assert_close(r["K"], r["fresh"], rtol=0, atol=1e-12)
    torch.testing.assert_close(r0["K"], r1["K"], rtol=0, atol=1e-12)
    for k in r0["banks"]:
        assert torch.equal(r0["banks"][k], r1["banks"][k]), k
