"""The cpp backend's memory-bank kernels (CPU) against the reference: class ring buffer (enqueue,
running sums, resync) and FIFO buffer, bank semantics over many steps, determinism, storage
dtypes, non-contiguous inputs and the ``ClassMemoryBank``/``FIFOMemoryBank`` modules.

Skipped when the extension ``icakd_fast._C`` is not built.
"""

import pytest
import torch

from icakd_fast import _ext

if not _ext.load():
    pytest.skip(f"icakd_fast._C is not built: {_ext.reason()}", allow_module_level=True)

from icakd_fast import reference  # noqa: E402
from icakd_fast.ops import _cpp_impl as cpp  # noqa: E402

pytestmark = pytest.mark.cpp


def class_state(c, s, d, dtype):
    return (
        torch.zeros(c, s, d, dtype=dtype),
        torch.zeros(c, dtype=torch.int64),
        torch.zeros(c, dtype=torch.int64),
        torch.zeros(c, d, dtype=torch.float32),
    )


def clone_all(state):
    return tuple(t.clone() for t in state)


def random_batch(n, d, c, *, p_mask=0.2, out_of_range=False, skew=False, dtype=torch.float32):
    feats = torch.randn(n, d).to(dtype)
    if skew:  # a few classes get many rows (more than S)
        labels = torch.randint(0, min(c, 3), (n,))
    else:
        labels = torch.randint(0, c, (n,))
    if out_of_range and n > 2:
        labels[0] = c + 3
        labels[1] = -1
    mask = torch.rand(n) > p_mask
    return feats, labels, mask


def brute_force_class_bank(history, c, s, d, dtype):
    """Bank contents from the full history, one Python loop per batch and class: a class's kept
    rows of a batch (its last S if more) go to consecutive slots after its pointer."""
    bank = torch.zeros(c, s, d, dtype=dtype)
    count = torch.zeros(c, dtype=torch.int64)
    ptr = torch.zeros(c, dtype=torch.int64)
    for feats, labels, mask in history:
        for y in range(c):
            rows = [i for i in range(feats.shape[0]) if bool(mask[i]) and int(labels[i]) == y]
            for r, i in enumerate(rows[-s:]):
                bank[y, (int(ptr[y]) + r) % s] = feats[i].to(dtype)
            ptr[y] = (ptr[y] + min(len(rows), s)) % s
            count[y] = min(int(count[y]) + len(rows), s)
    sums = (bank.float() * (torch.arange(s)[None, :, None] < count[:, None, None])).sum(1)
    return bank, count, ptr, sums


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c,s,d", [(1, 1, 1), (5, 3, 7), (13, 4, 33)])
def test_class_enqueue_matches_reference_and_history(dtype, c, s, d):
    ours = class_state(c, s, d, dtype)
    ref = class_state(c, s, d, dtype)
    history = []
    for step in range(12):
        batch = random_batch(int(torch.randint(1, 20, ()).item()), d, c, out_of_range=step % 3 == 0, skew=step % 4 == 1)
        history.append(batch)
        cpp.class_bank_enqueue_(*ours, *batch)
        reference.class_bank_enqueue_(*ref, *batch)
        bank, count, ptr, sums = ours
        assert torch.equal(bank, ref[0]) and torch.equal(count, ref[1]) and torch.equal(ptr, ref[2])
        # same values summed in the same order as the reference: bit-identical
        assert torch.equal(sums, ref[3]), (sums - ref[3]).abs().max()
    bf = brute_force_class_bank(history, c, s, d, dtype)
    assert torch.equal(ours[0], bf[0]) and torch.equal(ours[1], bf[1]) and torch.equal(ours[2], bf[2])
    torch.testing.assert_close(ours[3], bf[3], rtol=1e-5, atol=1e-5)


def test_class_enqueue_feats_dtype_differs_and_noncontiguous():
    c, s, d = 6, 4, 10
    ours = class_state(c, s, d, torch.bfloat16)
    ref = class_state(c, s, d, torch.bfloat16)
    for _ in range(5):
        feats, labels, mask = random_batch(9, d, c)
        wide = torch.randn(9, 2 * d)
        wide[:, ::2] = feats
        nc = wide[:, ::2]
        cpp.class_bank_enqueue_(*ours, nc, labels, mask)
        reference.class_bank_enqueue_(*ref, feats, labels, mask)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_class_enqueue_noncontiguous_buffers():
    c, s, d = 4, 3, 5
    big = torch.zeros(c, s, 2 * d)
    bank = big[:, :, ::2]
    sums_big = torch.zeros(c, 2 * d)
    sums = sums_big[:, ::2]
    count, ptr = torch.zeros(c, dtype=torch.long), torch.zeros(c, dtype=torch.long)
    ref = class_state(c, s, d, torch.float32)
    for _ in range(4):
        batch = random_batch(7, d, c)
        cpp.class_bank_enqueue_(bank, count, ptr, sums, *batch)
        reference.class_bank_enqueue_(*ref, *batch)
    for a, b in zip((bank, count, ptr, sums), ref):
        assert torch.equal(a, b)


def test_class_enqueue_deterministic_across_runs_and_threads():
    c, s, d = 50, 8, 64
    batches = [random_batch(128, d, c, skew=i % 2 == 0) for i in range(6)]
    results = []
    threads = torch.get_num_threads()
    try:
        for nthreads in (threads, 1, threads):
            torch.set_num_threads(nthreads)
            state = class_state(c, s, d, torch.float32)
            for b in batches:
                cpp.class_bank_enqueue_(*state, *b)
            results.append(state)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_class_enqueue_empty_batch_and_all_masked():
    state = class_state(3, 2, 4, torch.float32)
    before = clone_all(state)
    cpp.class_bank_enqueue_(*state, torch.randn(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    cpp.class_bank_enqueue_(*state, torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool))
    for a, b in zip(state, before):
        assert torch.equal(a, b)


def test_class_resync_matches_reference():
    c, s, d = 9, 5, 12
    state = class_state(c, s, d, torch.bfloat16)
    for _ in range(6):
        cpp.class_bank_enqueue_(*state, *random_batch(20, d, c))
    bank, count, ptr, sums = state
    drifted = sums + 0.01 * torch.randn_like(sums)
    ours, ref = drifted.clone(), drifted.clone()
    classes = torch.tensor([0, 4, 8, 2])
    cpp.class_bank_resync_(bank, count, ours, classes)
    reference.class_bank_resync_(bank, count, ref, classes)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    untouched = torch.tensor([1, 3, 5, 6, 7])
    assert torch.equal(ours[untouched], drifted[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [1, 7, 32])
def test_fifo_matches_reference(dtype, size):
    d, c = 6, 5
    ours = (torch.zeros(size, d, dtype=dtype), torch.full((size,), -1, dtype=torch.long), torch.zeros((), dtype=torch.long))
    ref = clone_all(ours)
    for step in range(10):
        batch = random_batch(int(torch.randint(1, 15, ()).item()), d, c)
        if step == 4:  # a negative label is skipped
            batch[1][0] = -1
        cpp.fifo_bank_enqueue_(*ours, *batch)
        reference.fifo_bank_enqueue_(*ref, *batch)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
        s1, n1 = cpp.fifo_bank_sums(ours[0], ours[1], c)
        s2, n2 = reference.fifo_bank_sums(ref[0], ref[1], c)
        assert torch.equal(n1, n2) and s1.dtype == torch.float32
        torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the modules with backend="cpp"
# ---------------------------------------------------------------------------------------------


def _memory():
    try:
        import icakd_fast.memory as memory

        return memory
    except ImportError as exc:  # pragma: no cover - the modules are part of the package
        pytest.skip(f"icakd_fast.memory is not importable: {exc}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_memory_bank_module(dtype):
    memory = _memory()
    c, s, d = 10, 4, 16
    ours = memory.ClassMemoryBank(c, s, d, dtype=dtype, resync_every=3, backend="cpp")
    ref = memory.ClassMemoryBank(c, s, d, dtype=dtype, resync_every=3, backend="reference")
    for step in range(9):
        feats, labels, mask = random_batch(24, d, c, skew=step == 2)
        ours.enqueue(feats, labels, mask)
        ref.enqueue(feats, labels, mask)
    for name, buf in ref.state_dict().items():
        if buf.is_floating_point():
            torch.testing.assert_close(ours.state_dict()[name], buf, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(ours.state_dict()[name], buf), name
    feats, labels, _ = random_batch(12, d, c)
    mu1, n1 = ours.centroids(feats, labels)
    mu2, n2 = ref.centroids(feats, labels)
    assert torch.equal(n1, n2)
    torch.testing.assert_close(mu1, mu2, rtol=1e-5, atol=1e-6)
    ours.resync()
    ref.resync()
    torch.testing.assert_close(ours.sums, ref.sums, rtol=1e-6, atol=1e-6)


def test_fifo_memory_bank_module():
    memory = _memory()
    ours = memory.FIFOMemoryBank(20, 8, 6, backend="cpp")
    ref = memory.FIFOMemoryBank(20, 8, 6, backend="reference")
    for _ in range(7):
        batch = random_batch(9, 8, 6)
        ours.enqueue(*batch)
        ref.enqueue(*batch)
    assert torch.equal(ours.bank, ref.bank) and torch.equal(ours.labels, ref.labels) and torch.equal(ours.ptr, ref.ptr)
    s1, n1 = ours.sums_counts()
    s2, n2 = ref.sums_counts()
    assert torch.equal(n1, n2)
    torch.testing.assert_close(s1, s2)


def test_bank_enqueue_compiles_without_graph_breaks():
    memory = _memory()
    bank = memory.ClassMemoryBank(7, 3, 5, backend="cpp")
    ref = memory.ClassMemoryBank(7, 3, 5, backend="reference")

    def step(feats, labels):
        bank.enqueue(feats, labels)
        return bank.sums_counts()[0].sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(5):  # includes wrap-around (S = 3)
        feats, labels = torch.randn(6, 5), torch.randint(0, 7, (6,))
        compiled(feats, labels)
        ref.enqueue(feats, labels)
    assert torch.equal(bank.bank, ref.bank) and torch.equal(bank.count, ref.count) and torch.equal(bank.ptr, ref.ptr)
