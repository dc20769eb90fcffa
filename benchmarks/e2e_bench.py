"""End-to-end ICAKD benchmark: training-step throughput and memory, memory at scale, and peers.

    python benchmarks/e2e_bench.py --out DIR --device cuda --budget-s 300   # all modes (GPU)
    python benchmarks/e2e_bench.py --out DIR --device cpu --preset cifar     # e2e, CIFAR shapes
    python benchmarks/e2e_bench.py --out DIR --sweep                         # scale sweep only
    python benchmarks/e2e_bench.py --out DIR --peers                         # peer libraries only
    python benchmarks/e2e_bench.py --out DIR --dry-run                       # CPU smoke test of
                                                                             # every code path

Modes (no mode flag = all of them):

* e2e (``--e2e`` / ``--preset imagenet|cifar|all``): one full training step -- teacher forward
  under no_grad, student forward with a ``FeatureTap``, ``ICAKDLoss`` (which enqueues the batch
  into its banks in train mode), backward, SGD step over the student's and the loss module's
  parameters -- for methods ce, kd, cskd, icakd and backends ``reference`` (eager),
  ``compiled`` (``torch.compile`` of the loss module with the reference ops; the models stay
  eager), ``triton``, ``cpp`` and, on CUDA, ``auto`` (``backend=None``, the per-op default).
  ``ce`` is plain cross-entropy without a teacher and runs once. Banks are pre-filled to steady
  state (every class full). Reports images/s (median step time over the timed steps,
  synchronised, warm-up excluded), the loss module alone (``loss_ms``, forward + backward: ICAKD's
  own cost, little affected by load), peak memory, and ICAKD's overhead over KD (step time and
  peak memory, the latter next to the size of both banks). ``--interleave`` (default on CPU) builds
  every row of a preset first and times them round-robin, so that the load of a shared machine
  affects all rows alike; sequential timing (default on CUDA) adds an interleaved KD/ICAKD pair
  for the fastest backend.
* sweep (``--sweep``): bank enqueue of both banks + centroids + intra + inter loss, forward and
  backward, with banks pre-filled to steady state, for C x slots_per_class; time, peak memory
  and the banks' own size per backend. Out-of-memory is recorded as ``oom``.
* peers (``--peers``): pytorch-metric-learning ``CrossBatchMemory`` vs our banks, pytorch-grad-cam
  ``GradCAM`` vs ``icakd_fast.functional.grad_cam``, and a plain eager CSKD loss vs ours
  (``benchmarks/peers.py``); a peer that is not installed is recorded as skipped.

Every fast backend (and ``compiled``) is checked against the eager reference on the same inputs
before it is timed (max abs / rel error recorded). ``--budget-s`` caps the wall time: tasks run
in priority order (e2e icakd + kd on the fast backends first, then the other e2e rows, sweep,
peers, and last the ``compiled`` rows, which each pay a compilation) and what does not fit is
recorded as skipped. Results: ``DIR/NAME.json`` and ``DIR/NAME.csv`` (NAME = ``--name``), one row
per measured value (case, backend, method, shape, metric, value, unit, status), with the device,
torch, triton and CUDA versions. Peak memory: CUDA ``torch.cuda.max_memory_allocated`` during the
row; CPU (no allocator statistics) the growth of the resident set size, see ``memory_method``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import functools
import gc
import importlib.abc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass

START = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _map_source_kernels() -> None:
    """Resolve ``icakd_fast.kernels`` to ``ROOT/kernels`` when running from a source checkout whose
    install does not map it (consulted only after every other import finder)."""
    kdir = os.path.join(ROOT, "kernels")
    init = os.path.join(kdir, "__init__.py")
    if not os.path.isfile(init):
        return

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "icakd_fast.kernels":
                return None
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[kdir])

    sys.meta_path.append(_Finder())


_map_source_kernels()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import icakd_fast.functional as IF  # noqa: E402
from icakd_fast import ClassMemoryBank, FeatureTap, ICAKDLoss  # noqa: E402
from icakd_fast._backend import not_supported_reasons  # noqa: E402
from icakd_fast.train.models import build_model  # noqa: E402

METHODS = ("ce", "kd", "cskd", "icakd")
MIB = 2**20


# ----------------------------------------------------------------------------------------------
# environment, memory, timing
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pin_glibc_mmap_threshold() -> bool:
    """Make glibc serve every allocation >= 128 KiB with its own mmap and return it on free, so that
    the resident set size follows the live tensors (otherwise freed blocks stay in the heap)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024)) and bool(libc.mallopt(-1, 128 * 1024))  # MMAP / TRIM threshold
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak memory of a block above the level at entry, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at entry. CPU: peak growth
    of the resident set size, sampled every 5 ms by a thread (glibc's mmap threshold pinned, see
    ``pin_glibc_mmap_threshold``). ``restart_peak()`` forgets the peak so far (e.g. after a
    correctness check) but keeps the entry level; ``current_mib()`` is the level now.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def _now(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else rss_bytes()

    def __enter__(self):
        free_memory(self.device)
        self.base = self._now()
        self.peak = self.base
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def restart_peak(self):
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak = self._now()

    def current_mib(self) -> float:
        return (self._now() - self.base) / MIB

    def peak_mib(self) -> float:
        if self.cuda:
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
        self.peak = max(self.peak, rss_bytes())
        return (self.peak - self.base) / MIB

    def __exit__(self, *exc):
        if not self.cuda:
            self._stop.set()
            self._thread.join()
        return False


def memory_method(device: torch.device, pinned: bool) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during the row minus the allocation before it"
    return ("CPU: e2e = bytes of the tensors that exist before the first step (weights, buffers incl. banks, inputs) "
            "+ peak growth of the resident set size (RSS, /proc/self/statm sampled every 5 ms) over the steps; "
            "sweep and peers = peak RSS growth over the case" +
            ("; glibc mmap threshold pinned to 128 KiB so freed tensors leave the RSS" if pinned else ""))


def time_steps(step, device, warmup: int, steps: int, deadline: float | None = None, min_steps: int = 3):
    """Run ``step(i)`` ``warmup`` times, then time up to ``steps`` calls (seconds each, synchronised).
    Stops early (keeping at least ``min_steps``) once ``deadline`` (time.time()) has passed."""
    for i in range(warmup):
        step(i)
    sync(device)
    times = []
    for i in range(steps):
        if deadline is not None and len(times) >= min_steps and time.time() > deadline:
            break
        t0 = time.perf_counter()
        step(warmup + i)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_op_ms(fn, device, *, reps: int = 7, target_s: float = 0.02, max_inner: int = 50, stat=statistics.median) -> float:
    """Milliseconds per call of ``fn()`` (median of ``reps`` samples, or ``stat``); short calls are
    repeated between synchronisations."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    inner = int(min(max_inner, max(1, target_s / one)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return stat(samples) * 1e3


def is_oom(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in msg
            or "can't allocate memory" in msg)


def status_of(exc: BaseException) -> str:
    if is_oom(exc):
        return "oom"
    return f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def module_bytes(*modules) -> int:
    return sum(b.numel() * b.element_size() for m in modules if m is not None for b in m.buffers())


# ----------------------------------------------------------------------------------------------
# results and budget
# ----------------------------------------------------------------------------------------------


class Bench:
    """Rows, budget and output files of one run."""

    FIELDS = ("mode", "case", "preset", "method", "backend", "shape", "metric", "value", "unit", "status", "note")

    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.dry = args.dry_run
        self.rows: list[dict] = []
        self.budget = args.budget_s
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.mem_pinned = pin_glibc_mmap_threshold() if device.type == "cpu" else False
        self.env = self._environment()

    # -- environment -----------------------------------------------------------------------
    def _environment(self) -> dict:
        env = {
            "device": str(self.device),
            "device_name": device_name(self.device),
            "cpu": f"{cpu_model()} ({os.cpu_count()} cores)",
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "dry_run": self.dry,
            "memory_measure": memory_method(self.device, self.mem_pinned),
        }
        try:
            import triton

            env["triton"] = triton.__version__
        except Exception:  # noqa: BLE001 - any import failure means "no triton"
            env["triton"] = None
        if self.device.type == "cuda":
            env["cudnn"] = torch.backends.cudnn.version()
            env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(self.device)))
            env["memory_gib"] = round(torch.cuda.get_device_properties(self.device).total_memory / 2**30, 1)
        try:
            import icakd_fast

            env["icakd_fast"] = icakd_fast.__version__
        except Exception:  # noqa: BLE001
            pass
        env["cpp_extension"] = not not_supported_reasons("cpp", None, self.device)
        env["triton_backend"] = "; ".join(not_supported_reasons("triton", None, self.device)) or "available"
        return env

    # -- budget ----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.time() - START

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.elapsed()

    def deadline(self) -> float | None:
        return None if self.budget is None else START + self.budget

    def estimate(self, kind: str, default: float) -> float:
        seen = self.durations.get(kind)
        return statistics.median(seen) if seen else default

    def run(self, kind: str, default_s: float, base: dict, fn, *, metric: str = "images_per_s") -> None:
        """Run task ``fn()`` if its estimated cost fits the budget, else record it as skipped.
        Any exception is recorded on ``base`` (one row) and the run goes on."""
        est = self.estimate(kind, default_s)
        if est > self.left():
            self.record(base, metric, status=f"skipped: budget (needs ~{est:.0f} s, {max(self.left(), 0):.0f} s left)")
            return
        t0 = time.time()
        status = None
        try:
            fn()
        except Exception as exc:  # one failure never stops the run
            status = status_of(exc)
            if status != "oom":
                traceback.print_exc()
        free_memory(self.device)  # after the exception (and the frames it holds) is gone
        if status is not None:
            avail = available_bytes(self.device)
            self.record(base, metric, status=status,
                        note=f"free memory after: {avail / MIB:.0f} MiB" if avail is not None and status == "oom" else "")
        self.durations[kind].append(time.time() - t0)
        self.write()

    # -- rows ------------------------------------------------------------------------------
    def record(self, base: dict, metric: str, value=None, unit: str = "", status: str = "ok", note: str = "") -> dict:
        row = {k: "" for k in self.FIELDS}
        row.update(base)
        row.update(metric=metric, value=value, unit=unit, status=status, note=note)
        self.rows.append(row)
        val = f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))
        what = " ".join(str(base.get(k, "")) for k in ("case", "method", "backend") if base.get(k, ""))
        log(f"[{self.elapsed():6.1f}s] {what} | {metric} = {val} {unit} [{status}]{'  ' + note if note else ''}")
        return row

    def find(self, **match) -> list[dict]:
        return [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]

    def value(self, **match):
        for r in self.find(**match):
            if r["status"] == "ok" and isinstance(r["value"], (int, float)):
                return r["value"]
        return None

    def write(self) -> None:
        os.makedirs(self.args.out, exist_ok=True)
        stem = os.path.join(self.args.out, self.args.name)
        env = dict(self.env, wall_s=round(self.elapsed(), 1), budget_s=self.budget)
        config = {k: v for k, v in vars(self.args).items()}
        with open(stem + ".json", "w") as fh:
            json.dump({"environment": env, "config": config, "results": self.rows}, fh, indent=1, default=str)
        extra = ("device_name", "torch", "triton", "cuda")
        with open(stem + ".csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(self.FIELDS) + list(extra))
            w.writeheader()
            for r in self.rows:
                w.writerow({**{k: r.get(k, "") for k in self.FIELDS}, **{k: env.get(k) for k in extra}})


def log(msg: str) -> None:
    print(msg, flush=True)


def skip_reason(backend: str, device: torch.device, dry: bool) -> str | None:
    if backend in ("reference", "compiled", "auto"):
        return None
    if backend == "triton" and device.type == "cpu" and not dry:
        return "triton on CPU is the interpreter, a correctness tool, not a benchmark target"
    reasons = not_supported_reasons(backend, None, device)
    return "; ".join(reasons) or None


def dry_run_skip(case: str, method: str, backend: str, first: bool) -> str | None:
    """The dry run keeps every code path but leaves out repeats that only cost time: the Triton
    interpreter at ImageNet widths (D=2048), and compilation beyond one e2e row and one sweep point."""
    if backend == "triton" and case == "e2e_imagenet":
        return "dry run: the Triton interpreter at D=2048 takes minutes (covered by the cifar preset)"
    if backend == "compiled" and not (first and (method == "icakd" or case.startswith("sweep"))):
        return "dry run: one compiled e2e row (imagenet icakd) and one compiled sweep point only"
    return None


def loss_backend(backend: str) -> str | None:
    """The ``backend=`` argument of the library for a benchmark backend label."""
    return {"compiled": "reference", "auto": None}.get(backend, backend)


# ----------------------------------------------------------------------------------------------
# e2e: one training step
# ----------------------------------------------------------------------------------------------


@dataclass
class Preset:
    name: str
    teacher: str
    student: str
    classes: int
    image: int
    batch: int
    amp: bool  # bf16 autocast + channels_last
    warmup: int
    steps: int

    def shape(self) -> str:
        extra = " bf16 autocast, channels_last" if self.amp else " fp32"
        return f"{self.teacher}->{self.student} {self.image}x{self.image} C={self.classes} B={self.batch}{extra}"


def make_preset(name: str, device: torch.device, args) -> Preset:
    gpu = device.type == "cuda"
    if name == "imagenet":
        p = Preset(name, "resnet50", "resnet18", 1000, 224, 256 if gpu else 8, gpu, 3 if gpu else 1, 10 if gpu else 4)
        if args.dry_run:  # 2x2 feature maps; the Triton interpreter is left out here (see dry_run_skip)
            p.classes, p.image, p.batch, p.warmup, p.steps = 10, 64, 2, 1, 2
    elif name == "cifar":
        p = Preset(name, "resnet32x4", "resnet8x4", 100, 32, 64, False, 5 if gpu else 2, 20 if gpu else 5)
        if args.dry_run:  # the same CIFAR models, narrow (64 channels) so that the interpreter is quick
            p.teacher, p.student, p.classes, p.batch, p.warmup, p.steps = "resnet20", "resnet8", 10, 4, 1, 2
    else:
        raise ValueError(f"unknown preset {name!r}")
    if args.batch_size:
        p.batch = args.batch_size
    if args.steps:
        p.steps = args.steps
    if args.warmup is not None:
        p.warmup = args.warmup
    return p


class E2ESetup:
    """Models, taps, loss module, optimiser and on-device random batches for one (method, backend)."""

    def __init__(self, preset: Preset, method: str, backend: str, device: torch.device, n_batches: int = 4):
        self.p, self.method, self.backend, self.device = preset, method, backend, device
        fmt = torch.channels_last if preset.amp else torch.contiguous_format
        torch.manual_seed(0)
        with torch.device(device):
            self.student = build_model(preset.student, preset.classes).to(memory_format=fmt).train()
            self.teacher = None
            if method != "ce":
                self.teacher = build_model(preset.teacher, preset.classes).to(memory_format=fmt).eval().requires_grad_(False)
        self.s_tap = FeatureTap(self.student)
        self.t_tap = FeatureTap(self.teacher) if self.teacher is not None else None
        self.crit = self.crit_fn = None
        params = list(self.student.parameters())
        if method != "ce":
            self.loss_kwargs = dict(method=method, backend=loss_backend(backend))
            self.crit = ICAKDLoss(preset.classes, self.s_tap.dim, self.t_tap.dim, **self.loss_kwargs).to(device).train()
            params += [p for p in self.crit.parameters() if p.requires_grad]
            if self.crit.bank_s is not None:  # steady state: every class has a full bank
                g = torch.Generator(device=device).manual_seed(2)
                prefill_bank(self.crit.bank_s, g)
                prefill_bank(self.crit.bank_t, g)
            self.crit_fn = torch.compile(self.crit) if backend == "compiled" else self.crit
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator(device=device).manual_seed(1)
        self.batches = []
        for _ in range(n_batches):
            x = torch.randn(preset.batch, 3, preset.image, preset.image, device=device, generator=g)
            y = torch.randint(0, preset.classes, (preset.batch,), device=device, generator=g)
            self.batches.append((x.contiguous(memory_format=fmt), y))
        self.phase = lambda name: contextlib.nullcontext()

    def static_bytes(self) -> int:
        """Bytes of the tensors that exist before the first step: weights, buffers (banks), inputs."""
        mods = [m for m in (self.student, self.teacher, self.crit) if m is not None]
        n = sum(t.numel() * t.element_size() for m in mods for t in list(m.parameters()) + list(m.buffers()))
        return n + sum(x.numel() * x.element_size() + y.numel() * y.element_size() for x, y in self.batches)

    def bank_bytes(self) -> int:
        return module_bytes(self.crit.bank_s, self.crit.bank_t) if self.crit is not None and self.crit.bank_s is not None else 0

    def forward_models(self, x):
        with autocast(self.device, self.p.amp):
            zt = None
            if self.teacher is not None:
                with self.phase("teacher_forward"), torch.no_grad():
                    zt = self.teacher(x)
            with self.phase("student_forward"):
                zs = self.student(x)
        return zs, zt

    def step(self, i: int) -> torch.Tensor:
        x, y = self.batches[i % len(self.batches)]
        zs, zt = self.forward_models(x)
        # the loss runs outside autocast: it takes low-precision activations as they are (as the trainer does)
        with self.phase("loss_forward"):
            if self.crit_fn is None:
                loss = F.cross_entropy(zs.float(), y)
            else:
                loss = self.crit_fn(self.s_tap.features, zs, self.t_tap.features, zt, y,
                                    self.s_tap.fc_weight, self.t_tap.fc_weight).loss
        with self.phase("backward"):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        with self.phase("optimizer_step"):
            self.opt.step()
        return loss

    def loss_only(self):
        """A closure running the loss module alone, forward + backward (bank enqueue included), on
        the features and logits of one batch."""
        x, y = self.batches[0]
        with torch.no_grad():
            zs, zt = self.forward_models(x)
        fs, ft = self.s_tap.features, self.t_tap.features

        def run():
            a = fs.detach().requires_grad_(True)
            b = zs.detach().requires_grad_(True)
            self.crit_fn(a, b, ft, zt, y, self.s_tap.fc_weight, self.t_tap.fc_weight).loss.backward()

        return run

    def check(self) -> dict:
        """Loss (total and each part) and its gradient w.r.t. the student features, this backend vs
        the eager reference, over two consecutive batches from identical loss-module states (the
        second batch sees the first one's enqueue). Returns the errors and the first call's time
        (which includes any compilation)."""
        ref = ICAKDLoss(self.p.classes, self.s_tap.dim, self.t_tap.dim, method=self.method, backend="reference")
        ref = ref.to(self.device).train()
        ref.load_state_dict(self.crit.state_dict())
        out = {"loss_abs": 0.0, "loss_rel": 0.0, "grad_rel": 0.0, "first_call_s": None}
        for i in range(2):
            x, y = self.batches[i]
            with torch.no_grad():
                zs, zt = self.forward_models(x)
            fs, ft = self.s_tap.features, self.t_tap.features
            a = fs.detach().clone().requires_grad_(True)
            b = fs.detach().clone().requires_grad_(True)
            args = (zs, ft, zt, y, self.s_tap.fc_weight, self.t_tap.fc_weight)
            r = ref(a, *args)
            ga = torch.autograd.grad(r.loss, a, allow_unused=True)[0] if r.loss.requires_grad else None
            sync(self.device)
            t0 = time.perf_counter()
            o = self.crit_fn(b, *args)
            gb = torch.autograd.grad(o.loss, b, allow_unused=True)[0] if o.loss.requires_grad else None
            sync(self.device)
            if i == 0:
                out["first_call_s"] = time.perf_counter() - t0
            for key in ["loss"] + sorted(r.parts):
                va = r.loss if key == "loss" else r.parts[key]
                vb = o.loss if key == "loss" else o.parts.get(key, torch.tensor(float("nan")))
                out["loss_abs"] = max(out["loss_abs"], abs_err(vb, va))
                out["loss_rel"] = max(out["loss_rel"], abs_err(vb, va) / max(abs(va.item()), 1e-12))
            if ga is not None and gb is not None:  # kd: the loss does not depend on the features
                out["grad_rel"] = max(out["grad_rel"], rel_err(gb, ga))
        del ref
        return out


def e2e_prepare(bench: Bench, p: Preset, method: str, backend: str, time_it: bool, store: dict | None = None):
    """Build one (method, backend), check it against the reference, run its warm-up steps and
    record its peak memory; with ``time_it`` also time it (sequential mode), otherwise keep the
    setup in ``store`` for the interleaved timing."""
    base = dict(mode="e2e", case=f"e2e_{p.name}", preset=p.name, method=method, backend=backend, shape=p.shape())
    dev = bench.device
    if backend == "compiled" and time_it:
        torch._dynamo.reset()  # every compiled row compiles from scratch (interleaved: kept side by side)
    with PeakMemory(dev) as mem:
        s = E2ESetup(p, method, backend, dev)
        if s.crit is not None and backend != "reference":
            chk = s.check()
            tol = 2e-2 if p.amp else 1e-4
            ok = chk["loss_rel"] <= tol and chk["grad_rel"] <= 10 * tol
            st = "ok" if ok else "mismatch"
            bench.record(base, "check_loss_max_abs_err", chk["loss_abs"], "", st, "vs eager reference, total and each part, 2 batches")
            bench.record(base, "check_loss_max_rel_err", chk["loss_rel"], "", st, f"tolerance {tol:g}")
            bench.record(base, "check_grad_rel_err", chk["grad_rel"], "", st,
                         f"d loss / d student features, relative L2, tolerance {10 * tol:g}")
            if backend == "compiled":
                bench.record(base, "compile_s", chk["first_call_s"], "s", "ok", "first forward + backward call")
            free_memory(dev)
        mem.restart_peak()
        before = mem.current_mib()
        if time_it:
            times = time_steps(s.step, dev, p.warmup, p.steps, bench.deadline())
        else:
            times = time_steps(s.step, dev, max(p.warmup - 1, 0), 1)  # the last warm-up step, timed
        if dev.type == "cuda":
            peak, what = mem.peak_mib(), "max_memory_allocated: weights, grads, optimiser state, banks, activations"
        else:
            # one-off growth (library loading, compilation, the check) is left out: tensors that exist
            # before the first step are counted by size, everything the steps add by RSS growth
            peak = s.static_bytes() / MIB + mem.peak_mib() - before
            what = "tensor bytes of models, loss module (banks) and inputs + peak RSS growth over the steps"
        bank = s.bank_bytes()
    bench.record(base, "peak_mem_mib", peak, "MiB", "ok", what)
    if s.crit is not None and time_it:  # interleaved: timed once per round, see e2e_interleaved
        ms = time_op_ms(s.loss_only(), dev, reps=3 if bench.dry else 9, stat=min)
        s.opt.zero_grad(set_to_none=True)
        bench.record(base, "loss_ms", ms, "ms", "ok", "the loss module alone, forward + backward (enqueue "
                     "included), fastest of 9")
    if bank:
        bench.record(base, "bank_mib", bank / MIB, "MiB", "ok", "both banks: bank + sums + count + ptr buffers")
    if time_it:
        record_times(bench, base, p, times, f"after {p.warmup} warm-up")
        del s
    else:
        s.warm_s = times[-1]
        store[(method, backend)] = s


def record_times(bench: Bench, base: dict, p: Preset, times: list[float], how: str) -> None:
    med = statistics.median(times)
    note = f"median of {len(times)} steps {how}" + ("; no teacher" if base["method"] == "ce" else "")
    bench.record(base, "images_per_s", p.batch / med, "images/s", "ok", note)
    bench.record(base, "step_ms", med * 1e3, "ms", "ok", f"min {min(times) * 1e3:.1f} max {max(times) * 1e3:.1f}")
    bench.record(base, "step_ms_min", min(times) * 1e3, "ms", "ok", "fastest step (robust to load on a shared machine)")


def e2e_interleaved(bench: Bench, p: Preset, live: dict) -> None:
    """Time every prepared setup in round-robin order (start rotated each round), so that the load
    of a shared machine affects every row alike."""
    keys = list(live)
    if not keys:
        return
    per_round = sum(live[k].warm_s for k in keys)
    rounds = p.steps
    if bench.budget is not None:
        rounds = min(rounds, int(max(bench.left(), 0) // max(per_round, 1e-9)))
    if rounds < min(3, p.steps):
        for m, b in keys:
            base = dict(mode="e2e", case=f"e2e_{p.name}", preset=p.name, method=m, backend=b, shape=p.shape())
            bench.record(base, "images_per_s", status=f"skipped: budget (a round of all rows takes ~{per_round:.0f} s)")
        return
    log(f"interleaved timing: {rounds} rounds of {len(keys)} rows (~{per_round:.1f} s per round)")
    times = {k: [] for k in keys}
    loss_fns = {k: live[k].loss_only() for k in keys if live[k].crit is not None}
    loss_times = {k: [] for k in loss_fns}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            sync(bench.device)
            t0 = time.perf_counter()
            live[k].step(1000 + r)
            sync(bench.device)
            times[k].append(time.perf_counter() - t0)
            if k in loss_fns:  # the loss alone, once per round: its minimum is robust to bursts of load
                t0 = time.perf_counter()
                loss_fns[k]()
                sync(bench.device)
                loss_times[k].append(time.perf_counter() - t0)
        if bench.deadline() is not None and time.time() > bench.deadline() and r >= 2:
            break
    for (m, b), ts in times.items():
        base = dict(mode="e2e", case=f"e2e_{p.name}", preset=p.name, method=m, backend=b, shape=p.shape())
        record_times(bench, base, p, ts, f"interleaved round-robin with the other {len(keys) - 1} rows, "
                                         f"after {p.warmup} warm-up")
        if (m, b) in loss_times:
            bench.record(base, "loss_ms", min(loss_times[(m, b)]) * 1e3, "ms", "ok",
                         f"the loss module alone, forward + backward (enqueue included), fastest of "
                         f"{len(loss_times[(m, b)])}, one call per round")


def e2e_backends(bench: Bench) -> list[str]:
    wanted = [b.strip() for b in bench.args.backends.split(",") if b.strip()]
    if bench.device.type != "cuda" and "auto" in wanted and not bench.args.backends_given:
        wanted.remove("auto")  # on CPU auto = cpp
    return wanted


def e2e_tasks(bench: Bench, p: Preset, backends: list[str], methods: list[str]):
    """(priority, method, backend, budget kind) for one preset; lower priority runs first."""
    fast = [b for b in backends if b in ("auto", "cpp", "triton")]
    tasks = []

    def add(prio, method, backend):
        if method in methods and backend in backends:
            kind = f"e2e_{p.name}" + ("_compiled" if backend == "compiled" else "")
            tasks.append((prio, method, backend, kind))

    for b in fast:
        add(0, "icakd", b)
        add(0, "kd", b)
    add(1, "icakd", "reference")
    add(1, "kd", "reference")
    for b in fast + ["reference"]:
        add(1, "cskd", b)
    if "ce" in methods:
        tasks.append((1, "ce", "reference", f"e2e_{p.name}"))
    for m in ("icakd", "kd", "cskd"):
        add(5, m, "compiled")
    return tasks


def e2e_summary(bench: Bench, p: Preset) -> None:
    """ICAKD's overhead over KD per backend (step time, peak memory next to the bank size)."""
    case = f"e2e_{p.name}"
    best, best_ips = None, -1.0
    for b in sorted({r["backend"] for r in bench.find(case=case, method="icakd")}):
        ips = bench.value(case=case, method="icakd", backend=b, metric="images_per_s")
        if ips is not None and ips > best_ips:
            best, best_ips = b, ips
    for b in sorted({r["backend"] for r in bench.find(case=case, method="icakd")}):
        t_i = bench.value(case=case, method="icakd", backend=b, metric="step_ms")
        t_k = bench.value(case=case, method="kd", backend=b, metric="step_ms")
        if t_i is None or t_k is None:
            continue
        base = dict(mode="summary", case=case, preset=p.name, method="icakd vs kd", backend=b, shape=p.shape())
        tag = " (fastest ICAKD backend)" if b == best else ""
        bench.record(base, "icakd_step_time_ratio_vs_kd", t_i / t_k, "x", "ok", "ICAKD step time / KD step time" + tag)
        bench.record(base, "icakd_overhead_vs_kd_pct", (t_i / t_k - 1) * 100, "%",
                     "ok", "extra step time = loss of images/s: (ips_kd / ips_icakd - 1) * 100" + tag)
        m_i = bench.value(case=case, method="icakd", backend=b, metric="step_ms_min")
        m_k = bench.value(case=case, method="kd", backend=b, metric="step_ms_min")
        if m_i is not None and m_k is not None:
            bench.record(base, "icakd_step_time_ratio_vs_kd_min", m_i / m_k, "x", "ok", "ratio of the fastest steps" + tag)
        l_i = bench.value(case=case, method="icakd", backend=b, metric="loss_ms")
        l_k = bench.value(case=case, method="kd", backend=b, metric="loss_ms")
        if l_i is not None and l_k is not None:
            bench.record(base, "icakd_loss_overhead_vs_kd_step_pct", (l_i - l_k) / t_k * 100, "%", "ok",
                         f"(ICAKD loss - KD loss) / KD step time, losses timed alone: {l_i:.2f} vs {l_k:.2f} ms" + tag)
        m_i = bench.value(case=case, method="icakd", backend=b, metric="peak_mem_mib")
        m_k = bench.value(case=case, method="kd", backend=b, metric="peak_mem_mib")
        bank = bench.value(case=case, method="icakd", backend=b, metric="bank_mib")
        if m_i is not None and m_k is not None:
            bench.record(base, "icakd_peak_mem_overhead_vs_kd_mib", m_i - m_k, "MiB", "ok",
                         f"both banks hold {bank:.1f} MiB" if bank is not None else "")
    if best is not None:
        bench.record(dict(mode="summary", case=case, preset=p.name, method="icakd", backend=best, shape=p.shape()),
                     "fastest_icakd_backend", best_ips, "images/s", "ok", f"fastest backend: {best}")


def pair_overhead(bench: Bench, p: Preset, backend: str, rounds: int) -> None:
    """KD and ICAKD steps interleaved (same backend, same models), so that load on a shared
    machine affects both alike: ratio of the median step times."""
    base = dict(mode="summary", case=f"e2e_{p.name}", preset=p.name, method="icakd vs kd", backend=backend,
                shape=p.shape())
    kd = E2ESetup(p, "kd", backend, bench.device)
    ic = E2ESetup(p, "icakd", backend, bench.device)
    for i in range(p.warmup):
        kd.step(i)
        ic.step(i)
    tk, ti = [], []
    for i in range(rounds):
        for s, acc in ((kd, tk), (ic, ti)) if i % 2 == 0 else ((ic, ti), (kd, tk)):
            sync(bench.device)
            t0 = time.perf_counter()
            s.step(p.warmup + i)
            sync(bench.device)
            acc.append(time.perf_counter() - t0)
        dl = bench.deadline()
        if dl is not None and time.time() > dl and len(tk) >= 3:
            break
    ratio = statistics.median(ti) / statistics.median(tk)
    bench.record(base, "icakd_step_time_ratio_vs_kd_interleaved", ratio, "x", "ok",
                 f"{len(ti)} interleaved step pairs; kd {statistics.median(tk) * 1e3:.1f} ms, "
                 f"icakd {statistics.median(ti) * 1e3:.1f} ms")


def profile_pair(bench: Bench, p: Preset, backend: str) -> None:
    """torch.profiler over a few KD and ICAKD steps: time per phase and the top operators."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    lines = []
    for method in ("kd", "icakd"):
        s = E2ESetup(p, method, backend, bench.device)
        for i in range(max(p.warmup, 1)):
            s.step(i)
        sync(bench.device)
        s.phase = record_function
        n = 3
        with profile(activities=acts) as prof:
            for i in range(n):
                with record_function("step"):
                    s.step(i)
            sync(bench.device)
        s.phase = lambda name: contextlib.nullcontext()
        ka = prof.key_averages()
        use_cuda = bench.device.type == "cuda"
        base = dict(mode="profile", case=f"profile_{p.name}", preset=p.name, method=method, backend=backend,
                    shape=p.shape())
        for ev in ka:
            if ev.key in ("step", "teacher_forward", "student_forward", "loss_forward", "backward", "optimizer_step"):
                ms = (ev.device_time_total if use_cuda else ev.cpu_time_total) / 1e3 / n
                bench.record(dict(base, case=f"profile_{p.name}:{ev.key}"), "phase_ms_per_step", ms, "ms", "ok",
                             "CUDA time" if use_cuda else "CPU wall time of the phase")
        sort = "self_cuda_time_total" if use_cuda else "self_cpu_time_total"
        table = ka.table(sort_by=sort, row_limit=25)
        lines.append(f"==== {p.name} {method} backend={backend} ({n} steps)\n{table}")
        for ev in sorted(ka, key=lambda e: -(e.self_device_time_total if use_cuda else e.self_cpu_time_total))[:12]:
            if ev.key in ("step",):
                continue
            ms = (ev.self_device_time_total if use_cuda else ev.self_cpu_time_total) / 1e3 / n
            bench.record(dict(base, case=f"profile_{p.name}:op:{ev.key}"), "self_ms_per_step", ms, "ms", "ok",
                         f"{ev.count // n} calls per step")
        del s
        free_memory(bench.device)
    path = os.path.join(bench.args.out, f"{bench.args.name}.profile_{p.name}.txt")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    log(f"profile tables -> {path}")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    """glibc's ``mallinfo2`` (None where there is none); looked up once, it is read per operator."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


def _malloc_live_bytes() -> int | None:
    """Bytes glibc has handed out and not taken back (heap in use + mmapped chunks)."""
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return info.uordblks + info.hblkhd


def live_at_peak(events: list[dict]) -> tuple[int, list[dict]]:
    """Replay a CUDA allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``):
    the peak of the bytes allocated during the trace and the allocations alive at that moment.

    Only the trace's own allocations count (not those made before recording started)."""
    live: dict[int, dict] = {}
    cur = peak = 0
    at_peak: list[dict] = []
    for ev in events:
        action = ev.get("action")
        if action == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > peak:
                peak, at_peak = cur, list(live.values())
        elif action in ("free_requested", "free") and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]
    return peak, at_peak


def _frame_label(frames: list[dict]) -> str:
    """The first frame in this project's code (or else the first frame) as ``file:line (function)``."""
    keys = ("icakd_fast", os.sep + "kernels" + os.sep, "e2e_bench.py", "torchvision")
    pick = next((f for f in frames if any(k in f.get("filename", "") for k in keys)), frames[0] if frames else None)
    if pick is None:
        return "<no stack>"
    return f"{os.path.basename(pick['filename'])}:{pick.get('line', '?')} ({pick.get('name', '?')})"


def group_by_site(allocs: list[dict], top: int = 12) -> list[tuple[str, int, int]]:
    """(site, bytes, count) of allocations grouped by ``_frame_label``, largest first."""
    sites: dict[str, list[int]] = {}
    for a in allocs:
        entry = sites.setdefault(_frame_label(a.get("frames", [])), [0, 0])
        entry[0] += a["size"]
        entry[1] += 1
    return sorted(((k, v[0], v[1]) for k, v in sites.items()), key=lambda r: -r[1])[:top]


def memory_mode(bench: Bench, names: list[str], backends: list[str]) -> None:
    """``--memory``: ``memory_pair`` per preset and backend; breakdowns in NAME.memory_PRESET.txt."""
    for name in names:
        p = make_preset(name, bench.device, bench.args)
        lines = []
        for backend in backends:
            base = dict(mode="memory", case=f"memory_{name}", preset=name, method="icakd vs kd", backend=backend,
                        shape=p.shape())
            reason = "compiled steps are not traced by the memory mode" if backend == "compiled" else \
                skip_reason(backend, bench.device, bench.args.dry_run)
            if reason:
                bench.record(base, "step_peak_icakd_minus_kd_mib", status=f"skipped: {reason}")
                continue
            bench.run(f"memory_{name}", 30.0 if bench.device.type == "cuda" else 300.0, base,
                      lambda p=p, b=backend: lines.extend(memory_pair(bench, p, b)),
                      metric="step_peak_icakd_minus_kd_mib")
        path = os.path.join(bench.args.out, f"{bench.args.name}.memory_{name}.txt")
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        log(f"memory breakdown -> {path}")


def memory_pair(bench: Bench, p: Preset, backend: str) -> list[str]:
    """Peak memory of one KD and one ICAKD step above the level at its start, and (CUDA) what is
    alive at the peak, grouped by allocation site. CPU: glibc's bytes in use, read after every
    operator (a TorchDispatchMode), no breakdown."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Peak(TorchDispatchMode):
        """Largest glibc bytes-in-use seen after any operator."""
        top = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            _Peak.top = max(_Peak.top, _malloc_live_bytes())
            return out

    lines, peaks = [], {}
    for method in ("kd", "icakd"):
        s = E2ESetup(p, method, backend, bench.device)
        for i in range(max(p.warmup, 1)):
            s.step(i)
        sync(bench.device)
        base = dict(mode="memory", case=f"memory_{p.name}", preset=p.name, method=method, backend=backend,
                    shape=p.shape())
        if bench.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200000)
            start = torch.cuda.memory_allocated(bench.device)
            torch.cuda.reset_peak_memory_stats(bench.device)
            s.step(0)
            sync(bench.device)
            peak = torch.cuda.max_memory_allocated(bench.device) - start
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            trace = snap["device_traces"][bench.device.index or 0]
            _, alive = live_at_peak(trace)
            lines.append(f"==== {p.name} {method} backend={backend}: step peak {peak / MIB:.1f} MiB above its start; "
                         "alive at the peak, by site (allocations made during the step):")
            lines += [f"  {b / MIB:9.1f} MiB  x{n:<4d} {site}" for site, b, n in group_by_site(alive)]
        else:
            if _malloc_live_bytes() is None:
                return ["memory breakdown skipped: glibc mallinfo2 unavailable"]
            start = _malloc_live_bytes()
            _Peak.top = start
            with _Peak():
                s.step(0)
            peak = _Peak.top - start
            lines.append(f"==== {p.name} {method} backend={backend}: step peak {peak / MIB:.1f} MiB above its start "
                         "(glibc bytes in use, read after every operator)")
        peaks[method] = peak
        bench.record(base, "step_peak_above_start_mib", peak / MIB, "MiB", "ok",
                     "max_memory_allocated - allocated at step start" if bench.device.type == "cuda"
                     else "glibc bytes in use after each operator - at step start")
        if method == "icakd":
            bank = s.bank_bytes()
            proj = 3 * sum(t.numel() * t.element_size() for t in s.crit.projector.parameters())  # + momentum, grad
            bench.record(dict(base, method="icakd vs kd"), "step_peak_icakd_minus_kd_mib",
                         (peaks["icakd"] - peaks["kd"]) / MIB, "MiB", "ok",
                         f"plus banks {bank / MIB:.1f} MiB and projector weight/momentum/grad "
                         f"{proj / MIB:.1f} MiB held across steps")
        del s
        free_memory(bench.device)
    return lines


# ----------------------------------------------------------------------------------------------
# sweep: bank + structure losses at scale
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def prefill_bank(bank: ClassMemoryBank, gen: torch.Generator) -> None:
    """Steady state: every slot of every class filled with a unit vector, exact float32 sums."""
    C, S, D = bank.bank.shape
    chunk = max(1, (1 << 24) // (S * D))
    for c0 in range(0, C, chunk):
        n = min(chunk, C - c0)
        rows = F.normalize(torch.randn(n, S, D, device=bank.bank.device, generator=gen), dim=-1)
        bank.bank[c0:c0 + n].copy_(rows)
        bank.sums[c0:c0 + n].copy_(bank.bank[c0:c0 + n].float().sum(1))
        del rows
    bank.count.fill_(S)
    bank.ptr.random_(0, S, generator=gen)


def structure_loss(proj, bank_s, bank_t, v_s, v_t, y, backend):
    """The structure part of ICAKDLoss: projected, normalised features; centroids with the banks;
    intra + inter (gradient into the live classes only)."""
    f_s = F.normalize(proj(v_s), dim=1)
    f_t = F.normalize(v_t, dim=1)
    sums_s, cnt_s = bank_s.sums_counts()
    sums_t, cnt_t = bank_t.sums_counts()
    mu_s, n_s = IF.class_centroids(sums_s, cnt_s, f_s, y, backend=backend)
    with torch.no_grad():
        mu_t, n_t = IF.class_centroids(sums_t, cnt_t, f_t, y, backend=backend)
    valid = (n_s >= 1) & (n_t >= 1)
    live = torch.zeros(mu_s.shape[0], dtype=torch.bool, device=y.device).index_fill_(0, y, True)
    loss = IF.intra_class_loss(f_s, f_t, mu_s, mu_t, y, valid, backend=backend) + \
        IF.inter_class_loss(mu_s, mu_t, valid, live=live, backend=backend)
    return loss, f_s, f_t


def sweep_dims(bench: Bench) -> tuple[int, int, int]:
    if bench.dry:
        return 8, 12, 16
    if bench.device.type == "cuda":
        return 256, 512, 2048
    return 64, 128, 256


def predicted_bytes(C: int, S: int, Dt: int, backend: str) -> int:
    banks = 2 * C * (S + 1) * Dt * 4
    dense = 6 * C * C * 4 if backend in ("reference", "compiled") else 0  # two C x C matrices + their grads
    return banks + dense


def sweep_point(bench: Bench, C: int, S: int, backend: str) -> None:
    B, Ds, Dt = sweep_dims(bench)
    dev = bench.device
    base = dict(mode="sweep", case=f"sweep C={C} S={S}", method="enqueue x2 + centroids + intra + inter fwd+bwd",
                backend=backend, shape=f"C={C} S={S} B={B} Ds={Ds} Dt={Dt}")
    bank_mib = 2 * C * S * Dt * 4 / MIB
    avail = available_bytes(dev)
    if dev.type == "cpu" and avail is not None:
        need = predicted_bytes(C, S, Dt, backend) + (predicted_bytes(C, S, Dt, "reference") - 2 * C * (S + 1) * Dt * 4)
        if need > 0.6 * avail:
            bench.record(base, "ms", status=f"skipped: predicted out of memory (~{need / 2**30:.1f} GiB, "
                         f"{avail / 2**30:.1f} GiB available)")
            return
    be = loss_backend(backend)
    if backend == "compiled":
        torch._dynamo.reset()
    gen = torch.Generator(device=dev).manual_seed(0)
    with PeakMemory(dev) as mem:
        bank_s = ClassMemoryBank(C, S, Dt, backend=be, device=dev)
        bank_t = ClassMemoryBank(C, S, Dt, backend=be, device=dev)
        prefill_bank(bank_s, gen)
        prefill_bank(bank_t, gen)
        banks_level = mem.current_mib()
        torch.manual_seed(0)
        proj = nn.Linear(Ds, Dt, bias=False).to(dev)
        batches = [(torch.randn(B, Ds, device=dev, generator=gen), torch.randn(B, Dt, device=dev, generator=gen),
                    torch.randint(0, C, (B,), device=dev, generator=gen)) for _ in range(3)]

        def loss_and_enqueue(v_s, v_t, y):
            loss, f_s, f_t = structure_loss(proj, bank_s, bank_t, v_s, v_t, y, be)
            bank_s.enqueue(f_s.detach(), y)
            bank_t.enqueue(f_t.detach(), y)
            return loss

        fn = torch.compile(loss_and_enqueue) if backend == "compiled" else loss_and_enqueue
        grads = {}

        def step(i):
            v_s, v_t, y = batches[i % len(batches)]
            v_s = v_s.detach().requires_grad_(True)
            proj.zero_grad(set_to_none=True)
            loss = fn(v_s, v_t, y)
            loss.backward()
            grads["v_s"] = v_s.grad
            return loss

        # correctness on the current bank state: the reference first (no enqueue), then one step
        if backend != "reference":
            v_s, v_t, y = batches[0]
            try:
                a = v_s.detach().requires_grad_(True)
                ref, _, _ = structure_loss(proj, bank_s, bank_t, a, v_t, y, "reference")
                (g_ref,) = torch.autograd.grad(ref, a)
                ref = ref.detach()
                del a
            except Exception as exc:  # e.g. the reference runs out of memory: time the backend anyway
                ref = g_ref = None
                bench.record(base, "check_loss_rel_err", status=f"skipped: the reference failed ({status_of(exc)})")
            free_memory(dev)
            t0 = time.perf_counter()
            got = step(0)
            sync(dev)
            first = time.perf_counter() - t0
            if ref is not None:
                e_loss = abs_err(got, ref) / max(abs(ref.item()), 1e-12)
                e_grad = rel_err(grads["v_s"], g_ref)
                bench.record(base, "check_loss_rel_err", e_loss, "", "ok" if e_loss <= 1e-4 else "mismatch",
                             "vs eager reference, same bank state, tolerance 1e-4")
                bench.record(base, "check_grad_rel_err", e_grad, "", "ok" if e_grad <= 1e-4 else "mismatch",
                             "d loss / d v_s, relative L2, tolerance 1e-4")
            if backend == "compiled":
                bench.record(base, "compile_s", first, "s", "ok", "first call")
            del g_ref, ref, got
            free_memory(dev)
        mem.restart_peak()
        inputs_level = mem.current_mib()
        first_t = time.perf_counter()
        step(1)
        sync(dev)
        one = time.perf_counter() - first_t
        reps = 3 if bench.dry else int(min(30, max(5, 0.5 / max(one, 1e-4))))
        times = time_steps(step, dev, 1, reps, bench.deadline())
        peak = mem.peak_mib()
    med = statistics.median(times) * 1e3
    bench.record(base, "ms", med, "ms", "ok", f"median of {len(times)}")
    bench.record(base, "peak_mem_mib", peak, "MiB", "ok", "banks included")
    bench.record(base, "peak_extra_mib", peak - inputs_level, "MiB", "ok",
                 "above banks, projector and inputs")
    bench.record(base, "bank_mib", bank_mib, "MiB", "ok", f"C*S*D*4 bytes x 2 banks (measured level {banks_level:.0f} MiB)")


def sweep_tasks(bench: Bench):
    a = bench.args
    if a.sweep_classes:
        classes = [int(c) for c in a.sweep_classes.split(",")]
    elif bench.dry:
        classes = [20]
    elif bench.device.type == "cuda":
        classes = [100, 1000, 4096, 21841]
    else:
        classes = [100, 1000, 4096]
    slots = [int(s) for s in a.sweep_slots.split(",")] if a.sweep_slots else ([2, 4] if bench.dry else [16, 64])
    backends = e2e_backends(bench)
    fast = [b for b in backends if b in ("auto", "cpp", "triton")]
    tasks = []
    for C in classes:
        for S in slots:
            for b in fast + (["reference"] if "reference" in backends else []):
                tasks.append((2, C, S, b))
            if "compiled" in backends:
                tasks.append((6, C, S, "compiled"))
    return tasks


# ----------------------------------------------------------------------------------------------
# summary table
# ----------------------------------------------------------------------------------------------


def fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def short_status(bench: Bench, **match) -> str:
    rows = bench.find(**match)
    for r in rows:
        if r["status"] != "ok":
            s = r["status"]
            return "oom" if s == "oom" else ("skip" if s.startswith("skipped") else ("mism" if s == "mismatch" else "err"))
    return "-"


def print_summary(bench: Bench) -> None:
    log("\n" + "=" * 100)
    log(f"device: {bench.env['device_name']} | torch {bench.env['torch']} | triton {bench.env.get('triton')} | "
        f"CUDA {bench.env.get('cuda')} | wall {bench.elapsed():.0f} s")
    backends = []
    for r in bench.rows:
        if r["mode"] in ("e2e", "sweep") and r["backend"] not in backends:
            backends.append(r["backend"])
    for case in sorted({r["case"] for r in bench.rows if r["mode"] == "e2e"}):
        log(f"\n{case}: images/s (peak MiB)   [{bench.find(case=case)[0]['shape']}]")
        log(f"{'method':8s}" + "".join(f"{b:>22s}" for b in backends))
        for m in METHODS:
            cells = []
            for b in backends:
                ips = bench.value(case=case, method=m, backend=b, metric="images_per_s")
                mem = bench.value(case=case, method=m, backend=b, metric="peak_mem_mib")
                cells.append(f"{fmt(ips)} ({fmt(mem, 0)})" if ips is not None else short_status(bench, case=case, method=m, backend=b))
            log(f"{m:8s}" + "".join(f"{c:>22s}" for c in cells))
        for r in bench.find(case=case, mode="summary"):
            if r["status"] == "ok":
                log(f"  {r['backend']:10s} {r['metric']}: {fmt(r['value'], 3)} {r['unit']}  {r['note']}")
    sweep = [r for r in bench.rows if r["mode"] == "sweep"]
    if sweep:
        sb = [b for b in backends if any(r["backend"] == b for r in sweep)]
        log("\nsweep: ms (peak MiB incl. banks); bank MiB = both banks")
        log(f"{'C':>6s} {'S':>3s} {'bank MiB':>9s}" + "".join(f"{b:>22s}" for b in sb))
        for case in dict.fromkeys(r["case"] for r in sweep):
            C, S = (int(t.split("=")[1]) for t in case.split()[1:3])
            bank = 2 * C * S * sweep_dims(bench)[2] * 4 / MIB
            cells = []
            for b in sb:
                ms = bench.value(case=case, backend=b, metric="ms")
                mem = bench.value(case=case, backend=b, metric="peak_mem_mib")
                cells.append(f"{fmt(ms, 2)} ({fmt(mem, 0)})" if ms is not None else short_status(bench, case=case, backend=b))
            log(f"{C:6d} {S:3d} {bank:9.1f}" + "".join(f"{c:>22s}" for c in cells))
    peers = [r for r in bench.rows if r["mode"] == "peers"]
    if peers:
        log("\npeers:")
        for r in peers:
            if r["unit"] in ("ms", "MiB", "rows/s", "images/s") or r["status"] != "ok":
                log(f"  {r['case']:28s} {r['backend']:28s} {r['metric']:22s} {fmt(r['value'], 3):>10s} {r['unit']:8s} "
                    f"{'' if r['status'] == 'ok' else r['status'][:60]}")
    bad = [r for r in bench.rows if r["status"].startswith("error") or r["status"] in ("mismatch", "oom")]
    skipped = [r for r in bench.rows if r["status"].startswith("skipped")]
    log(f"\n{len(bench.rows)} rows: {len(bad)} error/oom/mismatch, {len(skipped)} skipped")
    for r in bad:
        log(f"  {r['case']} {r['method']} {r['backend']} {r['metric']}: {r['status'][:160]}")


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default="e2e_bench", help="file stem of the results (default e2e_bench)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--e2e", action="store_true", help="run the end-to-end step benchmark")
    p.add_argument("--preset", choices=("imagenet", "cifar", "all"), help="e2e shapes (implies --e2e); "
                   "default: both on CUDA, cifar on CPU")
    p.add_argument("--sweep", action="store_true", help="run the scale sweep")
    p.add_argument("--peers", action="store_true", help="run the peer comparisons")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--backends", default=None, help="comma list of reference,compiled,triton,cpp,auto")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled backend")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset batch size")
    p.add_argument("--steps", type=int, default=None, help="timed steps per e2e row")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per e2e row")
    p.add_argument("--interleave", choices=("auto", "on", "off"), default="auto",
                   help="e2e timing: 'on' times all rows of a preset round-robin (robust to a shared, loaded "
                        "machine), 'off' one row after the other; auto: on for CPU, off for CUDA "
                        "(dry run: imagenet off, cifar on)")
    p.add_argument("--pair-rounds", type=int, default=None,
                   help="sequential mode: KD/ICAKD step pairs timed interleaved for the fastest backend (0: off)")
    p.add_argument("--sweep-classes", default=None, help="comma list of C for the sweep")
    p.add_argument("--sweep-slots", default=None, help="comma list of slots_per_class for the sweep")
    p.add_argument("--profile", action="store_true", help="torch.profiler of KD vs ICAKD steps (fastest backend)")
    p.add_argument("--memory", action="store_true",
                   help="step peak memory of KD vs ICAKD per backend for the --preset shapes (CUDA: what is alive "
                        "at the peak, by allocation site); a mode of its own")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total wall-time budget in seconds (default: 420 on CUDA, 3600 on CPU, none for --dry-run)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: every code path")
    args = p.parse_args(argv)
    args.backends_given = args.backends is not None
    if args.backends is None:
        args.backends = "reference,compiled,triton,cpp,auto"
    if args.no_compile:
        args.backends = ",".join(b for b in args.backends.split(",") if b.strip() != "compiled")
    if args.preset and not args.memory:
        args.e2e = True
    if not (args.e2e or args.sweep or args.peers or args.memory):
        args.e2e = args.sweep = args.peers = True
    return args


def resolve_device(args) -> torch.device:
    if args.dry_run:
        return torch.device("cpu")
    spec = args.device
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = resolve_device(args)
    if args.budget_s is None and not args.dry_run:
        args.budget_s = 420.0 if dev.type == "cuda" else 3600.0
    if dev.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    else:
        torch.backends.cudnn.benchmark = True
    # several compiled loss modules live side by side (the setting was named cache_size_limit before torch 2.7)
    _dyn = torch._dynamo.config
    setattr(_dyn, "recompile_limit" if hasattr(_dyn, "recompile_limit") else "cache_size_limit", 64)
    if dev.type == "cpu":
        torch._inductor.config.compile_threads = 1  # no compile workers competing for the cores
    bench = Bench(args, dev)
    log(json.dumps(bench.env))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    backends = e2e_backends(bench)

    # 0. memory mode
    if args.memory:
        names = {"all": ["imagenet", "cifar"], None: ["imagenet"] if dev.type == "cuda" else ["cifar"]}
        memory_mode(bench, names.get(args.preset, [args.preset]), backends)

    # 1. e2e rows in priority order (compiled rows are deferred to the end: each one compiles)
    deferred = []
    presets = []
    if args.e2e:
        names = {"all": ["imagenet", "cifar"], None: ["imagenet", "cifar"] if dev.type == "cuda" else ["cifar"]}
        names = names.get(args.preset, [args.preset])
        if args.dry_run and args.preset is None:
            names = ["imagenet", "cifar"]
        for name in names:
            p = make_preset(name, dev, args)
            presets.append(p)
            interleave = {"on": True, "off": False}.get(args.interleave, dev.type == "cpu")
            if args.dry_run and args.interleave == "auto":
                interleave = name == "cifar"  # the dry run covers both ways
            log(f"\n== e2e {name}: {p.shape()} ({'interleaved' if interleave else 'sequential'} timing)")
            live: dict = {}
            for prio, method, backend, kind in sorted(e2e_tasks(bench, p, backends, methods), key=lambda t: t[0]):
                base = dict(mode="e2e", case=f"e2e_{name}", preset=name, method=method, backend=backend, shape=p.shape())
                reason = skip_reason(backend, dev, args.dry_run)
                if not reason and args.dry_run:
                    reason = dry_run_skip(f"e2e_{name}", method, backend, name == "imagenet")
                if reason:
                    bench.record(base, "images_per_s", status=f"skipped: {reason}")
                    continue
                run = lambda p=p, m=method, b=backend, t=not interleave: e2e_prepare(bench, p, m, b, t, live)  # noqa: E731
                if prio >= 5 and not interleave:
                    deferred.append((kind, base, run))
                    continue
                default = {"imagenet": 30.0, "cifar": 20.0}[name] if dev.type == "cuda" else 60.0
                bench.run(kind + ("_prepare" if interleave else ""), default, base, run)
            if interleave:
                e2e_interleaved(bench, p, live)
                live.clear()
                free_memory(dev)
            e2e_summary(bench, p)
            best = bench.find(case=f"e2e_{name}", metric="fastest_icakd_backend")
            rounds = args.pair_rounds if args.pair_rounds is not None else (1 if args.dry_run else 8)
            if best and rounds > 0 and "kd" in methods and "icakd" in methods and not interleave:
                b = best[-1]["backend"]
                if b != "compiled":
                    sbase = dict(mode="summary", case=f"e2e_{name}", preset=name, method="icakd vs kd", backend=b,
                                 shape=p.shape())
                    est = 2 * rounds * (bench.value(case=f"e2e_{name}", method="icakd", backend=b, metric="step_ms") or 1e3) / 1e3
                    bench.run(f"pair_{name}", est + 10, sbase, lambda p=p, b=b: pair_overhead(bench, p, b, rounds),
                              metric="icakd_step_time_ratio_vs_kd_interleaved")
            if args.profile and best:
                bench.run(f"profile_{name}", 30.0, dict(mode="profile", case=f"profile_{name}", preset=name),
                          lambda p=p, b=best[-1]["backend"]: profile_pair(bench, p, b), metric="phase_ms_per_step")

    # 2. sweep (fast backends and reference; compiled deferred)
    if args.sweep:
        log("\n== sweep")
        points = sweep_tasks(bench)
        first_point = points[0][1:3] if points else None
        for prio, C, S, b in points:
            B, Ds, Dt = sweep_dims(bench)
            base = dict(mode="sweep", case=f"sweep C={C} S={S}", method="enqueue x2 + centroids + intra + inter fwd+bwd",
                        backend=b, shape=f"C={C} S={S} B={B} Ds={Ds} Dt={Dt}")
            reason = skip_reason(b, dev, args.dry_run)
            if not reason and args.dry_run:
                reason = dry_run_skip("sweep", "", b, (C, S) == first_point)
            if reason:
                bench.record(base, "ms", status=f"skipped: {reason}")
                continue
            run = lambda C=C, S=S, b=b: sweep_point(bench, C, S, b)  # noqa: E731
            if prio >= 5:
                deferred.append(("sweep_compiled", base, run))
            else:
                bench.run(f"sweep_{b}", 5.0 if dev.type == "cuda" else 15.0, base, run, metric="ms")

    # 3. peers
    if args.peers:
        log("\n== peers")
        import peers

        for kind, default, base, fn, metric in peers.tasks(bench, sys.modules[__name__]):
            bench.run(kind, default, base, fn, metric=metric)

    # 4. what pays a compilation
    if deferred:
        log("\n== compiled (torch.compile of the reference)")
    for kind, base, fn in deferred:
        default = 40.0 if kind.startswith("e2e") else 20.0  # one compilation + steps
        if dev.type == "cpu":
            default *= 4
        bench.run(kind, default, base, fn, metric="images_per_s" if kind.startswith("e2e") else "ms")
    for p in presets:
        # re-summarise with the compiled rows (the earlier summary rows are replaced)
        bench.rows = [r for r in bench.rows if not (r["mode"] == "summary" and r["case"] == f"e2e_{p.name}"
                                                    and r["metric"] != "icakd_step_time_ratio_vs_kd_interleaved")]
        e2e_summary(bench, p)
    bench.write()
    print_summary(bench)
    log(f"\nresults -> {os.path.join(args.out, args.name)}.json / .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
