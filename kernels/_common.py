"""Small helpers shared by the kernel launchers (no upward imports)."""

from __future__ import annotations

import torch
import triton

try:  # torch >= 2.6: kernels launched through wrap_triton are visible to torch.compile
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover - older torch: plain launches
    def _wrap_triton(kernel):
        return kernel


def _is_fake(x) -> bool:
    if not isinstance(x, torch.Tensor):
        return False
    if x.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        return False
    return is_fake(x)


class _InterpretedLaunch:
    """Interpreter kernels cannot be traced: their launch is skipped on fake/meta tensors (shape
    propagation only -- every output is allocated by torch ops before the launch)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if any(_is_fake(a) for a in args) or any(_is_fake(v) for v in kwargs.values()):
                return None
            return self.kernel[grid](*args, **kwargs)

        return run


def interpreter_kernel(kernel) -> bool:
    from triton.runtime.jit import JITFunction

    return not isinstance(kernel, JITFunction)


try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover
    def _get_current_dispatch_mode():
        return True


def launch(kernel):
    """``launch(kernel)[grid](...)``: a launch that ``torch.library.triton_op`` can trace.

    While tracing (fake tensors, dispatch modes, torch.compile) the launch goes through
    ``wrap_triton``; in eager mode the compiled kernel is called directly, because the wrapper's
    dispatch costs hundreds of microseconds of host time per launch.
    """
    if interpreter_kernel(kernel):
        return _InterpretedLaunch(kernel)
    if _get_current_dispatch_mode() is None and not torch.compiler.is_compiling():
        return kernel
    return _wrap_triton(kernel)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1). Plain Python: launchers run it on every call, and
    ``triton.next_power_of_2`` / ``triton.cdiv`` go through Triton's constexpr-function machinery
    (microseconds of host time each)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (see ``next_pow2``)."""
    return -(-int(a) // int(b))


def interpreting(t: torch.Tensor) -> bool:
    """True when the kernels run through the Triton interpreter (CPU tensors)."""
    return t.device.type != "cuda"


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


#: codes of the dot precisions inside the kernels
PREC_CODE = {"ieee": 0, "tf32": 1, "tf32x3": 2, "bf16": 3}


def dot_precision(*dtypes: torch.dtype) -> str:
    """Precision of the kernels' float32 dot products, following PyTorch's own switch
    (``torch.set_float32_matmul_precision``; ``allow_tf32 = True`` reads as ``"high"``).

    ``"highest"`` (PyTorch's default): ``"tf32x3"`` -- three TF32 tensor-core products per
    product (the split-operand trick), as accurate as float32 FMA to within a few ulps, several
    times faster. ``"high"``: ``"tf32"``. ``"medium"``: ``"bf16"`` (operands rounded to
    bfloat16, float32 accumulation). Half inputs convert exactly to TF32, so they take
    ``"tf32"``; float64 takes ``"ieee"``.
    """
    if torch.float64 in dtypes:
        return "ieee"
    if all(d in (torch.float16, torch.bfloat16) for d in dtypes):
        return "tf32"
    prec = torch.get_float32_matmul_precision()
    if prec == "medium":
        return "bf16"
    if prec == "high":
        return "tf32"
    return "tf32x3"
