"""The kernel performance targets, judged from ``gpu_bench.py`` results.

    python benchmarks/targets.py DIR/gpu_bench.json [MORE.json ...] [--out FILE.md]

Several files are merged in order (a later row of the same case and provider replaces an earlier
one), so a run of one case can be judged together with a full run. For each target the table
names the best provider that meets it (or, where none does, the best one measured), its figure,
and the runner-up figures of the other fast providers. A target whose case is absent from the
files reads "not measured". Targets (B=256, K=2048, 7x7, bf16 for the CAM features; C=1000,
S=16, D=2048, B=256 for the bank; C=21841, Ds=512, Dt=2048, 256 live rows for the inter loss):

- CAM fwd+bwd at >= 75% of the measured copy bandwidth (through the public op; the kernels alone,
  replayed in a CUDA graph, are listed beside it), >= 3x eager and >= 1.5x ``torch.compile``;
- bank enqueue + sums >= 5x eager, capturable in a CUDA graph, no host synchronisation;
- inter loss fwd+bwd at full float32 accuracy (no TF32 / bf16 provider) >= 10x eager with at
  most 256 MB of extra peak memory (both by the same provider: the speed row considers only the
  providers within the memory bound).
"""

from __future__ import annotations

import argparse
import json
import sys

CAM = "cam_fwd_bwd B=256 K=2048 7x7 bfloat16"
BANK = "bank_enqueue C=1000 S=16 D=2048 B=256"
INTER = "inter fwd_bwd C=21841 Ds=512 Dt=2048 P=256"
BASELINES = ("eager", "compiled")


def load(paths):
    """(environment of the first file, {(case, provider): row}) over the files in order."""
    env, rows = {}, {}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        env = env or data.get("environment", {})
        for r in data.get("results", []):
            if r.get("status") == "ok":
                rows[(r["case"], r["provider"])] = r
    return env, rows


def fast(rows, case, keep=lambda p: True):
    """{provider: row} of the non-baseline providers of ``case``."""
    return {p: r for (c, p), r in rows.items() if c == case and p not in BASELINES and keep(p)}


def full_precision(provider: str) -> bool:
    return "tf32" not in provider and "bf16" not in provider


def judge(name, threshold, candidates, value, ok, fmt, higher=True):
    """One table row: the best candidate meeting ``ok`` (else the best one), with the others."""
    scored = [(p, value(r), ok(r)) for p, r in candidates.items() if value(r) is not None]
    if not scored:
        return [name, threshold, "-", "not measured", "-", ""]
    scored.sort(key=lambda t: (not t[2], -t[1] if higher else t[1]))
    best = scored[0]
    others = ", ".join(f"{p} {fmt(v)}" for p, v, _ in scored[1:6])
    return [name, threshold, best[0], fmt(best[1]), "yes" if best[2] else "**no**", others]


def report(env, rows) -> str:
    x = lambda v: f"{v:.2f}x"  # noqa: E731
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    cam = fast(rows, CAM)
    cam_kernels = fast(rows, CAM + " kernels only (CUDA graph)")
    bank = fast(rows, BANK, keep=lambda p: p != "triton_sync_check")
    sync = rows.get((BANK, "triton_sync_check"), {})
    inter = fast(rows, INTER, keep=full_precision)
    table = [
        judge("CAM fwd+bwd, share of copy bandwidth (op)", ">= 75%", cam,
              lambda r: r.get("fraction_of_copy_bw"), lambda r: r["fraction_of_copy_bw"] >= 0.75, pct),
        judge("CAM fwd+bwd, share of copy bandwidth (kernels alone, CUDA graph)", "(>= 75%)", cam_kernels,
              lambda r: r.get("fraction_of_copy_bw"), lambda r: r["fraction_of_copy_bw"] >= 0.75, pct),
        judge("CAM fwd+bwd vs eager", ">= 3x", cam,
              lambda r: r.get("speedup_vs_eager"), lambda r: r["speedup_vs_eager"] >= 3, x),
        judge("CAM fwd+bwd vs torch.compile", ">= 1.5x", cam,
              lambda r: r.get("speedup_vs_compiled"), lambda r: r["speedup_vs_compiled"] >= 1.5, x),
        judge("CAM fwd+bwd vs eager, both in CUDA graphs", "(>= 3x)", cam,
              lambda r: r.get("graph_speedup_vs_eager_graph"), lambda r: r["graph_speedup_vs_eager_graph"] >= 3, x),
        judge("CAM fwd+bwd vs torch.compile, both in CUDA graphs", "(>= 1.5x)", cam,
              lambda r: r.get("graph_speedup_vs_compiled_graph"),
              lambda r: r["graph_speedup_vs_compiled_graph"] >= 1.5, x),
        judge("bank enqueue + sums vs eager, CUDA-graph capturable", ">= 5x", bank,
              lambda r: r.get("speedup_vs_eager"),
              lambda r: r["speedup_vs_eager"] >= 5 and r.get("cuda_graph_capturable") is True, x),
        ["bank enqueue: no host synchronisation (triton)", "none", "triton",
         "not measured" if "host_sync" not in sync else ("syncs" if sync["host_sync"] else "no sync"),
         "-" if "host_sync" not in sync else ("**no**" if sync["host_sync"] else "yes"), ""],
        judge("inter fwd+bwd, full float32, vs eager (providers within 256 MB extra)", ">= 10x",
              {p: r for p, r in inter.items() if (r.get("peak_extra_mb") or 0) <= 256},
              lambda r: r.get("speedup_vs_eager"), lambda r: r["speedup_vs_eager"] >= 10, x),
        judge("inter fwd+bwd, full float32, extra peak memory", "<= 256 MB", inter,
              lambda r: r.get("peak_extra_mb"), lambda r: r["peak_extra_mb"] <= 256, lambda v: f"{v:.0f} MB",
              higher=False),
    ]
    gpu = env.get("gpu", env.get("device", "?"))
    head = (f"Kernel targets on {gpu} (torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; "
            f"copy bandwidth {env.get('copy_bandwidth_gbps', 0):.0f} GB/s). Wall time through the public "
            "ops unless a row says CUDA graph; rows in parentheses are context, not targets.\n")
    lines = ["| target | threshold | best provider | figure | met | others |", "| --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    return head + "\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="gpu_bench.json files, merged in order")
    p.add_argument("--out", help="also write the table here (markdown)")
    a = p.parse_args(argv)
    try:
        env, rows = load(a.results)
    except (OSError, ValueError) as exc:
        p.error(f"cannot read the results: {exc}")
    text = report(env, rows)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
