"""Plot the results of ``e2e_bench.py``: one PNG, one row of panels per results file.

    python benchmarks/plot_results.py DIR/e2e_bench.json [MORE.json ...] [--out FIG.png]

Panels (those with data): e2e images/s per method and backend (one panel per preset), scale
sweep step time vs number of classes and peak memory vs number of classes (one line per backend
and slots_per_class, the banks' own size dashed, out-of-memory marked with x), and the peer
comparisons (ms, log scale). Each row is titled with the device that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections import defaultdict

METHODS = ("ce", "kd", "cskd", "icakd")
BACKEND_ORDER = ("reference", "compiled", "triton", "cpp", "auto")


def load(path: str) -> dict:
    with open(path) as fh:
        data = json.load(fh)
    if "results" not in data or "environment" not in data:
        raise SystemExit(f"{path}: not a results file of e2e_bench.py")
    return data


def ok(r) -> bool:
    return r.get("status") == "ok" and isinstance(r.get("value"), (int, float))


def color(backend: str) -> str:
    i = BACKEND_ORDER.index(backend) if backend in BACKEND_ORDER else len(BACKEND_ORDER) + hash(backend) % 4
    return f"C{i}"


def ordered(names):
    known = [b for b in BACKEND_ORDER if b in names]
    return known + sorted(n for n in names if n not in known)


def panel_e2e(ax, rows, case):
    rows = [r for r in rows if r["case"] == case and r["mode"] == "e2e" and r["metric"] == "images_per_s"]
    backends = ordered({r["backend"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    width = 0.8 / max(len(backends), 1)
    for j, b in enumerate(backends):
        xs, ys, labels = [], [], []
        for i, m in enumerate(methods):
            hit = [r for r in rows if r["method"] == m and r["backend"] == b]
            if not hit:
                continue
            x = i - 0.4 + width * (j + 0.5)
            if ok(hit[0]):
                xs.append(x)
                ys.append(hit[0]["value"])
            else:
                st = hit[0]["status"]
                labels.append((x, "oom" if st == "oom" else ("skip" if st.startswith("skipped") else "err")))
        ax.bar(xs, ys, width, color=color(b))
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.0f}" if y >= 10 else f"{y:.2g}", ha="center", va="bottom", fontsize=6, rotation=90)
        for x, text in labels:
            ax.text(x, 0, text, ha="center", va="bottom", fontsize=6, rotation=90, color=color(b))
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods)
    ax.set_ylabel("images/s (higher is better)")
    shape = rows[0]["shape"] if rows else ""
    ax.set_title(f"{case}: one training step\n{shape}", fontsize=8)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=color(b), label=b) for b in backends], fontsize=6)
    ax.margins(y=0.15)


def _sweep_series(rows, metric):
    """{(backend, S): [(C, value or None for oom/error)]}"""
    out = defaultdict(list)
    for r in rows:
        if r["mode"] != "sweep" or r["metric"] != metric:
            continue
        parts = dict(t.split("=") for t in r["case"].split()[1:3])
        C, S = int(parts["C"]), int(parts["S"])
        if ok(r):
            out[(r["backend"], S)].append((C, r["value"]))
        elif r["status"] == "oom" or r["status"].startswith("error"):
            out[(r["backend"], S)].append((C, None))
    return out


def panel_sweep(ax, rows, metric, ylabel, bank_line=False):
    series = _sweep_series(rows, metric)
    markers = "osd^v<>"
    slots = sorted({s for _, s in series})
    backends = ordered({b for b, _ in series})
    for (b, S), pts in sorted(series.items(), key=lambda kv: (backends.index(kv[0][0]), kv[0][1])):
        pts.sort()
        good = [(c, v) for c, v in pts if v is not None]
        c = color(b)
        ls = "-" if slots.index(S) == 0 else "--" if slots.index(S) == 1 else ":"
        if good:
            ax.plot(*zip(*good), ls, marker=markers[slots.index(S) % len(markers)], color=c, ms=3,
                    label=f"{b} S={S}", lw=1)
        bad = [c for c, v in pts if v is None]
        if bad:
            top = max((v for _, v in good), default=1.0)
            ax.scatter(bad, [top] * len(bad), marker="x", color=c, s=40, zorder=5,
                       label=f"{b} S={S}: oom/error")
    if bank_line:
        bank = defaultdict(dict)
        for r in rows:
            if r["mode"] == "sweep" and r["metric"] == "bank_mib" and ok(r):
                parts = dict(t.split("=") for t in r["case"].split()[1:3])
                bank[int(parts["S"])][int(parts["C"])] = r["value"]
        for S, pts in sorted(bank.items()):
            cs = sorted(pts)
            ax.plot(cs, [pts[c] for c in cs], color="black", lw=0.8, ls=(0, (1, 2)), label=f"both banks S={S}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of classes C")
    ax.set_ylabel(ylabel)
    shape = next((r["shape"] for r in rows if r["mode"] == "sweep"), "")
    ax.set_title(f"sweep: enqueue x2 + centroids + intra + inter, fwd+bwd\n{shape.split(' ', 2)[-1]}", fontsize=8)
    ax.legend(fontsize=5, ncol=2)


def panel_peers(ax, rows):
    rows = [r for r in rows if r["mode"] == "peers" and r["metric"] == "ms"]
    labels, vals, colors = [], [], []
    for r in rows:
        labels.append(f"{r['case']} | {r['method']} | {r['backend']}"[:90])
        vals.append(r["value"] if ok(r) else 0.0)
        colors.append("C1" if r["backend"].startswith("icakd_fast") else "C0")
    y = range(len(labels))
    ax.barh(list(y), vals, color=colors)
    ax.set_xscale("log")
    # rows without a time (skipped, failed) are labelled at the left edge of the axis
    positive = [v for v in vals if v > 0]
    lo, hi = (min(positive) / 2, max(positive) * 30) if positive else (0.1, 10.0)
    ax.set_xlim(lo, hi)
    for i, (v, r) in enumerate(zip(vals, rows)):
        text = f"{v:.3g} ms" if ok(r) else r["status"][:30]
        ax.text(v if v > 0 else lo, i, " " + text, va="center", fontsize=5)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=5)
    ax.invert_yaxis()
    ax.set_xlabel("ms (lower is better; orange = icakd_fast)")
    ax.set_title("peers", fontsize=8)


def plot(paths: list[str], out: str) -> str:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("matplotlib is needed for the plot: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [load(p) for p in paths]
    layouts = []
    for d in datasets:
        rows = d["results"]
        top = [("e2e", c) for c in sorted({r["case"] for r in rows if r["mode"] == "e2e"})]
        if any(r["mode"] == "sweep" for r in rows):
            top += [("sweep_ms", None), ("sweep_mem", None)]
        n_peers = sum(r["mode"] == "peers" and r["metric"] == "ms" for r in rows)
        layouts.append((top or [("empty", None)], n_peers))
    ncols = max(len(t) for t, _ in layouts)
    heights = [4.2 + (0.12 * n + 0.8 if n else 0) for _, n in layouts]
    fig = plt.figure(figsize=(max(4.6 * ncols, 12), sum(heights) + 0.8 * len(datasets)), layout="constrained")
    subfigs = fig.subfigures(len(datasets), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sf, d, (top, n_peers) in zip(subfigs, datasets, layouts):
        rows, env = d["results"], d["environment"]
        parts = sf.subfigures(2, 1, height_ratios=[4.2, 0.12 * n_peers + 0.8]) if n_peers else [sf]
        axes = parts[0].subplots(1, ncols, squeeze=False)[0]
        for j, ax in enumerate(axes):
            kind, case = top[j] if j < len(top) else ("off", None)
            if kind == "e2e":
                panel_e2e(ax, rows, case)
            elif kind == "sweep_ms":
                panel_sweep(ax, rows, "ms", "ms per step (lower is better)")
            elif kind == "sweep_mem":
                panel_sweep(ax, rows, "peak_mem_mib", "peak memory MiB (incl. banks)", bank_line=True)
            elif kind == "empty":
                ax.text(0.5, 0.5, "no results", ha="center")
            else:
                ax.axis("off")
        if n_peers:
            panel_peers(parts[1].subplots(), rows)
        sf.suptitle(f"{env.get('device_name', env.get('device'))} | torch {env.get('torch')} | "
                    f"triton {env.get('triton')} | CUDA {env.get('cuda')}"
                    f"{' | DRY RUN: timings mean nothing' if env.get('dry_run') else ''}\n"
                    + textwrap.fill(f"peak memory: {env.get('memory_measure', '')}", 150), fontsize=9, fontweight="bold")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON file(s) of e2e_bench.py")
    p.add_argument("--out", default=None, help="PNG path (default: next to the first JSON, .png)")
    args = p.parse_args(argv)
    out = args.out or os.path.splitext(args.results[0])[0] + ".png"
    print(plot(args.results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
