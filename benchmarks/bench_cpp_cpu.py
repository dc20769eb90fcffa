"""CPU micro-benchmarks of the cpp backend against the eager reference (one process).

    python benchmarks/bench_cpp_cpu.py                          # all cases, all cores
    python benchmarks/bench_cpp_cpu.py --threads 1,2 --repeats 5 --out benchmarks/results/cpp_cpu
    python benchmarks/bench_cpp_cpu.py --quick                  # smaller inter-loss case

Reports, for each case and thread count, the time of the eager reference and of the cpp kernels
and their ratio (reference / cpp, > 1 means cpp is faster). Both are measured in the same run,
alternately: each repeat times the reference then the cpp kernel (median of many calls each), and
the table gives the median over the repeats of the times and of the per-repeat ratios, plus the
spread of the ratios (min-max) -- a wide spread means the machine was busy. The inter loss at
C=21841 has no eager counterpart (the reference needs several C x C matrices): it reports time and
the peak added resident memory (sampled from /proc/self/statm in a background thread). Every case
checks the cpp result against the reference before timing. --out writes PREFIX.json and PREFIX.md
(with the CPU model, the thread counts and the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections import defaultdict
from unittest import mock

import torch

from icakd_fast import _ext, ops, reference

if not _ext.load():
    raise SystemExit(f"icakd_fast._C is not built: {_ext.reason()}")

from icakd_fast.ops import _cpp_impl as cpp  # noqa: E402

EPS = reference.NORM_EPS


def bench(fn, *, warmup=3, reps=15, min_time=0.5):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size above the level at entry, sampled every 2 ms."""

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def added_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def case_cam(rows):
    B, K, H, W = 64, 512, 8, 8
    f0 = torch.randn(B, K, H, W)
    w0 = torch.randn(B, K) / (H * W)
    c1, p1 = ops.cam_features("cpp", f0, w0)
    c2, p2 = reference.class_activation_features(f0, w0)
    torch.testing.assert_close(c1, c2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        t_ref = bench(lambda: reference.class_activation_features(f0, w0))
        t_cpp = bench(lambda: cpp.cam_fwd(f0, w0, True))
    rows.append(("class_activation_features fwd", f"B={B} K={K} {H}x{W} f32", t_ref, t_cpp))
    fcl = f0.to(memory_format=torch.channels_last)
    with torch.no_grad():
        t_ref = bench(lambda: reference.class_activation_features(fcl, w0))
        t_cpp = bench(lambda: cpp.cam_fwd(fcl, w0, True))
    rows.append(("class_activation_features fwd", f"B={B} K={K} {H}x{W} f32 channels_last", t_ref, t_cpp))
    f = f0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    gc, gp = torch.randn(B, H, W), torch.randn(B, K)

    def fb(fn):
        def run():
            f.grad = w.grad = None
            cam, pooled = fn(f, w)
            torch.autograd.backward([cam, pooled], [gc, gp])

        return run

    t_ref = bench(fb(reference.class_activation_features))
    t_cpp = bench(fb(lambda a, b: ops.cam_features("cpp", a, b)))
    rows.append(("class_activation_features fwd+bwd", f"B={B} K={K} {H}x{W} f32", t_ref, t_cpp))
    fb16, wb16 = f0.bfloat16(), w0.bfloat16()
    with torch.no_grad():
        t_ref = bench(lambda: reference.class_activation_features(fb16, wb16))
        t_cpp = bench(lambda: cpp.cam_fwd(fb16, wb16, True))
    rows.append(("class_activation_features fwd", f"B={B} K={K} {H}x{W} bf16", t_ref, t_cpp))


def case_bank(rows):
    C, S, D, N = 1000, 16, 512, 256
    for dtype in (torch.float32, torch.bfloat16):
        def state():
            bank = torch.randn(C, S, D).to(dtype)
            count = torch.full((C,), S, dtype=torch.int64)
            ptr = torch.randint(0, S, (C,))
            sums = bank.float().sum(1)
            return bank, count, ptr, sums

        feats = torch.randn(N, D)
        labels = torch.randint(0, C, (N,))
        mask = torch.rand(N) > 0.1
        a, b = state(), tuple(t.clone() for t in state())
        b = tuple(t.clone() for t in a)
        cpp.class_bank_enqueue_(*a, feats, labels, mask)
        reference.class_bank_enqueue_(*b, feats, labels, mask)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        t_ref = bench(lambda: reference.class_bank_enqueue_(*b, feats, labels, mask))
        t_cpp = bench(lambda: cpp.class_bank_enqueue_(*a, feats, labels, mask))
        name = str(dtype).replace("torch.", "")
        rows.append(("class bank enqueue", f"C={C} S={S} D={D} N={N} {name} bank", t_ref, t_cpp))
    classes = torch.arange(C)
    t_ref = bench(lambda: reference.class_bank_resync_(a[0], a[1], a[3], classes), reps=5)
    t_cpp = bench(lambda: cpp.class_bank_resync_(a[0], a[1], a[3], classes), reps=5)
    rows.append(("class bank resync (all classes)", f"C={C} S={S} D={D} bf16 bank", t_ref, t_cpp))
    size = C * S
    fifo = torch.zeros(size, D)
    fl = torch.randint(0, C, (size,))
    t_ref = bench(lambda: reference.fifo_bank_sums(fifo, fl, C), reps=5)
    t_cpp = bench(lambda: cpp.fifo_bank_sums(fifo, fl, C), reps=5)
    rows.append(("fifo bank sums", f"N={size} D={D} C={C}", t_ref, t_cpp))
    ptr = torch.zeros((), dtype=torch.int64)
    fifo2, fl2, ptr2 = fifo.clone(), fl.clone(), ptr.clone()
    t_ref = bench(lambda: reference.fifo_bank_enqueue_(fifo2, fl2, ptr2, feats, labels, mask))
    t_cpp = bench(lambda: cpp.fifo_bank_enqueue_(fifo, fl, ptr, feats, labels, mask))
    rows.append(("fifo bank enqueue", f"N={size} D={D} batch={N}", t_ref, t_cpp))


def case_structure(rows):
    C, D, B = 1000, 512, 256
    sums, counts = torch.randn(C, D), torch.randint(0, 16, (C,))
    feats, labels = torch.randn(B, D), torch.randint(0, C, (B,))
    with torch.no_grad():
        t_ref = bench(lambda: reference.class_centroids(sums, counts, feats, labels))
        t_cpp = bench(lambda: cpp.centroids_fwd(sums, counts, feats, labels))
    rows.append(("class centroids", f"C={C} D={D} B={B}", t_ref, t_cpp))
    mu_s, mu_t = torch.randn(C, D), torch.randn(C, D)
    valid = torch.ones(C, dtype=torch.bool)
    f_t = torch.randn(B, D)

    def intra(fn):
        def run():
            f = feats.clone().requires_grad_()
            fn(f, f_t, mu_s, mu_t, labels, valid).backward()

        return run

    t_ref = bench(intra(reference.intra_class_loss))
    t_cpp = bench(intra(lambda *a: ops.intra_loss("cpp", *a)))
    rows.append(("intra loss fwd+bwd", f"B={B} C={C} D={D}", t_ref, t_cpp))
    live = torch.zeros(C, dtype=torch.bool)
    live[labels] = True

    def inter(fn):
        def run():
            s = mu_s.clone().requires_grad_()
            fn(s).backward()

        return run

    t_ref = bench(inter(lambda s: reference.inter_class_loss(s, mu_t, valid, live)), reps=5)
    t_cpp = bench(inter(lambda s: ops.inter_loss("cpp", s, mu_t, valid, live, EPS)), reps=5)
    rows.append(("inter loss fwd+bwd (live rows)", f"C={C} Ds=Dt={D} P={int(live.sum())}", t_ref, t_cpp))


def case_inter_large(rows, mem, quick):
    C = 4096 if quick else 21841
    Ds, Dt, P = 256, 512, 256
    torch.manual_seed(1)
    mu_s0 = torch.randn(C, Ds)
    mu_t = torch.randn(C, Dt)
    valid = torch.rand(C) < 0.95
    live = torch.zeros(C, dtype=torch.bool)
    live[torch.randperm(C)[:P]] = True
    # correctness on a slice first (the reference needs C x C matrices)
    n = 2048
    s1 = mu_s0[:n].clone().requires_grad_()
    ops.inter_loss("cpp", s1, mu_t[:n], valid[:n], live[:n], EPS).backward()
    s2 = mu_s0[:n].clone().requires_grad_()
    reference.inter_class_loss(s2, mu_t[:n], valid[:n], live[:n]).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-3, atol=1e-9)

    # auto picks the float64 Gram form here (C >> Ds + Dt); the direct tiled form for comparison
    for form in ("auto", "direct"):
        with mock.patch.dict(os.environ, {"ICAKD_INTER_FORM": form}):
            _inter_large_rows(mem, form, C, Ds, Dt, P, mu_s0, mu_t, valid, live)


def _inter_large_rows(mem, form, C, Ds, Dt, P, mu_s0, mu_t, valid, live):
    mu_s = mu_s0.clone().requires_grad_()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        loss = ops.inter_loss("cpp", mu_s, mu_t, valid, live, EPS)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
    grad_mb = mu_s.grad.numel() * 4 / 2**20
    mem.append(
        {
            "case": f"inter loss fwd+bwd (live rows), C={C} Ds={Ds} Dt={Dt} P={P}, form={form}",
            "fwd_s": round(t1 - t0, 3),
            "bwd_s": round(t2 - t1, 3),
            "peak_added_rss_MB": round(peak.added_mb, 1),
            "of_which_grad_output_MB": round(grad_mb, 1),
            "reference_one_CxC_matrix_MB": round(C * C * 4 / 2**20, 1),
        }
    )
    mu_s.grad = None
    mu_t_req = mu_t.clone().requires_grad_()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        loss = ops.inter_loss("cpp", mu_s, mu_t_req, valid, None, EPS)
        loss.backward()
        t1 = time.perf_counter()
    mem.append(
        {
            "case": f"inter loss fwd+bwd (full, both gradients), C={C} Ds={Ds} Dt={Dt}, form={form}",
            "fwd_bwd_s": round(t1 - t0, 3),
            "peak_added_rss_MB": round(peak.added_mb, 1),
            "reference_one_CxC_matrix_MB": round(C * C * 4 / 2**20, 1),
        }
    )


def cpu_model() -> str:
    fields = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if ":" in line:
                    k, v = (x.strip() for x in line.split(":", 1))
                    fields.setdefault(k, v)
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    extra = []
    if "cpu family" in fields:
        extra.append(f"family {fields['cpu family']} model {fields.get('model', '?')}")
    flags = fields.get("flags", "").split()
    isa = [f for f in ("avx512f", "avx2", "fma") if f in flags]
    if isa:
        extra.append("/".join(isa))
    return f"{name} ({', '.join(extra)})" if extra else name


def load_average() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def run_cases(args, threads: int):
    """(timing rows over the repeats, memory rows) at one thread count."""
    torch.set_num_threads(threads)
    per_case = defaultdict(list)  # (op, shape) -> [(t_ref, t_cpp), ...]
    for _ in range(args.repeats):
        torch.manual_seed(0)  # the same inputs in every repeat: only the timings vary
        rows = []
        case_cam(rows)
        if not args.cam_only:
            case_bank(rows)
            case_structure(rows)
        for name, shape, t_ref, t_cpp in rows:
            per_case[(name, shape)].append((t_ref, t_cpp))
    out = []
    for (name, shape), ts in per_case.items():
        ratios = [r / c for r, c in ts]
        out.append(
            dict(
                op=name,
                shape=shape,
                threads=threads,
                reference_ms=statistics.median(r for r, _ in ts) * 1e3,
                cpp_ms=statistics.median(c for _, c in ts) * 1e3,
                ratio=statistics.median(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                repeats=len(ts),
            )
        )
    mem = []
    if not args.skip_large and not args.cam_only:
        case_inter_large([], mem, args.quick)
        for m in mem:
            m["threads"] = threads
    return out, mem


def write_markdown(path, meta, rows, mem):
    lines = [
        "# cpp backend on CPU vs the eager reference",
        "",
        f"CPU: {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}; "
        f"{meta['repeats']} repeats per case and thread count; load average before / after: "
        f"{meta['load_before']} / {meta['load_after']}.",
        "",
        "Ratio = reference time / cpp time, measured alternately in the same process (median of the",
        "per-repeat ratios; min-max in brackets: a wide range means the machine was busy).",
        "",
        "| op | shape | threads | reference ms | cpp ms | ratio (min-max) |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['threads']} | {r['reference_ms']:.3f} | {r['cpp_ms']:.3f} | "
            f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |"
        )
    if mem:
        lines += ["", "| inter loss (no eager run: the reference needs C x C matrices) | threads | time s | "
                  "peak added RSS MB | one C x C float32 matrix MB |", "| --- | ---: | ---: | ---: | ---: |"]
        for m in mem:
            t = m.get("fwd_bwd_s", (m.get("fwd_s") or 0) + (m.get("bwd_s") or 0))
            lines.append(f"| {m['case']} | {m['threads']} | {t:.2f} | {m['peak_added_rss_MB']:.1f} | "
                         f"{m['reference_one_CxC_matrix_MB']:.1f} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="inter-loss memory case at C=4096 instead of 21841")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--out", help="write PREFIX.json and PREFIX.md")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts, each measured in turn (default: all cores)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating reference/cpp repeats per case")
    ap.add_argument("--skip-large", action="store_true", help="skip the C=21841 inter-loss memory case")
    ap.add_argument("--cam-only", action="store_true", help="only the class-activation cases")
    args = ap.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    meta = dict(cpu=cpu_model(), cores=os.cpu_count(), torch=torch.__version__, repeats=args.repeats,
                load_before=load_average())
    rows, mem = [], []
    for threads in thread_counts:
        r, m = run_cases(args, threads)
        rows += r
        mem += m
    meta["load_after"] = load_average()
    print(f"device: CPU {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}, "
          f"load average {meta['load_before']} -> {meta['load_after']}")
    print(f"{'op':36s} {'shape':40s} {'thr':>3s} {'ref ms':>9s} {'cpp ms':>9s} {'ratio':>7s} {'min-max':>11s}")
    for r in rows:
        print(f"{r['op']:36s} {r['shape']:40s} {r['threads']:3d} {r['reference_ms']:9.3f} {r['cpp_ms']:9.3f} "
              f"{r['ratio']:6.2f}x {r['ratio_min']:5.2f}-{r['ratio_max']:<5.2f}")
    for m in mem:
        print(json.dumps(m))
    result = dict(meta, rows=rows, memory=mem)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as fh:
            json.dump(result, fh, indent=1)
        write_markdown(args.out + ".md", meta, rows, mem)


if __name__ == "__main__":
    main()
