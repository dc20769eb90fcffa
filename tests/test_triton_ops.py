"""Registration of the Triton ops: opcheck (schema, fake tensors, AOT dispatch) and compile."""

import pytest
import torch

import icakd_fast.functional as F
import icakd_fast.reference as R
from icakd_fast._backend import is_available

pytestmark = pytest.mark.skipif(not is_available("triton", "cam", "cpu") and not torch.cuda.is_available(),
                                reason="triton backend unavailable")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
impl = pytest.importorskip("icakd_fast.ops._triton_impl")
ops = torch.ops.icakd_fast


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*s, dt=torch.float32):
        return torch.randn(*s, generator=g).to(dt).to(DEV)

    f, w = r(2, 5, 3, 3), r(2, 5)
    cam, _, pw = impl.cam_fwd(f, w, True)
    C, D = 4, 6
    lab = torch.tensor([0, 2, 2, 3, 1], device=DEV)
    mask = torch.tensor([True, True, False, True, True], device=DEV)
    valid = torch.tensor([True, False, True, True], device=DEV)
    live = torch.tensor([True, True, False, False], device=DEV)
    bank = (torch.zeros(C, 2, D, device=DEV), torch.zeros(C, dtype=torch.int64, device=DEV),
            torch.zeros(C, dtype=torch.int64, device=DEV), torch.zeros(C, D, device=DEV))
    fifo = (torch.zeros(3, D, device=DEV), torch.full((3,), -1, dtype=torch.int64, device=DEV),
            torch.zeros((), dtype=torch.int64, device=DEV))
    x = r(5, D)
    return [
        ("triton_cam_fwd", (f, w, True)),
        ("triton_cam_fwd", (f, w, False)),
        ("triton_cam_fwd_from_grads", (f, r(2, 5, 3, 3), True)),
        ("triton_cam_bwd", (r(2, 3, 3), r(2, 5), f, w, cam, pw, True, True)),
        ("triton_cam_bwd", (None, r(2, 5), f, w, cam, pw, True, False)),
        ("triton_spatial_mean", (f,)),
        ("triton_class_bank_enqueue_", (*bank, x, lab, mask)),
        ("triton_class_bank_resync_", (bank[0], bank[1], bank[3], torch.tensor([1, 3], device=DEV))),
        ("triton_fifo_bank_enqueue_", (*fifo, x, lab, mask)),
        ("triton_fifo_bank_sums", (fifo[0], fifo[1], C)),
        ("triton_centroids_fwd", (r(C, D), torch.tensor([1, 0, 2, 0], device=DEV), x, lab)),
        ("triton_intra_fwd", (x, r(5, D), r(C, D), r(C, D), lab, valid)),
        ("triton_intra_bwd", (torch.tensor(1.5, device=DEV), x, r(5, D), r(C, D), r(C, D), lab, valid)),
        ("triton_inter_fwd", (r(C, D), r(C, D + 3), valid, 1e-12)),
        ("triton_inter_bwd", (torch.tensor(0.5, device=DEV), r(C, D), r(C, D + 3), valid, live, True, True, 1e-12)),
        ("triton_inter_bwd", (torch.tensor(0.5, device=DEV), r(C, D), r(C, D + 3), valid, None, True, False, 1e-12)),
    ]


CASES = _cases()


@pytest.mark.parametrize("name,args", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


def _step(f, w, mu_s, mu_t, valid, live):
    cam, pooled = F.class_activation_features(f, w, backend="triton")
    inter = F.inter_class_loss(mu_s, mu_t, valid, live=live, backend="triton")
    return cam.square().mean() + pooled.sum() + inter


def test_compile_fullgraph_aot_eager():
    """The registered ops trace without graph breaks (aot_eager keeps them runnable on CPU)."""
    torch._dynamo.reset()
    f = torch.randn(2, 6, 3, 3, device=DEV, requires_grad=True)
    w = torch.randn(2, 6, device=DEV, requires_grad=True)
    mu_s = torch.randn(5, 4, device=DEV, requires_grad=True)
    mu_t = torch.randn(5, 7, device=DEV)
    valid = torch.ones(5, dtype=torch.bool, device=DEV)
    live = torch.tensor([True, False, True, False, False], device=DEV)
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    out = compiled(f, w, mu_s, mu_t, valid, live)
    grads = torch.autograd.grad(out, (f, w, mu_s))
    exp_out = _step(f, w, mu_s, mu_t, valid, live)
    exp = torch.autograd.grad(exp_out, (f, w, mu_s))
    torch.testing.assert_close(out, exp_out)
    for a, b in zip(grads, exp):
        torch.testing.assert_close(a, b)


def test_compile_bank_enqueue_no_recompiles():
    from icakd_fast import ClassMemoryBank

    torch._dynamo.reset()
    C, S, D = 4, 2, 5
    bank = ClassMemoryBank(C, S, D, backend="triton", resync_every=0, device=DEV)
    ref = ClassMemoryBank(C, S, D, backend="reference", resync_every=0, device=DEV)

    def enqueue(x, y):
        bank.enqueue(x, y)

    compiled = torch.compile(enqueue, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):  # several steps, including a wrap-around of every ring
            x = torch.randn(6, D, generator=gen).to(DEV)
            y = torch.randint(0, C, (6,), generator=gen).to(DEV)
            compiled(x, y)
            ref.enqueue(x, y)
    assert torch.equal(bank.bank, ref.bank) and torch.equal(bank.count, ref.count) and torch.equal(bank.ptr, ref.ptr)
    torch.testing.assert_close(bank.sums, ref.sums)



def test_plain_eager_calls_skip_the_dispatcher_and_traced_calls_use_it(monkeypatch):
    """In plain eager mode a Triton op runs its body directly (no dispatcher round trip); with
    autograd to record, a dispatch mode (fake tensors), a functorch transform or a tensor
    subclass it goes through the registered operator."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    f, w = torch.randn(2, 5, 3, 3, device=DEV), torch.randn(2, 5, device=DEV)
    calls = []
    real = impl._cam_fwd_op.op

    def spy(*args):
        calls.append(len(args))
        return real(*args)

    monkeypatch.setattr(impl._cam_fwd_op, "op", spy)
    cam = impl.cam_fwd(f, w, True)[0]
    assert not calls  # plain eager: the body, directly
    torch.testing.assert_close(cam, R.class_activation_features(f, w)[0])
    with torch.enable_grad():
        impl.cam_fwd(f.clone().requires_grad_(), w, True)  # autograd would have to see it
    assert len(calls) == 1
    with FakeTensorMode() as mode:
        fake_cam = impl.cam_fwd(mode.from_tensor(f), mode.from_tensor(w), True)[0]
    assert len(calls) == 2 and fake_cam.shape == cam.shape
    assert impl._plain_eager((f, w, 3, None))
    assert not impl._plain_eager((f.as_subclass(_Sub), w))
    seen = []
    torch.func.vmap(lambda x: seen.append(impl._plain_eager((x,))) or x)(f)
    assert seen == [False]


class _Sub(torch.Tensor):
    """A tensor subclass: it must go through the dispatcher."""
