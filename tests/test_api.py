"""Public API contract: validation errors name the argument; backend resolution and reasons."""

import os
import subprocess
import sys

import pytest
import torch

import icakd_fast
from icakd_fast import _backend, _inter_form, functional as IF

f4 = torch.randn(2, 3, 4, 4)
w2 = torch.randn(2, 3)

BAD = [
    ("features", lambda: IF.grad_cam(torch.randn(2, 3, 4), w2), ValueError),
    ("features", lambda: IF.grad_cam(f4.long(), w2), TypeError),
    ("weights", lambda: IF.class_activation_features(f4, torch.randn(2, 4)), ValueError),
    ("weights", lambda: IF.class_activation_features(f4, torch.randn(2, 3, device="meta")), ValueError),
    ("features", lambda: IF.class_activation_features([[1.0]], w2), TypeError),
    ("grads", lambda: IF.grad_cam_weights(torch.randn(2, 3)), ValueError),
    ("targets", lambda: IF.cam_weights_from_linear(torch.randn(5, 3), torch.tensor([0, 5]), 16), ValueError),
    ("targets", lambda: IF.cam_weights_from_linear(torch.randn(5, 3), torch.tensor([0.0]), 16), TypeError),
    ("spatial_size", lambda: IF.cam_weights_from_linear(torch.randn(5, 3), torch.tensor([0]), 0), ValueError),
    ("cam_t", lambda: IF.cam_constraint_loss(torch.rand(2, 4, 4), torch.rand(3, 4, 4)), ValueError),
    ("labels", lambda: IF.class_centroids(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.randn(3, 2), torch.tensor([0, 1, 4])), ValueError),
    ("labels", lambda: IF.class_centroids(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.randn(3, 2), torch.tensor([0, 1])), ValueError),
    ("feats", lambda: IF.class_centroids(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.randn(3, 5), torch.tensor([0, 1, 2])), ValueError),
    ("counts", lambda: IF.class_centroids(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), torch.randn(3, 2), torch.tensor([0, 1, 2])), ValueError),
    ("valid", lambda: IF.inter_class_loss(torch.randn(4, 2), torch.randn(4, 3), torch.ones(4)), TypeError),
    ("mu_t", lambda: IF.inter_class_loss(torch.randn(4, 2), torch.randn(5, 3), torch.ones(4, dtype=torch.bool)), ValueError),
    ("live", lambda: IF.inter_class_loss(torch.randn(4, 2), torch.randn(4, 3), torch.ones(4, dtype=torch.bool), live=torch.ones(3, dtype=torch.bool)), ValueError),
    ("f_t", lambda: IF.intra_class_loss(torch.randn(3, 2), torch.randn(3, 4), torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 1, 2]), torch.ones(4, dtype=torch.bool)), ValueError),
    ("labels", lambda: IF.intra_class_loss(torch.randn(3, 2), torch.randn(3, 2), torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 1, -1]), torch.ones(4, dtype=torch.bool)), ValueError),
    ("temperature", lambda: IF.kd_loss(torch.randn(2, 3), torch.randn(2, 3), 0.0), ValueError),
    ("logits_t", lambda: IF.kd_loss(torch.randn(2, 3), torch.randn(2, 4), 4.0), ValueError),
    ("backend", lambda: IF.grad_cam(f4, w2, backend="cuda-magic"), ValueError),
]


@pytest.mark.parametrize("arg,call,exc", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_inputs_raise_naming_the_argument(arg, call, exc):
    with pytest.raises(exc, match=arg):
        call()


@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_op_accepts_any_batch_size_and_float_dtype(B, dtype):
    C, K, D = 5, 7, 6
    feats = torch.randn(B, K, 3, 5, dtype=dtype)
    w = IF.cam_weights_from_linear(torch.randn(C, K, dtype=dtype), torch.randint(0, C, (B,)), 15)
    cam, pooled = IF.class_activation_features(feats, w)
    assert cam.shape == (B, 3, 5) and pooled.shape == (B, K) and cam.dtype == dtype
    assert IF.grad_cam_weights(feats).dtype == dtype
    assert torch.isfinite(IF.cam_constraint_loss(cam, cam.flip(0)))
    y = torch.randint(0, C, (B,))
    f = torch.randn(B, D, dtype=dtype)
    mu, n = IF.class_centroids(torch.zeros(C, D), torch.zeros(C, dtype=torch.long), f, y)
    valid = n > 0
    assert torch.isfinite(IF.intra_class_loss(f, f.flip(0), mu, mu, y, valid))
    assert torch.isfinite(IF.inter_class_loss(mu, mu * 2, valid, live=valid))
    assert torch.isfinite(IF.kd_loss(torch.randn(B, C, dtype=dtype), torch.randn(B, C, dtype=dtype), 4.0))


def test_reference_backend_always_resolves_and_auto_falls_back():
    assert _backend.resolve("reference", "inter", torch.zeros(1)) == "reference"
    assert _backend.resolve(None, "inter", torch.zeros(1)) in _backend.BACKENDS


def test_explicit_unavailable_backend_lists_every_reason():
    for name in ("triton", "cpp"):
        reasons = _backend.not_supported_reasons(name, "inter", "meta")
        assert reasons, name  # nothing runs on meta tensors but the reference
        with pytest.raises(_backend.BackendUnavailableError) as info:
            _backend.resolve(name, "inter", torch.zeros(1, device="meta"))
        for r in reasons:
            assert r in str(info.value)


@pytest.fixture
def set_allow_tf32():
    """Sets ``torch.backends.cuda.matmul.allow_tf32`` for one test and restores it afterwards
    (``monkeypatch.setattr`` cannot undo it on torch < 2.7, where the flag is a module property)."""
    flags = torch.backends.cuda.matmul
    old = flags.allow_tf32
    yield lambda value: setattr(flags, "allow_tf32", value)
    flags.allow_tf32 = old


def test_cuda_inter_order_follows_shape_precision_and_device(monkeypatch, set_allow_tf32):
    """On CUDA the inter loss goes to the C++ float64 Gram form only where it is the faster one:
    float32 kept exact (no TF32) or float64, C >= 2 (Ds + Dt) on full-rate float64 GPUs (64x on
    others), and not forced to the direct form; else the Triton tiles come first. (The rule reads
    shapes, dtypes and flags only, so CPU tensors stand in for CUDA ones here.)"""
    cap = {"v": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap["v"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_inter_form, "_FULL_RATE_FP64", {})
    set_allow_tf32(False)
    monkeypatch.delenv("ICAKD_INTER_FORM", raising=False)
    cuda = torch.device("cuda")

    def first(c, ds=100, dt=200, dtype=torch.float32):
        return _backend._auto_order(cuda, "inter", (torch.zeros(c, ds, dtype=dtype), torch.zeros(c, dt, dtype=dtype)))[0]

    assert first(600) == "cpp" and first(599) == "triton"
    assert first(600, dtype=torch.float64) == "cpp"
    assert first(10**4, dtype=torch.bfloat16) == "triton"
    set_allow_tf32(True)
    assert first(600) == "triton" and first(600, dtype=torch.float64) == "cpp"
    set_allow_tf32(False)
    monkeypatch.setenv("ICAKD_INTER_FORM", "direct")
    assert first(600) == "triton"
    monkeypatch.delenv("ICAKD_INTER_FORM")
    cap["v"] = (8, 9)  # consumer GPU: float64 at 1/64 rate
    _inter_form._FULL_RATE_FP64.clear()
    assert first(600) == "triton" and first(64 * 300) == "cpp"
    # other ops keep their fixed order
    assert _backend._auto_order(cuda, "cam", (torch.zeros(600, 100),)) == _backend._CUDA_ORDER["cam"]


def test_environment_override(monkeypatch):
    monkeypatch.setenv("ICAKD_BACKEND", "reference")
    assert _backend.resolve(None, "cam", torch.zeros(1)) == "reference"
    monkeypatch.setenv("ICAKD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        _backend.resolve(None, "cam", torch.zeros(1))


def test_info_command_prints_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "icakd_fast.info"], capture_output=True, text=True, check=True).stdout
    assert f"icakd_fast {icakd_fast.__version__}" in out and f"torch      {torch.__version__}" in out
    for name in _backend.BACKENDS:
        assert name in out


def test_import_does_not_need_a_gpu_or_the_extension():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = "import icakd_fast, torch; print(icakd_fast.functional.grad_cam(torch.ones(1,1,2,2), torch.ones(1,1)).sum().item())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "4.0"


def test_a_broken_triton_interpreter_is_reported_as_the_reason(monkeypatch):
    """A Triton interpreter that cannot run kernels (Triton < 3.8 with numpy >= 2.4) makes the
    triton backend unavailable with a reason that says what to install, instead of every kernel
    failing with an obscure ``InterpreterError``."""
    pytest.importorskip("triton")
    import numpy

    from icakd_fast.kernels import _common

    if _backend.triton_interpret():  # the real interpreter runs the check kernel correctly here
        assert _common.interpreter_problem() is None

    class Broken:
        def __getitem__(self, grid):
            def run(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return run

    class Wrong:
        def __getitem__(self, grid):
            return lambda out, n: out.fill_(5)

    monkeypatch.setattr(_common, "_interpreter_check_kernel", Broken())
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    msg = _common.interpreter_problem()
    assert "TypeError" in msg and "numpy < 2.4" in msg
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert "numpy < 2.4" not in _common.interpreter_problem()
    monkeypatch.setattr(_common, "_interpreter_check_kernel", Wrong())
    assert "wrong result (5 instead of 6)" in _common.interpreter_problem()

    # the probe turns the message into the backend's reason
    monkeypatch.setattr(_common, "_interpreter_check_kernel", Broken())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_PROBES", {})
    reasons = _backend.not_supported_reasons("triton", "cam", "cpu")
    assert any("cannot run kernels" in r for r in reasons)
    with pytest.raises(Exception, match="cannot run kernels"):
        _backend.resolve("triton", "cam", torch.zeros(1))
