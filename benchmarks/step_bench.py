"""One ``ICAKDLoss`` training step at tiny, host-bound shapes: ops dispatched and time per step
for methods x backends x eager / ``torch.compile`` of the same module.

    python benchmarks/step_bench.py --device cpu --threads 1 --out benchmarks/results --name step_cpu
    python benchmarks/step_bench.py --device cuda --out OUT      # a GPU (what gpu_run.sh runs)
    python benchmarks/step_bench.py --steps 20 --warmup 2 --compile-backend eager   # quick smoke run

One step = ``ICAKDLoss.forward`` (which, in training mode, enqueues the batch into the banks of
cskd / icakd with a class bank) + ``loss.backward()``; the gradients of the inputs and of the
module's parameters are set to None before each step, outside the timed region. The inputs are
the module's ``forward`` arguments made directly (no networks): student and teacher feature maps
``[B, D, H, H]``, logits ``[B, C]``, labels, and both classifier weights ``[C, D]``; the shapes
are tiny (default C=100, B=64, D=8, 2x2 maps) so the arithmetic is negligible and what is left
is what a step pays on the host. A pool of batches is cycled; every configuration sees the same.

Configurations: methods ce / kd / cskd / icakd x backends (``--backends``: reference, cpp, triton
and ``auto`` = ``backend=None``) x modes eager / compiled (``torch.compile`` of the same module,
``--compile-backend``, ``--compile-mode``). Triton on CPU exists only as the interpreter
(``TRITON_INTERPRET=1``), a correctness tool that says nothing about time: it is skipped on CPU
and the output says so. A backend that cannot run on the device is skipped with its reasons; a
configuration that fails is recorded with its error and the others go on. ``--compiled-backends``
limits the compiled configurations; ``--budget-s`` caps the run's wall time (eager
configurations are warmed up first, then the compiled ones, kd and icakd first; what the budget
leaves out is recorded as skipped).

Measured:

* ops per step: the ops dispatched in one step after warm-up, counted by a ``TorchDispatchMode``
  (every op the mode sees, i.e. at its top level: below autograd and after the decomposition of
  composite ops; the ops an op's kernel runs inside itself are not seen). Eager only: an active
  dispatch mode makes Dynamo run the frames of a compiled module eagerly, so it cannot count
  what the compiled code dispatches; compiled configurations record the graphs Dynamo captured
  and its graph breaks instead.
* us per step: median (and quartiles) over ``--steps`` steps per configuration, after ``--warmup``
  steps each (the compiling calls are part of the warm-up and timed apart as ``compile_s``). The
  configurations are interleaved: each round runs one step of every configuration, in a fresh
  random order, so the load of a shared machine affects all of them alike; the garbage collector
  is paused during a round. CPU: ``time.perf_counter`` around the step, and the process's CPU
  time (``cpu_us``, ``time.process_time``: what the step itself costs, without the time other
  processes hold the cores; with ``--threads 1`` it is the step's work). CUDA: the device is
  synchronised before the step, CUDA events around it (``us``), and the host's wall time
  between the synchronisations (``wall_us``) is kept too.

Reported: a table per configuration, the ratios ICAKD / KD (ops and time) per backend and mode,
and compiled / eager time per method and backend, with the targets of the step (ICAKD <= 3x KD
in ops and time; eager no slower than compiled) marked met or not. ``--out DIR`` writes
``DIR/NAME.json`` and ``DIR/NAME.md`` naming the device (CPU model and threads, or the GPU),
torch and the command. The CUDA path has the synchronisation and events described above; it
needs a GPU machine to run (``benchmarks/gpu_run.sh`` has a stage for it).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from icakd_fast import ICAKDLoss
from icakd_fast._backend import gram_shape_pays, not_supported_reasons

METHODS = ("ce", "kd", "cskd", "icakd")
BACKENDS = ("reference", "cpp", "triton", "auto")
MODES = ("eager", "compiled")
#: timed rounds run even when --budget-s is spent
MIN_ROUNDS = 20
#: the step's targets on a CPU: ICAKD / KD at most this, in ops and in time
ICAKD_OVER_KD_TARGET = 3.0


def cpu_model() -> str:
    """The CPU's model name: ``e2e_bench.cpu_model`` when that script imports, else the platform's."""
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from e2e_bench import cpu_model as e2e_cpu_model
    except Exception:  # the shared helper is optional: any failure to import it falls back
        return platform.processor() or platform.machine()
    finally:
        sys.path.pop(0)
    return e2e_cpu_model()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the threads torch uses (what CPU timings depend on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def default_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"step_{device.type}"
    gpu = torch.cuda.get_device_name(device).replace("NVIDIA", "").strip()
    return "step_" + "".join(ch if ch.isalnum() else "_" for ch in gpu)


def parse_shape(text: str) -> dict[str, int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be four positive ints C,B,D,H, got {text!r}")
    return dict(zip("CBDH", values))


def parse_list(allowed: tuple[str, ...], flag: str):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{flag} takes a comma-separated subset of {allowed}, got {text!r}")
        return items
    return parse


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches this dispatch mode, by name (``aten.mul`` etc.)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def skip_reason(backend: str, device: torch.device) -> str | None:
    if backend in ("reference", "auto"):
        return None
    if backend == "triton" and device.type == "cpu":
        return ("skipped: Triton on CPU runs only in its interpreter (TRITON_INTERPRET=1), "
                "a correctness tool whose time means nothing")
    reasons = not_supported_reasons(backend, None, device)
    return ("skipped: " + "; ".join(reasons)) if reasons else None


def make_batches(shape: dict[str, int], device: torch.device, n: int, seed: int) -> list[tuple]:
    """``n`` sets of ``forward`` arguments; the student's tensors are leaves that take gradients."""
    C, B, D, H = shape["C"], shape["B"], shape["D"], shape["H"]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        fs = torch.randn(B, D, H, H, generator=gen).relu().to(device).requires_grad_()
        zs = torch.randn(B, C, generator=gen).to(device).requires_grad_()
        ft = torch.randn(B, D, H, H, generator=gen).relu().to(device)
        zt = torch.randn(B, C, generator=gen).to(device)
        y = torch.randint(0, C, (B,), generator=gen).to(device)
        ws = (0.01 * torch.randn(C, D, generator=gen)).to(device).requires_grad_()
        wt = (0.01 * torch.randn(C, D, generator=gen)).to(device)
        out.append((fs, zs, ft, zt, y, ws, wt))
    return out


def dynamo_counts() -> tuple[int, int]:
    """(graphs captured, graph breaks) so far in this process, from Dynamo's counters."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0, 0
    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def raise_recompile_limit(limit: int = 64) -> None:
    """Every compiled configuration is a new entry on the one ``ICAKDLoss.forward`` code object;
    Dynamo's default limit of entries per code object would send the later ones to eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


class Config:
    def __init__(self, method: str, backend: str, mode: str, shape: dict[str, int], device: torch.device, args):
        self.method, self.backend, self.mode = method, backend, mode
        self.status = "ok"
        self.module = None
        self.fn = None
        self.times_us: list[float] = []
        self.wall_us: list[float] = []  # CUDA: host wall time between the synchronisations
        self.cpu_us: list[float] = []  # CPU: the process's CPU time (what another process's load does not add)
        self.ops: int | None = None
        self.ops_by_name: dict[str, int] = {}
        self.compile_s: float | None = None
        self.graphs: int | None = None
        self.graph_breaks: int | None = None
        self.device = device
        self.args = args
        self.shape = shape

    @property
    def key(self) -> str:
        return f"{self.method}/{self.backend}/{self.mode}"

    def build(self) -> None:
        D = self.shape["D"]
        mod = ICAKDLoss(self.shape["C"], D, D, method=self.method,
                        backend=None if self.backend == "auto" else self.backend).to(self.device)
        mod.train()
        self.module = mod
        if self.mode == "compiled":
            kw = {"backend": self.args.compile_backend}
            if self.args.compile_mode:
                kw["mode"] = self.args.compile_mode
            self.fn = torch.compile(mod, **kw)
        else:
            self.fn = mod

    def reset_grads(self, batch) -> None:
        for t in batch:
            t.grad = None
        for p in self.module.parameters():
            p.grad = None

    def step(self, batch) -> None:
        self.reset_grads(batch)
        self.run(batch)

    def run(self, batch) -> None:
        self.fn(*batch).loss.backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(cfg: Config, batch, device: torch.device) -> None:
    cfg.reset_grads(batch)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        start.record()
        cfg.run(batch)
        end.record()
        torch.cuda.synchronize(device)
        cfg.wall_us.append((time.perf_counter() - t0) * 1e6)
        cfg.times_us.append(start.elapsed_time(end) * 1e3)
    else:
        c0, t0 = time.process_time_ns(), time.perf_counter()
        cfg.run(batch)
        t1, c1 = time.perf_counter(), time.process_time_ns()
        cfg.times_us.append((t1 - t0) * 1e6)
        cfg.cpu_us.append((c1 - c0) * 1e-3)


def fail(cfg: Config, exc: BaseException, where: str) -> None:
    cfg.status = f"error ({where}): {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    cfg.fn = cfg.module = None
    print(f"  {cfg.key}: {cfg.status}", flush=True)
    traceback.print_exc(limit=3)


def warm_up(cfg: Config, batches, device: torch.device, warmup: int) -> None:
    g0, b0 = dynamo_counts()
    try:
        cfg.build()
        if cfg.mode == "compiled":
            sync(device)
            t0 = time.perf_counter()
            cfg.step(batches[0])  # compiles
            sync(device)
            cfg.compile_s = time.perf_counter() - t0
        for i in range(warmup):
            cfg.step(batches[i % len(batches)])
        sync(device)
    except Exception as exc:  # one failing configuration must not stop the others
        fail(cfg, exc, "warm-up")
        return
    if cfg.mode == "compiled":
        g1, b1 = dynamo_counts()
        cfg.graphs, cfg.graph_breaks = g1 - g0, b1 - b0
    else:
        counter = OpCounter()
        try:
            with counter:
                cfg.step(batches[0])
            sync(device)
        except Exception as exc:
            fail(cfg, exc, "op count")
            return
        cfg.ops = sum(counter.counts.values())
        cfg.ops_by_name = dict(counter.counts.most_common())


def quartiles(v: list[float]) -> tuple[float, float, float]:
    if len(v) < 2:
        return (v[0], v[0], v[0]) if v else (float("nan"),) * 3
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[1], q[2]


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt(v, spec: str = ".0f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=parse_shape, default=parse_shape("100,64,8,2"),
                   help="C,B,D,H: classes, batch, feature width (student and teacher), map side (default 100,64,8,2)")
    p.add_argument("--steps", type=int, default=300, help="timed steps per configuration (interleaved)")
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps per configuration, after compiling")
    p.add_argument("--methods", type=parse_list(METHODS, "--methods"), default=list(METHODS))
    p.add_argument("--backends", type=parse_list(BACKENDS, "--backends"), default=["reference", "cpp", "triton"])
    p.add_argument("--modes", type=parse_list(MODES, "--modes"), default=list(MODES))
    p.add_argument("--compiled-backends", type=parse_list(BACKENDS, "--compiled-backends"), default=list(BACKENDS),
                   help="the backends also timed under torch.compile (default: every one in --backends)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-time budget: configurations not warmed up by then are skipped, and timing stops "
                        f"at it (after at least {MIN_ROUNDS} rounds)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--batches", type=int, default=4, help="input batches cycled through")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for NAME.json and NAME.md (default: print only)")
    p.add_argument("--name", default=None, help="file name stem (default step_cpu, or step_<GPU>)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batches < 1:
        p.error("--steps and --batches must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    shape = args.shape
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    raise_recompile_limit()
    torch.manual_seed(args.seed)
    batches = make_batches(shape, device, args.batches, args.seed)
    dev = device_name(device)
    print(f"{dev}, torch {torch.__version__}: C={shape['C']} B={shape['B']} D={shape['D']} "
          f"{shape['H']}x{shape['H']} maps; {args.steps} steps per configuration after {args.warmup} warm-up",
          flush=True)

    configs = [Config(m, b, mode, shape, device, args)
               for m in args.methods for b in args.backends for mode in args.modes]
    for cfg in configs:
        reason = skip_reason(cfg.backend, device)
        if cfg.mode == "compiled" and cfg.backend not in args.compiled_backends:
            reason = "skipped: not in --compiled-backends"
        if reason:
            cfg.status = reason
            print(f"  {cfg.key}: {reason}", flush=True)
    # eager first, then the compiled ones (each pays a compilation), KD and ICAKD before the others,
    # so that what a budget leaves out is the least needed
    priority = {"kd": 0, "icakd": 1, "ce": 2, "cskd": 3}
    interrupted = False
    for cfg in sorted(configs, key=lambda c: (c.mode == "compiled", priority[c.method])):
        if cfg.status != "ok":
            continue
        if interrupted or (deadline is not None and time.perf_counter() > deadline):
            cfg.status = "skipped: " + ("interrupted" if interrupted else "--budget-s spent") + " before its warm-up"
            print(f"  {cfg.key}: {cfg.status}", flush=True)
            continue
        try:
            warm_up(cfg, batches, device, args.warmup)
        except KeyboardInterrupt:  # SIGINT (e.g. a stage's timeout): keep what is measured
            interrupted = True
            cfg.status, cfg.fn, cfg.module = "skipped: interrupted during its warm-up", None, None
            print(f"  {cfg.key}: {cfg.status}", flush=True)
            continue
        if cfg.status == "ok":
            extra = (f"compile {cfg.compile_s:.1f} s, {cfg.graphs} graphs, {cfg.graph_breaks} graph breaks"
                     if cfg.mode == "compiled" else f"{cfg.ops} ops")
            print(f"  warm: {cfg.key} ({extra})", flush=True)

    live = [c for c in configs if c.status == "ok"]
    order = random.Random(args.seed)
    t_start = time.perf_counter()
    gc.collect()
    try:
        for r in range(args.steps):
            if interrupted or (deadline is not None and r >= min(args.steps, MIN_ROUNDS)
                               and time.perf_counter() > deadline):
                print(f"  {'interrupted' if interrupted else '--budget-s spent'}: {r} timed rounds of {args.steps}",
                      flush=True)
                break
            order.shuffle(live)
            batch = batches[r % len(batches)]
            gc.disable()
            try:
                for cfg in live:
                    try:
                        timed_step(cfg, batch, device)
                    except Exception as exc:
                        fail(cfg, exc, f"timed step {r}")
            finally:
                gc.enable()
            live = [c for c in live if c.status == "ok"]
            if r % 50 == 49:
                gc.collect()
    except KeyboardInterrupt:
        print("  interrupted while timing: the steps timed so far are kept", flush=True)
    sync(device)
    timing_s = time.perf_counter() - t_start
    configs_out = []
    for cfg in configs:
        q1, med, q3 = quartiles(cfg.times_us) if cfg.times_us else (None, None, None)
        row = {"method": cfg.method, "backend": cfg.backend, "mode": cfg.mode, "status": cfg.status,
               "ops": cfg.ops, "us_median": med, "us_q1": q1, "us_q3": q3,
               "us_min": min(cfg.times_us) if cfg.times_us else None, "timed_steps": len(cfg.times_us),
               "compile_s": cfg.compile_s, "graphs": cfg.graphs, "graph_breaks": cfg.graph_breaks,
               "ops_by_name": cfg.ops_by_name}
        if device.type == "cuda":
            row["wall_us_median"] = statistics.median(cfg.wall_us) if cfg.wall_us else None
        else:
            row["cpu_us_median"] = statistics.median(cfg.cpu_us) if cfg.cpu_us else None
        configs_out.append(row)
    by = {(r["method"], r["backend"], r["mode"]): r for r in configs_out}

    def get(m, b, mode, field):
        r = by.get((m, b, mode))
        return r[field] if r and r["status"] == "ok" else None

    icakd_over_kd, compiled_over_eager = [], []
    for b in args.backends:
        for mode in args.modes:
            ro = ratio(get("icakd", b, mode, "ops"), get("kd", b, mode, "ops"))
            rt = ratio(get("icakd", b, mode, "us_median"), get("kd", b, mode, "us_median"))
            if ro is not None or rt is not None:
                row = {"backend": b, "mode": mode, "ops": ro, "time": rt}
                if device.type == "cpu":
                    row["cpu_time"] = ratio(get("icakd", b, mode, "cpu_us_median"), get("kd", b, mode, "cpu_us_median"))
                icakd_over_kd.append(row)
        for m in args.methods:
            rc = ratio(get(m, b, "compiled", "us_median"), get(m, b, "eager", "us_median"))
            if rc is not None:
                row = {"method": m, "backend": b, "time": rc}
                if device.type == "cpu":
                    row["cpu_time"] = ratio(get(m, b, "compiled", "cpu_us_median"), get(m, b, "eager", "cpu_us_median"))
                compiled_over_eager.append(row)
    targets = []
    for r in icakd_over_kd:
        if r["mode"] == "eager":
            for what in ("ops", "time"):
                if r[what] is not None:
                    targets.append({"target": f"icakd/kd {what} <= {ICAKD_OVER_KD_TARGET:g} ({r['backend']}, eager)",
                                    "value": r[what], "met": r[what] <= ICAKD_OVER_KD_TARGET})
    for r in compiled_over_eager:
        targets.append({"target": f"eager no slower than compiled ({r['method']}, {r['backend']}): compiled/eager >= 1",
                        "value": r["time"], "met": r["time"] >= 1.0})

    result = {
        "device": dev, "device_type": device.type, "torch": torch.__version__, "python": sys.version.split()[0],
        "threads": torch.get_num_threads(), "shape": shape, "steps": args.steps, "warmup": args.warmup,
        "batches": args.batches, "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
        "timing": ("CUDA events around the step (us), host wall time between synchronisations (wall_us)"
                   if device.type == "cuda" else
                   "time.perf_counter around the step (us); the process's CPU time, time.process_time (cpu_us)"),
        "timing_s": timing_s,
        "command": "python benchmarks/step_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        # ICAKDLoss's default (incremental_inter=None) with a class bank: the incremental form where
        # the full Gram form pays and C >= 4 B; never under torch.compile
        "icakd_eager_inter_form": ("incremental Gram form" if gram_shape_pays(shape["C"], 2 * shape["D"], device)
                                   and shape["C"] >= 4 * shape["B"] else "backend's structure op"),
        "configs": configs_out, "icakd_over_kd": icakd_over_kd, "compiled_over_eager": compiled_over_eager,
        "targets": targets,
    }
    lines = markdown(result)
    print("\n".join(lines))
    if args.out:
        name = args.name or default_name(device)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {os.path.join(args.out, name)}.json and .md")
    return 0


def markdown(res: dict) -> list[str]:
    s = res["shape"]
    cpu = res["device_type"] == "cpu"
    unit = "us" if cpu else "us (CUDA events)"
    lines = [
        f"One `ICAKDLoss` training step (forward with the bank update + backward), {res['device']}, "
        f"torch {res['torch']}, C={s['C']}, B={s['B']}, D={s['D']}, {s['H']}x{s['H']} maps.",
        f"Median of {max(r['timed_steps'] for r in res['configs'])} steps per configuration [quartiles] after "
        f"{res['warmup']} warm-up steps, all configurations interleaved in random order each round; compiled = `torch.compile` "
        f"(backend {res['compile_backend']}{', mode ' + res['compile_mode'] if res['compile_mode'] else ''}) of the "
        f"same module, compilation excluded. Ops: top-level ops seen by a `TorchDispatchMode` in one eager step "
        f"(it cannot see inside compiled code). Compiled graphs: the graphs Dynamo captured while warming up that "
        f"configuration (0: it reused the code compiled for an earlier one)"
        + (". CPU us: the process's CPU time (`time.process_time`), which the load of other processes does not "
           "inflate." if cpu else ".") + f" `{res['command']}`",
        "",
    ]
    head = ["method", "backend", "ops (eager)", f"eager {unit}", f"compiled {unit}", "compiled / eager"]
    if cpu:
        head += ["eager CPU us", "compiled CPU us", "compiled / eager, CPU"]
    head += ["compiled: graphs, breaks"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for r in res["configs"]:
        rows.setdefault((r["method"], r["backend"]), {})[r["mode"]] = r
    notes = []

    def ok(r):
        return r is not None and r["status"] == "ok"

    def cell(r, key):
        if not ok(r) or r.get(key) is None:
            return "-"
        if key == "us_median":
            return f"{r['us_median']:.0f} [{r['us_q1']:.0f}-{r['us_q3']:.0f}]"
        return f"{r[key]:.0f}"

    for (m, b), modes in rows.items():
        e, c = modes.get("eager"), modes.get("compiled")
        bad = [r for r in modes.values() if r["status"] != "ok"]
        if bad and len(bad) == len(modes):
            lines.append(f"| {m} | {b} | {bad[0]['status']} |" + " |" * (len(head) - 3))
            continue
        notes += [f"{m}/{b}/{r['mode']}: {r['status']}" for r in bad]
        both = ok(e) and ok(c)
        cells = [m, b, fmt(e["ops"] if ok(e) else None, "d"), cell(e, "us_median"), cell(c, "us_median"),
                 fmt(ratio(c["us_median"], e["us_median"]) if both else None, ".2f")]
        if cpu:
            cells += [cell(e, "cpu_us_median"), cell(c, "cpu_us_median"),
                      fmt(ratio(c["cpu_us_median"], e["cpu_us_median"]) if both else None, ".2f")]
        cells.append(f"{c['graphs']}, {c['graph_breaks']}" if ok(c) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if res["icakd_over_kd"]:
        lines += ["", "ICAKD / KD:", "", "| backend | mode | ops | time |" + (" CPU time |" if cpu else ""),
                  "| --- | --- | --- | --- |" + (" --- |" if cpu else "")]
        for r in res["icakd_over_kd"]:
            lines.append(f"| {r['backend']} | {r['mode']} | {fmt(r['ops'], '.2f')} | {fmt(r['time'], '.2f')} |"
                         + (f" {fmt(r.get('cpu_time'), '.2f')} |" if cpu else ""))
    if res["targets"]:
        met = sum(t["met"] for t in res["targets"])
        lines += ["", f"Targets (wall time) met: {met} of {len(res['targets'])}."]
        lines += [f"- {'met' if t['met'] else 'NOT met'}: {t['target']} (value {t['value']:.2f})"
                  for t in res["targets"]]
    lines += ["", f"The eager icakd step computes the inter loss with the {res['icakd_eager_inter_form']} at "
              "these shapes (`ICAKDLoss`'s default); a compiled module always takes the backend's structure op."]
    if notes:
        lines += ["", "Not measured: " + "; ".join(notes) + "."]
    for r in res["configs"]:
        if r["method"] == "icakd" and r["mode"] == "eager" and r["ops"]:
            most = ", ".join(f"{k} {v}" for k, v in list(r["ops_by_name"].items())[:10])
            lines += ["", f"Most frequent ops of the eager icakd step, {r['backend']}: {most}."]
    return lines

if __name__ == "__main__":
    raise SystemExit(main())
