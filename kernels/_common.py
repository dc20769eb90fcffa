"""Small helpers shared by the kernel launchers (no upward imports)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    from torch.utils._python_dispatch import _get_current_dispatch_mode as current_dispatch_mode
except ImportError:  # pragma: no cover
    def current_dispatch_mode():
        """The active TorchDispatchMode (unknown on this torch: assume one)."""
        return True


def launch(kernel):
    """``launch(kernel)[grid](...)``: a launch that ``torch.library.triton_op`` can trace.

    While tracing (fake tensors, dispatch modes, torch.compile) the launch goes through
    ``wrap_triton``; in eager mode the compiled kernel is called directly, because the wrapper's
    dispatch costs hundreds of microseconds of host time per launch.
    """
    if interpreter_kernel(kernel):
        return _InterpretedLaunch(kernel)
    if current_dispatch_mode() is None and not torch.compiler.is_compiling():
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

#: (major, minor) of the installed Triton, for the few work-arounds of old releases
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:2])


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


@triton.jit
def _interpreter_check_kernel(out_ptr, n):
    acc = 0
    for i in range(0, n):  # a loop bound known only at run time, as in most kernels here
        acc += i
    tl.store(out_ptr, acc)


def interpreter_problem() -> str | None:
    """Runs a tiny kernel through the Triton interpreter; why it cannot run kernels, or None.

    The interpreters of Triton releases before 3.8 turn a run-time integer into a Python int with
    ``int()`` of a one-element array, which numpy >= 2.4 refuses: every kernel with such a loop
    bound then fails with an obscure ``InterpreterError``. Found once here, it is reported as the
    reason the triton backend is unavailable instead.
    """
    import numpy

    out = torch.full((1,), -1, dtype=torch.int32)
    try:
        _interpreter_check_kernel[(1,)](out, 4)
    except Exception as exc:  # noqa: BLE001 - whatever the interpreter raises is the answer
        hint = ""
        if tuple(int(x) for x in numpy.__version__.split(".")[:2] if x.isdigit()) >= (2, 4):
            hint = f"; the interpreter of Triton {triton.__version__} needs numpy < 2.4 (pip install 'numpy<2.4') or a newer Triton"
        return f"the Triton interpreter cannot run kernels here ({type(exc).__name__}: {exc}){hint}"
    if int(out.item()) != 6:
        return f"the Triton interpreter computed a wrong result ({int(out.item())} instead of 6)"
    return None
