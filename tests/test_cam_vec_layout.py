"""The index plan of the vectorised CUDA CAM kernels, checked on a CPU.

``csrc/cuda/cam_vec_layout.h`` holds the kernels' (vector, element) -> (channel, pixel) mapping
and the order of their per-channel sums, with no CUDA or torch in it. The kernels themselves run
only on a GPU (``tests/test_cpp_gpu.py``); this compiles the same header with the host compiler
and checks, for every pixel count the kernels accept (V <= H*W <= 512, V = 8 and 4), that each
element of a channel group is read exactly once at the place the plan says, and that each
channel's sum visits exactly the partial sums holding its elements.
"""

import os
import subprocess

import pytest

from helpers import HOST_CXX as CXX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_cam_vec_layout(tmp_path):
    exe = tmp_path / "cam_vec_layout_check"
    build = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc", "cuda"),
                            os.path.join(ROOT, "tests", "cam_vec_layout_check.cpp"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "0 failures" in run.stdout
