"""The public API with ``backend="cpp"`` (CPU): functional ops against the reference, the
backend's module attributes, torch.compile tracing through the registered ops, and the graceful
extension loader.

Skipped when the extension ``icakd_fast._C`` is not built (except the loader tests).
"""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from icakd_fast import _ext

pytestmark = pytest.mark.cpp

needs_ext = pytest.mark.skipif(not _ext.load(), reason=f"icakd_fast._C is not built: {_ext.reason()}")


def _functional():
    try:
        import icakd_fast.functional as F

        return F
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"icakd_fast.functional is not importable: {exc}")


def close(a, b, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@needs_ext
def test_backend_module_attributes():
    from icakd_fast import _backend
    from icakd_fast.ops import _cpp_impl as cpp

    assert set(cpp.OPS) == set(_backend.OPS)
    assert "cpu" in cpp.device_types()
    assert cpp.UNAVAILABLE_REASONS == ()
    assert _backend.not_supported_reasons("cpp", "inter", "cpu") == []
    assert _backend.resolve("cpp", "cam", torch.zeros(1)) == "cpp"
    assert _backend.resolve(None, "inter", torch.zeros(1)) in ("cpp", "reference")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_functional_cam_ops(dtype):
    F = _functional()
    from icakd_fast import reference

    f0 = torch.randn(4, 24, 7, 5).to(dtype)
    w0 = torch.randn(4, 24).to(dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    outs = []
    for backend in ("cpp", "reference"):
        f, w = f0.clone().requires_grad_(), w0.clone().requires_grad_()
        cam, pooled = F.class_activation_features(f, w, backend=backend)
        (cam.float().square().sum() + (pooled.float() * torch.linspace(-1, 1, 24)).sum()).backward()
        outs.append((cam, pooled, f.grad, w.grad, F.grad_cam(f0, w0, backend=backend)))
    for a, b in zip(*outs):
        close(a, b, **tol)
    g = torch.randn(3, 8, 4, 4).to(dtype)
    close(F.grad_cam_weights(g, backend="cpp"), reference.grad_cam_weights(g), **tol)


@needs_ext
def test_functional_structure_ops():
    F = _functional()
    c, d, b = 40, 16, 30
    sums, counts = torch.randn(c, d), torch.randint(0, 3, (c,))
    f_s0, f_t0 = torch.randn(b, d), torch.randn(b, d)
    labels = torch.randint(0, c, (b,))
    res = []
    for backend in ("cpp", "reference"):
        f_s, f_t = f_s0.clone().requires_grad_(), f_t0.clone()
        mu_s, tot = F.class_centroids(sums, counts, f_s, labels, backend=backend)
        mu_t, _ = F.class_centroids(sums, counts, f_t, labels, backend=backend)
        valid = tot >= 1
        live = torch.zeros(c, dtype=torch.bool)
        live[labels] = True
        intra = F.intra_class_loss(f_s, f_t, mu_s, mu_t, labels, valid, backend=backend)
        inter = F.inter_class_loss(mu_s, mu_t, valid, live=live, backend=backend)
        (intra + 3 * inter).backward()
        res.append((mu_s, tot, intra, inter, f_s.grad))
    for a, b in zip(*res):
        close(a, b)


@needs_ext
def test_functional_inter_large_c_tiles():
    F = _functional()
    c = 1000
    mu_s0, mu_t = torch.randn(c, 32), torch.randn(c, 48)
    valid = torch.rand(c) < 0.9
    live = torch.rand(c) < 0.1
    grads = []
    for backend in ("cpp", "reference"):
        mu_s = mu_s0.clone().requires_grad_()
        loss = F.inter_class_loss(mu_s, mu_t, valid, live=live, backend=backend)
        loss.backward()
        grads.append((loss, mu_s.grad))
    close(grads[0][0], grads[1][0])
    close(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-7)


@needs_ext
def test_compile_fullgraph_traces_through_cpp_ops():
    F = _functional()

    def step(f, w, mu_s, mu_t, valid):
        cam, pooled = F.class_activation_features(f, w, backend="cpp")
        return cam.sum() + pooled.sum() + F.inter_class_loss(mu_s, mu_t, valid, backend="cpp")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for c in (7, 7, 9):
        f = torch.randn(2, 5, 4, 4, requires_grad=True)
        w = torch.randn(2, 5, requires_grad=True)
        mu_s, mu_t = torch.randn(c, 6, requires_grad=True), torch.randn(c, 3)
        valid = torch.ones(c, dtype=torch.bool)
        out = compiled(f, w, mu_s, mu_t, valid)
        out.backward()
        ref = step(f.detach(), w.detach(), mu_s.detach(), mu_t, valid)
        close(out, ref)
        assert f.grad is not None and mu_s.grad is not None


@needs_ext
@pytest.mark.parametrize("c", [7, 40])  # 40 >= 2 (Ds + Dt): the Gram form with its kept K
def test_compiled_inter_loss_matches_eager_in_both_cpp_forms(c):
    """Under the partitioner Inductor uses, the inter loss and its gradient match eager, whether
    the Function takes the tiled form (c=7) or the two-step Gram form that saves K (c=40)."""
    import icakd_fast.reference as R
    from icakd_fast import _backend

    F = _functional()
    mu_t, valid, live = torch.randn(c, 3), torch.rand(c) < 0.9, torch.rand(c) < 0.4
    mu_s0 = torch.randn(c, 6)
    assert _backend.inter_gram_pays(mu_s0, mu_t) == (c == 40)
    compiled = torch.compile(lambda s: F.inter_class_loss(s, mu_t, valid, live=live, backend="cpp"),
                             fullgraph=True, backend="aot_eager_decomp_partition")
    outs = []
    for fn in (compiled, lambda s: R.inter_class_loss(s, mu_t, valid, live)):
        s = mu_s0.clone().requires_grad_()
        loss = fn(s)
        outs.append((loss, torch.autograd.grad(loss, s)[0]))
    close(outs[0][0], outs[1][0])
    close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# the loader: missing / mismatched extension warns once and never breaks the package
# ---------------------------------------------------------------------------------------------

_LOADER_SCRIPT = r"""
import json, warnings
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    import icakd_fast  # probes the backends, loads the extension
    import icakd_fast._ext as ext
    ok = [ext.load(), ext.load()]
    from icakd_fast import _backend
    reasons = _backend.not_supported_reasons("cpp", "cam", "cpu")
    import torch
    import icakd_fast.functional as F
    f, w = torch.randn(2, 3, 4, 4), torch.randn(2, 3)
    F.class_activation_features(f, w)  # automatic choice falls back to the reference
msgs = [str(w.message) for w in rec if "cpp backend is unavailable" in str(w.message)]
print(json.dumps({"ok": ok, "warnings": msgs, "reasons": reasons}))
"""


@pytest.mark.parametrize("mode", ["mismatch", "missing", "sanitizer"])
def test_loader_warns_once_and_package_keeps_working(mode, tmp_path):
    import os
    import shutil

    env = dict(os.environ, ICAKD_EXT_DIR=str(tmp_path))
    env.pop("ICAKD_SKIP_EXT", None)
    if mode == "mismatch":
        lib = _ext.library_path()
        if lib is None:
            pytest.skip("needs a built extension to copy")
        shutil.copy(lib, tmp_path / os.path.basename(lib))
        (tmp_path / "_build_info.json").write_text(json.dumps({"torch": "1.0.0", "cuda": "9.9", "with_cuda": True}))
    if mode == "sanitizer":
        # an AddressSanitizer build would abort the process if loaded without its runtime: refused
        # from its metadata before loading (the library file itself is never opened here)
        (tmp_path / "_C.abi3.so").write_bytes(b"not a library")
        info = {"torch": torch.__version__, "cuda": "cpu", "with_cuda": False, "sanitize": "address"}
        (tmp_path / "_build_info.json").write_text(json.dumps(info))
        env["LD_PRELOAD"] = ""
    proc = subprocess.run([sys.executable, "-c", _LOADER_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] == [False, False]
    assert len(out["warnings"]) == 1, out
    msg = out["warnings"][0]
    assert torch.__version__ in msg  # the running version
    if mode == "mismatch":
        assert "1.0.0" in msg and "9.9" in msg  # the built-for versions
    if mode == "sanitizer":
        assert "ICAKD_SANITIZE=address" in msg and "LD_PRELOAD" in msg
    assert out["reasons"], "the cpp backend must report why it is unavailable"


@needs_ext
def test_build_info_beside_library():
    info = _ext.build_info()
    assert info is not None
    assert info["torch"] == torch.__version__
    assert info["cuda"] in ("cpu", torch.version.cuda)
    json.dumps(info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.load()
