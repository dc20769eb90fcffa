"""Loading of the compiled operator library ``icakd_fast._C`` (graceful).

``load()`` finds the library beside this file, compares its build metadata
(``_build_info.json``, written by setup.py) with the running torch and CUDA versions, and loads it
with ``torch.ops.load_library`` so that ``torch.ops.icakd_fast_C.*`` exist. A missing library, a
version mismatch or a failed load warns once (with the built-for and the running versions) and
leaves the package working on its other backends: ``load()`` then returns False and ``reason()``
says why. Importing this module never raises.

``ICAKD_EXT_DIR`` (optional) names another directory holding ``_C*.so`` and ``_build_info.json``.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import warnings

import torch

NAMESPACE = "icakd_fast_C"

_HERE = os.path.dirname(os.path.abspath(__file__))


def _lib_dir() -> str:
    return os.environ.get("ICAKD_EXT_DIR") or _HERE
_lock = threading.Lock()
_state: dict[str, object] = {"done": False, "ok": False, "reason": "", "info": None, "path": None}


def _base_version(v: str | None) -> str:
    return (v or "").split("+")[0]


def running_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "cuda": torch.version.cuda or "cpu"}


def build_info() -> dict | None:
    """The metadata saved beside the library at build time (None when absent or unreadable)."""
    path = os.path.join(_lib_dir(), "_build_info.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def library_path() -> str | None:
    where = _lib_dir()
    candidates = sorted(glob.glob(os.path.join(where, "_C.*so")) + glob.glob(os.path.join(where, "_C.*pyd")))
    if not candidates and where == _HERE:
        try:  # a non-editable install may place it elsewhere on the path
            import importlib.util

            spec = importlib.util.find_spec("icakd_fast._C")
            if spec is not None and spec.origin and os.path.exists(spec.origin):
                return spec.origin
        except Exception:
            return None
        return None
    return candidates[0] if candidates else None


def _versions_message(info: dict | None) -> str:
    run = running_versions()
    built = f"torch {info.get('torch')}, CUDA {info.get('cuda')}" if info else "unknown (no _build_info.json)"
    return f"built for {built}; running torch {run['torch']}, CUDA {run['cuda']}"


def _mismatch(info: dict | None) -> str:
    if not info:
        return ""
    run = running_versions()
    if _base_version(info.get("torch")) != _base_version(run["torch"]):
        return "torch version differs"
    if info.get("with_cuda") and _base_version(info.get("cuda")) != _base_version(torch.version.cuda):
        return "CUDA version differs"
    return ""


def _sanitizer_problem(info: dict | None) -> str:
    """An AddressSanitizer build aborts the process when loaded without its runtime preloaded."""
    if not info or info.get("sanitize") != "address":
        return ""
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        return ""
    return (
        "it was built with ICAKD_SANITIZE=address and needs LD_PRELOAD=\"$(gcc -print-file-name=libasan.so) "
        "$(gcc -print-file-name=libstdc++.so)\" (docs/cpp_extension.md, 'Debugging a crash')"
    )


def _fail(reason: str) -> bool:
    _state["ok"] = False
    _state["reason"] = reason
    if os.environ.get("ICAKD_SKIP_EXT", "0") in ("", "0"):
        warnings.warn(f"icakd_fast: the cpp backend is unavailable: {reason}", RuntimeWarning, stacklevel=3)
    return False


def load() -> bool:
    """Load the operator library once; True when ``torch.ops.icakd_fast_C`` is usable."""
    with _lock:
        if _state["done"]:
            return bool(_state["ok"])
        _state["done"] = True
        info = build_info()
        _state["info"] = info
        path = library_path()
        _state["path"] = path
        if path is None:
            return _fail(
                "the compiled extension icakd_fast._C was not found (build it with "
                "`pip install --no-build-isolation -e .`); " + _versions_message(info)
            )
        why = _mismatch(info)
        if why:
            return _fail(f"{why}: the extension at {path} was {_versions_message(info)}; rebuild it")
        why = _sanitizer_problem(info)
        if why:
            return _fail(f"the extension at {path} cannot be loaded here: {why}; {_versions_message(info)}")
        try:
            torch.ops.load_library(path)
        except Exception as exc:
            return _fail(f"loading {path} failed ({type(exc).__name__}: {exc}); {_versions_message(info)}")
        if not hasattr(torch.ops, NAMESPACE) or not _has_op("cam_fwd"):
            return _fail(f"{path} registered no {NAMESPACE} operators; {_versions_message(info)}")
        _state["ok"] = True
        return True


def _has_op(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def reason() -> str:
    """Why the library is unusable ('' when it loaded)."""
    load()
    return str(_state["reason"])


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``icakd_fast_C::op`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not load():
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", dispatch_key))
    except Exception:
        return False


def with_cuda() -> bool:
    """Whether the loaded library carries CUDA kernels."""
    return has_kernel("cam_fwd", "CUDA")
