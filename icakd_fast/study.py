"""``icakd-study`` / ``python -m icakd_fast.study``: methods x seeds under one budget, with paired intervals.

Every run is one ``icakd-train`` run (:func:`icakd_fast.train.train`, in this process) with the
options given here; ``--methods`` (default ``ce,kd,cskd,icakd``; any name of
:func:`icakd_fast.methods.method_names`, ablations and ``cskd-official`` included) and ``--seeds N``
(seeds ``1..N``) or ``--seed-list 1,5,9`` span the study. Without a training option the budget is
the embedded demo's (``icakd-train --demo``); ``--config FILE`` or ``--config NAME`` (a preset
shipped with the package, e.g. ``manyclass``) sets another.

Teacher policy: **one teacher per seed**, trained once with ``--method ce`` on that seed's data
and shared by every method of that seed (so the methods of one seed differ only in the loss, and
the paired differences remove the teacher's and the data's seed-to-seed variation). Its epochs
are ``--teacher-epochs`` (default: the student's epochs, and at least the demo's teacher epochs on
the synthetic dataset). ``--teacher-ckpt PATH`` instead shares one given teacher by every seed.

Layout of ``--out`` (default ``runs/study``): ``teacher/seed<S>/``, ``<method>/seed<S>/`` (each a
run's own folder: ``metrics.csv``, ``last.pt``, ``best.pt``, ``train.log``), ``summary.json``,
``study.json`` (the budget, device, teacher policy, timings), ``study.png``. A run whose folder
holds ``study_run.json`` with the same configuration and whose ``metrics.csv`` reaches the last
epoch is not run again; an interrupted one continues from its ``last.pt``.

The statistic is the **last-epoch test top-1** of every run, the same for every method.
``summary.json`` holds exactly ``runs`` (``method``, ``seed``, ``top1``, ``dir``), ``methods``
(per method ``mean``, ``sd``, ``n``) and ``paired`` (keyed ``"<a>-<b>"``, e.g. ``"icakd-kd"``:
the per-seed difference a - b over the seeds both have, its ``mean``, ``sd``, ``n``, ``a``, ``b``
and ``ci95`` = [low, high] by Student's t with n-1 degrees of freedom; ``sd``/``ci95`` are null
below two seeds). The pairs: icakd-kd, icakd-cskd, cskd-kd, kd-ce, icakd-<baseline> for other
baselines (e.g. ``icakd-cskd-official``), and <ablation>-icakd for each ablation of icakd.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "run_study", "t_quantile", "t_cdf", "summarize", "pairs_of_interest", "format_table",
           "format_markdown", "plot_summary", "DEFAULT_METHODS"]

PROG = "icakd-study"
DEFAULT_METHODS = ("ce", "kd", "cskd", "icakd")
STATISTIC = "last-epoch test top-1 (%)"
_MARK = "study_run.json"
# options that change where or how fast a run goes, not what it computes
_NOT_FINGERPRINTED = ("out", "resume", "progress", "threads", "device", "workers", "eval_batch_size")


# ---------------------------------------------------------------------------------------------
# Student's t distribution (no scipy)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# statistics


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def pairs_of_interest(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(a, b) pairs whose per-seed difference a - b the study reports, among ``methods``."""
    from .methods import method_spec

    want = [("icakd", "kd"), ("icakd", "cskd"), ("cskd", "kd"), ("kd", "ce")]
    for m in methods:
        if m in DEFAULT_METHODS:
            continue
        spec = method_spec(m)
        if spec.ablation_of == "icakd":
            want.append((m, "icakd"))
        else:
            want.append(("icakd", m))
            want.append((m, "kd"))
    have = set(methods)
    out = []
    for a, b in want:
        if a in have and b in have and (a, b) not in out:
            out.append((a, b))
    return out


def summarize(runs: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """``{"runs", "methods", "paired"}`` from run records (``method``, ``seed``, ``top1``, ``dir``)."""
    by: dict[str, dict[int, float]] = {m: {} for m in methods}
    for r in runs:
        by.setdefault(r["method"], {})[int(r["seed"])] = float(r["top1"])
    per_method = {}
    for m in methods:
        vals = [by[m][s] for s in sorted(by[m])]
        if vals:
            mean, sd = _mean_sd(vals)
            per_method[m] = {"mean": mean, "sd": sd, "n": len(vals)}
    paired = {}
    for a, b in pairs_of_interest(methods):
        seeds = sorted(set(by[a]) & set(by[b]))
        if not seeds:
            continue
        diffs = [by[a][s] - by[b][s] for s in seeds]
        mean, sd = _mean_sd(diffs)
        ci = None
        if sd is not None:
            half = t_quantile(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
            ci = [mean - half, mean + half]
        paired[f"{a}-{b}"] = {"mean": mean, "sd": sd, "ci95": ci, "n": len(diffs), "a": a, "b": b}
    return {"runs": list(runs), "methods": per_method, "paired": paired}


def format_table(summary: dict[str, Any]) -> str:
    """The study's two tables (per method; paired differences) as text."""
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"{'method':<18s} {'n':>3s} {'mean':>7s} {'sd':>6s}  per seed"]
    for m, s in summary["methods"].items():
        seeds = sorted((r["seed"], r["top1"]) for r in summary["runs"] if r["method"] == m)
        lines.append(f"{m:<18s} {s['n']:>3d} {s['mean']:>7.2f} {f(s['sd']):>6s}  "
                     + " ".join(f"{v:.2f}" for _, v in seeds))
    if summary["paired"]:
        lines += ["", f"{'paired difference':<26s} {'n':>3s} {'mean':>7s} {'sd':>6s}  95% CI (t)"]
        for key, p in summary["paired"].items():
            ci = "-" if p["ci95"] is None else f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
            lines.append(f"{key:<26s} {p['n']:>3d} {p['mean']:>+7.2f} {f(p['sd']):>6s}  {ci}")
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any]) -> str:
    """The study's two tables (per method; paired differences) as markdown."""
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| method | n | top-1 mean ± sd | per seed |", "|---|---:|---:|---|"]
    for m, s in summary["methods"].items():
        seeds = sorted((r["seed"], r["top1"]) for r in summary["runs"] if r["method"] == m)
        lines.append(f"| {m} | {s['n']} | {s['mean']:.2f} ± {f(s['sd'])} | "
                     + ", ".join(f"{v:.2f}" for _, v in seeds) + " |")
    if summary["paired"]:
        lines += ["", "| paired difference (a - b) | n | mean | sd | 95% CI (t) |", "|---|---:|---:|---:|---|"]
        for key, p in summary["paired"].items():
            ci = "-" if p["ci95"] is None else f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
            lines.append(f"| {key} | {p['n']} | {p['mean']:+.2f} | {f(p['sd'])} | {ci} |")
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Means with 95% t intervals (and each seed) per method; paired differences with intervals."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    methods = list(summary["methods"])
    paired = summary["paired"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.5 * max(len(methods), len(paired), 4) + 1.5))
    for i, m in enumerate(methods):
        s = summary["methods"][m]
        vals = [r["top1"] for r in summary["runs"] if r["method"] == m]
        ax1.scatter(vals, [i] * len(vals), s=12, color="0.6", zorder=2)
        half = 0.0 if s["sd"] is None else t_quantile(0.975, s["n"] - 1) * s["sd"] / math.sqrt(s["n"])
        ax1.errorbar([s["mean"]], [i], xerr=[[half], [half]], fmt="o", color="C0", capsize=4, zorder=3)
    ax1.set_yticks(range(len(methods)), methods)
    ax1.invert_yaxis()
    ax1.set_xlabel("last-epoch test top-1 % (mean, 95% t CI, seeds)")
    ax1.grid(axis="x", alpha=0.3)
    keys = list(paired)
    for i, k in enumerate(keys):
        p = paired[k]
        lo, hi = p["ci95"] if p["ci95"] is not None else (p["mean"], p["mean"])
        colour = "C2" if lo > 0 else ("C3" if hi < 0 else "C0")
        ax2.errorbar([p["mean"]], [i], xerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="o", color=colour, capsize=4)
    ax2.axvline(0.0, color="k", lw=0.8)
    ax2.set_yticks(range(len(keys)), keys)
    ax2.invert_yaxis()
    ax2.set_xlabel("paired difference a - b, points (mean, 95% t CI)")
    ax2.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# runs


def _fingerprint(cfg, extra: Any = None) -> str:
    """Hash of what a run computes: the options that differ from their defaults (so a new option
    with a default does not invalidate finished runs), less those of :data:`_NOT_FINGERPRINTED`."""
    from .train.config import TrainConfig

    defaults = TrainConfig().to_dict()
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_FINGERPRINTED and v != defaults.get(k, object())}
    d["_extra"] = extra
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _last_row(path: Path) -> dict[str, str] | None:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return None
    return rows[-1] if rows else None


def finished_top1(run_dir: str | Path, epochs: int, fingerprint: str | None) -> float | None:
    """The last-epoch test top-1 of a finished run in ``run_dir`` with this configuration, else None
    (``fingerprint=None``: any configuration with ``epochs`` epochs)."""
    run_dir = Path(run_dir)
    try:
        mark = json.loads((run_dir / _MARK).read_text())
    except (OSError, ValueError):
        return None
    if fingerprint is not None and mark.get("fingerprint") != fingerprint:
        return None
    row = _last_row(run_dir / "metrics.csv")
    if row is None or int(row.get("epoch", -1)) != epochs:
        return None
    return float(row["test_top1"])


def _resumable(run_dir: Path, fingerprint: str) -> bool:
    """Whether ``run_dir`` holds an interrupted run (a ``last.pt``) of this configuration."""
    stamp = run_dir / "fingerprint.txt"
    return (run_dir / "last.pt").is_file() and stamp.is_file() and stamp.read_text().strip() == fingerprint


def _run_one(cfg, run_dir: Path, fingerprint: str, data, log_file: bool) -> float:
    """Train (or finish) one run into ``run_dir``; returns its last-epoch test top-1."""
    from .train import train

    if run_dir.exists() and not _resumable(run_dir, fingerprint):
        shutil.rmtree(run_dir)
    resume = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "fingerprint.txt").write_text(fingerprint)
    cfg = dataclasses.replace(cfg, out=str(run_dir), resume="auto" if resume else None, progress=False)
    with open(run_dir / "train.log", "a") as logf:
        def log(msg: str) -> None:
            logf.write(msg + "\n")
            logf.flush()

        result = train(cfg, data=data, log=log if log_file else print, desc=f"{cfg.method} seed {cfg.seed}")
    top1 = float(result["top1"])
    (run_dir / _MARK).write_text(json.dumps({"fingerprint": fingerprint, "method": cfg.method, "seed": cfg.seed,
                                             "top1": top1, "epochs": result["epochs"],
                                             "train_time_s": result["train_time_s"]}, indent=2))
    return top1


def run_study(cfg, methods: Sequence[str], seeds: Sequence[int], out: str | Path, *,
              teacher_epochs: int | None = None, log: Callable[[str], None] = print,
              quiet_runs: bool = True, train_missing: bool = True) -> dict[str, Any]:
    """Run ``methods`` x ``seeds`` on the budget ``cfg``; write and return the summary.

    ``train_missing=False`` trains nothing: the summary then holds the runs already finished."""
    from .methods import method_names
    from .train import build_datasets
    from .train.demo import TEACHER_EPOCHS
    from .train.engine import environment_info, resolve_device
    from .train.errors import UserError

    known = method_names()
    for m in methods:
        if m not in known:
            raise UserError(f"unknown method {m!r} in --methods; choose from: {', '.join(known)}")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise UserError("--methods and the seeds must not repeat")
    if not methods or not seeds:
        raise UserError("a study needs at least one method and one seed")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shared_teacher = cfg.teacher_ckpt
    if teacher_epochs is None:
        teacher_epochs = max(TEACHER_EPOCHS, cfg.epochs) if cfg.dataset == "synthetic" else cfg.epochs
    device = resolve_device(cfg.device)
    n_total = len(methods) * len(seeds)
    k = 0
    runs: list[dict[str, Any]] = []
    teachers: dict[int, Any] = {}
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    for seed in seeds:
        scfg = dataclasses.replace(cfg, seed=seed, loss=dict(cfg.loss), synthetic=dict(cfg.synthetic))
        data = None

        def get_data():
            nonlocal data
            if data is None:
                data = build_datasets(scfg.dataset, scfg.data_dir, download=scfg.download, seed=seed,
                                      synthetic=scfg.synthetic, image_size=scfg.image_size)
            return data

        def ensure_run(rcfg, rdir, epochs, fp, key, name, what):
            """The run's top-1: read when it finished earlier, else trained now (None when it has
            not finished and the study only collects)."""
            top1 = finished_top1(rdir, epochs, fp if train_missing else None)
            if top1 is not None:
                log(f"{name}: {what}top-1 {top1:.2f} (done earlier)")
            elif not train_missing:
                log(f"{name}: not finished")
            else:
                t0 = time.perf_counter()
                top1 = _run_one(rcfg, rdir, fp, get_data(), quiet_runs)
                times[key] = time.perf_counter() - t0
                log(f"{name}: {what}top-1 {top1:.2f} ({times[key]:.0f}s)")
            return top1

        if shared_teacher:
            teacher_ckpt, teacher_fp = shared_teacher, shared_teacher
        else:
            tdir = out / "teacher" / f"seed{seed}"
            tcfg = dataclasses.replace(scfg, method="ce", student=cfg.teacher, epochs=teacher_epochs,
                                       teacher_ckpt=None, loss={})
            teacher_fp = _fingerprint(tcfg)
            top1 = ensure_run(tcfg, tdir, teacher_epochs, teacher_fp, f"teacher/seed{seed}",
                              f"teacher seed {seed}", f"{cfg.teacher} ")
            if top1 is not None:
                teachers[seed] = {"dir": str(tdir), "top1": top1, "epochs": teacher_epochs}
            teacher_ckpt = str(tdir / "last.pt")
        for method in methods:
            k += 1
            rdir = out / method / f"seed{seed}"
            rcfg = dataclasses.replace(scfg, method=method, teacher_ckpt=None if method == "ce" else teacher_ckpt)
            fp = _fingerprint(rcfg, None if method == "ce" else teacher_fp)
            top1 = ensure_run(rcfg, rdir, cfg.epochs, fp, f"{method}/seed{seed}",
                              f"[{k}/{n_total}] {method} seed {seed}", "")
            if top1 is None:
                continue
            runs.append({"method": method, "seed": seed, "top1": top1, "dir": str(rdir)})
            summary = summarize(runs, methods)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        del data

    summary = summarize(runs, methods)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    env = environment_info(device)
    meta = {
        "statistic": STATISTIC, "methods": list(methods), "seeds": list(seeds),
        "teacher_policy": "shared: " + shared_teacher if shared_teacher else
        "one teacher per seed (method ce), shared by the methods of that seed",
        "teachers": {str(s): t for s, t in teachers.items()},
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("out", "resume", "seed", "method")},
        "device": env["device"], "device_name": env["device_name"], "cpu_threads": env["cpu_threads"],
        "versions": env["versions"], "run_times_s": times, "total_time_s": time.perf_counter() - t_start,
    }
    (out / "study.json").write_text(json.dumps(meta, indent=2))
    from .train.plots import have_matplotlib

    if have_matplotlib():
        title = (f"{cfg.dataset}: {cfg.teacher} -> {cfg.student}, {cfg.epochs} epochs, "
                 f"{len(seeds)} seeds" + (f", {cfg.synthetic.get('num_classes')} classes"
                                           if cfg.dataset == "synthetic" else ""))
        plot_summary(summary, out / "study.png", title)
    else:
        sys.stderr.write(f"{PROG}: warning: matplotlib is not installed; skipping study.png\n")
    log("")
    log(f"statistic: {STATISTIC}")
    log(format_table(summary))
    (out / "summary.md").write_text(
        f"Statistic: {STATISTIC}, the same for every method; paired over seeds (one teacher per seed).\n"
        f"Device: {meta['device_name'] or meta['device']}, {meta['cpu_threads']} CPU thread(s) per run.\n\n"
        + format_markdown(summary) + "\n")
    log(f"\nwrote {out}/summary.json, summary.md, study.json" + (", study.png" if have_matplotlib() else "")
        + f"  (total {meta['total_time_s']:.0f}s)")
    return summary


# ---------------------------------------------------------------------------------------------
# command line


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return vals


def _name_list(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one method")
    return vals


def build_parser() -> argparse.ArgumentParser:
    from .train.config import OneLineErrorParser

    p = OneLineErrorParser(prog=PROG, add_help=False,
                description="Run methods x seeds under one budget and report paired differences with 95% t "
                            "intervals. Every other option is an icakd-train option (see icakd-train --help); "
                            "without one the budget is the embedded demo's. --config also takes a preset name "
                            "(e.g. manyclass).")
    p.add_argument("-h", "--help", action="store_true", help="show this help and the icakd-train options")
    p.add_argument("--methods", type=_name_list, default=list(DEFAULT_METHODS),
                   help="comma-separated method names (default ce,kd,cskd,icakd)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seeds", type=int, metavar="N", help="seeds 1..N (default 3)")
    g.add_argument("--seed-list", type=_int_list, metavar="S1,S2,..", help="explicit seeds")
    p.add_argument("--teacher-epochs", type=int, metavar="E",
                   help="epochs of each seed's teacher (default: the students' epochs; at least 8 on synthetic)")
    p.add_argument("--collect", action="store_true", help="train nothing: summarise the runs already finished in the "
                   "output folder (with the budget's epochs; their other options are not compared)")
    p.add_argument("--verbose", action="store_true", help="print every epoch of every run (default: into "
                   "each run's train.log)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .train.config import build_parser as train_parser
    from .train.config import parse_args
    from .train.__main__ import run_command
    from .train.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns, rest = parser.parse_known_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if ns.help:
        parser.print_help()
        print("\nicakd-train options:\n")
        print(train_parser().format_help())
        return 0

    def study() -> int:
        if ns.seeds is not None and ns.seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {ns.seeds}")
        if ns.teacher_epochs is not None and ns.teacher_epochs < 1:
            raise UserError(f"--teacher-epochs must be >= 1, got {ns.teacher_epochs}")
        for bad, use in (("--method", "--methods"), ("--seed", "--seeds or --seed-list"), ("--resume", None),
                         ("--demo", None)):
            if any(a == bad or a.startswith(bad + "=") for a in rest):
                raise UserError(f"{bad} is not a study option" + (f"; use {use}" if use else ""))
        try:
            cfg, demo, given = parse_args(rest)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2
        if demo:
            from .train.demo import demo_config

            cfg = demo_config(cfg, given)
        if "out" not in given:
            cfg.out = "runs/study"
        if cfg.threads is None:
            from .train.demo import free_cpus

            cfg.threads = free_cpus()
        seeds = ns.seed_list if ns.seed_list is not None else list(range(1, (ns.seeds or 3) + 1))
        print(f"{PROG}: {len(ns.methods)} methods x {len(seeds)} seeds on {cfg.dataset}"
              + (f" ({cfg.synthetic.get('num_classes')} classes)" if cfg.dataset == "synthetic" else "")
              + f", {cfg.teacher} -> {cfg.student}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
              f"{cfg.threads} CPU threads, output {cfg.out}/", flush=True)
        run_study(cfg, ns.methods, seeds, cfg.out, teacher_epochs=ns.teacher_epochs,
                  log=lambda m: print(m, flush=True), quiet_runs=not ns.verbose, train_missing=not ns.collect)
        return 0

    return run_command(PROG, study, "run the same command again to continue")


if __name__ == "__main__":
    sys.exit(main())
