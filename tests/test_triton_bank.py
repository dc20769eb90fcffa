"""Triton memory-bank kernels: equality with the reference bank, determinism, resync, FIFO."""

import pytest
import torch

import icakd_fast.reference as R
from icakd_fast import ClassMemoryBank, FIFOMemoryBank
from icakd_fast._backend import is_available

from helpers import noncontig

pytestmark = pytest.mark.skipif(not is_available("triton", "class_bank", "cpu") and not torch.cuda.is_available(),
                                reason="triton backend unavailable")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
impl = pytest.importorskip("icakd_fast.ops._triton_impl")


def _state(C, S, D, dtype):
    return (torch.zeros(C, S, D, dtype=dtype, device=DEV), torch.zeros(C, dtype=torch.int64, device=DEV),
            torch.zeros(C, dtype=torch.int64, device=DEV), torch.zeros(C, D, dtype=torch.float32, device=DEV))


def _batch(gen, n, C, D, fdtype, bad_labels=True):
    x = torch.randn(n, D, generator=gen).to(fdtype).to(DEV)
    lo, hi = (-1, C + 1) if bad_labels else (0, C)
    # few classes so that several rows share a class and some classes overflow their slots
    y = torch.randint(lo, hi, (n,), generator=gen).to(DEV)
    m = (torch.rand(n, generator=gen) > 0.2).to(DEV)
    return x, y, m


@pytest.mark.parametrize("bank_dtype,feat_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                   (torch.float32, torch.float16)])
@pytest.mark.parametrize("C,S,D", [(4, 3, 7), (1, 2, 5), (6, 1, 33)])
def test_class_bank_matches_reference(bank_dtype, feat_dtype, C, S, D):
    gen = torch.Generator().manual_seed(C * 100 + S * 10 + D)
    tri, ref = _state(C, S, D, bank_dtype), _state(C, S, D, bank_dtype)
    for step in range(7):
        n = int(torch.randint(1, 14, (1,), generator=gen))
        x, y, m = _batch(gen, n, C, D, feat_dtype)
        if step % 3 == 1:
            x = noncontig(x)
        impl.class_bank_enqueue_(*tri, x, y, m)
        R.class_bank_enqueue_(*ref, x, y, m)
        for name, a, b in zip(("bank", "count", "ptr"), tri[:3], ref[:3]):
            assert torch.equal(a, b), f"{name} differs at step {step}"
        torch.testing.assert_close(tri[3], ref[3], rtol=1e-6, atol=1e-6)
    # the running sums equal the exact float32 sums of the stored rows
    exact = tri[3].clone()
    R.class_bank_resync_(tri[0], tri[1], exact, torch.arange(C, device=DEV))
    torch.testing.assert_close(tri[3], exact, rtol=1e-5, atol=1e-5)


def test_class_bank_is_deterministic():
    gen = torch.Generator().manual_seed(3)
    C, S, D = 5, 4, 19
    a, b = _state(C, S, D, torch.float16), _state(C, S, D, torch.float16)
    for _ in range(6):
        x, y, m = _batch(gen, 25, C, D, torch.float32, bad_labels=False)
        impl.class_bank_enqueue_(*a, x, y, m)
        impl.class_bank_enqueue_(*b, x, y, m)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_class_bank_overflowing_class_keeps_last_rows():
    C, S, D = 3, 4, 6
    st = _state(C, S, D, torch.float32)
    x = torch.arange(10 * D, dtype=torch.float32, device=DEV).view(10, D)
    y = torch.ones(10, dtype=torch.int64, device=DEV)
    impl.class_bank_enqueue_(*st, x, y, torch.ones(10, dtype=torch.bool, device=DEV))
    bank, count, ptr, sums = st
    assert count.tolist() == [0, 4, 0] and ptr.tolist() == [0, 0, 0]
    # rows 6..9 in slots (0 + r - 6) % 4 -> 0,1,2,3
    assert torch.equal(bank[1], x[6:])
    torch.testing.assert_close(sums[1], x[6:].sum(0))


def test_class_bank_empty_and_all_masked_are_noops():
    st = _state(3, 2, 4, torch.float32)
    before = [t.clone() for t in st]
    impl.class_bank_enqueue_(*st, torch.randn(0, 4, device=DEV), torch.zeros(0, dtype=torch.int64, device=DEV),
                             torch.zeros(0, dtype=torch.bool, device=DEV))
    impl.class_bank_enqueue_(*st, torch.randn(5, 4, device=DEV), torch.zeros(5, dtype=torch.int64, device=DEV),
                             torch.zeros(5, dtype=torch.bool, device=DEV))
    for u, v in zip(st, before):
        assert torch.equal(u, v)


def test_resync_recomputes_selected_classes():
    gen = torch.Generator().manual_seed(1)
    C, S, D = 5, 3, 9
    st = _state(C, S, D, torch.float16)
    x, y, m = _batch(gen, 20, C, D, torch.float32, bad_labels=False)
    impl.class_bank_enqueue_(*st, x, y, m)
    bank, count, ptr, sums = st
    sums.add_(1.0)  # drift
    ref = sums.clone()
    cls = torch.tensor([4, 0, 2], device=DEV)
    impl.class_bank_resync_(bank, count, sums, cls)
    R.class_bank_resync_(bank, count, ref, cls)
    torch.testing.assert_close(sums, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(sums[1], ref[1])  # untouched class keeps its (drifted) value


@pytest.mark.parametrize("size,D", [(5, 7), (1, 3), (16, 40)])
def test_fifo_bank_matches_reference(size, D):
    gen = torch.Generator().manual_seed(size * 7 + D)
    C = 4
    tri = (torch.zeros(size, D, device=DEV), torch.full((size,), -1, dtype=torch.int64, device=DEV),
           torch.zeros((), dtype=torch.int64, device=DEV))
    ref = tuple(t.clone() for t in tri)
    for step in range(6):
        n = int(torch.randint(1, 2 * size + 3, (1,), generator=gen))
        x = torch.randn(n, D, generator=gen).to(DEV)
        y = torch.randint(-1, C, (n,), generator=gen).to(DEV)
        m = (torch.rand(n, generator=gen) > 0.25).to(DEV)
        impl.fifo_bank_enqueue_(*tri, x, y, m)
        R.fifo_bank_enqueue_(*ref, x, y, m)
        for a, b in zip(tri, ref):
            assert torch.equal(a, b), f"step {step}"
        s1, c1 = impl.fifo_bank_sums(tri[0], tri[1], C)
        s2, c2 = R.fifo_bank_sums(ref[0], ref[1], C)
        assert torch.equal(c1, c2)
        torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_memory_modules_match_reference_backend(dtype):
    gen = torch.Generator().manual_seed(11)
    C, S, D = 6, 3, 12
    a = ClassMemoryBank(C, S, D, dtype=dtype, resync_every=4, backend="triton", device=DEV)
    b = ClassMemoryBank(C, S, D, dtype=dtype, resync_every=4, backend="reference", device=DEV)
    fa = FIFOMemoryBank(10, D, C, dtype=dtype, backend="triton", device=DEV)
    fb = FIFOMemoryBank(10, D, C, dtype=dtype, backend="reference", device=DEV)
    for _ in range(6):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        x = torch.randn(n, D, generator=gen).to(DEV)
        y = torch.randint(0, C, (n,), generator=gen).to(DEV)
        m = (torch.rand(n, generator=gen) > 0.2).to(DEV)
        for bank in (a, b, fa, fb):
            bank.enqueue(x, y, m)
        assert torch.equal(a.bank, b.bank) and torch.equal(a.count, b.count) and torch.equal(a.ptr, b.ptr)
        torch.testing.assert_close(a.sums, b.sums, rtol=1e-5, atol=1e-5)
        assert torch.equal(fa.bank, fb.bank) and torch.equal(fa.labels, fb.labels) and torch.equal(fa.ptr, fb.ptr)
        sa, ca = fa.sums_counts()
        sb, cb = fb.sums_counts()
        assert torch.equal(ca, cb)
        torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-5)
