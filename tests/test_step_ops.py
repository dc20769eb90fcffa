"""The training step's one-op forms (``icakd_fast.ops``: structure, class activation with the CAM
loss, bank update) where the conformance suite's tiny shapes do not reach: the BLAS-backed forms
of the structure op, the bank update against its composition, and which ops one ``ICAKDLoss``
step dispatches."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from icakd_fast import ICAKDLoss, _backend, ops
from icakd_fast.memory import ClassMemoryBank, FIFOMemoryBank, enqueue_banks

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-12


def _needs(backend, op):
    reasons = _backend.not_supported_reasons(backend, op, DEV)
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("inter_form", [None, "direct", "gram"])
@pytest.mark.parametrize("keep", [False, True])
def test_structure_one_op_form_past_the_small_loops(keep, inter_form, monkeypatch):
    """C (Ds + Dt)^2 above the small loop form: the one-op structure takes the C++ direct or Gram
    inter form (chosen by ICAKD_INTER_FORM when set) and still equals the float64 reference."""
    _needs("cpp", "structure")
    if inter_form:
        monkeypatch.setenv("ICAKD_INTER_FORM", inter_form)
    C, D, B = 300, 32, 48
    g = torch.Generator().manual_seed(3)
    counts = [torch.randint(0, 3, (C,), generator=g) for _ in range(2)]
    sums = [torch.randn(C, D, generator=g) * c.unsqueeze(1) for c in counts]
    f_s = torch.randn(B, D, generator=g, dtype=torch.float64).float()
    f_t = torch.randn(B, D, generator=g).float()
    labels = torch.randint(0, C, (B,), generator=g)
    keep_s = (torch.rand(B, generator=g) > 0.3) if keep else None
    keep_t = (torch.rand(B, generator=g) > 0.3) if keep else None

    def run(plan, dtype):
        x = f_s.to(dtype).detach().clone().requires_grad_()
        state = (sums[0].to(dtype), counts[0], sums[1].to(dtype), counts[1])
        intra, inter = ops.structure(plan, *state, x, f_t.to(dtype), labels, keep_s, keep_t, 1, EPS)
        (0.7 * intra + 1.3 * inter).backward()
        return intra, inter, x.grad

    got = run(ops.StructurePlan("cpp", "cpp", "cpp", "cpp"), torch.float32)
    want = run(ops.StructurePlan(None, "reference", "reference", "reference"), torch.float64)
    for a, b, what in zip(got, want, ("intra", "inter", "grad f_s")):
        assert a.dtype == torch.float32, what
        scale = b.abs().max().item()
        assert scale > 0, what
        err = (a.double() - b).abs().max().item() / scale
        assert err < 2e-5, f"{what}: relative error {err:.2e}"


def _poisoned_batches(steps, n, dim, classes, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        feats = torch.randn(n, dim, generator=g)
        feats[step % n, 1] = float("nan")
        feats[(step + 2) % n, 0] = float("inf")
        feats[(step + 3) % n] *= 1e6  # overflows float16 storage only
        labels = torch.randint(0, classes, (n,), generator=g)
        mask = None if step % 2 else torch.rand(n, generator=g) > 0.25
        out.append((feats, labels, mask))
    return out


@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["class", "fifo"])
@pytest.mark.parametrize("backend", _backend.BACKENDS)
def test_bank_update_matches_the_reference_composition(backend, layout, storage):
    """Every backend's update (the one-op form where the registry lists it, else the composition
    of its enqueue and resync) leaves the bank in the reference's state, refusals included."""
    op = "class_bank" if layout == "class" else "fifo_bank"
    _needs(backend, op)
    C, D = 5, 6

    def make(name):
        if layout == "class":
            return ClassMemoryBank(C, 3, D, dtype=storage, resync_every=2, backend=name, device=DEV)
        return FIFOMemoryBank(11, D, C, dtype=storage, backend=name, device=DEV)

    bank, ref = make(backend), make("reference")
    if backend == "cpp" and DEV.type == "cpu":
        assert bank._backend_of(op) == ("cpp", True)  # the one-op form runs here
    for feats, labels, mask in _poisoned_batches(6, 9, D, C, seed=1):
        args = (feats.to(DEV), labels.to(DEV), None if mask is None else mask.to(DEV))
        bank.enqueue(*args)
        ref.enqueue(*args)
    assert int(ref.refused) > 0
    for name, want in ref.state_dict().items():
        got = bank.state_dict()[name]
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(got, want), name


@pytest.mark.parametrize("layout", ["class", "fifo"])
@pytest.mark.parametrize("backend", _backend.BACKENDS)
def test_two_banks_updated_together_match_each_alone(backend, layout):
    """``enqueue_banks`` of two banks (one update op for both where the backend has it) leaves
    each bank as its own ``enqueue`` does, with each bank's own rows and masks."""
    op = "class_bank" if layout == "class" else "fifo_bank"
    _needs(backend, op)
    C, D = 5, 6

    def make():
        if layout == "class":
            return ClassMemoryBank(C, 3, D, dtype=torch.float16, resync_every=2, backend=backend, device=DEV)
        return FIFOMemoryBank(11, D, C, dtype=torch.float16, backend=backend, device=DEV)

    pair, alone = [make(), make()], [make(), make()]
    steps = _poisoned_batches(6, 9, D, C, seed=2)
    for step, (feats, labels, mask) in enumerate(steps):
        other = steps[(step + 3) % len(steps)][0].flip(1)  # the second bank's rows: other values, other NaNs
        rows = [feats.to(DEV), other.to(DEV)]
        masks = [None if mask is None else mask.to(DEV), None if mask is None else (~mask).to(DEV)]
        enqueue_banks(pair, rows, labels.to(DEV), masks)
        for bank, f, m in zip(alone, rows, masks):
            bank.enqueue(f, labels.to(DEV), m)
    if backend == "cpp" and DEV.type == "cpu":
        assert pair[0]._joint_key() is not None  # one op for both banks ran
    for i in range(2):
        assert int(alone[i].refused) > 0
        for name, want in alone[i].state_dict().items():
            assert torch.equal(pair[i].state_dict()[name], want), f"bank {i}: {name}"
    assert not torch.equal(pair[0].bank, pair[1].bank)


def test_enqueue_banks_names_the_lists_that_do_not_match():
    banks = [ClassMemoryBank(4, 2, 3), ClassMemoryBank(4, 2, 3)]
    with pytest.raises(ValueError, match="one entry per bank"):
        enqueue_banks(banks, [torch.randn(2, 3)], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="feats must be"):
        enqueue_banks(banks, [torch.randn(2, 3), torch.randn(2, 5)], torch.tensor([0, 1]))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.name()] += 1  # "namespace::name"
        return func(*args, **(kwargs or {}))


def test_icakd_step_dispatches_the_one_op_forms():
    """One eager training step of ``ICAKDLoss`` on the C++ backend (CPU): the structure term, each
    network's CAM step (weights, map, pooling and, for the student, the CAM loss) and each bank's
    update are one op each way, and none of the ops they replace runs."""
    _needs("cpp", "structure")
    _needs("cpp", "class_activation")
    C, B, D = 20, 8, 4
    loss = ICAKDLoss(C, D, D, backend="cpp").train()
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(B, D, 2, 2, generator=g, requires_grad=True)
    ws = torch.randn(C, D, generator=g, requires_grad=True)
    args = (fs, torch.randn(B, C, generator=g, requires_grad=True), torch.randn(B, D, 2, 2, generator=g),
            torch.randn(B, C, generator=g), torch.randint(0, C, (B,), generator=g), ws, torch.randn(C, D, generator=g))
    loss(*args).loss.backward()  # warm-up: backends resolved, nothing recorded
    counter = _CountOps()
    with counter:
        out = loss(*args)
        out.loss.backward()
    c = counter.ops
    ns = "icakd_fast_C::"
    assert c[ns + "structure_fwd"] == 1 and c[ns + "structure_bwd"] == 1, c
    # the teacher's step (no grad) and the student's, one backward for the student
    assert c[ns + "class_activation_fwd"] == 2 and c[ns + "class_activation_bwd"] == 1, c
    # both banks in one update op
    assert c[ns + "class_banks_update_"] == 1 and not c[ns + "class_bank_update_"], c
    replaced = ("centroids_fwd", "intra_fwd", "intra_bwd", "inter_fwd", "inter_bwd", "inter_gram_fwd",
                "inter_gram_bwd", "class_bank_enqueue_", "class_bank_resync_", "cam_fwd", "cam_bwd", "cam_loss_fwd",
                "cam_loss_bwd")
    assert not [name for name in replaced if c[ns + name]], c
    # the classifier rows are gathered, and their gradient scattered, inside the CAM ops
    assert not [name for name in ("aten::index_select", "aten::index_add_", "aten::zeros") if c[name]], c
    assert fs.grad is not None and ws.grad is not None and loss.projector.weight.grad is not None
