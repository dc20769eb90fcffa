"""``python -m icakd_fast.info``: versions and which backends run here."""

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


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
