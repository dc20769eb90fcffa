"""ICAKDLoss training steps with the incremental Gram form of the inter loss, against the same
steps with the backend's inter op (the full form), at ImageNet-21k class counts.

    python benchmarks/inter_incremental_bench.py --device cpu --out benchmarks/results --name inter_incremental_cpu
    python benchmarks/inter_incremental_bench.py --device cuda --teacher-dim 2048 --out OUT

One step = ``ICAKDLoss`` forward (which enqueues the batch into both class banks) + backward,
banks pre-filled to steady state (every class full). The two modules start from the same state
and take the same batches, interleaved step by step (so that the load of a shared machine
affects both alike); before timing, both losses are computed on the same state and compared.
A third module with ``method="kd"`` (CE + KD only, no banks) takes the same batches: the floor
that shows what ICAKD adds. Reported: median step time over the timed steps (synchronised), the
one-time rebuild of the Gram matrix from the banks, the size of that matrix, and each step's peak
memory above the level before it (CUDA: the allocator's peak; CPU: the resident set size,
sampled, as ``e2e_bench.py`` measures it). Results: ``OUT/NAME.json`` and ``OUT/NAME.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import torch

from e2e_bench import PeakMemory, cpu_model, pin_glibc_mmap_threshold, sync
from icakd_fast import ICAKDLoss
from icakd_fast._backend import resolve


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the threads torch uses (what CPU timings depend on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def fill_banks(mod: ICAKDLoss, seed: int) -> None:
    """Every class full: random unit rows (made on the banks' device, a block of classes at a
    time), then sums recomputed from them."""
    gen = torch.Generator(device=mod.bank_s.bank.device).manual_seed(seed)
    for bank in (mod.bank_s, mod.bank_t):
        for c0 in range(0, bank.num_classes, 1024):
            block = bank.bank[c0:c0 + 1024]
            rows = torch.randn(block.shape, generator=gen, device=block.device)
            block.copy_(torch.nn.functional.normalize(rows, dim=2).to(block.dtype))
        bank.count.fill_(bank.slots_per_class)
        bank.ptr.zero_()
        bank.resync()


def make_batch(args, device, gen):
    B, C = args.batch, args.classes
    hw = args.spatial
    fs = torch.randn(B, args.student_dim, hw, hw, generator=gen).relu().to(device).requires_grad_()
    zs = torch.randn(B, C, generator=gen).to(device).requires_grad_()
    ft = torch.randn(B, args.teacher_dim, hw, hw, generator=gen).relu().to(device)
    zt = torch.randn(B, C, generator=gen).to(device)
    y = torch.randint(0, C, (B,), generator=gen).to(device)
    ws = (0.01 * torch.randn(C, args.student_dim, generator=gen)).to(device).requires_grad_()
    wt = (0.01 * torch.randn(C, args.teacher_dim, generator=gen)).to(device)
    return fs, zs, ft, zt, y, ws, wt


def run_step(mod, batch, device):
    out = mod(*batch)
    out.loss.backward()
    mod.zero_grad(set_to_none=True)


def timed_step(mod, batch, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    run_step(mod, batch, device)
    sync(device)
    return time.perf_counter() - t0


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``), so that reusing them
    shows in the resident set size again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_peak_mib(mod, batch, device) -> float:
    """Peak memory of one step above the level before it, MiB: the CUDA allocator's peak, or on
    CPU the sampled peak growth of the resident set size (``e2e_bench.PeakMemory``; glibc's free
    heap pages released first)."""
    if device.type == "cpu":
        release_free_heap()
    with PeakMemory(device) as mem:
        run_step(mod, batch, device)
        return mem.peak_mib()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="inter_incremental")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, default=21841)
    p.add_argument("--teacher-dim", type=int, default=512)
    p.add_argument("--student-dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--spatial", type=int, default=2, help="feature map side (the CAM part is not what is measured)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default=None, help="backend of the full form's inter op (default: automatic)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    kw = dict(slots_per_class=args.slots, backend=args.backend)
    inc = ICAKDLoss(args.classes, args.student_dim, args.teacher_dim, incremental_inter=True, **kw).to(device)
    full = ICAKDLoss(args.classes, args.student_dim, args.teacher_dim, incremental_inter=False, **kw).to(device)
    with torch.no_grad():
        fill_banks(inc, 1)
    full.load_state_dict(inc.state_dict())
    kd = ICAKDLoss(args.classes, args.student_dim, args.teacher_dim, method="kd").to(device)
    D = 2 * args.teacher_dim
    mu_probe = torch.empty(0, args.teacher_dim, device=device)
    full_backend = resolve(args.backend, "inter", mu_probe, mu_probe)
    print(f"{device_name(device)}: C={args.classes} D_s=D_t={args.teacher_dim} B={args.batch} S={args.slots}; "
          f"full form through backend {full_backend!r}", flush=True)

    # the one-time rebuild of K_base from the banks
    sync(device)
    t0 = time.perf_counter()
    inc._inter_gram.ensure(inc.bank_s, inc.bank_t)
    sync(device)
    rebuild_s = time.perf_counter() - t0
    print(f"  rebuild of the Gram matrix from the banks: {rebuild_s * 1e3:.1f} ms", flush=True)

    # the same state and batch through both: the losses must agree
    inc.eval()
    full.eval()
    check = make_batch(args, device, torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = inc(*check).parts["inter"].item(), full(*check).parts["inter"].item()
    rel_err = abs(a - b) / max(abs(b), 1e-30)
    print(f"  inter loss: incremental {a:.9g}, full {b:.9g} (relative difference {rel_err:.2e})", flush=True)
    inc.train()
    full.train()

    times = {"incremental": [], "full": [], "kd": []}
    peaks = {"incremental": [], "full": [], "kd": []}
    for step in range(args.warmup + args.steps):
        seed = 100 + step
        for label, mod in (("incremental", inc), ("full", full), ("kd", kd)):
            dt = timed_step(mod, make_batch(args, device, torch.Generator().manual_seed(seed)), device)
            if step >= args.warmup:
                times[label].append(dt)
        if step >= args.warmup:
            print(f"  step {step + 1 - args.warmup}/{args.steps}: " + ", ".join(
                f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()), flush=True)
    # memory after the timing: one more step per module. On CPU glibc's mmap threshold is pinned
    # first (freed tensors then leave the resident set at once), which slows allocation, so the
    # timed steps run without it.
    pinned = device.type == "cpu" and pin_glibc_mmap_threshold()
    for label, mod in (("incremental", inc), ("full", full), ("kd", kd)):
        batch = make_batch(args, device, torch.Generator().manual_seed(99))
        run_step(mod, batch, device)  # the allocation pattern settles under the pinned threshold
        peaks[label].append(step_peak_mib(mod, batch, device))
    drift = (inc._inter_gram.K - inc._inter_gram._build(inc.bank_s, inc.bank_t)).abs().max().item()

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {
        "device": device_name(device), "torch": torch.__version__, "python": sys.version.split()[0],
        "classes": args.classes, "teacher_dim": args.teacher_dim, "student_dim": args.student_dim,
        "batch": args.batch, "slots_per_class": args.slots, "spatial": args.spatial, "steps": args.steps,
        "full_form_backend": full_backend,
        "step_ms_median": med, "step_ms_all": {k: [t * 1e3 for t in v] for k, v in times.items()},
        "speedup": med["full"] / med["incremental"],
        "overhead_over_kd_ms": {k: med[k] - med["kd"] for k in ("incremental", "full")},
        "rebuild_ms": rebuild_s * 1e3, "gram_matrix_mb": D * D * 8 / 2**20,
        "inter_loss_rel_diff": rel_err, "gram_drift_after_steps": drift,
        "step_peak_extra_mib": {k: max(v) for k, v in peaks.items()},
        "memory_measure": ("torch.cuda.max_memory_allocated during the step minus the allocation before it"
                           if device.type == "cuda" else
                           "peak growth of the resident set size during the step (/proc/self/statm sampled every 5 ms)"
                           + ("; glibc mmap threshold pinned to 128 KiB and free heap pages released before the step" if pinned else ""))
        + "; one step per module after the timed ones",
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        f"ICAKDLoss training step (forward with enqueue + backward), {result['device']}, torch {torch.__version__}.",
        f"C={args.classes}, D_s=D_t={args.teacher_dim} (Gram matrix {D}x{D} float64, "
        f"{result['gram_matrix_mb']:.0f} MiB), B={args.batch}, S={args.slots}, {args.spatial}x{args.spatial} maps; "
        f"median of {args.steps} steps after {args.warmup} warm-up, the three modules interleaved.",
        "",
        "| step | step ms (median) | speed-up | over KD, ms | step peak above the level before it, MiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, desc in (("full", f"ICAKD, inter loss by the backend op ({full_backend})"),
                        ("incremental", "ICAKD, incremental inter loss"), ("kd", "KD only (floor)")):
        over = "-" if label == "kd" else f"{med[label] - med['kd']:.1f}"
        speed = "-" if label == "kd" else f"{med['full'] / med[label]:.2f}x"
        lines.append(f"| {desc} | {med[label]:.1f} | {speed} | {over} | {max(peaks[label]):.0f} |")
    lines += [
        "",
        f"One-time rebuild of the Gram matrix from the banks: {rebuild_s * 1e3:.0f} ms. "
        f"Inter loss on the same state: relative difference {rel_err:.1e}; "
        f"largest difference between the updated Gram matrix and a rebuild after the steps: {drift:.1e}. "
        f"Memory: {result['memory_measure']}.",
    ]
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
