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
import pickle
import platform
import random
import re
import signal
import threading
import time
import warnings
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
from .data import DatasetBundle, EpochBatches, build_datasets, canonical_dataset
from .errors import TrainingDiverged, TrainingStopped, UserError
from .models import build_model, canonical_name
from .progress import progress_bar

__all__ = ["train", "evaluate", "load_weights", "read_checkpoint", "environment_info", "DistInfo", "resolve_device"]

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
        # torchrun keeps its store across restarts (--max-restarts): the keys of each attempt get
        # a prefix of their own, so new workers never read the addresses of the dead ones
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"icakd_attempt_{attempt}", store),
                                rank=rank, world_size=world, **kw)
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
    """The generator states of this process as tensors and plain types (loadable with
    ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(v) for v in internal], "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
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


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; problems raise a one-line UserError.

    Only tensors and plain Python types are unpickled: a file that needs anything else (which
    could run code while loading) is refused, as is a truncated or corrupt one.
    """
    p = Path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = _GLOBAL_RE.search(text)
        if m:
            raise UserError(f"{p}: refused: loading it would unpickle {m.group(1)}, which can run code "
                            f"(checkpoints are read with torch.load(weights_only=True): tensors and plain "
                            f"types only)") from None
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
        raise UserError(f"{p}: cannot read checkpoint: corrupt file or not written by torch.save "
                        f"({_first_line(detail)})") from None
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt files raise many types
        raise UserError(f"{p}: cannot read checkpoint: truncated or corrupt file "
                        f"({exc.__class__.__name__}: {_first_line(str(exc))})") from None


def _first_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def load_weights(model: nn.Module, path: str, arch: str | None = None) -> dict[str, Any]:
    """Load weights into ``model`` from a checkpoint of this trainer or a plain state_dict.

    Returns the checkpoint's metadata (empty for a plain state_dict). ``path == 'torchvision'``
    loads torchvision's default ImageNet weights for ``arch`` (needs internet or a warm cache).
    Every file is read with ``weights_only=True`` (:func:`read_checkpoint`).
    """
    if path == "torchvision":
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(canonical_name(arch or "")).DEFAULT
            sd = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - download / name errors
            raise UserError(f"could not load torchvision weights for {arch}: {_first_line(str(exc))}") from None
        meta = {}
    else:
        p = Path(path)
        if p.is_dir():
            p = p / "best.pt" if (p / "best.pt").is_file() else p / "last.pt"
        if not p.is_file():
            raise UserError(f"checkpoint not found: {path}")
        ckpt = read_checkpoint(p)
        if not isinstance(ckpt, dict):
            raise UserError(f"{p}: not a state_dict or checkpoint")
        meta: dict[str, Any] = {}
        sd = ckpt
        wrapped = [k for k in ("student", "model", "state_dict", "net") if isinstance(ckpt.get(k), dict)]
        if wrapped:
            meta = {k: v for k, v in ckpt.items() if not isinstance(v, dict) or k == "config"}
            sd = ckpt[wrapped[0]]
        if not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise UserError(f"{p}: not a state_dict or checkpoint (values other than tensors)")
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
    batches = EpochBatches(sampler, cfg.batch_size, drop_last=drop_last, limit=cfg.limit_train_batches)
    train_loader = DataLoader(data.train, batch_sampler=batches, generator=gen, **common)
    test = data.test if not di.enabled else Subset(data.test, range(di.rank, len(data.test), di.world))
    test_loader = DataLoader(test, batch_size=cfg.eval_batch_size or max(cfg.batch_size, 128), shuffle=False,
                             **common)
    if len(train_loader) == 0:
        raise UserError(f"the training set of {data.name} is empty")
    return train_loader, test_loader, batches, gen


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
    step: int = 0  # training steps taken (skipped bad steps included)
    batch: int = 0  # batches of epoch ``epoch`` already trained (0 at an epoch boundary)
    best_top1: float = -1.0
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient, all epochs
    bad_streak: int = 0  # consecutive skipped steps up to now
    history: list[dict[str, Any]] = field(default_factory=list)


CKPT_FORMAT = 2


def _save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` atomically: a temporary file, flushed to disk, then renamed over
    ``path``, so a kill during the save leaves the previous file intact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _gather(di: DistInfo, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective under DDP)."""
    if not di.enabled:
        return [obj]
    out: list[Any] = [None] * di.world
    dist.all_gather_object(out, obj)
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``path`` with ``rows`` (atomically); the columns are the union of the rows' keys.
    No rows: no file."""
    if not rows:
        path.unlink(missing_ok=True)
        return
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _fmt_parts(parts: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in parts.items())


class _StopSignals:
    """SIGTERM and SIGINT while training: the first one is remembered and the loop stops after
    the current step, with a checkpoint; a second SIGINT interrupts at once. Installed only in
    the main thread (Python delivers signals there), restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None and dst:
        foreach_copy(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def _grads_finite(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    """A 0-dim bool tensor on ``device``: every gradient of ``params`` is finite (no host sync)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    foreach_norm = getattr(torch, "_foreach_norm", None)
    norms = foreach_norm(grads) if foreach_norm is not None else [torch.linalg.vector_norm(g) for g in grads]
    return torch.stack([n.float() for n in norms]).isfinite().all()


def _refused_rows(loss_module: nn.Module | None) -> int:
    """Rows the loss module's memory banks refused so far (their ``refused`` buffers)."""
    if loss_module is None:
        return 0
    return int(sum(int(b.sum()) for name, b in loss_module.named_buffers() if name.rsplit(".", 1)[-1] == "refused"))


def _resolve_resume(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint ``--resume`` names; None for ``--resume`` alone when --out has none yet."""
    if not cfg.resume:
        return None
    auto = cfg.resume == "auto"
    path = out / "last.pt" if auto else Path(cfg.resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        if auto:
            return None
        raise UserError(f"resume checkpoint not found: {path}")
    return path


def _check_resume(ckpt: Any, path: Path, cfg: TrainConfig) -> None:
    """One clear UserError when ``ckpt`` cannot continue this run's configuration."""
    need = ("student", "optimizer", "scheduler", "epoch", "step", "config")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
        missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
        raise UserError(f"{path}: not a last.pt written by icakd-train (no {', '.join(repr(k) for k in missing)})")
    prev = ckpt["config"] if isinstance(ckpt["config"], dict) else {}

    def differs(what: str, old: Any, new: Any) -> None:
        if old != new:
            raise UserError(f"{path} was saved with {what} {old!r}, this run has {new!r}")

    def name(fn: Callable[[str], str], value: Any) -> Any:
        try:
            return fn(str(value))
        except (KeyError, UserError):
            return value

    differs("student", name(canonical_name, prev.get("student", ckpt.get("arch"))), canonical_name(cfg.student))
    differs("method", prev.get("method"), cfg.method)
    if cfg.method != "ce":
        differs("teacher", name(canonical_name, prev.get("teacher")), canonical_name(cfg.teacher))
    differs("dataset", name(canonical_dataset, prev.get("dataset")), canonical_dataset(cfg.dataset))
    old_loss, new_loss = prev.get("loss") or {}, cfg.loss or {}
    def opt(d: dict[str, Any], key: str) -> str:
        return f"{key}={d[key]!r}" if key in d else f"{key} unset"

    for key in sorted(set(old_loss) | set(new_loss)):
        if (key in old_loss, old_loss.get(key)) != (key in new_loss, new_loss.get(key)):
            raise UserError(f"{path} was saved with loss option {opt(old_loss, key)}, this run has "
                            f"{opt(new_loss, key)}")
    if (ckpt.get("loss_module") is None) != (cfg.method == "ce"):
        raise UserError(f"{path}: its loss module does not match method {cfg.method!r}")


def _check_resume_data(ckpt: dict[str, Any], path: Path, cfg: TrainConfig, num_classes: int, di: DistInfo,
                       steps_per_epoch: int) -> None:
    """One clear UserError when ``ckpt`` does not fit this run's data (class count, data order)."""
    if "num_classes" in ckpt and ckpt["num_classes"] != num_classes:
        raise UserError(f"{path} was saved with {ckpt['num_classes']} classes, this run's dataset has {num_classes}")
    prev = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
    if int(ckpt.get("batch", 0)) > 0:  # saved in the middle of an epoch: the data order must be the same
        here = {"ranks": di.world, "batch-size": cfg.batch_size, "steps per epoch": steps_per_epoch}
        there = {"ranks": ckpt.get("world_size"), "batch-size": prev.get("batch_size"),
                 "steps per epoch": ckpt.get("steps_per_epoch")}
        for key in here:
            if here[key] != there[key]:
                raise UserError(f"{path} was saved in the middle of epoch {int(ckpt['epoch']) + 1} with "
                                f"{key} {there[key]}, this run has {here[key]}: resume it with the same "
                                f"number of processes, --batch-size and --limit-train-batches")


def _load_state(what: str, module_or_opt: Any, sd: Any, path: Path) -> None:
    try:
        module_or_opt.load_state_dict(sd)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        text = str(exc)
        first = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln or "Missing key" in ln
                      or "Unexpected key" in ln), _first_line(text))
        raise UserError(f"{path}: the {what} does not fit this run ({_first_line(first)})") from None


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = None,
          data: DatasetBundle | None = None, desc: str | None = None) -> dict[str, Any]:
    """Train ``cfg.student`` (with ``cfg.method``) and return a summary dict.

    ``data`` may pass pre-built datasets (the demo builds the synthetic set once for all runs).
    Writes ``metrics.csv``, ``last.pt`` and ``best.pt`` into ``cfg.out`` (rank 0).

    SIGTERM or SIGINT stops the run after the current step with a checkpoint in ``last.pt`` and
    raises :class:`TrainingStopped` (its ``summary`` is this dict). :class:`TrainingDiverged` is
    raised after ``cfg.max_bad_steps`` consecutive skipped steps, with nothing written.
    """
    cfg.validate()
    di, device = _setup_distributed(cfg)
    try:
        with _StopSignals() as stop:
            return _train(cfg, di, device, log or print, data, desc, stop)
    finally:
        if di.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, di: DistInfo, device: torch.device, log_fn, data, desc,
           stop: _StopSignals) -> dict[str, Any]:
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
    resume_path = _resolve_resume(cfg, out)
    if cfg.resume == "auto" and resume_path is None:
        log(f"--resume: no checkpoint in {out} yet, starting fresh")
    if cfg.method != "ce" and not cfg.teacher_ckpt:
        raise UserError(f"--method {cfg.method} needs --teacher-ckpt (train a teacher first with "
                        f"--method ce --student {cfg.teacher})")
    if cfg.teacher_ckpt and cfg.teacher_ckpt != "torchvision" and not Path(cfg.teacher_ckpt).exists():
        raise UserError(f"teacher checkpoint not found: {cfg.teacher_ckpt}")
    ckpt = read_checkpoint(resume_path) if resume_path is not None else None
    if ckpt is not None:
        _check_resume(ckpt, resume_path, cfg)

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
        from icakd_fast.methods import build_loss

        opts = dict(cfg.loss)
        if isinstance(opts.get("bank_dtype"), str):
            name = opts["bank_dtype"].replace("torch.", "")
            if not isinstance(getattr(torch, name, None), torch.dtype):
                raise UserError(f"unknown bank_dtype {opts['bank_dtype']!r}")
            opts["bank_dtype"] = getattr(torch, name)
        try:
            loss_module = build_loss(cfg.method, data.num_classes, ds, dt, **opts).to(device)
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
    train_loader, test_loader, batches, loader_gen = _loaders(cfg, data, di, device)
    steps_per_epoch = len(train_loader)
    params = list(student.parameters())
    loss_params = [p for p in loss_module.parameters() if p.requires_grad] if loss_module is not None else []
    optimizer = torch.optim.SGD([{"params": params}, {"params": loss_params}] if loss_params else params,
                                lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov and cfg.momentum > 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    state = _State()
    n_sums = 2 + len(PARTS)  # loss, correct, parts (sums over the images of good steps)
    resumed_sums: list[float] | None = None
    resumed_seen = 0
    resumed_parts: list[str] = []
    epoch_bad = 0

    # --- resume (checked in full before anything is loaded or written)
    if ckpt is not None:
        _check_resume_data(ckpt, resume_path, cfg, data.num_classes, di, steps_per_epoch)
        _load_state("student", student, ckpt["student"], resume_path)
        if loss_module is not None:
            _load_state("loss module", loss_module, ckpt["loss_module"], resume_path)
        _load_state("optimizer state", optimizer, ckpt["optimizer"], resume_path)
        _load_state("scheduler state", scheduler, ckpt["scheduler"], resume_path)
        if ckpt.get("scaler"):
            _load_state("gradient scaler state", scaler, ckpt["scaler"], resume_path)
        state = _State(int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt.get("batch", 0)),
                       float(ckpt.get("best_top1", -1.0)), int(ckpt.get("bad_steps", 0)),
                       int(ckpt.get("bad_streak", 0)), list(ckpt.get("history", [])))
        rng = ckpt.get("rng") or []
        if rng:
            _set_rng_state(rng[di.rank % len(rng)])
        if state.batch:
            progress = ckpt["epoch_progress"][di.rank]
            resumed_sums, resumed_seen = list(progress["sums"]), int(progress["seen"])
            resumed_parts, epoch_bad = list(progress["parts"]), int(progress["bad_steps"])
        where = f", batch {state.batch}/{steps_per_epoch} of epoch {state.epoch + 1}" if state.batch else ""
        log(f"resumed from {resume_path} at epoch {state.epoch}, step {state.step}{where}")
    if di.main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:  # the metrics of the epochs the checkpoint holds, no more
            _write_csv(out / "metrics.csv", state.history)
    ckpt = None

    meter = MemoryMeter(device)
    title = desc or f"{cfg.method} {canonical_name(cfg.student)}"
    log(f"{title}: {data.name} ({len(data.train)} train / {len(data.test)} test, {data.num_classes} classes), "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps, batch {cfg.batch_size}"
        f"{' x ' + str(di.world) + ' ranks' if di.enabled else ''}, device {device}")
    meta = {"arch": canonical_name(cfg.student), "num_classes": data.num_classes, "dataset": data.name,
            "method": cfg.method, "config": cfg.to_dict()}

    def checkpoint(sums: torch.Tensor, seen: int, part_keys: set[str], top1: float | None) -> dict[str, Any] | None:
        """The state to resume from (a collective under DDP; the dict on rank 0, else None)."""
        per_rank = _gather(di, {"rng": _rng_state(),
                                "progress": {"sums": sums.tolist(), "seen": seen, "parts": sorted(part_keys),
                                             "bad_steps": epoch_bad}})
        if not di.main:
            return None
        return {"format": CKPT_FORMAT, "student": student.state_dict(),
                "loss_module": loss_module.state_dict() if loss_module is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": state.epoch, "step": state.step, "batch": state.batch,
                "steps_per_epoch": steps_per_epoch, "world_size": di.world, "best_top1": state.best_top1,
                "bad_steps": state.bad_steps, "bad_streak": state.bad_streak, "history": state.history,
                "rng": [r["rng"] for r in per_rank],
                "epoch_progress": [r["progress"] for r in per_rank] if state.batch else None,
                "top1": top1, **meta}

    # bad steps leave the student's buffers (BatchNorm statistics) as they were before the step
    buffers = list(student.buffers())
    buffers_before = [b.detach().clone() for b in buffers]
    check_grads = cfg.amp != "fp16"  # with fp16 the gradient scaler skips overflowing steps itself
    grad_params = params + loss_params
    train_time = 0.0
    train_images = 0
    last_eval: dict[str, float] = {}
    peak_mib = 0.0
    first_step = True
    stopped: str | None = None
    for epoch in range(state.epoch, cfg.epochs):
        start = state.batch
        batches.set_epoch(epoch, start)
        loader_gen.manual_seed(cfg.seed * 100003 + epoch * 1009 + di.rank)
        student.train()
        sums = torch.zeros(n_sums, dtype=torch.float64, device=device)
        seen = 0
        part_keys: set[str] = set()
        if resumed_sums is not None:
            sums.copy_(torch.tensor(resumed_sums, dtype=torch.float64))
            seen, part_keys = resumed_seen, set(resumed_parts)
            resumed_sums = None
        else:
            epoch_bad = 0
        bar = progress_bar(steps_per_epoch - start, f"{title} epoch {epoch + 1}/{cfg.epochs}", cfg.progress and di.main)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        seen_here = 0
        for i, (x, y) in enumerate(train_loader, start):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            _copy_all(buffers_before, buffers)
            measure = meter.saved_tensor_hooks() if (first_step and not meter.cuda) else nullcontext()
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
            # one small collective and one host synchronisation per step: every rank takes the
            # same decision (skip a bad step; stop after a signal on any rank)
            bad_grad = ~_grads_finite(grad_params, device) if check_grads else torch.zeros((), dtype=torch.bool,
                                                                                            device=device)
            got = [float(stop.signum == signal.SIGTERM), float(stop.signum == signal.SIGINT)]
            flags = torch.cat([torch.stack([(~torch.isfinite(loss.detach().float())).float(), bad_grad.float()]),
                               torch.tensor(got, device=device)])
            if di.enabled:
                dist.all_reduce(flags)
            n_bad_loss, n_bad_grad, n_term, n_int = flags.tolist()
            bad = n_bad_loss > 0 or n_bad_grad > 0
            if bad:
                _copy_all(buffers, buffers_before)
                optimizer.zero_grad(set_to_none=True)
                state.bad_steps += 1
                state.bad_streak += 1
                epoch_bad += 1
                what = (f"non-finite loss on {int(n_bad_loss)} of {di.world} ranks" if di.enabled else
                        "non-finite loss") if n_bad_loss > 0 else "non-finite gradient"
                log(f"step {state.step + 1} (epoch {epoch + 1}, batch {i + 1}/{steps_per_epoch}): {what}, "
                    f"optimiser step skipped ({state.bad_streak} in a row, {state.bad_steps} in all)")
            else:
                scaler.step(optimizer)
                scaler.update()
                state.bad_streak = 0
            if first_step:
                meter.add_static((student, teacher, loss_module), optimizer)
                first_step = False
            with warnings.catch_warnings():  # a skipped first step: the schedule still advances
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                scheduler.step()
            state.step += 1
            state.batch = i + 1
            n = y.numel()
            seen_here += n
            if not bad:
                seen += n
                sums[0] += loss.detach().double() * n
                sums[1] += (logits.detach().argmax(1) == y).sum()
                part_keys.update(parts)
                for j, k in enumerate(PARTS):
                    if k in parts:
                        sums[2 + j] += parts[k].double() * n
            meter.sample()
            bar.update(1)
            if i % 10 == 0 and di.main and cfg.progress and not bad:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
            if cfg.max_bad_steps and state.bad_streak >= cfg.max_bad_steps:
                bar.close()
                last = out / "last.pt"
                saved = _saved_step(last) if di.main else None
                good = state.step - state.bad_streak
                kept = ("no checkpoint was written" if saved is None else
                        f"the last checkpoint, {last} (step {saved}), holds the weights of step {min(saved, good)}")
                raise TrainingDiverged(
                    f"stopped after {state.bad_streak} consecutive steps with a non-finite loss or gradient "
                    f"(steps {state.step - state.bad_streak + 1}-{state.step}, --max-bad-steps "
                    f"{cfg.max_bad_steps}), all skipped; {kept}")
            if n_term or n_int:
                stopped = "SIGTERM" if n_term else "SIGINT"
                break
            if cfg.save_every and state.step % cfg.save_every == 0 and state.batch < steps_per_epoch:
                ck = checkpoint(sums, seen, part_keys, None)
                if di.main:
                    _save(ck, out / "last.pt")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt_epoch = time.perf_counter() - t0
        train_time += dt_epoch
        if stopped is not None:
            ck = checkpoint(sums, seen, part_keys, None)
            if di.main:
                _save(ck, out / "last.pt")
            if di.enabled:
                dist.barrier()
            log(f"{stopped} received: stopped at step {state.step} (epoch {epoch + 1}, batch "
                f"{state.batch}/{steps_per_epoch}); {out / 'last.pt'} holds it, continue with --resume")
            break
        if di.enabled:
            seen_t = torch.tensor([float(seen), float(seen_here)], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            dist.all_reduce(seen_t)
            seen_all, seen_here_all = int(seen_t[0].item()), int(seen_t[1].item())
        else:
            seen_all, seen_here_all = seen, seen_here
        train_images += seen_here_all
        last_eval = evaluate(eval_model, test_loader, device, amp_dtype=amp_dtype, channels_last=cfg.channels_last, di=di)
        state.epoch = epoch + 1
        state.batch = 0
        peak_mib = max(peak_mib, meter.peak_mib())
        avg = (sums / max(seen_all, 1)).tolist()
        parts_avg = {k: avg[2 + j] for j, k in enumerate(PARTS) if k in part_keys}
        row = {"epoch": state.epoch, "step": state.step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": avg[0] if seen_all else float("nan"), "train_top1": 100.0 * avg[1],
               **{f"loss_{k}": parts_avg.get(k, "") for k in PARTS},
               "test_top1": last_eval["top1"], "test_top5": last_eval["top5"], "test_loss": last_eval["loss"],
               "images_per_s": seen_here_all / max(dt_epoch, 1e-9), "epoch_time_s": dt_epoch, "peak_mem_mib": peak_mib,
               "bad_steps": epoch_bad, "refused_rows": _refused_rows(loss_module)}
        state.history.append(row)
        improved = last_eval["top1"] > state.best_top1
        if improved:
            state.best_top1 = last_eval["top1"]
        ck = checkpoint(sums, seen, part_keys, last_eval["top1"])
        if di.main:
            _save(ck, out / "last.pt")
            _append_csv(out / "metrics.csv", row)
            if improved:
                _save({"student": ck["student"], **meta, "epoch": state.epoch, "top1": last_eval["top1"]},
                      out / "best.pt")
        ck = None
        bad_note = f"  {epoch_bad} bad steps skipped" if epoch_bad else ""
        log(f"{title} epoch {state.epoch}/{cfg.epochs}: loss {row['train_loss']:.3f} ({_fmt_parts(parts_avg)}) "
            f"train@1 {row['train_top1']:.1f}  test@1 {last_eval['top1']:.2f} @5 {last_eval['top5']:.2f}  "
            f"lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  {dt_epoch:.1f}s{bad_note}")

    if stopped is not None:  # no time for an evaluation: the scheduler wants the job gone
        last_eval = last_eval or {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    elif not last_eval:  # nothing left to train: evaluate what was loaded
        last_eval = evaluate(eval_model, test_loader, device, amp_dtype=amp_dtype, channels_last=cfg.channels_last, di=di)
    for tap in (s_tap, t_tap):
        if tap is not None:
            tap.remove()
    summary = {
        "method": cfg.method, "student": canonical_name(cfg.student),
        "teacher": canonical_name(cfg.teacher) if cfg.method != "ce" else None,
        "top1": last_eval["top1"], "top5": last_eval["top5"],
        "best_top1": state.best_top1 if math.isnan(last_eval["top1"]) else max(state.best_top1, last_eval["top1"]),
        "epochs": state.epoch, "steps": state.step, "bad_steps": state.bad_steps,
        "refused_rows": _refused_rows(loss_module), "stopped": stopped,
        "images_per_s": train_images / train_time if train_time > 0 else float("nan"),
        "train_time_s": train_time, "peak_mem_mib": peak_mib, "peak_mem_kind": meter.label,
        "rss_growth_mib": meter.rss_growth_mib(),
        "out": str(out), "history": state.history, "world_size": di.world,
        "env": environment_info(device),
    }
    if stopped is not None:
        raise TrainingStopped(f"stopped by {stopped} at step {state.step}", stopped, summary)
    return summary


def _saved_step(path: Path) -> int | None:
    """The ``step`` of the checkpoint at ``path``; None when there is none (or it is unreadable)."""
    if not path.is_file():
        return None
    try:
        return int(read_checkpoint(path)["step"])
    except (UserError, KeyError, TypeError, ValueError):
        return None
