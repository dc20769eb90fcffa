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


@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("inter_form", [None, "direct", "gram"])
@pytest.mark.parametrize("keep", [False, True])
def test_structure_one_op_form_past_the_small_loops(keep, inter_form, project, monkeypatch):
    """C (Ds + Dt)^2 above the small loop form: the one-op structure takes the C++ direct or Gram
    inter form (chosen by ICAKD_INTER_FORM when set) and still equals the float64 reference, also
    with the projection and the normalisation inside the op (``project``)."""
    _needs("cpp", "structure")
    if inter_form:
        monkeypatch.setenv("ICAKD_INTER_FORM", inter_form)
    C, D, B, Dx = 300, 32, 48, 24
    g = torch.Generator().manual_seed(3)
    counts = [torch.randint(0, 3, (C,), generator=g) for _ in range(2)]
    sums = [torch.randn(C, D, generator=g) * c.unsqueeze(1) for c in counts]
    f_s = torch.randn(B, Dx if project else D, generator=g, dtype=torch.float64).float()
    f_t = torch.randn(B, D, generator=g).float()
    projection = torch.randn(D, Dx, generator=g) / Dx**0.5
    if project:  # bank sums of unit rows, as the banks hold them
        sums = [torch.nn.functional.normalize(s, dim=1) * c.unsqueeze(1) for s, c in zip(sums, counts)]
    labels = torch.randint(0, C, (B,), generator=g)
    keep_s = (torch.rand(B, generator=g) > 0.3) if keep else None
    keep_t = (torch.rand(B, generator=g) > 0.3) if keep else None

    def run(plan, dtype):
        x = f_s.to(dtype).detach().clone().requires_grad_()
        p = projection.to(dtype).detach().clone().requires_grad_()
        state = (sums[0].to(dtype), counts[0], sums[1].to(dtype), counts[1])
        extra = dict(normalize=True, projection=p) if project else {}
        intra, inter = ops.structure(plan, *state, x, f_t.to(dtype), labels, keep_s, keep_t, 1, EPS, **extra)[:2]
        (0.7 * intra + 1.3 * inter).backward()
        return (intra, inter, x.grad) + ((p.grad,) if project else ())

    got = run(ops.StructurePlan("cpp", "cpp", "cpp", "cpp"), torch.float32)
    want = run(ops.StructurePlan(None, "reference", "reference", "reference"), torch.float64)
    for a, b, what in zip(got, want, ("intra", "inter", "grad f_s", "grad projection")):
        assert a.dtype == torch.float32, what
        scale = b.abs().max().item()
        assert scale > 0, what
        err = (a.double() - b).abs().max().item() / scale
        assert err < 2e-5, f"{what}: relative error {err:.2e}"


def _student_step_inputs(dtype, keep, with_cam_t, own_targets, seed=5):
    g = torch.Generator().manual_seed(seed)
    C, Dx, D, B, H = 7, 5, 4, 10, 3
    counts = [torch.randint(0, 3, (C,), generator=g) for _ in range(2)]
    sums = [torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype) * c.unsqueeze(1) for c in counts]
    labels = torch.randint(0, C, (B,), generator=g)
    return dict(
        features=torch.randn(B, Dx, H, H, generator=g, dtype=torch.float64).to(dtype),
        fc_weight=torch.randn(C, Dx, generator=g, dtype=torch.float64).to(dtype),
        projection=torch.randn(D, Dx, generator=g, dtype=torch.float64).to(dtype),
        targets=torch.randint(0, C, (B,), generator=g) if own_targets else labels,
        cam_t=torch.rand(B, H, H, generator=g, dtype=torch.float64).to(dtype) if with_cam_t else None,
        state=(sums[0], counts[0], sums[1], counts[1]),
        v_t=torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype),
        labels=labels,
        keep_s=(torch.rand(B, generator=g) > 0.3) if keep else None,
        keep_t=(torch.rand(B, generator=g) > 0.3) if keep else None,
    )


def _run_student_step(cam_backend, cam_fused, plan, inp, weights=(0.7, 1.3, 0.9)):
    leaves = {k: inp[k].to(DEV).detach().clone().requires_grad_() for k in ("features", "fc_weight", "projection")}
    dev = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in inp.items() if k not in leaves}
    l_cam, intra, inter, unit_s, unit_t = ops.student_step(
        cam_backend, cam_fused, plan, leaves["features"], leaves["fc_weight"], dev["targets"], dev["cam_t"],
        *[t.to(DEV) for t in inp["state"]], dev["v_t"], dev["labels"], dev["keep_s"], dev["keep_t"], 1, EPS,
        leaves["projection"])
    total = weights[1] * intra + weights[2] * inter
    if l_cam is not None:
        total = total + weights[0] * l_cam
    total.backward()
    return ([l_cam, intra, inter, unit_s, unit_t], {k: v.grad for k, v in leaves.items()})


@pytest.mark.parametrize("own_targets", [False, True])
@pytest.mark.parametrize("with_cam_t", [False, True])
@pytest.mark.parametrize("keep", [False, True])
def test_student_step_one_node_matches_the_composition(keep, with_cam_t, own_targets):
    """``ops.student_step`` as one autograd node (C++ ``class_activation`` and ``structure``) gives
    the terms, the unit rows and the gradients of the features, the classifier and the projection
    that the two ops' own Functions give, and that the float64 reference composition gives."""
    _needs("cpp", "class_activation")
    _needs("cpp", "structure")
    inp = _student_step_inputs(torch.float32, keep, with_cam_t, own_targets)
    one = _run_student_step("cpp", True, ops.StructurePlan("cpp", "cpp", "cpp", "cpp"), inp)

    # the same two ops, each its own autograd Function
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("features", "fc_weight", "projection")}
    _, pooled, l_cam = ops.class_activation("cpp", leaves["features"], leaves["fc_weight"], inp["targets"],
                                            inp["cam_t"], fused=True)
    intra, inter, unit_s, unit_t = ops.structure(ops.StructurePlan("cpp", "cpp", "cpp", "cpp"), *inp["state"],
                                                 pooled, inp["v_t"], inp["labels"], inp["keep_s"], inp["keep_t"], 1,
                                                 EPS, normalize=True, projection=leaves["projection"])
    total = 1.3 * intra + 0.9 * inter + (0.7 * l_cam if l_cam is not None else 0)
    total.backward()
    two = ([l_cam, intra, inter, unit_s, unit_t], {k: v.grad for k, v in leaves.items()})

    f64 = _student_step_inputs(torch.float64, keep, with_cam_t, own_targets)
    ref = _run_student_step("reference", False, ops.StructurePlan(None, "reference", "reference", "reference"), f64)

    names = ("l_cam", "intra", "inter", "unit_s", "unit_t")
    for got, want, name in zip(one[0], two[0], names):
        if not with_cam_t and name == "l_cam":
            assert got is None and want is None
            continue
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6, msg=name)
    for got, want, name in zip(one[0], ref[0], names):
        if got is not None:
            torch.testing.assert_close(got.cpu().double(), want.cpu(), rtol=1e-4, atol=1e-6, msg=name)
    for name in ("features", "fc_weight", "projection"):
        assert one[1][name] is not None, name
        # the pooling's CAM weights are a constant (SPEC 3): the classifier learns from the CAM loss only
        assert (one[1][name].abs().max() > 0) == (with_cam_t or name != "fc_weight"), name
        for other, rtol, dtype in ((two, 1e-5, torch.float32), (ref, 1e-4, torch.float64)):
            want = other[1][name]
            want = torch.zeros_like(one[1][name], dtype=dtype) if want is None else want.cpu()
            torch.testing.assert_close(one[1][name].cpu().to(dtype), want, rtol=rtol, atol=1e-6, msg=name)


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
    # the student's CAM step and the structure term are one autograd node
    nodes, todo = collections.Counter(), [out.loss.grad_fn]
    seen = set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes[type(node).__name__] += 1
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    assert nodes["StudentStepFunctionBackward"] == 1, nodes
    assert not nodes["ClassActivationFunctionBackward"] and not nodes["StructureFunctionBackward"], nodes
