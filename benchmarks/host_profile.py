"""Where the host time of the small ops goes: wall time per call and a cProfile of each backend.

    python benchmarks/host_profile.py --out DIR               # on a CUDA machine (~20 s)
    python benchmarks/host_profile.py --out DIR --dry-run     # CPU, tiny shapes, every code path

At training shapes, the bank enqueue and the centroid + intra-class ops run for tens of
microseconds on a GPU, so their eager time is the host's: Python, the dispatcher, Triton's
launcher. For each op and backend this prints the wall time per call (after warm-up, the GPU
synchronised once at the end: with the host the bottleneck that is the host time) and the
functions with the most own time under cProfile. Results: ``DIR/host_profile.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import icakd_fast.functional as IF  # noqa: E402
from icakd_fast import ClassMemoryBank, _backend  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cases(device, dry):
    """(name, {backend: zero-argument step})."""
    C, S, D, B = (20, 4, 16, 12) if dry else (1000, 16, 2048, 256)
    K, HW = (8, 4) if dry else (64, 7)
    x = torch.randn(B, D, device=device)
    y = torch.randint(0, C, (B,), device=device)
    sums, counts = torch.randn(C, D, device=device), torch.randint(0, 5, (C,), device=device)
    f_t = torch.randn(B, D, device=device)
    fmap = torch.randn(B, K, HW, HW, device=device)
    wts = torch.randn(B, K, device=device)
    out = []

    def bank_step(name):
        bank = ClassMemoryBank(C, S, D, backend=name, device=device)
        return lambda: bank.enqueue(x, y)

    def structure_step(name):
        def step():
            f_s = x.clone().requires_grad_()
            mu_s, n = IF.class_centroids(sums, counts, f_s, y, backend=name)
            mu_t, _ = IF.class_centroids(sums, counts, f_t, y, backend=name)
            loss = IF.intra_class_loss(f_s, f_t, mu_s, mu_t, y, n > 0, backend=name)
            loss.backward()

        return step

    def cam_step(name):
        def step():
            f = fmap.clone().requires_grad_()
            cam, pooled = IF.class_activation_features(f, wts, backend=name)
            (cam.sum() + pooled.sum()).backward()

        return step

    for case, make, op in (
        (f"bank enqueue C={C} S={S} D={D} B={B}", bank_step, "class_bank"),
        (f"centroids x2 + intra fwd+bwd C={C} D={D} B={B}", structure_step, "centroids"),
        (f"CAM features fwd+bwd B={B} K={K} {HW}x{HW}", cam_step, "cam"),
    ):
        steps = {}
        for name in _backend.BACKENDS:
            if name == "reference" or not _backend.not_supported_reasons(name, op, device):
                steps[name] = make(name)
        out.append((case, steps))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for host_profile.txt")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few calls")
    p.add_argument("--calls", type=int, default=200, help="timed calls per op and backend")
    p.add_argument("--top", type=int, default=14, help="functions listed per profile")
    args = p.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        args.calls = min(args.calls, 3)
    else:
        if not torch.cuda.is_available():
            sys.exit("host_profile.py needs a CUDA device (or --dry-run)")
        device = torch.device("cuda")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [f"host time per call, {name}, torch {torch.__version__}, {args.calls} calls after warm-up"]
    torch.manual_seed(0)
    for case, steps in cases(device, args.dry_run):
        lines.append(f"\n==== {case}")
        profiles = []
        for backend, step in steps.items():
            for _ in range(3 if args.dry_run else 20):
                step()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.calls):
                step()
            sync(device)
            us = (time.perf_counter() - t0) / args.calls * 1e6
            lines.append(f"  {backend:<10} {us:9.1f} us/call")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                step()
            prof.disable()
            sync(device)
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
            body = buf.getvalue()
            profiles.append(f"---- {backend}: cProfile, {args.calls} calls, by own time\n"
                            + body[body.find("   ncalls"):].rstrip())
        lines.extend(profiles)
        print("\n".join(lines[-(len(steps) + len(profiles) + 1):]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "host_profile.txt")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
