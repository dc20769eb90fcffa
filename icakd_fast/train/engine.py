"""The training engine: models, loss, optimiser, schedule, loops, checkpoints, resume and DDP.

:func:`train` runs one configuration end to end and returns a summary dict. It is what the
``icakd-train`` command calls, and what the demo calls once per method.

Distributed: when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) it initialises
``torch.distributed`` (NCCL on CUDA, gloo on CPU), wraps the student in DDP, shards the data with
a ``DistributedSampler``, all-reduces the loss module's gradients (its projector lives outside
the DDP wrapper), and logs / checkpoints on rank 0 only. The ICAKD memory banks gather every
rank's batch themselves, so each rank holds the same banks.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .config import TrainConfig
from .data import DatasetBundle, build_datasets, canonical_dataset
from .errors import UserError
from .models import build_model, canonical_name
from .progress import progress_bar

__all__ = ["train", "evaluate", "load_weights", "environment_info", "DistInfo", "resolve_device"]

PARTS = ("ce", "kd", "cam", "intra", "inter")


# ----------------------------------------------------------------------------- environment

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise UserError(f"unsupported device {spec!r}")
    return dev


def _setup_distributed(cfg: TrainConfig) -> tuple[DistInfo, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(cfg.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local_rank)
    initialised_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kw)
        initialised_here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, initialised_here), device


def environment_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["versions"]["cuda"] = torch.version.cuda
    try:
        import torchvision

        info["versions"]["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import icakd_fast

        info["versions"]["icakd_fast"] = getattr(icakd_fast, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        pass
    return info


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):  # different number of GPUs: keep the fresh state
            pass


class MemoryMeter:
    """Peak memory of a run.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (PyTorch keeps no CPU allocator statistics):
    an estimate -- parameters, gradients, optimiser state and buffers (memory banks included) of
    every model in the run, plus the bytes the autograd graph saves for backward in one training
    step (measured with saved-tensor hooks on the first step). The growth of the resident set
    size (RSS, sampled from /proc/self/statm every step) is kept too, as ``rss_growth_mib``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._statm = Path("/proc/self/statm")
        self.base = self.peak = 0
        self.static_bytes = 0
        self.saved_bytes = 0
        self.label = ("CUDA: torch.cuda.max_memory_allocated" if self.cuda else
                      "CPU: estimate = weights + gradients + optimiser state + buffers + activations saved for backward")
        self.reset()

    def _rss(self) -> int:
        try:
            return int(self._statm.read_text().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.base = self.peak = self._rss()

    def sample(self) -> None:
        self.peak = max(self.peak, self._rss())

    def add_static(self, modules, optimizer) -> None:
        seen: set[int] = set()
        total = 0

        def add(t):
            nonlocal total
            if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
                return
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()

        for m in modules:
            if m is None:
                continue
            for p in m.parameters():
                add(p)
                if p.requires_grad:
                    total += p.numel() * p.element_size()  # its gradient
            for b in m.buffers():
                add(b)
        for st in optimizer.state.values():
            for v in st.values():
                add(v)
        self.static_bytes = total

    def saved_tensor_hooks(self):
        """Context manager counting the distinct storages autograd saves for backward."""
        seen: set[int] = set()

        def pack(t):
            try:
                st = t.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    self.saved_bytes += st.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def rss_growth_mib(self) -> float:
        return max(self.peak - self.base, 0) / 2**20

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return (self.static_bytes + self.saved_bytes) / 2**20


# ----------------------------------------------------------------------------- models

def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod."):
            while k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def load_weights(model: nn.Module, path: str, arch: str | None = None) -> dict[str, Any]:
    """Load weights into ``model`` from a checkpoint of this trainer or a plain state_dict.

    Returns the checkpoint's metadata (empty for a plain state_dict). ``path == 'torchvision'``
    loads torchvision's default ImageNet weights for ``arch`` (needs internet or a warm cache).
    """
    if path == "torchvision":
        import torchvision

        try:
            ref = torchvision.models.get_model(canonical_name(arch or ""), weights="DEFAULT")
        except Exception as exc:  # noqa: BLE001 - download / name errors
            raise UserError(f"could not load torchvision weights for {arch}: {exc}") from exc
        sd, meta = ref.state_dict(), {}
    else:
        p = Path(path)
        if p.is_dir():
            p = p / "best.pt" if (p / "best.pt").is_file() else p / "last.pt"
        if not p.is_file():
            raise UserError(f"checkpoint not found: {path}")
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
            raise UserError(f"{p}: cannot read checkpoint ({exc.__class__.__name__})") from exc
        meta = {}
        if isinstance(ckpt, dict) and any(k in ckpt for k in ("student", "model", "state_dict", "net")):
            meta = {k: v for k, v in ckpt.items() if not isinstance(v, dict) or k == "config"}
            for k in ("student", "model", "state_dict", "net"):
                if k in ckpt and isinstance(ckpt[k], dict):
                    sd = ckpt[k]
                    break
        elif isinstance(ckpt, dict):
            sd = ckpt
        else:
            raise UserError(f"{p}: not a state_dict or checkpoint")
        if meta.get("arch") and arch and canonical_name(str(meta["arch"])) != canonical_name(arch):
            raise UserError(f"{p} holds a {meta['arch']}, not a {arch}")
    sd = _strip_prefixes(sd)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise UserError(f"{path}: weights do not fit {arch or 'the model'} ({first})") from None
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{path}: weights do not fit {arch or 'the model'} ({what})")
    return meta


def _build(name: str, num_classes: int) -> nn.Module:
    try:
        return build_model(name, num_classes)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None


def _feature_tap(model: nn.Module):
    from icakd_fast.hooks import FeatureTap

    try:
        return FeatureTap(model)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"cannot find the feature map / classifier of {model.__class__.__name__}: {exc}") from exc


@torch.no_grad()
def _probe_dims(model: nn.Module, tap, image_size: int, device: torch.device) -> int:
    was = model.training
    model.eval()
    model(torch.zeros(2, 3, image_size, image_size, device=device))
    model.train(was)
    return int(tap.features.shape[1])


# ----------------------------------------------------------------------------- schedule

def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = float(cfg.epochs)
    milestones = cfg.milestones
    if milestones is None:
        milestones = [round(total * f) for f in (150 / 240, 180 / 240, 210 / 240)]
    warm = float(cfg.warmup_epochs)

    def fn(step: int) -> float:
        e = step / steps_per_epoch
        if warm > 0 and e < warm:
            return (step + 1) / (warm * steps_per_epoch)
        if cfg.schedule == "cosine":
            t = min(max(e - warm, 0.0) / max(total - warm, 1e-9), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return cfg.gamma ** sum(e >= m for m in milestones)

    return fn


# ----------------------------------------------------------------------------- loaders

def _loaders(cfg: TrainConfig, data: DatasetBundle, di: DistInfo, device: torch.device):
    workers = cfg.workers
    if workers is None:
        workers = 0 if data.name == "synthetic" else min(8, os.cpu_count() or 1)
    sampler = DistributedSampler(data.train, num_replicas=di.world, rank=di.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    per_rank = len(sampler)
    drop_last = per_rank >= cfg.batch_size * 2
    gen = torch.Generator()
    common = dict(num_workers=workers, pin_memory=device.type == "cuda")
    if workers > 0:
        common["prefetch_factor"] = 4
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last,
                              generator=gen, **common)
    test = data.test if not di.enabled else Subset(data.test, range(di.rank, len(data.test), di.world))
    test_loader = DataLoader(test, batch_size=cfg.eval_batch_size or max(cfg.batch_size, 128), shuffle=False,
                             **common)
    if len(train_loader) == 0:
        raise UserError(f"the training set of {data.name} is empty")
    return train_loader, test_loader, sampler, gen


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp_dtype=None, channels_last: bool = False,
             di: DistInfo | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader``."""
    was = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, n
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        stats[0] += hit[:, 0].sum()
        stats[1] += hit.any(dim=1).sum()
        stats[2] += F.cross_entropy(logits, y, reduction="sum")
        stats[3] += y.numel()
    if di is not None and di.enabled:
        dist.all_reduce(stats)
    model.train(was)
    n = max(stats[3].item(), 1.0)
    return {"top1": 100.0 * stats[0].item() / n, "top5": 100.0 * stats[1].item() / n, "loss": stats[2].item() / n}


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- training

@dataclass
class _State:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _gather_rng(di: DistInfo) -> list[dict[str, Any]]:
    state = _rng_state()
    if not di.enabled:
        return [state]
    out: list[Any] = [None] * di.world
    dist.all_gather_object(out, state)
    return out


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _fmt_parts(parts: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in parts.items())


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = None,
          data: DatasetBundle | None = None, desc: str | None = None) -> dict[str, Any]:
    """Train ``cfg.student`` (with ``cfg.method``) and return a summary dict.

    ``data`` may pass pre-built datasets (the demo builds the synthetic set once for all runs).
    Writes ``metrics.csv``, ``last.pt`` and ``best.pt`` into ``cfg.out`` (rank 0).
    """
    cfg.validate()
    di, device = _setup_distributed(cfg)
    try:
        return _train(cfg, di, device, log or print, data, desc)
    finally:
        if di.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, di: DistInfo, device: torch.device, log_fn, data, desc) -> dict[str, Any]:
    def log(msg: str) -> None:
        if di.main:
            log_fn(msg)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    canonical_dataset(cfg.dataset)
    for arch in (cfg.student,) + ((cfg.teacher,) if cfg.method != "ce" else ()):
        try:
            canonical_name(arch)
        except KeyError as exc:
            raise UserError(exc.args[0]) from None
    out = Path(cfg.out)
    resume_path = None
    if cfg.resume:
        resume_path = out / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
        if resume_path.is_dir():
            resume_path = resume_path / "last.pt"
        if not resume_path.is_file():
            raise UserError(f"resume checkpoint not found: {resume_path}")
    if cfg.method != "ce" and not cfg.teacher_ckpt:
        raise UserError(f"--method {cfg.method} needs --teacher-ckpt (train a teacher first with "
                        f"--method ce --student {cfg.teacher})")
    if cfg.teacher_ckpt and cfg.teacher_ckpt != "torchvision" and not Path(cfg.teacher_ckpt).exists():
        raise UserError(f"teacher checkpoint not found: {cfg.teacher_ckpt}")

    seed_everything(cfg.seed)
    if data is None:
        def _data(download: bool) -> DatasetBundle:
            return build_datasets(cfg.dataset, cfg.data_dir, download=download, seed=cfg.seed,
                                  synthetic=cfg.synthetic, image_size=cfg.image_size)

        if di.enabled and cfg.download:  # rank 0 downloads, the others wait and then read
            data = _data(True) if di.main else None
            dist.barrier()
            if data is None:
                data = _data(False)
        else:
            data = _data(cfg.download)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    mem_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    # --- models
    seed_everything(cfg.seed)
    student = _build(cfg.student, data.num_classes).to(device, memory_format=mem_format)
    teacher = s_tap = t_tap = None
    loss_module = None
    if cfg.method != "ce":
        teacher = _build(cfg.teacher, data.num_classes)
        load_weights(teacher, cfg.teacher_ckpt, cfg.teacher)
        teacher = teacher.to(device, memory_format=mem_format).eval().requires_grad_(False)
        t_tap = _feature_tap(teacher)
        s_tap = _feature_tap(student)
        ds = _probe_dims(student, s_tap, data.image_size, device)
        dt = _probe_dims(teacher, t_tap, data.image_size, device)
        from icakd_fast import ICAKDLoss

        opts = dict(cfg.loss)
        if isinstance(opts.get("bank_dtype"), str):
            name = opts["bank_dtype"].replace("torch.", "")
            if not isinstance(getattr(torch, name, None), torch.dtype):
                raise UserError(f"unknown bank_dtype {opts['bank_dtype']!r}")
            opts["bank_dtype"] = getattr(torch, name)
        try:
            loss_module = ICAKDLoss(data.num_classes, ds, dt, method=cfg.method, **opts).to(device)
        except (TypeError, ValueError) as exc:
            raise UserError(f"bad loss option: {exc}") from None
    model = student
    if di.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(model) if cfg.compile else model
    # evaluation runs on each rank's own shard: no DDP collectives there
    eval_model = student if di.enabled else fwd

    # --- data, optimiser, schedule
    train_loader, test_loader, sampler, loader_gen = _loaders(cfg, data, di, device)
    steps_per_epoch = len(train_loader)
    if cfg.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.limit_train_batches)
    params = list(student.parameters())
    loss_params = [p for p in loss_module.parameters() if p.requires_grad] if loss_module is not None else []
    optimizer = torch.optim.SGD([{"params": params}, {"params": loss_params}] if loss_params else params,
                                lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov and cfg.momentum > 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    state = _State()

    # --- resume
    if resume_path is not None:
        try:
            ckpt = torch.load(resume_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
            raise UserError(f"{resume_path}: cannot read checkpoint ({exc.__class__.__name__})") from None
        if not isinstance(ckpt, dict) or "student" not in ckpt or "optimizer" not in ckpt:
            raise UserError(f"{resume_path}: not a last.pt written by icakd-train")
        prev = ckpt.get("config", {})
        for key in ("student", "method", "dataset"):
            if key in prev and prev[key] != getattr(cfg, key):
                raise UserError(f"{resume_path} was trained with {key}={prev[key]!r}, not {getattr(cfg, key)!r}")
        student.load_state_dict(ckpt["student"])
        if loss_module is not None and ckpt.get("loss_module"):
            loss_module.load_state_dict(ckpt["loss_module"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state = _State(ckpt["epoch"], ckpt["step"], ckpt.get("best_top1", -1.0), list(ckpt.get("history", [])))
        rng = ckpt.get("rng") or []
        if rng:
            _set_rng_state(rng[di.rank % len(rng)])
        log(f"resumed from {resume_path} at epoch {state.epoch}, step {state.step}")
    if di.main:
        out.mkdir(parents=True, exist_ok=True)

    meter = MemoryMeter(device)
    title = desc or f"{cfg.method} {canonical_name(cfg.student)}"
    log(f"{title}: {data.name} ({len(data.train)} train / {len(data.test)} test, {data.num_classes} classes), "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps, batch {cfg.batch_size}"
        f"{' x ' + str(di.world) + ' ranks' if di.enabled else ''}, device {device}")
    train_time = 0.0
    train_images = 0
    last_eval: dict[str, float] = {}
    peak_mib = 0.0
    first_epoch = state.epoch
    for epoch in range(state.epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        loader_gen.manual_seed(cfg.seed * 100003 + epoch * 1009 + di.rank)
        student.train()
        sums = torch.zeros(2 + len(PARTS), dtype=torch.float64, device=device)  # loss, correct, parts
        seen = 0
        part_keys: set[str] = set()
        bar = progress_bar(steps_per_epoch, f"{title} epoch {epoch + 1}/{cfg.epochs}", cfg.progress and di.main)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            measure = meter.saved_tensor_hooks() if (i == 0 and epoch == first_epoch and not meter.cuda) \
                else nullcontext()
            with measure:
                with _autocast(device, amp_dtype):
                    logits = fwd(x)
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(x)
                # the losses run outside autocast: they take low-precision activations as they
                # are and accumulate in float32 themselves
                if loss_module is None:
                    loss = F.cross_entropy(logits.float(), y)
                    parts = {"ce": loss.detach()}
                else:
                    res = loss_module(s_tap.features, logits, t_tap.features, t_logits, y,
                                      s_tap.fc_weight, t_tap.fc_weight)
                    loss, parts = res.loss, res.parts
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if di.enabled and loss_params:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in loss_params]
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat)
                flat /= di.world
                off = 0
                for p in loss_params:
                    p.grad = flat[off:off + p.numel()].view_as(p).clone()
                    off += p.numel()
            scaler.step(optimizer)
            scaler.update()
            if i == 0 and epoch == first_epoch:
                meter.add_static((student, teacher, loss_module), optimizer)
            scheduler.step()
            state.step += 1
            n = y.numel()
            seen += n
            sums[0] += loss.detach().double() * n
            sums[1] += (logits.detach().argmax(1) == y).sum()
            part_keys.update(parts)
            for j, k in enumerate(PARTS):
                if k in parts:
                    sums[2 + j] += parts[k].double() * n
            meter.sample()
            bar.update(1)
            if i % 10 == 0 and di.main and cfg.progress:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt_epoch = time.perf_counter() - t0
        if di.enabled:
            seen_t = torch.tensor([float(seen)], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            dist.all_reduce(seen_t)
            seen_all = int(seen_t.item())
        else:
            seen_all = seen
        train_time += dt_epoch
        train_images += seen_all
        last_eval = evaluate(eval_model, test_loader, device, amp_dtype=amp_dtype, channels_last=cfg.channels_last, di=di)
        state.epoch = epoch + 1
        peak_mib = max(peak_mib, meter.peak_mib())
        avg = (sums / max(seen_all, 1)).tolist()
        parts_avg = {k: avg[2 + j] for j, k in enumerate(PARTS) if k in part_keys}
        row = {"epoch": state.epoch, "step": state.step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": avg[0], "train_top1": 100.0 * avg[1],
               **{f"loss_{k}": parts_avg.get(k, "") for k in PARTS},
               "test_top1": last_eval["top1"], "test_top5": last_eval["top5"], "test_loss": last_eval["loss"],
               "images_per_s": seen_all / max(dt_epoch, 1e-9), "epoch_time_s": dt_epoch, "peak_mem_mib": peak_mib}
        state.history.append(row)
        improved = last_eval["top1"] > state.best_top1
        if improved:
            state.best_top1 = last_eval["top1"]
        rng = _gather_rng(di)
        if di.main:
            _append_csv(out / "metrics.csv", row)
            meta = {"arch": canonical_name(cfg.student), "num_classes": data.num_classes, "dataset": data.name,
                    "method": cfg.method, "epoch": state.epoch, "top1": last_eval["top1"],
                    "config": cfg.to_dict()}
            _save({"student": student.state_dict(),
                   "loss_module": loss_module.state_dict() if loss_module is not None else None,
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "step": state.step, "best_top1": state.best_top1,
                   "history": state.history, "rng": rng, **meta}, out / "last.pt")
            if improved:
                _save({"student": student.state_dict(), **meta}, out / "best.pt")
        log(f"{title} epoch {state.epoch}/{cfg.epochs}: loss {avg[0]:.3f} ({_fmt_parts(parts_avg)}) "
            f"train@1 {row['train_top1']:.1f}  test@1 {last_eval['top1']:.2f} @5 {last_eval['top5']:.2f}  "
            f"lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  {dt_epoch:.1f}s")

    if not last_eval:  # nothing left to train: evaluate what was loaded
        last_eval = evaluate(eval_model, test_loader, device, amp_dtype=amp_dtype, channels_last=cfg.channels_last, di=di)
    for tap in (s_tap, t_tap):
        if tap is not None:
            tap.remove()
    return {
        "method": cfg.method, "student": canonical_name(cfg.student),
        "teacher": canonical_name(cfg.teacher) if cfg.method != "ce" else None,
        "top1": last_eval["top1"], "top5": last_eval["top5"], "best_top1": max(state.best_top1, last_eval["top1"]),
        "epochs": state.epoch, "steps": state.step,
        "images_per_s": train_images / train_time if train_time > 0 else float("nan"),
        "train_time_s": train_time, "peak_mem_mib": peak_mib, "peak_mem_kind": meter.label,
        "rss_growth_mib": meter.rss_growth_mib(),
        "out": str(out), "history": state.history, "world_size": di.world,
        "env": environment_info(device),
    }
