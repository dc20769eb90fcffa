"""Runs the Triton and CUDA C++ kernels of the hot spots a few times at benchmark shapes, for a kernel profiler.

    ncu --kernel-name regex:"cam_|_inter_" --launch-count 40 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python benchmarks/profile_kernels.py

Without a profiler it prints the CUDA-event time of each call (a quick sanity check). Needs a GPU.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from icakd_fast.kernels import cam as kcam  # noqa: E402
from icakd_fast.kernels import structure as kst  # noqa: E402


def timed(name, fn, reps=2, nbytes=None):
    """CUDA-event time of the last of ``reps`` calls; with ``nbytes`` (the bytes one pass must move)
    also the rate against them."""
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
    us = start.elapsed_time(end) * 1e3
    rate = f", {nbytes / us / 1e3:.0f} GB/s of {nbytes / 1e6:.0f} MB" if nbytes else ""
    print(f"{name}: {us:.1f} us (last of {reps}){rate}", flush=True)


def main():
    if not torch.cuda.is_available():
        sys.exit("profile_kernels.py needs a CUDA device")
    torch.manual_seed(0)
    B, K, H, W = 256, 2048, 7, 7
    f = torch.randn(B, K, H, W, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(B, K, device="cuda") / 49).to(torch.bfloat16)
    fbytes = f.numel() * f.element_size()  # forward: read the map once; backward: read + write
    for mode in ("image", "split"):
        kcam.CAM_FWD_MODE = mode
        timed(f"cam_fwd {mode}", lambda: kcam.cam_fwd(f, w, True), nbytes=fbytes)
    kcam.CAM_FWD_MODE = "auto"
    cam, pooled, pool_w, _ = kcam.cam_fwd(f, w, True)
    gc, gp = torch.randn_like(cam), torch.randn_like(pooled)
    timed("cam_bwd", lambda: kcam.cam_bwd(gc, gp, f, w, cam, pool_w, True, True), nbytes=2 * fbytes)
    kcam.CAM_VEC = True  # the opt-in vec kernels on the same inputs
    timed("cam_fwd vec", lambda: kcam.cam_fwd(f, w, True), nbytes=fbytes)
    timed("cam_bwd vec", lambda: kcam.cam_bwd(gc, gp, f, w, cam, pool_w, True, True), nbytes=2 * fbytes)
    kcam.CAM_VEC = False
    try:  # the C++ extension's CUDA kernels on the same inputs
        from icakd_fast.ops import _cpp_impl as cpp

        ccam, _, cpool_w = cpp.cam_fwd(f, w, True)
        timed("cam_fwd cpp", lambda: cpp.cam_fwd(f, w, True), nbytes=fbytes)
        timed("cam_bwd cpp", lambda: cpp.cam_bwd(gc, gp, f, w, ccam, cpool_w, True, True), nbytes=2 * fbytes)
        os.environ["ICAKD_CUDA_CAM"] = "vec"  # the opt-in 16-byte-vector CUDA kernels
        try:
            timed("cam_fwd cpp vec", lambda: cpp.cam_fwd(f, w, True), nbytes=fbytes)
            timed("cam_bwd cpp vec", lambda: cpp.cam_bwd(gc, gp, f, w, ccam, cpool_w, True, True), nbytes=2 * fbytes)
        finally:
            del os.environ["ICAKD_CUDA_CAM"]
    except Exception as exc:  # extension not built with CUDA kernels
        print(f"cam cpp: skipped ({type(exc).__name__}: {exc})", flush=True)
    timed("copy of the map (reference rate)", lambda: f.clone(), nbytes=2 * fbytes)
    C, Ds, Dt, P = 4096, 512, 2048, 256
    mu_s, mu_t = torch.randn(C, Ds, device="cuda"), torch.randn(C, Dt, device="cuda")
    valid = torch.ones(C, dtype=torch.bool, device="cuda")
    live = torch.zeros(C, dtype=torch.bool, device="cuda")
    live[torch.randperm(C, device="cuda")[:P]] = True
    torch.set_float32_matmul_precision("high")
    timed("inter_fwd tf32", lambda: kst.inter_fwd(mu_s, mu_t, valid, 1e-12))
    timed("inter_bwd tf32", lambda: kst.inter_bwd(torch.ones((), device="cuda"), mu_s, mu_t, valid, live, True, False, 1e-12))


if __name__ == "__main__":
    main()
