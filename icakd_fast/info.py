"""``python -m icakd_fast.info [--check-extension]``: versions, which backends run here and (with the
flag) whether errors raised inside the C++ extension reach Python."""

from __future__ import annotations

import platform
import sys


def report() -> str:
    import torch

    from . import __version__
    from ._backend import BACKENDS, not_supported_reasons

    lines = [f"icakd_fast {__version__}", f"python     {platform.python_version()} ({sys.executable})",
             f"torch      {torch.__version__} (CUDA build {torch.version.cuda or 'none'})"]
    try:
        import triton

        lines.append(f"triton     {triton.__version__}")
    except Exception:
        lines.append("triton     not installed")
    if torch.cuda.is_available():
        lines.append(f"device     {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)")
    else:
        lines.append("device     cpu only (no CUDA device)")
    lines.append("backends:")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in BACKENDS:
        for dev in devices:
            reasons = not_supported_reasons(name, None, dev)
            state = "runs" if not reasons else "unavailable: " + "; ".join(reasons)
            lines.append(f"  {name:<9} on {dev:<4}  {state}")
    return "\n".join(lines)


_ERROR_PROBE = """
import torch, icakd_fast._C
try:
    torch.ops.icakd_fast_C.cam_fwd(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5), True)
except RuntimeError:
    print("raised")
"""


def extension_errors_raise() -> str:
    """Whether an error inside the C++ extension reaches Python as an exception, checked in a child
    process: an extension linked against a C++ runtime other than torch's can crash instead."""
    import subprocess

    try:
        r = subprocess.run([sys.executable, "-c", _ERROR_PROBE], capture_output=True, text=True, timeout=120)
    except Exception as exc:  # pragma: no cover - e.g. no subprocesses allowed
        return f"not checked ({type(exc).__name__})"
    if r.returncode == 0 and "raised" in r.stdout:
        return "yes"
    if r.returncode == 0 or "No module named" in r.stderr:
        return "not checked (extension not built)"
    return (f"NO: the child process died (exit {r.returncode}); rebuild the extension with the compiler torch "
            "was built with, e.g. CXX=/usr/bin/g++ (see docs/cpp_extension.md)")


def main() -> None:
    print(report())
    if "--check-extension" in sys.argv:
        print(f"C++ extension errors raise: {extension_errors_raise()}")


if __name__ == "__main__":
    main()
