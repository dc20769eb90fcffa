"""Compiles every Triton kernel specialisation the launchers produce for a GPU, with no GPU.

    python .ci/compile_triton.py            # sm_90, every case
    python .ci/compile_triton.py --quick    # fewer shapes (335 specialisations instead of 495)
    python .ci/compile_triton.py --list     # record and list the specialisations only

The tests run the kernels through the Triton interpreter, which executes their Python source and
so cannot tell whether Triton's compiler accepts them: a construct the compiler of some Triton
release rejects (a starred call in a kernel, with Triton 3.2) or an input the compiler aborts on
(a layout assertion) passes every interpreted test. This script calls the launchers of
``icakd_fast.kernels`` over a matrix of inputs (dtypes, layouts, shapes that take each branch,
every flag of the backward) on empty CPU tensors with their launches recorded instead of run,
using the launch configurations of a CUDA device; then it compiles each distinct specialisation
(argument types, constants, divisibility, warps, stages) for ``sm_<arch>`` with the installed
Triton's own compiler and ptxas, as its launcher would on that GPU. Exit status 1 when any fails.

A compiler that aborts takes the process with it: the kernel being compiled is printed first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import types

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # interpreted kernels cannot be compiled
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET")
    sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402
import triton  # noqa: E402

import kernel_static as ks  # noqa: E402
from icakd_fast.kernels import bank as kb  # noqa: E402
from icakd_fast.kernels import cam as kcam  # noqa: E402
from icakd_fast.kernels import structure as kst  # noqa: E402

_CUDA = types.SimpleNamespace(device=torch.device("cuda"))  # what the launchers read of a CUDA tensor


class _Recording:
    """Every launch of the three kernel modules recorded (nothing runs), with the launch
    configurations the launchers pick for CUDA tensors."""

    def __init__(self):
        self.label = ""  # what the cases are doing, kept with each launch
        self.launches = []  # (kernel, grid, args, kwargs, label)

    def __enter__(self):
        self.saved = (kcam._launch, kb.launch, kst.launch, kst._cfg, kst._splits, kcam.CAM_VEC, kcam.CAM_FWD_MODE)
        cfg, splits = kst._cfg, kst._splits
        kcam._launch = kb.launch = kst.launch = self._launch
        kst._cfg = lambda x, C, f64=False: cfg(_CUDA, C, f64)
        kst._splits = lambda C, bn, device: splits(C, bn, torch.device("cuda"))
        return self

    def __exit__(self, *exc):
        (kcam._launch, kb.launch, kst.launch, kst._cfg, kst._splits, kcam.CAM_VEC, kcam.CAM_FWD_MODE) = self.saved

    def _launch(self, kernel):
        return ks._Grid(lambda grid, args, kwargs: self.launches.append((kernel, tuple(grid), args, kwargs, self.label)))


def _cam_cases(r: _Recording, quick: bool):
    shapes = [(4, 64, 7, 7), (3, 40, 5, 3), (2, 96, 1, 1)]
    if not quick:
        shapes += [(2, 48, 14, 14), (2, 16, 70, 70)]  # 70x70: more pixels than one fused tile
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    for variant in ("split", "image", "vec"):
        kcam.CAM_VEC = variant == "vec"
        kcam.CAM_FWD_MODE = "image" if variant == "image" else "auto"
        for B, K, H, W in shapes:
            for dt in dtypes:
                if variant == "vec" and dt not in (torch.float16, torch.bfloat16):
                    continue
                for layout in ("nchw", "channels_last", "strided") if not quick or variant == "split" else ("nchw",):
                    r.label = f"cam {variant} {dt} {layout} {B}x{K}x{H}x{W}"
                    f = torch.empty(B, K, H, W, dtype=dt)
                    if layout == "channels_last":
                        f = f.contiguous(memory_format=torch.channels_last)
                    elif layout == "strided":
                        f = torch.empty(B, K, H, 2 * W, dtype=dt)[..., ::2]
                    w = torch.empty(B, K, dtype=dt)
                    for pooled in (True, False):
                        cam, pool, pw, _ = kcam.cam_fwd(f, w, pooled)
                        for gc, gp in ((True, True), (True, False), (False, True)):
                            if gp and not pooled:
                                continue
                            for nf, nw in ((True, True), (True, False), (False, True)):
                                kcam.cam_bwd(torch.empty_like(cam) if gc else None, torch.empty_like(pool) if gp else None,
                                             f, w, cam, pw, nf, nw)
                    kcam.cam_fwd(f, None, True, grads=torch.empty_like(f))  # generic Grad-CAM: weights from grads
                    kcam.spatial_mean(f)
    kcam.CAM_VEC, kcam.CAM_FWD_MODE = False, "auto"


def _bank_cases(r: _Recording, quick: bool):
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for C, S, D, N in ((10, 3, 5, 7), (1000, 16, 2048, 256)) if not quick else ((10, 3, 5, 7),):
            r.label = f"bank {dt} C={C} S={S} D={D} N={N}"
            bank, sums = torch.empty(C, S, D, dtype=dt), torch.empty(C, D)
            count, ptr = torch.empty(C, dtype=torch.int64), torch.empty(C, dtype=torch.int64)
            feats, labels = torch.empty(N, D, dtype=dt), torch.zeros(N, dtype=torch.int64)
            mask = torch.ones(N, dtype=torch.bool)
            kb.class_bank_enqueue_(bank, count, ptr, sums, feats, labels, mask)
            fifo, fifo_labels = torch.empty(C * S, D, dtype=dt), torch.empty(C * S, dtype=torch.int64)
            kb.fifo_bank_enqueue_(fifo, fifo_labels, torch.empty((), dtype=torch.int64), feats, labels, mask)
            kb.class_bank_resync_(bank, count, sums, torch.arange(min(C, N)))
            kb.fifo_bank_sums(fifo, fifo_labels, C)
            kb.segment_sum(feats, labels, C)


def _structure_cases(r: _Recording, quick: bool):
    sizes = [(7, 5, 9), (1000, 2048, 256)] if not quick else [(7, 5, 9)]
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for C, D, B in sizes:
            r.label = f"structure {dt} C={C} D={D} B={B}"
            sums, counts = torch.empty(C, D, dtype=dt), torch.zeros(C, dtype=torch.int64)
            feats, labels = torch.empty(B, D, dtype=dt), torch.zeros(B, dtype=torch.int64)
            kst.centroids_fwd(sums, counts, feats, labels)
            valid = torch.ones(C, dtype=torch.bool)
            kst.intra_fwd(feats, feats, sums, sums, labels, valid)
            kst.intra_bwd(torch.ones(()), feats, feats, sums, sums, labels, valid)
    inter = [(9, 24, 40, 3), (3000, 64, 96, 256)] if quick else [(9, 24, 40, 3), (3000, 64, 96, 256), (21841, 512, 2048, 256)]
    for precision in ("highest", "high", "medium"):
        torch.set_float32_matmul_precision(precision)
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            if dt != torch.float32 and precision != "highest":
                continue  # the precision switch only concerns float32 inputs
            for C, Ds, Dt, P in inter:
                r.label = f"inter {dt} {precision} C={C} Ds={Ds} Dt={Dt} P={P}"
                mu_s, mu_t = torch.empty(C, Ds, dtype=dt), torch.empty(C, Dt, dtype=dt)
                valid = torch.ones(C, dtype=torch.bool)
                live = torch.zeros(C, dtype=torch.bool)
                live[:P] = True
                kst.inter_fwd(mu_s, mu_t, valid, 1e-8)
                kst.inter_bwd(torch.ones(()), mu_s, mu_t, valid, live, True, True, 1e-8)
                with _Deterministic():
                    kst.inter_bwd(torch.ones(()), mu_s, mu_t, valid, None, True, False, 1e-8)
    torch.set_float32_matmul_precision("highest")


class _Deterministic:
    """``torch.use_deterministic_algorithms(True)`` for a block (the backward then stores instead of adding atomically)."""

    def __enter__(self):
        self.old = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.old)


def record_all(quick: bool):
    with _Recording() as r:
        torch.set_float32_matmul_precision("highest")
        _cam_cases(r, quick)
        _bank_cases(r, quick)
        _structure_cases(r, quick)
    return r.launches


def _key(kernel, args, kwargs, exact: bool):
    """What decides whether a launch compiles: the kernel, its argument types, its constexpr
    values and its options. Integers equal to 1 or divisible by 16 change the code too (vector
    widths, folded strides) but seldom whether it compiles; ``exact`` keeps them apart."""
    sig, consts, attrs, opts = ks.specialise(kernel, args, kwargs)
    if not exact:
        names = kernel.arg_names
        params = {p.name: p for p in kernel.params}
        consts = {k: v for k, v in consts.items() if params[names[k[0]]].is_constexpr}
        sig = {n: t for n, t in sig.items() if t.startswith("*") or params[n].is_constexpr}
        attrs = {}
    return (kernel.fn.__name__, tuple(sorted(sig.items())), repr(sorted(consts.items())),
            repr(sorted(attrs.items())), tuple(sorted(opts.items())))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and layouts")
    p.add_argument("--list", action="store_true", help="list the specialisations, compile nothing")
    p.add_argument("--exact", action="store_true",
                   help="also tell apart launches whose integers differ in divisibility by 16 or equality to 1 (many more)")
    a = p.parse_args()
    t0 = time.time()
    launches = record_all(a.quick)
    unique = {}
    for kernel, grid, args, kwargs, label in launches:
        unique.setdefault(_key(kernel, args, kwargs, a.exact), (kernel, args, kwargs, label))
    kernels = sorted({k[0] for k in unique})
    print(f"Triton {triton.__version__}, torch {torch.__version__}: {len(launches)} launches recorded, "
          f"{len(unique)} distinct specialisations of {len(kernels)} kernels, for sm_{a.arch}", flush=True)
    if a.list:
        for key, (_, _, kwargs, label) in unique.items():
            print(f"  {key[0]:28s} {label}")
        return 0
    failed = []
    for i, (key, (kernel, args, kwargs, label)) in enumerate(unique.items(), 1):
        print(f"[{i}/{len(unique)}] {key[0]} ({label}) ...", end=" ", flush=True)
        s = time.time()
        try:
            ks.compile_launch(kernel, args, kwargs, a.arch)
            print(f"ok {time.time() - s:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - every compiler error is a finding
            msg = str(exc).strip().splitlines()
            print(f"FAILED: {type(exc).__name__}: {msg[-1] if msg else ''}", flush=True)
            failed.append((key[0], label, f"{type(exc).__name__}: {' | '.join(msg[-3:])}"))
    print(f"{len(unique) - len(failed)} of {len(unique)} specialisations compiled in {time.time() - t0:.0f} s")
    for name, label, msg in failed:
        print(f"FAILED {name} ({label}): {msg}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
