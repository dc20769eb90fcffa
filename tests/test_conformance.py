"""Conformance of every backend's public functional ops with the float64 reference.

One table of ops (``OPS``), run on every backend of ``icakd_fast._backend.BACKENDS`` with
``backend=<name>``, in every input dtype and on a few tiny shapes (one with B = 1, one with odd,
non-power-of-two sizes). For each case:

* the forward equals the reference backend's forward on the same values in float64, within a
  per-dtype relative tolerance (``TOL``), and has the reference's dtype and shape;
* every gradient subset (each differentiable input alone, and all of them together, the
  stop-gradient inputs included) equals the float64 reference's gradient, relative to that
  gradient's largest entry; an input that does not require grad gets no ``.grad``;
* float64 ``torch.autograd.gradcheck`` of every fast backend;
* non-contiguous inputs (transposed and strided views) give the contiguous result;
* ``torch.library.opcheck`` of every C++ op that the functional op calls (recorded while it runs);
* ``torch.compile(fullgraph=True, backend="aot_eager")`` of forward + backward matches eager.

A backend that cannot run an op on the test device skips with the backend's own reasons.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import icakd_fast.functional as F
from icakd_fast import _backend, ops

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = _backend.BACKENDS
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Triton kernels on CPU tensors run in the interpreter: correct, but slow
INTERPRETED = DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: relative tolerances per input dtype: (forward, gradient), as a fraction of the float64
#: reference's largest entry. Inputs are rounded to the dtype before both sides see them, so
#: what remains is the accumulation order and the rounding of the outputs: two units of the
#: dtype's epsilon for 16-bit inputs, about twenty for float32, and for float64 a margin that
#: stays far below the error of any float32 step inside a float64 path. Gradients get twice to
#: four times as much (they pass one more rounding, of the upstream gradient).
TOL = {
    torch.float64: (1e-12, 1e-11),
    torch.float32: (2e-6, 1e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 3.2e-2),
}


def tolerance_problem(backend: str, dtype: torch.dtype) -> str | None:
    """Why the tolerance table cannot hold ``backend`` in ``dtype`` (None: it can)."""
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        return "the Triton interpreter does not round bfloat16 arithmetic as a GPU does"
    return None


# ---------------------------------------------------------------------------------------------
# the op table
# ---------------------------------------------------------------------------------------------

#: B: batch rows, K: channels, H x W: map, C: classes, D / Dt: student / teacher widths
SHAPES = {
    "B1": dict(B=1, K=3, H=2, W=3, C=3, D=4, Dt=5),
    "odd": dict(B=5, K=7, H=3, W=5, C=7, D=13, Dt=9),
    "pow2": dict(B=4, K=8, H=4, W=4, C=8, D=16, Dt=16),
}
#: the shapes of float64 gradcheck
GRADCHECK_SHAPES = ("B1", "odd")


def _randn(*shape):
    return torch.randn(shape, dtype=torch.float64, device=DEV)


def _valid(c, must):
    """A class mask with about a third of the classes off; the classes in ``must`` are on."""
    valid = torch.arange(c, device=DEV) % 3 != 1
    valid[must] = True
    return valid


def _cam_inputs(s, dtype):
    return [_randn(s["B"], s["K"], s["H"], s["W"]).to(dtype), _randn(s["B"], s["K"]).to(dtype)]


def _centroid_inputs(s, dtype):
    c, d, b = s["C"], s["D"], s["B"]
    counts = torch.randint(0, 3, (c,), device=DEV)
    sums = _randn(c, d) * 2 * (counts > 0).unsqueeze(1)
    # the bank sums are float32 (float64 with float64 rows)
    sums = sums.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return [sums, counts, _randn(b, d).to(dtype), torch.randint(0, c, (b,), device=DEV)]


def _intra_inputs(s, dtype):
    b, c, d = s["B"], s["C"], s["D"]
    labels = torch.randint(0, c, (b,), device=DEV)
    return [_randn(b, d).to(dtype), _randn(b, d).to(dtype), _randn(c, d).to(dtype), _randn(c, d).to(dtype), labels,
            _valid(c, labels[:1])]


def _inter_inputs(s, dtype, with_live):
    c = s["C"]
    live_rows = torch.randperm(c, device=DEV)[: min(s["B"], c)]
    # the live rows and two more classes are valid: the gradient of every live row is not zero
    valid = _valid(c, torch.cat([live_rows, live_rows.new_tensor([0, 2])]))
    args = [_randn(c, s["D"]).to(dtype), _randn(c, s["Dt"]).to(dtype), valid]
    if with_live:
        live = torch.zeros(c, dtype=torch.bool, device=DEV)
        live[live_rows] = True
        args.append(live)
    return args


def _structure_inputs(s, dtype):
    """Both networks' bank state, the batch and its keep masks (``ops.structure``)."""
    c, d, b = s["C"], s["D"], s["B"]
    sums_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    state = []
    for _ in range(2):
        # some classes empty; the first three valid in both networks even with min_count=2, so
        # that the inter loss compares several relations (one class alone has none)
        counts = torch.randint(0, 4, (c,), device=DEV)
        counts[:3] = 3
        state += [(_randn(c, d) * counts.unsqueeze(1)).to(sums_dtype), counts]
    labels = torch.randint(0, c, (b,), device=DEV)
    keep_s = torch.rand(b, device=DEV) > 0.3
    keep_s[0] = True
    keep_t = torch.rand(b, device=DEV) > 0.3
    return state + [_randn(b, d).to(dtype), _randn(b, d).to(dtype), labels, keep_s, keep_t]


def _projected_structure_inputs(s, dtype):
    """``_structure_inputs`` plus a projection [D, D] of the student's rows (the projector)."""
    return _structure_inputs(s, dtype) + [(_randn(s["D"], s["D"]) / s["D"] ** 0.5).to(dtype)]


def _structure_call(keep, min_count, normalize=False):
    """``ops.structure`` on one backend: its one-op form where the registry lists it, else the
    composition of its centroids, intra and inter ops. With ``normalize`` the batch rows are raw
    and the outputs include the unit rows; a tenth input is the projection of the student's rows."""
    def call(backend, a):
        fused = backend if backend != "reference" and _backend.is_available(backend, "structure", DEV) else None
        plan = ops.StructurePlan(fused, backend, backend, backend)
        keep_s, keep_t = (a[7], a[8]) if keep else (None, None)
        projection = a[9] if len(a) > 9 else None
        return ops.structure(plan, *a[:7], keep_s, keep_t, min_count, 1e-12, normalize=normalize,
                             projection=projection)
    return call


def _activation_inputs(s, dtype):
    b, k, c = s["B"], s["K"], s["C"]
    features = _randn(b, k, s["H"], s["W"]).to(dtype)
    cam_t = _randn(b, s["H"], s["W"]).relu().to(dtype)
    return [features, _randn(c, k).to(dtype), torch.randint(0, c, (b,), device=DEV), cam_t]


def _activation_call(backend, a):
    """``ops.class_activation`` with the teacher's map: (pooled, CAM loss)."""
    fused = backend != "reference" and _backend.is_available(backend, "class_activation", DEV)
    _, pooled, l_cam = ops.class_activation(backend, a[0], a[1], a[2], a[3], fused=fused)
    return pooled, l_cam


def _student_step_inputs(s, dtype):
    """The student's CAM step inputs, the teacher's map, both networks' bank state and the
    teacher's rows, the keep masks and the projection [D, K] (``ops.student_step``)."""
    b, k, c, d = s["B"], s["K"], s["C"], s["D"]
    act = _activation_inputs(s, dtype)
    state = _structure_inputs(s, dtype)
    # targets other than the labels (the CAM of the teacher's class)
    return act + state[:4] + [state[5], state[6], state[7], state[8], (_randn(d, k) / k**0.5).to(dtype)]


def _student_step_call(backend, a):
    """``ops.student_step``: one node over the one-op forms where the registry lists both, else the
    composition: (CAM loss, intra, inter)."""
    fast = backend != "reference"
    cam_fused = fast and _backend.is_available(backend, "class_activation", DEV)
    fused = backend if fast and _backend.is_available(backend, "structure", DEV) else None
    plan = ops.StructurePlan(fused, backend, backend, backend)
    l_cam, intra, inter, _, _ = ops.student_step(backend, cam_fused, plan, a[0], a[1], a[2], a[3], *a[4:8], a[8],
                                                 a[9], a[10], a[11], 1, 1e-12, a[12])
    return l_cam, intra, inter


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    support: str  # the op name of ``_backend.not_supported_reasons``
    make: Callable  # (shape dict, dtype) -> list of inputs
    call: Callable  # (backend, inputs) -> tuple of outputs
    diff: tuple[int, ...]  # inputs with a gradient
    const: tuple[int, ...] = ()  # floating inputs that are constants (stop-gradient)
    checked: tuple[int, ...] | None = None  # outputs that gradcheck differentiates (None: all floating)


def _inter_call(backend, a):
    return (F.inter_class_loss(a[0], a[1], a[2], live=a[3] if len(a) > 3 else None, backend=backend),)


OPS = [
    Op("grad_cam", "cam", _cam_inputs, lambda be, a: (F.grad_cam(a[0], a[1], backend=be),), diff=(0, 1)),
    # pooled's pooling weights are a stop-gradient map of the inputs: finite differences see
    # them move, so gradcheck takes the map only (pooled's gradient is checked against the reference)
    Op("class_activation_features", "cam", _cam_inputs,
       lambda be, a: F.class_activation_features(a[0], a[1], backend=be), diff=(0, 1), checked=(0,)),
    Op("grad_cam_weights", "grad_cam_weights", lambda s, dt: _cam_inputs(s, dt)[:1],
       lambda be, a: (F.grad_cam_weights(a[0], backend=be),), diff=(), const=(0,)),
    Op("class_centroids", "centroids", _centroid_inputs,
       lambda be, a: F.class_centroids(a[0], a[1], a[2], a[3], backend=be), diff=(0, 2)),
    Op("intra_class_loss", "intra", _intra_inputs,
       lambda be, a: (F.intra_class_loss(*a, backend=be),), diff=(0, 1, 3), const=(2,)),
    Op("inter_class_loss", "inter", lambda s, dt: _inter_inputs(s, dt, False), _inter_call, diff=(0, 1)),
    Op("inter_class_loss-live", "inter", lambda s, dt: _inter_inputs(s, dt, True), _inter_call, diff=(0, 1)),
    # the training step's ops (icakd_fast.ops): the bank sums and the teacher side are constants;
    # the intra loss detaches the student centroid, which moves with f_s: finite differences see
    # that, so gradcheck takes the inter loss only (intra's gradient is checked against the reference)
    Op("structure", "centroids", _structure_inputs, _structure_call(False, 1), diff=(4,), const=(0, 2, 5),
       checked=(1,)),
    Op("structure-keep-min2", "centroids", _structure_inputs, _structure_call(True, 2), diff=(4,), const=(0, 2, 5),
       checked=(1,)),
    # raw batch rows that the op normalises (as the loss module calls it)
    Op("structure-normalize", "centroids", _structure_inputs, _structure_call(True, 1, normalize=True), diff=(4,),
       const=(0, 2, 5), checked=(1,)),
    # and the student's rows projected first (the projector's weight takes a gradient too)
    Op("structure-project", "centroids", _projected_structure_inputs, _structure_call(True, 1, normalize=True),
       diff=(4, 9), const=(0, 2, 5), checked=(1,)),
    # pooled's pooling weights are a stop-gradient (see above): gradcheck takes the CAM loss only
    Op("class_activation", "cam", _activation_inputs, _activation_call, diff=(0, 1), const=(3,), checked=(1,)),
    # the student's CAM step feeding the structure term (as the loss module calls it): the
    # pooling's stop-gradient weights move under finite differences, so gradcheck takes the CAM loss
    Op("student_step", "cam", _student_step_inputs, _student_step_call, diff=(0, 1, 12), const=(3, 4, 6, 8),
       checked=(0,)),
]
OP_IDS = [op.name for op in OPS]


def skip_unless_supported(backend: str, op: Op, dtype: torch.dtype | None = None):
    reasons = _backend.not_supported_reasons(backend, op.support, DEV)
    if reasons:
        pytest.skip("; ".join(reasons))
    if dtype is not None:
        problem = tolerance_problem(backend, dtype)
        if problem:
            pytest.skip(problem)


def _cases():
    """(backend, dtype, shape) triples: the whole dtype x shape table, except that the interpreted
    Triton backend takes the largest shape in float32 only."""
    out = []
    for backend in BACKENDS:
        for dtype in DTYPES:
            for shape in SHAPES:
                if backend == "triton" and INTERPRETED and dtype != torch.float32 and shape == "pow2":
                    continue
                out.append(pytest.param(backend, dtype, shape, id=f"{backend}-{str(dtype)[6:]}-{shape}"))
    return out


CASES = _cases()


# ---------------------------------------------------------------------------------------------
# running an op and comparing
# ---------------------------------------------------------------------------------------------


def _f64(t):
    return t.detach().double() if t.is_floating_point() else t


def _run(op, backend, inputs, need=(), layout=None):
    """Run ``op`` on fresh leaves (those in ``need`` require grad), given to the op in ``layout``
    (None: as they are). Returns (leaves, outputs)."""
    leaves = [t.detach().clone().requires_grad_(i in need) if t.is_floating_point() else t.clone()
              for i, t in enumerate(inputs)]
    args = leaves if layout is None else [layout(t) for t in leaves]
    return leaves, tuple(op.call(backend, args))


def _backward(outs, upstream):
    """Backpropagate ``upstream[i]`` (float64) into each floating output that requires grad,
    rounded to the output's dtype."""
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, upstream) if g is not None and o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def _upstream(outs):
    return [_randn(*o.shape) if o.is_floating_point() else None for o in outs]


def _rel_err(actual, expected):
    """Largest error over the expected tensor's largest entry (an all-zero expected tensor: the
    absolute error)."""
    expected = expected.detach().double()
    err = (actual.detach().double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return err / scale if scale > 0 else err


def assert_rel_close(actual, expected, rtol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.detach().double()).all(), f"{what}: non-finite values"
    err = _rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def _reference_grads(op, inputs, outs, upstream):
    """The float64 reference's gradients of every differentiable input, for the upstream
    gradients rounded as the backend's outputs round them."""
    up = [None if g is None else g.to(o.dtype).double() for o, g in zip(outs, upstream)]
    leaves, ref = _run(op, "reference", [_f64(t) for t in inputs], need=op.diff)
    _backward(ref, up)
    return {i: leaves[i].grad for i in op.diff}


# ---------------------------------------------------------------------------------------------
# forward and gradients against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("backend,dtype,shape", CASES)
def test_forward_matches_float64_reference(backend, dtype, shape, op):
    skip_unless_supported(backend, op, dtype)
    inputs = op.make(SHAPES[shape], dtype)
    _, outs = _run(op, backend, inputs)
    _, ref = _run(op, "reference", [_f64(t) for t in inputs])
    _, ref_same = _run(op, "reference", inputs)  # the reference in the input dtype: dtypes only
    assert len(outs) == len(ref)
    for i, (o, r, rs) in enumerate(zip(outs, ref, ref_same)):
        what = f"{op.name}[{i}] on {backend}"
        assert o.dtype == rs.dtype, f"{what}: dtype {o.dtype}, the reference gives {rs.dtype}"
        assert o.device == rs.device
        if o.is_floating_point():
            assert_rel_close(o, r, TOL[dtype][0], what)
        else:
            assert torch.equal(o, r), what


def _subsets(op):
    """Each differentiable input alone, then all of them together with the constant inputs."""
    out = [(i,) for i in op.diff]
    if len(op.diff) > 1 or op.const:
        out.append(tuple(op.diff) + tuple(op.const))
    return out


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("backend,dtype,shape", CASES)
def test_gradients_match_float64_reference(backend, dtype, shape, op):
    skip_unless_supported(backend, op, dtype)
    inputs = op.make(SHAPES[shape], dtype)
    rtol = TOL[dtype][1]
    expected = None
    for need in _subsets(op):
        leaves, outs = _run(op, backend, inputs, need)
        if expected is None:
            upstream = _upstream(outs)
            expected = _reference_grads(op, inputs, outs, upstream)
        _backward(outs, upstream)
        for i, leaf in enumerate(leaves):
            what = f"{op.name} on {backend}, grad of input {i} (inputs requiring grad: {need})"
            if i not in need:
                assert leaf.grad is None, f"{what}: an input that does not require grad got a gradient"
            elif i in op.const:
                assert leaf.grad is None or not leaf.grad.any(), f"{what}: a constant input got a non-zero gradient"
            else:
                ref = expected[i]
                assert ref.abs().max() > 0, f"{what}: the reference gradient is zero, the case checks nothing"
                assert leaf.grad is not None, f"{what}: no gradient"
                assert leaf.grad.dtype == leaf.dtype, f"{what}: gradient dtype {leaf.grad.dtype} != {leaf.dtype}"
                assert_rel_close(leaf.grad, ref, rtol, what)
        if len(inputs) > 3 and op.support == "inter" and 0 in need:
            live = inputs[3]
            assert not leaves[0].grad[~live].any(), f"{op.name} on {backend}: rows outside live got a gradient"


# ---------------------------------------------------------------------------------------------
# float64 gradcheck
# ---------------------------------------------------------------------------------------------


def _gradcheck_problem(op, inputs):
    """(function, variables) for gradcheck: the differentiable inputs, except that with ``live``
    only the live rows of mu_s are variables (the other rows are constants by definition)."""
    checked = op.checked

    def outputs(outs):
        idx = checked if checked is not None else [i for i, o in enumerate(outs) if o.is_floating_point()]
        return tuple(outs[i] for i in idx)

    if op.name == "inter_class_loss-live":
        mu_s, mu_t, valid, live = inputs
        rows = live.nonzero().squeeze(1)

        def fn_live(live_rows, t, backend):
            s = mu_s.index_put((rows,), live_rows)
            return outputs(op.call(backend, [s, t, valid, live]))

        return fn_live, [mu_s[rows].clone(), mu_t]

    def fn(*variables, backend):
        args = list(inputs)
        for i, v in zip(op.diff, variables):
            args[i] = v
        return outputs(op.call(backend, args))

    return fn, [inputs[i] for i in op.diff]


@pytest.mark.parametrize("op", [op for op in OPS if op.diff], ids=[op.name for op in OPS if op.diff])
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_gradcheck_float64(backend, shape, op):
    skip_unless_supported(backend, op, torch.float64)
    if backend == "triton" and INTERPRETED and shape != GRADCHECK_SHAPES[0]:
        pytest.skip("the interpreted Triton backend is gradchecked on the smallest shape only")
    fn, variables = _gradcheck_problem(op, op.make(SHAPES[shape], torch.float64))
    variables = [v.detach().clone().requires_grad_() for v in variables]
    # the full Jacobian on the smallest shape; random projections of it (fast mode) on the others
    # and wherever each evaluation is slow (the interpreter)
    fast = shape != GRADCHECK_SHAPES[0] or (backend == "triton" and INTERPRETED)
    assert torch.autograd.gradcheck(lambda *v: fn(*v, backend=backend), variables, fast_mode=fast)


# ---------------------------------------------------------------------------------------------
# non-contiguous inputs
# ---------------------------------------------------------------------------------------------


def _transposed(t):
    """Same values, the last two dims stored transposed (1-D tensors: strided)."""
    if t.dim() < 2:
        return _strided(t)
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _strided(t):
    """Same values, every second element of a twice-as-wide buffer along the last dim."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


LAYOUTS = {"transposed": _transposed, "strided": _strided}


#: the odd shape in every dtype (the interpreted Triton backend: float32 only)
NONCONTIGUOUS_CASES = [c for c in CASES if c.values[2] == "odd"
                       and not (c.values[0] == "triton" and INTERPRETED and c.values[1] != torch.float32)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("backend,dtype,shape", NONCONTIGUOUS_CASES)
def test_noncontiguous_inputs_match_contiguous(backend, dtype, shape, op, layout):
    skip_unless_supported(backend, op, dtype)
    inputs = op.make(SHAPES[shape], dtype)
    to_layout = LAYOUTS[layout]
    views = [to_layout(t) for t in inputs]
    assert all(not v.is_contiguous() for v in views if v.numel() > 1)
    need = tuple(op.diff)
    leaves_c, outs_c = _run(op, backend, inputs, need)
    leaves_n, outs_n = _run(op, backend, inputs, need, layout=to_layout)
    upstream = _upstream(outs_c)
    _backward(outs_c, upstream)
    _backward(outs_n, upstream)
    fwd, grad = TOL[dtype]
    for i, (a, b) in enumerate(zip(outs_n, outs_c)):
        assert a.dtype == b.dtype
        if a.is_floating_point():
            assert_rel_close(a, b, fwd, f"{op.name}[{i}] on {backend}, {layout}")
        else:
            assert torch.equal(a, b)
    for i in need:
        what = f"grad of input {i} of {op.name} on {backend}, {layout}"
        assert leaves_n[i].grad is not None, f"{what}: no gradient"
        assert_rel_close(leaves_n[i].grad, leaves_c[i].grad, grad, what)


# ---------------------------------------------------------------------------------------------
# opcheck of the C++ ops behind each functional op
# ---------------------------------------------------------------------------------------------

C_NAMESPACE = "icakd_fast_C"


class _RecordCppOps(TorchDispatchMode):
    """Records the first call of each ``icakd_fast_C`` op (its overload and a copy of its arguments)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == C_NAMESPACE and func.name() not in self.calls:
            copy = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.calls[func.name()] = (func, tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


OPCHECK_CASES = [pytest.param(op, dtype, None, id=f"{op.name}-{str(dtype)[6:]}")
                 for op in OPS for dtype in (torch.float32, torch.bfloat16)]
# the float64 Gram form of the inter loss (its own C++ ops), chosen by the environment
OPCHECK_CASES += [pytest.param(op, torch.float32, "gram", id=f"{op.name}-float32-gram")
                  for op in OPS if op.support == "inter"]


@pytest.mark.parametrize("op,dtype,inter_form", OPCHECK_CASES)
def test_opcheck_cpp_ops(op, dtype, inter_form, monkeypatch):
    skip_unless_supported("cpp", op, dtype)
    if inter_form:
        monkeypatch.setenv("ICAKD_INTER_FORM", inter_form)
    inputs = op.make(SHAPES["odd"], dtype)
    recorder = _RecordCppOps()
    with recorder:
        _, outs = _run(op, "cpp", inputs, need=op.diff)
        _backward(outs, _upstream(outs))
    assert recorder.calls, f"{op.name} with backend='cpp' called no {C_NAMESPACE} op"
    if inter_form == "gram":
        assert any("gram" in name for name in recorder.calls), f"ICAKD_INTER_FORM=gram called {list(recorder.calls)}"
    for name, (func, args, kwargs) in recorder.calls.items():
        torch.library.opcheck(func, args, kwargs)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_forward_backward_matches_eager(backend, op):
    skip_unless_supported(backend, op, torch.float32)
    if backend == "triton" and INTERPRETED:
        pytest.skip("the Triton interpreter runs each kernel as Python: torch.compile is checked with a GPU")
    torch._dynamo.reset()
    inputs = op.make(SHAPES["odd"], torch.float32)

    def step(*args):
        return op.call(backend, list(args))

    results = []
    upstream = None
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        leaves = [t.detach().clone().requires_grad_(i in op.diff) if t.is_floating_point() else t
                  for i, t in enumerate(inputs)]
        outs = fn(*leaves)
        if upstream is None:
            upstream = _upstream(outs)
        _backward(outs, upstream)
        results.append((outs, [leaves[i].grad for i in op.diff]))
    (outs_c, grads_c), (outs_e, grads_e) = results
    for a, b in zip(outs_c, outs_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_e):
        assert a is not None
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
