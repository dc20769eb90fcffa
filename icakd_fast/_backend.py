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

BACKENDS = ("reference", "triton", "cpp")

#: ops that a fast backend may implement (a backend module lists its own in ``OPS``)
OPS = ("cam", "grad_cam_weights", "class_bank", "fifo_bank", "centroids", "intra", "inter")


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
    return reasons


def is_available(name: str, op: str | None = None, device: torch.device | str | None = None) -> bool:
    return not not_supported_reasons(name, op, device)


def implementation(name: str):
    """The implementation module of a backend (raises if it did not import)."""
    mod, reasons = _probe(name)
    if mod is None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: " + "; ".join(reasons))
    return mod


#: automatic order on CUDA tensors, per op, from the H200 measurements recorded in
#: benchmarks/results (gpu_bench_H200_run3/run4, e2e_H200): in a full ImageNet training step the
#: Triton CAM kernels gave the fastest ICAKD step (their GPU time is 0.22 ms vs 0.59 ms for the C++
#: kernels; the C++ op has less host overhead, which a GPU-bound step hides); the C++ bank enqueue
#: was fastest (0.24 ms, 0.04 ms in a CUDA graph); the Triton inter loss is the fastest and needs 43 MB
#: at C=21841 (C++: 812 MB); for centroids + intra plain PyTorch was fastest.
_CUDA_ORDER = {
    "cam": ("triton", "cpp", "reference"),
    "class_bank": ("cpp", "triton", "reference"),
    "fifo_bank": ("cpp", "triton", "reference"),
    "centroids": ("reference",),
    "intra": ("reference",),
}


def _auto_order(device: torch.device, op: str | None = None) -> tuple[str, ...]:
    if device.type == "cuda":
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
        for name in _auto_order(device, op):
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


def status() -> dict[str, list[str]]:
    """{backend: reasons it cannot run at all} (empty list = usable on at least one device)."""
    return {name: list(_probe(name)[1]) for name in BACKENDS}


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
