"""CUDA kernels of the extension, run on a CPU.

``tests/cuda_emu/cuda_emu.h`` emulates the parts of the CUDA execution model these kernels use
(thread and block indices, shared memory, ``__syncthreads`` / ``__syncthreads_or``, full-warp
shuffles) with one OS thread per CUDA thread. Each program compiles the kernels' own source with
the host compiler and checks it:

- ``cam_vec_emu.cpp``: the vectorised CAM kernels (``csrc/cuda/cam_vec_kernels.cuh``), forward
  and every backward subset against float64 math for float32 / float16 / bfloat16 maps, with
  bit-identical reruns;
- ``bank_emu.cpp``: the memory-bank kernels (``csrc/cuda/bank_kernels.cuh``), bit for bit against
  a sequential statement of the bank semantics over several enqueues, resync, FIFO, segment sums.

The emulator is stricter than a GPU where it helps: a shuffle in a partial warp aborts, dynamic
shared memory starts as NaN. It proves the kernels' logic, not their speed, and nothing about
the GPU's memory model beyond the barriers: ``tests/test_cpp_gpu.py`` runs them on a GPU.
"""

import os
import subprocess

import pytest

from helpers import HOST_CXX as CXX

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
@pytest.mark.parametrize("program", ["cam_vec_emu", "bank_emu"])
def test_cuda_kernels_emulated_on_cpu(tmp_path, program):
    exe = tmp_path / program
    include = os.path.join(os.path.dirname(torch.__file__), "include")  # c10::Half / c10::BFloat16
    build = subprocess.run(
        [CXX, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare",
         "-I", os.path.join(ROOT, "csrc", "cuda"), "-I", os.path.join(ROOT, "tests", "cuda_emu"), "-isystem", include,
         os.path.join(ROOT, "tests", "cuda_emu", program + ".cpp"), "-o", str(exe)],
        capture_output=True, text=True, timeout=600)
    if build.returncode != 0 and "barrier" in build.stderr and "No such file" in build.stderr:
        pytest.skip("the host compiler has no C++20 <barrier>")
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " 0 failures" in run.stdout, run.stdout[-4000:]
