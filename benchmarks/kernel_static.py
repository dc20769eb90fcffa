"""What the CAM kernels compile to on a GPU, read on any machine (no GPU needed).

    python benchmarks/kernel_static.py                       # B=256 K=2048 7x7 bf16, sm_90
    python benchmarks/kernel_static.py --shape 8 64 7 7 --dtype float16 --json out.json

The CAM launchers (``kernels/cam.py``) run on empty CPU tensors of the given shape with their
launches recorded instead of executed; every recorded launch is then compiled ahead of time for
the target architecture with Triton's own ptxas, specialised as Triton's launcher would
specialise it (16-byte-aligned pointers, integers divisible by 16, integers equal to 1), and its
machine code (SASS, through the cuobjdump shipped with Triton) is summarised per kernel:
registers per thread, stack / local memory (register spills), shared memory, the theoretical occupancy on an
H100/H200-class SM, the width of every global load and store, and the number of SASS
instructions -- in total and per element of the feature map. These are static figures, not
timings: they show whether accesses are vectorised and how much work each element costs, which
is what bounds these memory-bound kernels, before a GPU is at hand to time them.

Variants: the default strategy ("split"), the one-launch image forward ("image") and the opt-in
"vec" kernels. Needs Triton's NVIDIA backend (it ships ptxas and cuobjdump); the interpreter
must be off (the script re-executes itself without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # interpreted kernels cannot be compiled
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET")
    sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from icakd_fast.kernels import cam as kcam  # noqa: E402
from icakd_fast.kernels._common import TRITON_VERSION  # noqa: E402

#: per-SM limits of compute capability 9.0 (H100/H200) for the occupancy estimate
SM90 = {"regs": 65536, "warps": 64, "blocks": 32, "smem": 228 * 1024, "smem_reserved": 1024}
_TT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
       torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
       torch.bool: "i1"}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def tool(name: str) -> str:
    """Path of a binary shipped with Triton's NVIDIA backend."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: this Triton has no NVIDIA backend binaries")
    return path


class Recorder:
    """Stands in for ``kernels.cam._launch``: records (kernel, grid, args, kwargs), runs nothing."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        return _Grid(lambda grid, args, kwargs: self.launches.append((kernel, tuple(grid), args, kwargs)))


class _Grid:
    """``launch(kernel)[grid](*args, **kwargs)``, recorded."""

    def __init__(self, sink):
        self.sink = sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink(grid, args, kwargs)


def record(variant: str, B: int, K: int, H: int, W: int, dtype: torch.dtype, channels_last: bool = False):
    """The launches of one forward (with pooling) and one full backward of ``variant``."""
    saved = (kcam._launch, kcam.CAM_VEC, kcam.CAM_FWD_MODE)
    rec = Recorder()
    try:
        kcam._launch = rec
        kcam.CAM_VEC = variant == "vec"
        kcam.CAM_FWD_MODE = "image" if variant == "image" else "auto"
        f = torch.empty(B, K, H, W, dtype=dtype)
        if channels_last:
            f = f.contiguous(memory_format=torch.channels_last)
        w = torch.empty(B, K, dtype=dtype)
        cam, pooled, pool_w, _ = kcam.cam_fwd(f, w, True)
        fwd = len(rec.launches)
        kcam.cam_bwd(torch.empty_like(cam), torch.empty_like(pooled), f, w, cam, pool_w, True, True)  # dA like f
    finally:
        kcam._launch, kcam.CAM_VEC, kcam.CAM_FWD_MODE = saved
    return [(("fwd" if i < fwd else "bwd"),) + L for i, L in enumerate(rec.launches)]


def record_inter(C: int, Ds: int, Dt: int, P: int, precision: str):
    """The launches of the Triton inter loss (forward, then the backward of mu_s for P live rows)
    with the GPU launch configuration, at a float32 matmul precision ("highest": 3xTF32)."""
    from icakd_fast.kernels import structure as kst

    saved = (kst.launch, kst._cfg, torch.get_float32_matmul_precision())
    rec = Recorder()
    try:
        kst.launch = rec
        kst._cfg = lambda x, C, f64=False: {**kst._cuda_cfg(C), **kst.GPU_CFG_OVERRIDES}
        torch.set_float32_matmul_precision(precision)
        mu_s, mu_t = torch.empty(C, Ds), torch.empty(C, Dt)
        valid = torch.ones(C, dtype=torch.bool)
        live = torch.zeros(C, dtype=torch.bool)
        live[:P] = True
        kst.inter_fwd(mu_s, mu_t, valid, 1e-8)
        fwd = len(rec.launches)
        kst.inter_bwd(torch.ones(()), mu_s, mu_t, valid, live, True, False, 1e-8)
    finally:
        kst.launch, kst._cfg = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])
    return [(("fwd" if i < fwd else "bwd"),) + L for i, L in enumerate(rec.launches)]


def record_bank(C: int, S: int, D: int, N: int):
    """The launches of one class-bank enqueue of N rows (plan + apply) and one resync of N classes."""
    from icakd_fast.kernels import bank as kb

    saved = kb.launch
    rec = Recorder()
    try:
        kb.launch = rec
        bank = torch.empty(C, S, D)
        count, ptr = torch.zeros(C, dtype=torch.int64), torch.zeros(C, dtype=torch.int64)
        sums = torch.empty(C, D)
        labels = torch.randint(0, C, (N,))
        kb.class_bank_enqueue_(bank, count, ptr, sums, torch.empty(N, D), labels, torch.ones(N, dtype=torch.bool))
        kb.class_bank_resync_(bank, count, sums, torch.arange(min(N, C)))
    finally:
        kb.launch = saved
    return [("enqueue" if k.fn.__name__ != "_resync_kernel" else "resync", k, g, a, kw) for k, g, a, kw in rec.launches]


def record_structure(C: int, D: int, B: int):
    """The launches of the live centroids, then the intra-class loss forward and backward, of B rows."""
    from icakd_fast.kernels import structure as kst

    saved = kst.launch
    rec = Recorder()
    try:
        kst.launch = rec
        feats, labels = torch.empty(B, D), torch.randint(0, C, (B,))
        mu, _ = kst.centroids_fwd(torch.empty(C, D), torch.zeros(C, dtype=torch.int64), feats, labels)
        valid = torch.ones(C, dtype=torch.bool)
        kst.intra_fwd(feats, feats, mu, mu, labels, valid)
        kst.intra_bwd(torch.ones(()), feats, feats, mu, mu, labels, valid)
    finally:
        kst.launch = saved
    return [("bwd" if i == len(rec.launches) - 1 else "fwd",) + L for i, L in enumerate(rec.launches)]


def _bound(kernel, args, kwargs):
    """``(names, params by name, values by name)`` of one launch."""
    names = kernel.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    return names, {p.name: p for p in kernel.params}, values


def specialise(kernel, args, kwargs):
    """``(signature, constants, attributes, options)`` of one launch, as Triton's launcher would
    specialise it (Triton >= 3.3 form: constants and attributes keyed by argument index tuples)."""
    names, params, values = _bound(kernel, args, kwargs)
    sig, consts, attrs = {}, {}, {}
    for i, n in enumerate(names):
        v = values[n]
        if params[n].is_constexpr:
            sig[n] = "constexpr"
            consts[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[n] = "*" + _TT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(v, bool):
            sig[n] = "i1"
        elif isinstance(v, int):
            if v == 1 and not params[n].do_not_specialize:
                sig[n] = "constexpr"
                consts[(i,)] = 1
            else:
                sig[n] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0 and not params[n].do_not_specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        else:
            raise TypeError(f"argument {n!r}: cannot specialise {type(v).__name__}")
    opts = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
    return sig, consts, attrs, opts


def compile_launch(kernel, args, kwargs, arch: int):
    """Triton's specialisation of one launch, compiled for ``sm_<arch>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs, opts = specialise(kernel, args, kwargs)
    target = GPUTarget("cuda", arch, 32)
    # Triton's ahead-of-time API changed in 3.3 (tuple-keyed constants and attributes); before it,
    # names as keys and an AttrsDescriptor the backend derives from the values
    if TRITON_VERSION < (3, 3):
        from triton.compiler.compiler import make_backend

        names, params, values = _bound(kernel, args, kwargs)
        desc = make_backend(target).get_attrs_descriptor(kernel.params, [values[n] for n in names])
        const_ids = desc.get_constants()  # integers equal to 1
        consts = {n: values[n] for i, n in enumerate(names) if params[n].is_constexpr or i in const_ids}
        sig = {n: (t if t != "constexpr" else "i32") for n, t in sig.items() if not params[n].is_constexpr}
        return triton.compile(ASTSource(kernel, sig, consts, desc), target=target, options=opts)
    return triton.compile(ASTSource(kernel, sig, consts, attrs), target=target, options=opts)


def sass_stats(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    try:
        res = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", ln)]
    addrs = [int(re.search(r"/\*([0-9a-f]{4,})\*/", ln).group(1), 16) for ln in lines]
    loops = []  # (first, last) address of every loop: a backward branch and its target
    for a, ln in zip(addrs, lines):
        b = re.search(r"\bBRA\b[^;]*?(0x[0-9a-f]+)", ln)
        if b and int(b.group(1), 16) < a:
            loops.append((int(b.group(1), 16), a))
    outer = [lp for lp in loops if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in loops)]
    body = sum(sum(1 for x in addrs if lo <= x <= hi) for lo, hi in outer)  # top-level loop bodies
    ops = Counter(re.findall(r"\b((?:LDG|STG|LDGSTS)\.E[\w.]*)", sass))
    opcodes = Counter(re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", ln).group(1) for ln in lines)
    # spilled registers live on the thread's stack (STACK), LOCAL is for local arrays
    return {"regs": int(m.group(1)), "local": int(m.group(2)) + int(m.group(4)), "instructions": len(lines), "loop_body": body,
            "loops": len(outer),
            "global": dict(sorted(ops.items())), "shuffles": len(re.findall(r"\bSHFL\.", sass)),
            "barriers": len(re.findall(r"\bBAR\.", sass)), "opcodes": dict(opcodes.most_common())}


def occupancy(regs: int, warps: int, smem: int) -> float:
    """Theoretical resident warps / 64 on an SM of compute capability 9.0."""
    warp_regs = -(-regs * 32 // 256) * 256
    by_regs = SM90["regs"] // max(warp_regs * warps, 1)
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved"])
    blocks = min(by_regs, by_smem, SM90["warps"] // warps, SM90["blocks"])
    return blocks * warps / SM90["warps"]


def trips(name: str, values: dict) -> int | None:
    """Iterations of every top-level loop of a kernel where the launch fixes them, else None."""
    if "ITERS" in values:
        return values["ITERS"]
    if name == "_cam_image_kernel":  # two sweeps over the channels
        return triton.cdiv(values["K"], values["BLOCK_K"])
    if name == "_cam_pool_kernel" and values.get("FUSED"):
        return triton.cdiv(values["NKB"], values["BLOCK_R"])
    return None


def analyse(variant: str, B: int, K: int, H: int, W: int, dtype: torch.dtype, arch: int,
            channels_last: bool = False, launches=None) -> list[dict]:
    """One row per launch; ``launches`` (from ``record_inter``) replaces the CAM launches."""
    rows = []
    if launches is None:
        launches = record(variant, B, K, H, W, dtype, channels_last)
    for phase, kernel, grid, args, kwargs in launches:
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        ck = compile_launch(kernel, args, kwargs, arch)
        st = sass_stats(ck.asm["cubin"])
        warps = kwargs.get("num_warps", 4)
        smem = ck.metadata.shared
        programs = 1
        for g in grid:
            programs *= g
        n = trips(name, {**dict(zip(kernel.arg_names, args)), **kwargs})
        if st["loop_body"] == 0:
            executed = st["instructions"]
        elif n is not None:
            executed = st["instructions"] - st["loop_body"] + st["loop_body"] * n
        else:
            executed = None
        per_elem = None if executed is None or not B else executed * warps * 32 * programs / (B * K * H * W)
        rows.append({"variant": variant, "phase": phase, "kernel": name, "grid": programs, "warps": warps,
                     "smem": smem, "occupancy": occupancy(st["regs"], warps, smem),
                     "instr_per_element": per_elem, **st})
    return rows


def table(rows: list[dict], header: str) -> str:
    out = [header, "",
           "| variant | pass | kernel | programs x warps | regs | stack B | smem KB | occupancy | global accesses "
           "(per thread, static) | SASS instr | thread-instr / element |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        acc = ", ".join(f"{k} x{v}" for k, v in r["global"].items())
        pe = "-" if r["instr_per_element"] is None else f"{r['instr_per_element']:.1f}"
        loop = f" (loops {r['loop_body']})" if r["loop_body"] else ""
        out.append(f"| {r['variant']} | {r['phase']} | `{r['kernel']}` | {r['grid']} x {r['warps']} | {r['regs']} | "
                   f"{r['local']} | {r['smem'] / 1024:.1f} | {r['occupancy']:.0%} | {acc} | {r['instructions']}{loop} | {pe} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, default=[256, 2048, 7, 7], metavar=("B", "K", "H", "W"))
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    p.add_argument("--channels-last", action="store_true", help="an NHWC-contiguous feature map")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--variants", default="split,image,vec")
    p.add_argument("--inter", type=int, nargs=4, metavar=("C", "DS", "DT", "P"),
                   help="the Triton inter-loss kernels instead (C classes, widths Ds and Dt, P live rows), e.g. 21841 512 2048 256")
    p.add_argument("--bank", type=int, nargs=4, metavar=("C", "S", "D", "N"),
                   help="the Triton class-bank kernels instead (C classes, S slots, width D, N rows), e.g. 1000 16 2048 256")
    p.add_argument("--structure", type=int, nargs=3, metavar=("C", "D", "B"),
                   help="the Triton centroid and intra-loss kernels instead (C classes, width D, B rows), e.g. 1000 2048 256")
    p.add_argument("--precision", choices=("highest", "high", "medium"), default="highest",
                   help="with --inter: torch.set_float32_matmul_precision (highest: 3xTF32, high: TF32, medium: bf16)")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE",
                   help="override an entry of kernels.cam.CAM_CFG (repeatable), e.g. vec_warps=8")
    p.add_argument("--opcodes", type=int, default=0, metavar="N", help="also list each kernel's N most frequent SASS opcodes")
    p.add_argument("--out", help="write the markdown table here")
    a = p.parse_args()
    B, K, H, W = a.shape
    for name, v in (("B", B), ("K", K), ("H", H), ("W", W)):
        if v < 1:
            p.error(f"--shape: {name} must be >= 1, got {v}")
    for item in a.cfg:
        key, _, value = item.partition("=")
        if key not in kcam.CAM_CFG or not value.lstrip("-").isdigit():
            p.error(f"--cfg: expected KEY=INT with KEY one of {sorted(kcam.CAM_CFG)}, got {item!r}")
        kcam.CAM_CFG[key] = int(value)
    rows = []
    if a.inter:
        C, Ds, Dt, P = a.inter
        if min(C, Ds, Dt) < 1 or not 0 <= P <= C:
            p.error(f"--inter: need C, DS, DT >= 1 and 0 <= P <= C, got {a.inter}")
        rows = analyse("inter", 0, 0, 0, 0, torch.float32, a.arch, launches=record_inter(C, Ds, Dt, P, a.precision))
        header = (f"Inter-loss kernels compiled for sm_{a.arch} (Triton {triton.__version__}), C={C} Ds={Ds} Dt={Dt}, "
                  f"P={P} live rows, float32 matmul precision {a.precision!r}; static figures, not timings")
    if a.bank:
        C, S, D, N = a.bank
        if min(C, S, D, N) < 1:
            p.error(f"--bank: C, S, D, N must be >= 1, got {a.bank}")
        rows = analyse("bank", 0, 0, 0, 0, torch.float32, a.arch, launches=record_bank(C, S, D, N))
        header = (f"Class-bank kernels compiled for sm_{a.arch} (Triton {triton.__version__}), C={C} S={S} D={D}, "
                  f"N={N} rows, float32 bank; static figures, not timings")
    if a.structure:
        C, D, B = a.structure
        if min(C, D, B) < 1:
            p.error(f"--structure: C, D, B must be >= 1, got {a.structure}")
        rows = analyse("structure", 0, 0, 0, 0, torch.float32, a.arch, launches=record_structure(C, D, B))
        header = (f"Centroid and intra-loss kernels compiled for sm_{a.arch} (Triton {triton.__version__}), C={C} D={D} "
                  f"B={B}, float32; static figures, not timings")
    other = a.inter or a.bank or a.structure
    for variant in [] if other else a.variants.split(","):
        if variant not in ("split", "image", "vec"):
            p.error(f"--variants: unknown variant {variant!r} (split, image, vec)")
        rows += analyse(variant, B, K, H, W, _DTYPES[a.dtype], a.arch, a.channels_last)
    if not other:
        layout = "channels_last" if a.channels_last else "NCHW"
        header = (f"CAM kernels compiled for sm_{a.arch} (Triton {triton.__version__}), B={B} K={K} {H}x{W} {a.dtype} "
                  f"{layout}, forward with pooling + full backward; static figures, not timings")
    text = table(rows, header)
    if a.opcodes:
        text += "\n\nMost frequent SASS opcodes (static counts):\n" + "\n".join(
            f"- {r['variant']} `{r['kernel']}`: " + ", ".join(f"{k} {v}" for k, v in list(r["opcodes"].items())[:a.opcodes])
            for r in rows)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"header": header, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
