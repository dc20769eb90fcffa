"""Backend names, availability probes and resolution.

Three backends implement the performance-critical ops:

* ``reference`` -- plain PyTorch differentiated by autograd; runs anywhere.
* ``triton``    -- fused Triton kernels (``icakd_fast.kernels``); CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` was set before triton was imported.
* ``cpp``       -- the compiled extension ``icakd_fast._C`` (CPU kernels and CUDA kernels).

``resolve(backend, op, *tensors)`` picks one. ``backend=None`` (or ``"auto"``) means: the
``ICAKD_BACKEND`` environment variable if set, otherwise the automatic order: on CPU tensors
cpp, reference (plus triton after cpp when the interpreter is on); on CUDA tensors a per-op order
chosen from GPU measurements (``_CUDA_ORDER``; triton, cpp, reference for the rest). The automatic choice falls back silently; a backend asked for by name that cannot run
raises ``BackendUnavailableError`` listing every reason.

Import-time probes run once and are cached; per-call checks are plain attribute reads, so the
resolution is cheap and traceable by ``torch.compile``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Iterable

import torch

from ._inter_form import gram_shape_pays, inter_gram_pays  # noqa: F401  (public names kept here too)

BACKENDS = ("reference", "triton", "cpp")

#: ops that a fast backend may implement (a backend module lists its own in ``OPS``)
OPS = ("cam", "cam_loss", "class_activation", "grad_cam_weights", "class_bank", "fifo_bank", "bank_update",
       "centroids", "intra", "inter", "structure")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the op on the given inputs."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# one-time probes
# --------------------------------------------------------------------------------------------


def _run_probe(name: str) -> tuple[object | None, tuple[str, ...]]:
    """Import the backend's implementation module once: (module or None, reasons it cannot run)."""
    if name == "reference":
        return importlib.import_module("icakd_fast.reference"), ()
    if name == "triton":
        reasons = []
        try:
            import triton  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the install
            return None, (f"triton is not importable ({type(exc).__name__}: {exc})",)
        try:
            mod = importlib.import_module("icakd_fast.ops._triton_impl")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("icakd_fast"):
                return None, ("the triton backend is not part of this build",)
            return None, (f"triton kernels failed to import ({type(exc).__name__}: {exc})",)
        except Exception as exc:
            return None, (f"triton kernels failed to import ({type(exc).__name__}: {exc})",)
        if not torch.cuda.is_available() and not triton_interpret():
            reasons.append("no CUDA device and TRITON_INTERPRET is not set")
        if triton_interpret():
            problem = mod.interpreter_problem()
            if problem:
                reasons.append(problem)
        return mod, tuple(reasons)
    if name == "cpp":
        try:
            mod = importlib.import_module("icakd_fast.ops._cpp_impl")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("icakd_fast"):
                return None, ("the cpp backend is not part of this build",)
            return None, (f"the cpp backend failed to import ({type(exc).__name__}: {exc})",)
        except Exception as exc:
            return None, (f"the cpp backend failed to import ({type(exc).__name__}: {exc})",)
        reasons = tuple(getattr(mod, "UNAVAILABLE_REASONS", ()))
        return mod, reasons
    raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")


_PROBES: dict[str, tuple[object | None, tuple[str, ...], tuple[str, ...]]] = {}


def _probe(name: str) -> tuple[object | None, tuple[str, ...]]:
    """Cached (module or None, reasons it cannot run at all); also caches its device types."""
    hit = _PROBES.get(name)
    if hit is None:
        mod, reasons = _run_probe(name)
        types = ("cpu", "cuda", "meta") if name == "reference" else tuple(mod.device_types()) if mod is not None else ()
        hit = _PROBES[name] = (mod, reasons, types)
    return hit[0], hit[1]


def probe_all() -> None:
    """Run every probe now (``import icakd_fast`` does), so that no probe runs while tracing."""
    for name in BACKENDS:
        _probe(name)


def not_supported_reasons(name: str, op: str | None = None, device: torch.device | str | None = None) -> list[str]:
    """Every reason why backend ``name`` cannot run ``op`` on ``device`` (empty list: it can)."""
    mod, reasons = _probe(name)
    reasons = list(reasons)
    if mod is None or name == "reference":
        return reasons
    if op is not None and op not in getattr(mod, "OPS", ()):
        reasons.append(f"op {op!r} is not implemented by the {name} backend")
    if device is not None:
        dev = torch.device(device)
        if dev.type not in _PROBES[name][2]:
            extra = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors)" if name == "triton" and dev.type == "cpu" else ""
            reasons.append(f"{name} does not run on {dev.type} tensors{extra}")
    # the backend's own rules (an op it implements on some devices only)
    own = getattr(mod, "not_supported_reasons", None)
    if own is not None and op is not None and not reasons:
        reasons.extend(own(op, None if device is None else torch.device(device)))
    return reasons


def is_available(name: str, op: str | None = None, device: torch.device | str | None = None) -> bool:
    return not not_supported_reasons(name, op, device)


def implementation(name: str):
    """The implementation module of a backend (raises if it did not import)."""
    mod, reasons = _probe(name)
    if mod is None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: " + "; ".join(reasons))
    return mod


#: automatic order on CUDA tensors, per op: the backend that gave the fastest training step in
#: the GPU benchmarks (figures and results files: docs/performance.md, "Why the automatic choice
#: is what it is"). CAM: triton (less GPU time; the C++ op's lower host overhead is hidden in a
#: GPU-bound step); banks: cpp; centroids + intra: plain PyTorch. The inter loss depends on
#: shapes and precision: ``_inter_cuda_order``.
_CUDA_ORDER = {
    "cam": ("triton", "cpp", "reference"),
    "class_bank": ("cpp", "triton", "reference"),
    "fifo_bank": ("cpp", "triton", "reference"),
    "centroids": ("reference",),
    "intra": ("reference",),
}


def _inter_cuda_order(tensors: tuple, device: torch.device) -> tuple[str, ...]:
    """The inter loss on CUDA: the Triton tiles unless a backend asks to go first for these
    operands (``preferred``: the C++ float64 Gram form when C is large against Ds + Dt and
    float32 products must keep float32 accuracy; figures: docs/performance.md)."""
    order = ("triton", "cpp", "reference")
    for name in order:
        mod = _probe(name)[0]
        prefers = getattr(mod, "preferred", None)
        if prefers is not None and prefers("inter", device, *tensors):
            return (name,) + tuple(n for n in order if n != name)
    return order


def _auto_order(device: torch.device, op: str | None = None, tensors: tuple = ()) -> tuple[str, ...]:
    if device.type == "cuda":
        if op == "inter" and len(tensors) >= 2:
            return _inter_cuda_order(tensors, device)
        return _CUDA_ORDER.get(op, ("triton", "cpp", "reference"))
    if device.type == "cpu" and triton_interpret():
        # the interpreter is a correctness tool, never the fast path: cpp first
        return ("cpp", "triton", "reference")
    return ("cpp", "reference")


def _device_of(tensors: Iterable[object]) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def resolve(backend: str | None, op: str, *tensors: object) -> str:
    """Choose the backend that runs ``op`` on ``tensors``."""
    if backend is None or backend == "auto":
        env = os.environ.get("ICAKD_BACKEND", "").strip().lower()
        backend = env if env and env != "auto" else None
    device = _device_of(tensors)
    if backend is None:
        for name in _auto_order(device, op, tensors):
            if name == "reference" or not not_supported_reasons(name, op, device):
                return name
        return "reference"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)} or None, got {backend!r}")
    reasons = not_supported_reasons(backend, op, device)
    if reasons:
        raise BackendUnavailableError(
            f"backend {backend!r} cannot run {op!r} on {device.type} tensors:\n  - " + "\n  - ".join(reasons)
        )
    return backend


def cached(cache: dict, key, make):
    """``cache[key]``, made by ``make()`` the first time. While ``torch.compile`` traces, ``make()``
    runs and nothing is stored: the graph keeps what it gave, and a cache filled then would only
    add guards (and recompiles) on its contents."""
    if torch.compiler.is_compiling():
        return make()
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = make()
    return hit


def status() -> dict[str, list[str]]:
    """{backend: reasons it cannot run at all} (empty list = usable on at least one device)."""
    return {name: list(_probe(name)[1]) for name in BACKENDS}


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
