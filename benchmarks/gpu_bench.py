"""GPU benchmark of the ICAKD hot spots: eager reference, torch.compile(reference), triton, cpp.

    python benchmarks/gpu_bench.py --out DIR [--quick]      # on a CUDA machine (< 4 minutes)
    python benchmarks/gpu_bench.py --out DIR --dry-run      # CPU, Triton interpreter, tiny shapes:
                                                            # every code path except the timers

Every case first checks each provider against the eager reference (max error printed and
recorded), then times it (median ms, ``triton.testing.do_bench``; CUDA graphs for the bank
enqueue), measures its extra peak memory, and records GB/s and speedups. A failing case or
provider (e.g. an out-of-memory eager reference) is recorded as ``oom``/``error`` and the script
goes on. Results: ``DIR/gpu_bench.json`` and ``DIR/gpu_bench.csv``, naming the GPU and the
torch / triton / CUDA versions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import traceback
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for gpu_bench.json / gpu_bench.csv")
    p.add_argument("--quick", action="store_true", help="smaller shapes, shorter timing")
    p.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes, no timing")
    p.add_argument("--cases", default="inter,cam,bank,overhead,structure", help="comma-separated subset (run in this order)")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers to time (default: all; eager always runs: it is the reference)")
    p.add_argument("--compiled-cases", default="cam,bank,structure,inter",
                   help="cases that also time torch.compile(reference) (compiling costs tens of seconds each)")
    return p.parse_args()


ARGS = _parse()
if ARGS.dry_run:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import icakd_fast.functional as F  # noqa: E402
from icakd_fast._backend import is_available  # noqa: E402

DEV = "cpu" if ARGS.dry_run else "cuda"
RESULTS: list[dict] = []


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# timing and memory helpers
# ----------------------------------------------------------------------------------------------


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, graph: bool = False) -> float:
    """Median milliseconds of ``fn()``."""
    if ARGS.dry_run:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing as tt

    rep = 40 if ARGS.quick else 100
    if graph:
        try:
            return float(tt.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        except TypeError:
            return float(tt.do_bench_cudagraph(fn, rep=rep))
    try:
        return float(tt.do_bench(fn, warmup=10, rep=rep, return_mode="median"))
    except TypeError:
        return float(tt.do_bench(fn, warmup=10, rep=rep))


def peak_extra_mb(fn) -> float | None:
    """Peak memory allocated by ``fn()`` above what was allocated before (MB)."""
    if DEV != "cuda":
        return None
    sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def max_err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(max_err(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def rel_err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(rel_err(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def copy_bandwidth_gbps() -> float | None:
    """Device-to-device copy bandwidth (read + write bytes per second)."""
    if DEV != "cuda":
        return None
    n = 256 * 2**20  # 1 GiB per buffer (float32)
    if ARGS.quick:
        n //= 4
    src = torch.empty(n, dtype=torch.float32, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def providers(op: str) -> list[str]:
    names = ["eager", "compiled", "triton"]
    dev_ok = "cpu" if ARGS.dry_run else "cuda"
    if is_available("cpp", op, dev_ok):
        names.append("cpp")
    if not is_available("triton", op, dev_ok):
        names.remove("triton")
    if ARGS.dry_run or op_case(op) not in ARGS.compiled_cases.split(","):
        names.remove("compiled")  # Inductor on CPU is slow to build and says nothing about the GPU
    return names


def op_case(op: str) -> str:
    return {"cam": "cam", "class_bank": "bank", "centroids": "structure", "intra": "structure"}.get(op, op)


def backend_of(p: str) -> str:
    for name in ("eager", "compiled"):
        if p == name or p.startswith(name + "_"):
            return "reference"
    return p.split("_")[0]


#: kernel variants timed beside the defaults (module attribute overrides), to tune the defaults
CAM_VARIANTS = {
    "triton_image": {"CAM_FWD_MODE": "image"},
    "triton_image_t8k": {"CAM_FWD_MODE": "image", "CAM_CFG": {"image_tile": 8192}},
    "triton_bwd_w8": {"CAM_CFG": {"bwd_warps": 8}},
    "triton_bwd_t8k": {"CAM_CFG": {"bwd_tile": 8192, "bwd_warps": 8}},
    "triton_bwd_t1k": {"CAM_CFG": {"bwd_tile": 1024}},
    "triton_vec": {"CAM_VEC": True},
    "triton_vec_t8k": {"CAM_VEC": True, "CAM_CFG": {"vec_tile": 8192}},
    "triton_vec_w4": {"CAM_VEC": True, "CAM_CFG": {"vec_warps": 4}},
    "triton_vec_i8": {"CAM_VEC": True, "CAM_CFG": {"vec_iters": 8}},
}
#: environment of the cpp CAM kernels per provider: ICAKD_CUDA_CAM=vec selects the 16-byte-vector
#: kernels (contiguous NCHW, K a multiple of 16 bytes' worth of elements, 8 <= H*W <= 512)
CAM_CPP_ENV = {"cpp_vec": {"ICAKD_CUDA_CAM": "vec"}}
#: float32 matmul precision per inter provider (PyTorch's switch; the kernels follow it)
INTER_PRECISION = {"eager": "highest", "eager_tf32": "high", "compiled": "highest", "triton": "highest",
                   "triton_tf32": "high", "triton_bf16": "medium", "cpp": "highest",
                   "triton_tf32_t64": "high", "triton_tf32_s4": "high", "triton_tf32_m32": "high",
                   "triton_tf32_m32o512": "high", "cpp_direct": "highest", "cpp_direct_tf32": "high"}
#: environment of the cpp inter loss per provider: ICAKD_INTER_FORM ("cpp" = auto: float64 Gram
#: matrix when C >= 2 (Ds + Dt) on sm_80/90/100, else tiles of E through cuBLAS) and the Gram
#: form's row-chunk size in elements (ICAKD_GRAM_CHUNK_ELEMS; default 2^22)
INTER_CPP_ENV = {"cpp": {"ICAKD_INTER_FORM": "auto"}, "cpp_direct": {"ICAKD_INTER_FORM": "direct"},
                 "cpp_direct_tf32": {"ICAKD_INTER_FORM": "direct"}}
INTER_CPP_ENV.update({f"cpp_chunk2e{k}": {"ICAKD_INTER_FORM": "gram", "ICAKD_GRAM_CHUNK_ELEMS": str(2**k)}
                      for k in (20, 21, 23, 24)})
#: the bound on live rows that ICAKDLoss passes (its batch size): the Gram form's backward then
#: takes that many rows instead of all C (``F.inter_class_loss(..., max_live=...)``)
INTER_CPP_ENV.update({"cpp_bound": {"ICAKD_INTER_FORM": "auto"}, "cpp_bound_chunk2e23":
                      {"ICAKD_INTER_FORM": "gram", "ICAKD_GRAM_CHUNK_ELEMS": str(2**23)}})
INTER_BOUND = ("cpp_bound", "cpp_bound_chunk2e23")
INTER_PRECISION.update({p: "highest" for p in INTER_CPP_ENV if p.startswith(("cpp_chunk", "cpp_bound"))})
INTER_VARIANTS = {"triton_tf32_t64": {"fwd_t": 64, "fwd_warps": 4}, "triton_tf32_s4": {"stages": 4},
                  "triton_tf32_m32": {"bwd_m": 32, "bwd_warps": 4}, "triton_tf32_m32o512": {"bwd_m": 32, "bwd_o": 512}}


class overrides:
    """Context manager: set attributes of a kernels module (dict values update a dict attribute)."""

    def __init__(self, module, values: dict):
        self.module, self.values, self.saved = module, values, {}

    def __enter__(self):
        import copy

        for k, v in self.values.items():
            cur = getattr(self.module, k)
            self.saved[k] = copy.copy(cur)
            if isinstance(cur, dict):
                cur.update(v)
            else:
                setattr(self.module, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            cur = getattr(self.module, k)
            if isinstance(cur, dict):
                cur.clear()
                cur.update(v)
            else:
                setattr(self.module, k, v)


class matmul_precision:
    def __init__(self, value: str):
        self.value, self.old = value, None

    def __enter__(self):
        self.old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.value)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.old)


def record(case: str, provider: str, **kw):
    row = {"case": case, "provider": provider}
    row.update(kw)
    RESULTS.append(row)
    msg = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
    log(f"  [{case}] {provider}: {msg}")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_case(case: str, make_fn, check_outputs, provider_list, bytes_moved=None, graph_for=(), extra=None):
    """``make_fn(provider) -> fn`` returning the outputs to compare; the eager reference first."""
    ref_out = None
    times: dict[str, float] = {}
    gtimes: dict[str, float] = {}
    if ARGS.providers:
        keep = set(ARGS.providers.split(",")) | {"eager"}
        provider_list = [p for p in provider_list if p in keep]
    for p in provider_list:
        try:
            fn = make_fn(p)
            out = fn()  # also compiles / warms up
            sync()
            if p == "eager":
                ref_out = check_outputs(out)
                err = {"max_abs_err": 0.0, "rel_err": 0.0}
            elif ref_out is not None:
                got = check_outputs(out)
                err = {"max_abs_err": max_err(got, ref_out), "rel_err": rel_err(got, ref_out)}
            else:
                err = {"max_abs_err": float("nan"), "rel_err": float("nan")}
            del out
            log(f"  [{case}] {p}: correctness max_abs_err={err['max_abs_err']:.3e} rel_err={err['rel_err']:.3e}")
            ms = bench(fn)
            row = dict(err, ms=ms)
            if p in graph_for and DEV == "cuda":
                try:
                    row["ms_cuda_graph"] = bench(fn, graph=True)
                    row["cuda_graph_capturable"] = True
                except Exception as exc:  # record, keep the plain timing
                    row["cuda_graph_capturable"] = f"no: {type(exc).__name__}: {str(exc)[:200]}"
                    torch.cuda.synchronize()
            if bytes_moved:
                row["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
                if "ms_cuda_graph" in row:
                    row["gbps_cuda_graph"] = bytes_moved / (row["ms_cuda_graph"] * 1e-3) / 1e9
            row["peak_extra_mb"] = peak_extra_mb(fn)
            times[p] = ms
            if "ms_cuda_graph" in row:
                gtimes[p] = row["ms_cuda_graph"]
            if extra:
                row.update(extra(p, row))
            record(case, p, status="ok", **row)
        except Exception as exc:  # one failure never stops the script
            status = "oom" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"
            if not is_oom(exc):
                traceback.print_exc()
            record(case, p, status=status)
            if DEV == "cuda":
                torch.cuda.empty_cache()
    for row in RESULTS:
        if row["case"] == case and row.get("status") == "ok" and row["provider"] in times:
            t = times[row["provider"]]
            if "eager" in times:
                row["speedup_vs_eager"] = times["eager"] / t
            if "compiled" in times:
                row["speedup_vs_compiled"] = times["compiled"] / t
            if "eager_tf32" in times and row["provider"].startswith("triton_tf32"):
                row["speedup_vs_eager_tf32"] = times["eager_tf32"] / t
            if row["provider"] in gtimes and "eager" in gtimes:
                row["graph_speedup_vs_eager_graph"] = gtimes["eager"] / gtimes[row["provider"]]
            if row["provider"] in gtimes and "compiled" in gtimes:
                row["graph_speedup_vs_compiled_graph"] = gtimes["compiled"] / gtimes[row["provider"]]
    return times


def _compile(fn):
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


def case_cam(copy_bw):
    if ARGS.dry_run:
        B, K, H, W, dt = 3, 20, 7, 7, torch.float16
    else:
        B, K, H, W, dt = (64, 2048, 7, 7, torch.bfloat16) if ARGS.quick else (256, 2048, 7, 7, torch.bfloat16)
    case = f"cam_fwd_bwd B={B} K={K} {H}x{W} {str(dt).split('.')[-1]}"
    log(f"case {case}")
    f = torch.randn(B, K, H, W, device=DEV).to(dt).requires_grad_(True)
    w = (torch.randn(B, K, device=DEV) / (H * W)).to(dt).requires_grad_(True)
    gc = torch.randn(B, H, W, device=DEV).to(dt)
    gp = torch.randn(B, K, device=DEV).to(dt)

    def make(p):
        be = backend_of(p)

        def step(f, w, gc, gp):
            cam, pooled = F.class_activation_features(f, w, backend=be)
            gf, gw = torch.autograd.grad((cam, pooled), (f, w), (gc, gp))
            return cam, pooled, gf, gw

        fn = _compile(step) if p == "compiled" else step
        if p in CAM_CPP_ENV:
            def run_env():
                with mock.patch.dict(os.environ, CAM_CPP_ENV[p]):
                    return fn(f, w, gc, gp)

            return run_env
        if p in CAM_VARIANTS:
            from icakd_fast.kernels import cam as kcam

            def run():
                with overrides(kcam, CAM_VARIANTS[p]):
                    return fn(f, w, gc, gp)

            return run
        return lambda: fn(f, w, gc, gp)

    nbytes = 3 * f.numel() * f.element_size()  # read A (fwd), read A + write dA (bwd)

    def extra(p, row):
        out = {}
        if copy_bw and "gbps" in row:
            out["fraction_of_copy_bw"] = row["gbps"] / copy_bw
        if copy_bw and "gbps_cuda_graph" in row:
            out["fraction_of_copy_bw_cuda_graph"] = row["gbps_cuda_graph"] / copy_bw
        return out

    provs = providers("cam")
    if "triton" in provs:
        provs += list(CAM_VARIANTS)
    if "cpp" in provs:
        provs += list(CAM_CPP_ENV)
    # every provider also replayed as a CUDA graph (forward + autograd backward captured whole):
    # GPU time without the host's share, the fair comparison where the wall time is host-bound
    run_case(case, make, lambda out: tuple(o.float() for o in out), provs, bytes_moved=nbytes, extra=extra,
             graph_for=tuple(provs))

    # the kernels alone (backend contract functions, no autograd), replayed as a CUDA graph: GPU
    # time without the host-side layers, i.e. the kernels' own share of the copy bandwidth
    if DEV == "cuda":
        fd, wd = f.detach(), w.detach()
        for p in [q for q in provs if q.startswith("triton") or q.startswith("cpp")]:
            impl = __import__(f"icakd_fast.ops._{backend_of(p)}_impl", fromlist=["cam_fwd"])
            mod = __import__("icakd_fast.kernels.cam", fromlist=["cam_fwd"])

            def kern(impl=impl):
                cam, pooled, pw = impl.cam_fwd(fd, wd, True)
                return impl.cam_bwd(gc, gp, fd, wd, cam, pw, True, True)

            try:
                with overrides(mod, CAM_VARIANTS.get(p, {})), mock.patch.dict(os.environ, CAM_CPP_ENV.get(p, {})):
                    kern()
                    sync()
                    ms = bench(kern, graph=True)
                gbps = nbytes / (ms * 1e-3) / 1e9
                record(f"{case} kernels only (CUDA graph)", p, status="ok", ms_cuda_graph=ms, gbps=gbps,
                       fraction_of_copy_bw=(gbps / copy_bw) if copy_bw else None)
            except Exception as exc:
                record(f"{case} kernels only (CUDA graph)", p, status=f"error: {type(exc).__name__}: {str(exc)[:200]}")
                torch.cuda.synchronize()

    # generic path: Grad-CAM weights from a gradient tensor (spatial mean) fused into the forward
    if "triton" in providers("cam"):
        try:
            impl = __import__("icakd_fast.ops._triton_impl", fromlist=["cam_fwd_from_grads"])
            g = torch.randn_like(f, dtype=dt)
            got = impl.cam_fwd_from_grads(f.detach(), g, True)
            import icakd_fast.reference as R

            rw = R.grad_cam_weights(g)
            rc, rp = R.class_activation_features(f.detach(), rw)
            err = max_err((got[0].float(), got[1].float()), (rc.float(), rp.float()))
            ms_fused = bench(lambda: impl.cam_fwd_from_grads(f.detach(), g, True))
            ms_eager = bench(lambda: R.class_activation_features(f.detach(), R.grad_cam_weights(g)))
            record(f"generic_cam_fwd(grads) B={B} K={K}", "triton", status="ok", max_abs_err=err, ms=ms_fused,
                   gbps=3 * f.numel() * f.element_size() / (ms_fused * 1e-3) / 1e9)
            record(f"generic_cam_fwd(grads) B={B} K={K}", "eager", status="ok", ms=ms_eager,
                   speedup_of_triton=ms_eager / ms_fused)
        except Exception as exc:
            traceback.print_exc()
            record(f"generic_cam_fwd(grads) B={B} K={K}", "triton", status=f"error: {type(exc).__name__}: {exc}"[:300])


def case_bank():
    from icakd_fast import ClassMemoryBank

    if ARGS.dry_run:
        C, S, D, B, dt = 20, 4, 16, 12, torch.float32
    else:
        C, S, D, B, dt = 1000, 16, 2048, 256, torch.float32
    case = f"bank_enqueue C={C} S={S} D={D} B={B}"
    log(f"case {case}")
    gen_x = torch.randn(B, D, device=DEV)
    gen_y = torch.randint(0, C, (B,), device=DEV)
    banks = {}

    def make(p):
        torch.manual_seed(0)
        bank = ClassMemoryBank(C, S, D, dtype=dt, backend=backend_of(p), device=DEV)
        banks[p] = bank
        step = (lambda x, y: bank.enqueue(x, y))
        fn = _compile(step) if p == "compiled" else step

        def run():
            fn(gen_x, gen_y)
            return bank.bank, bank.count, bank.ptr, bank.sums

        return run

    def snapshot(out):
        return tuple(t.clone().float() for t in out)

    provs = providers("class_bank")
    # same sequence of calls for every provider before the check: the first call
    run_case(case, make, snapshot, provs, bytes_moved=(B * D * 4 * 3), graph_for=("eager", "triton", "cpp"))
    # no host synchronisation in the triton enqueue
    if DEV == "cuda" and "triton" in provs:
        try:
            bank = ClassMemoryBank(C, S, D, dtype=dt, backend="triton", device=DEV)
            bank.enqueue(gen_x, gen_y)
            sync()
            torch.cuda.set_sync_debug_mode("error")
            try:
                bank.enqueue(gen_x, gen_y)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            sync()
            record(case, "triton_sync_check", status="ok", host_sync=False)
        except Exception as exc:
            record(case, "triton_sync_check", status=f"error: {type(exc).__name__}: {str(exc)[:200]}", host_sync=True)


def case_structure():
    if ARGS.dry_run:
        C, D, B = 30, 16, 12
    else:
        C, D, B = 1000, 2048, 256
    case = f"centroids+intra fwd_bwd C={C} D={D} B={B}"
    log(f"case {case}")
    sums_s = torch.randn(C, D, device=DEV)
    sums_t = torch.randn(C, D, device=DEV)
    counts = torch.randint(0, 16, (C,), device=DEV)
    f_s = torch.randn(B, D, device=DEV, requires_grad=True)
    f_t = torch.randn(B, D, device=DEV)
    y = torch.randint(0, C, (B,), device=DEV)

    def make(p):
        be = backend_of(p)

        def step(f_s, f_t):
            mu_s, tot_s = F.class_centroids(sums_s, counts, f_s, y, backend=be)
            mu_t, tot_t = F.class_centroids(sums_t, counts, f_t, y, backend=be)
            valid = (tot_s >= 1) & (tot_t >= 1)
            loss = F.intra_class_loss(f_s, f_t, mu_s, mu_t, y, valid, backend=be)
            (g,) = torch.autograd.grad(loss, (f_s,))
            return loss, g

        fn = _compile(step) if p == "compiled" else step
        return lambda: fn(f_s, f_t)

    provs = [p for p in providers("intra") if p in providers("centroids")]
    run_case(case, make, lambda out: tuple(o.float() for o in out), provs)


def case_inter():
    if ARGS.dry_run:
        C, Ds, Dt, P = 70, 16, 24, 9
    elif ARGS.quick:
        C, Ds, Dt, P = 8192, 512, 2048, 256
    else:
        C, Ds, Dt, P = 21841, 512, 2048, 256
    case = f"inter fwd_bwd C={C} Ds={Ds} Dt={Dt} P={P}"
    log(f"case {case}")
    mu_s = torch.randn(C, Ds, device=DEV, requires_grad=True)
    mu_t = torch.randn(C, Dt, device=DEV)
    valid = torch.ones(C, dtype=torch.bool, device=DEV)
    live = torch.zeros(C, dtype=torch.bool, device=DEV)
    live[torch.randperm(C, device=DEV)[:P]] = True

    def make(p):
        be = backend_of(p)

        max_live = P if p in INTER_BOUND else None

        def step(mu_s, mu_t):
            loss = F.inter_class_loss(mu_s, mu_t, valid, live=live, max_live=max_live, backend=be)
            (g,) = torch.autograd.grad(loss, (mu_s,))
            return loss, g

        fn = _compile(step) if p == "compiled" else step
        from icakd_fast.kernels import structure as kst

        def run():
            with matmul_precision(INTER_PRECISION.get(p, "highest")), \
                    overrides(kst, {"GPU_CFG_OVERRIDES": INTER_VARIANTS.get(p, {})}), \
                    mock.patch.dict(os.environ, INTER_CPP_ENV.get(p, {})):
                return fn(mu_s, mu_t)

        return run

    def fwd_only(p, row):
        if ARGS.dry_run or not p.startswith(("triton", "cpp")) or p in INTER_BOUND:  # same forward as cpp
            return {}
        from icakd_fast.kernels import structure as kst

        def run():
            with torch.no_grad(), matmul_precision(INTER_PRECISION.get(p, "highest")), \
                    overrides(kst, {"GPU_CFG_OVERRIDES": INTER_VARIANTS.get(p, {})}), \
                    mock.patch.dict(os.environ, INTER_CPP_ENV.get(p, {})):
                return F.inter_class_loss(mu_s, mu_t, valid, live=live, backend=backend_of(p))

        return {"ms_forward_only": bench(run)}

    provs = providers("inter")
    if not ARGS.dry_run:
        provs.insert(1, "eager_tf32")
    if "triton" in provs:
        provs += ["triton_tf32", "triton_bf16"] + ([] if ARGS.dry_run else list(INTER_VARIANTS))
    if "cpp" in provs:
        provs += [p for p in INTER_CPP_ENV if p != "cpp"]
    run_case(case, make, lambda out: (out[0].float(), out[1].float()), provs, extra=fwd_only)


def case_overhead():
    """Host time per call of each layer of the CAM op on a tiny input (GPU time negligible): where
    the microseconds of a small call go. Median of host wall time, one sync per batch of calls."""
    if "triton" not in providers("cam"):
        return
    from icakd_fast.kernels import cam as kcam
    from icakd_fast.ops import _triton_impl as TI
    from icakd_fast.ops import cam_features

    f = torch.randn(2, 8, 7, 7, device=DEV, requires_grad=True)
    w = torch.randn(2, 8, device=DEV, requires_grad=True)
    fd, wd = f.detach(), w.detach()
    n = 5 if ARGS.dry_run else 300

    def host_us(fn):
        for _ in range(3):
            fn()
        sync()
        samples = []
        for _ in range(3 if ARGS.dry_run else 5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            samples.append((time.perf_counter() - t0) / n * 1e6)
        return sorted(samples)[len(samples) // 2]

    def fwd_bwd():
        cam, pooled = F.class_activation_features(f, w, backend="triton")
        torch.autograd.grad((cam, pooled), (f, w), (torch.ones_like(cam), torch.ones_like(pooled)))

    def fwd_bwd_ref():
        cam, pooled = F.class_activation_features(f, w, backend="reference")
        torch.autograd.grad((cam, pooled), (f, w), (torch.ones_like(cam), torch.ones_like(pooled)))

    layers = {
        "kernels.cam.cam_fwd (direct launches)": lambda: kcam.cam_fwd(fd, wd, True),
        "registered op triton_cam_fwd (dispatcher)": lambda: TI._cam_fwd_op.op(fd, wd, True),
        "contract function TI.cam_fwd (eager: body called directly)": lambda: TI.cam_fwd(fd, wd, True),
        "ops.cam_features (autograd Function)": lambda: cam_features("triton", f, w),
        "functional.class_activation_features": lambda: F.class_activation_features(f, w, backend="triton"),
        "functional fwd + autograd.grad (triton)": fwd_bwd,
        "functional fwd + autograd.grad (reference)": fwd_bwd_ref,
        "torch.empty x4 (allocation floor)": lambda: [torch.empty(2, 8, device=DEV) for _ in range(4)],
    }
    for name, fn in layers.items():
        try:
            record("host_overhead_us B=2 K=8 7x7", name, status="ok", host_us=host_us(fn))
        except Exception as exc:
            record("host_overhead_us B=2 K=8 7x7", name, status=f"error: {type(exc).__name__}: {str(exc)[:200]}")


# ----------------------------------------------------------------------------------------------


def environment(copy_bw):
    env = {"torch": torch.__version__, "device": DEV, "dry_run": ARGS.dry_run, "quick": ARGS.quick}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if DEV == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    env["copy_bandwidth_gbps"] = copy_bw
    try:
        import icakd_fast._C  # noqa: F401

        env["cpp_extension"] = True
    except Exception:
        env["cpp_extension"] = False
    return env


def main():
    if not ARGS.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device (use --dry-run to exercise it on CPU)")
    os.makedirs(ARGS.out, exist_ok=True)
    t_start = time.time()
    copy_bw = None
    try:
        copy_bw = copy_bandwidth_gbps()
        log(f"device-to-device copy bandwidth: {copy_bw} GB/s")
    except Exception:
        traceback.print_exc()
    env = environment(copy_bw)
    log(json.dumps(env))
    cases = {"cam": lambda: case_cam(copy_bw), "bank": case_bank, "structure": case_structure, "inter": case_inter,
             "overhead": case_overhead}
    for name in ARGS.cases.split(","):
        name = name.strip()
        if name not in cases:
            continue
        try:
            cases[name]()
        except Exception as exc:
            traceback.print_exc()
            record(name, "*", status=f"error: {type(exc).__name__}: {str(exc)[:300]}")
        if DEV == "cuda":
            torch.cuda.empty_cache()
        _write(env, t_start)  # keep partial results if a later case hangs
    _write(env, t_start)
    log(f"done in {time.time() - t_start:.1f} s -> {ARGS.out}")


def _write(env, t_start):
    env = dict(env, wall_s=time.time() - t_start)
    with open(os.path.join(ARGS.out, "gpu_bench.json"), "w") as fh:
        json.dump({"environment": env, "results": RESULTS}, fh, indent=2, default=str)
    keys: list[str] = []
    for row in RESULTS:
        for k in row:
            if k not in keys:
                keys.append(k)
    with open(os.path.join(ARGS.out, "gpu_bench.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["gpu", "torch", "triton", "cuda"] + keys)
        w.writeheader()
        for row in RESULTS:
            w.writerow(dict(row, gpu=env.get("gpu", DEV), torch=env["torch"], triton=env["triton"], cuda=env.get("cuda")))


if __name__ == "__main__":
    main()
