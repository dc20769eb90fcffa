"""Incremental memory banks of (detached) features, per class (ring buffers) or FIFO.

Both banks keep all state in registered buffers (saved by ``state_dict``, moved by ``.to()``),
never synchronise with the host in ``enqueue`` (single process), validate every argument before
writing anything, and under ``torch.distributed`` (world size > 1) all-gather the batch from every
rank in rank order first, so that every rank holds an identical bank.

A row with any non-finite value (or one that overflows the storage dtype) is never stored: it is
treated as masked, the other rows of the batch are stored as usual, and the bank counts it in its
``refused`` buffer (int64, 0-dim). The check runs on the device, with no host synchronisation,
before any backend sees the rows, so nothing a bank keeps (rows, sums, counts, pointers) can
turn NaN.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from . import _validate as V
from ._backend import cached, resolve
from .functional import class_centroids
from .ops import bank as bank_ops

__all__ = ["ClassMemoryBank", "FIFOMemoryBank", "all_gather_rows", "enqueue_banks", "is_distributed"]

_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


#: unique content stamps (a counter never repeats, so an old stamp never matches a new state)
_STAMPS = itertools.count(1)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def all_gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of ``tensors`` (all with the same number of rows, any dtypes), each
    concatenated in rank order; batch sizes may differ between ranks. Detached: no gradient
    flows back to another rank. A collective: every rank must call it.

    Exchanging the batch sizes is its one host synchronisation.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    first = tensors[0]
    n_local = torch.tensor([first.shape[0]], dtype=torch.int64, device=first.device)
    sizes = [torch.zeros_like(n_local) for _ in range(world)]
    dist.all_gather(sizes, n_local)
    sizes = [int(s.item()) for s in sizes]
    n_max = max(sizes)

    def gather(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        wire = t.to(torch.uint8) if t.dtype == torch.bool else t
        pad = torch.zeros((n_max - wire.shape[0],) + tuple(wire.shape[1:]), dtype=wire.dtype, device=wire.device)
        padded = torch.cat([wire, pad]).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out = torch.cat([p[:n] for p, n in zip(parts, sizes)])
        return out.bool() if t.dtype == torch.bool else out

    return tuple(gather(t) for t in tensors)


def is_distributed() -> bool:
    """A ``torch.distributed`` process group with more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.library.custom_op("icakd_fast::bank_snapshot", mutates_args=())
def _bank_snapshot(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of a bank's ``(sums, counts)``, as an opaque op.

    Under ``torch.compile`` a loss that reads the bank and an ``enqueue`` that mutates it can land
    in one graph. AOTAutograd's min-cut partitioner may then recompute a cheap read of a buffer
    (say ``(sums + batch) / total``) in the backward instead of saving it, so the backward sees the
    post-enqueue contents and the gradients are silently wrong (torch <= 2.14). A custom op is never
    recomputed, so reads through this snapshot are saved as they were at read time.
    """
    return sums.clone(), counts.clone()


@_bank_snapshot.register_fake
def _(sums, counts):
    return torch.empty_like(sums), torch.empty_like(counts)


def _snapshot_if_compiling(sums: torch.Tensor, counts: torch.Tensor):
    if torch.compiler.is_compiling():
        return _bank_snapshot(sums, counts)
    return sums, counts


@torch.no_grad()
def enqueue_banks(banks, feats, labels: torch.Tensor, masks=None, *, check: bool = True, before_write=None):
    """``bank.enqueue`` of several banks whose rows share ``labels`` (the student's and the
    teacher's banks of one step): ``feats[i]`` and ``masks[i]`` (None: every row) go to
    ``banks[i]``. Under ``torch.distributed`` every rank's rows of all banks are gathered in one
    exchange. Banks of one layout, device and backend take one update op together where the
    backend has it. ``check`` and ``before_write`` as in ``enqueue``."""
    n = len(banks)
    feats = list(feats)
    masks = [None] * n if masks is None else list(masks)
    if len(feats) != n or len(masks) != n:
        raise ValueError(f"feats and masks must hold one entry per bank ({n}), got {len(feats)} and {len(masks)}")
    if check:
        for i, bank in enumerate(banks):
            feats[i], _, masks[i] = bank._check_enqueue(feats[i], labels, masks[i])
    labels = labels.long()
    if is_distributed():
        masks = [torch.ones(f.shape[0], dtype=torch.bool, device=f.device) if m is None else m
                 for f, m in zip(feats, masks)]
        rows = all_gather_rows(*feats, labels, *masks)
        feats, labels, masks = list(rows[:n]), rows[n], list(rows[n + 1:])
    result = before_write(labels) if before_write is not None else None
    key = banks[0]._joint_key() if n > 1 else None
    if key is not None and all(bank._joint_key() == key for bank in banks[1:]):
        banks[0]._update_joint(key[0], banks, feats, labels, masks)
    else:
        for bank, f, m in zip(banks, feats, masks):
            bank._update(f, labels, m)
    for bank in banks:
        bank._renew_stamp()
    return result


def _buffer_lists(banks, *names: str) -> list[list[torch.Tensor]]:
    """One list per buffer name, holding that buffer of every bank (read from each module's
    buffer table, which skips ``nn.Module.__getattr__``)."""
    tables = [bank._buffers for bank in banks]
    return [[table[name] for table in tables] for name in names]


class _Stamp:
    """A bank's content stamp, renewed by every change made through the bank's methods (a plain
    object: ``torch.compile`` sets it without guarding on its value). ``None`` after a change
    made under ``torch.compile``: unknown, matches nothing."""

    def __init__(self):
        self.value: int | None = next(_STAMPS)


class _BankBase(nn.Module):
    num_classes: int
    dim: int

    def _renew_stamp(self) -> None:
        """Mark the contents as changed (caches built from them, e.g. ``ICAKDLoss``'s inter-loss
        Gram matrix, are then rebuilt)."""
        self._stamp.value = None if torch.compiler.is_compiling() else next(_STAMPS)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "refused"
        if key not in state_dict:
            # saved before banks counted refused rows: none counted
            if key in missing_keys:
                missing_keys.remove(key)
            self.refused.zero_()
        self._renew_stamp()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._renew_stamp()
        return out

    def _check_enqueue(self, feats, labels, mask):
        V.floating("feats", feats, 2)
        V.integer("labels", labels, 1)
        device = self.bank.device
        if feats.device != device:
            raise ValueError(f"feats is on {feats.device} but the bank is on {device}; move one of them")
        if labels.device != device:
            raise ValueError(f"labels is on {labels.device} but the bank is on {device}; move one of them")
        if feats.shape[1] != self.dim:
            raise ValueError(f"feats must be [N, {self.dim}] for this bank, got {tuple(feats.shape)}")
        V.length("labels", labels, feats.shape[0], "feats")
        if mask is not None:
            V.boolean("mask", mask, 1)
            if mask.device != device:
                raise ValueError(f"mask is on {mask.device} but the bank is on {device}; move one of them")
            V.length("mask", mask, feats.shape[0], "feats")
        V.label_range("labels", labels, self.num_classes, mask)
        return feats, labels, mask

    @property
    def stamp(self) -> int | None:
        """The contents' stamp: renewed by every change made through the bank's methods,
        ``load_state_dict`` and ``.to()``, so a cache built from the contents (e.g. ``ICAKDLoss``'s
        inter-loss Gram matrix) knows when to rebuild. ``None`` after a change made under
        ``torch.compile``: unknown, equal to no stamp."""
        return self._stamp.value

    @torch.no_grad()
    def enqueue(self, feats: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
                check: bool = True, before_write=None):
        """Store detached ``feats`` [N,D] under ``labels`` [N]; rows with ``mask`` False are skipped.

        Rows with a non-finite value (in ``feats`` or once cast to the storage dtype) are skipped
        too, and each such row that ``mask`` offered adds one to ``refused``. Under
        ``torch.distributed`` every rank's rows are gathered first (every rank must call it).

        ``check=False``: skip the argument checks (callers that validated them already).
        ``before_write`` (optional): called with the int64 labels of every rank once they are
        gathered, before anything is written; its result is returned (``ICAKDLoss`` reads the bank
        rows the update will change with it)."""
        return enqueue_banks([self], [feats], labels, [mask], check=check, before_write=before_write)

    def _update(self, feats, labels, mask):
        raise NotImplementedError

    def _joint_key(self):
        """Banks with equal keys take one update op together (None: never joined); the key's
        first item is the backend that runs it."""
        return None

    @staticmethod
    def _update_joint(backend, banks, feats, labels, masks):
        raise NotImplementedError

    def _backend_of(self, op: str) -> tuple[str, bool]:
        """``(backend, fused update available)`` for ``op`` on the bank's device, resolved once per
        device and ``backend`` setting (``ICAKD_BACKEND`` is read then)."""
        device = self.bank.device

        def make():
            name = resolve(self.backend, op, self.bank)
            return name, bank_ops.fused_update(name, device)

        return cached(self._resolved, (op, device, self.backend), make)

    def _impl(self, op: str):
        """The module implementing ``op`` for this bank's backend and device."""
        return bank_ops.impl_of(self._backend_of(op)[0])

    def centroids(self, feats: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Class centroids over the bank plus (optionally) a live batch -> ``(centroids [C,D], counts [C])``."""
        sums, counts = self.sums_counts()
        if (feats is None) != (labels is None):
            raise ValueError("feats and labels must be given together")
        if feats is None:
            feats = torch.zeros(0, self.dim, dtype=sums.dtype, device=sums.device)
            labels = torch.zeros(0, dtype=torch.int64, device=sums.device)
        return class_centroids(sums, counts, feats, labels, backend=self.backend)


class ClassMemoryBank(_BankBase):
    """Per-class ring buffer: ``bank`` [C,S,D] in a storage dtype, ``count``/``ptr`` [C] int64 and
    float32 running ``sums`` [C,D].

    ``enqueue`` writes each class's rows (the last ``S`` if more) to consecutive slots after the
    class pointer and updates ``sums`` incrementally (``+= stored_new - stored_old``), O(B*D).
    To bound float drift, sums are recomputed exactly from the stored rows on a rotating schedule:
    each enqueue resyncs ``ceil(C / resync_every)`` classes, so every class is recomputed at least
    once every ``resync_every`` enqueues with a fixed, small cost per step and no data-dependent
    branch (``resync_every=0`` turns it off; ``resync()`` recomputes everything now).

    ``refused`` (int64, 0-dim buffer): how many rows ``enqueue`` refused because they held a
    non-finite value, in the input or in the storage dtype (they are never stored); checkpointed,
    cleared by ``reset()``.
    """

    def __init__(
        self,
        num_classes: int,
        slots_per_class: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        resync_every: int = 1000,
        backend: str | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self._stamp = _Stamp()
        self._resolved: dict = {}
        self.num_classes = _positive_int("num_classes", num_classes)
        self.slots_per_class = _positive_int("slots_per_class", slots_per_class)
        self.dim = _positive_int("dim", dim)
        if dtype not in _STORAGE_DTYPES:
            raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        if isinstance(resync_every, bool) or not isinstance(resync_every, int) or resync_every < 0:
            raise ValueError(f"resync_every must be an int >= 0, got {resync_every!r}")
        self.resync_every = resync_every
        self.backend = backend
        self.register_buffer("bank", torch.zeros(num_classes, slots_per_class, dim, dtype=dtype, device=device))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.int64, device=device))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.int64, device=device))
        self.register_buffer("sums", torch.zeros(num_classes, dim, dtype=torch.float32, device=device))
        self.register_buffer("resync_pos", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("refused", torch.zeros((), dtype=torch.int64, device=device))
        chunk = math.ceil(num_classes / resync_every) if resync_every else 0
        self.register_buffer("_resync_offsets", torch.arange(chunk, dtype=torch.int64, device=device), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, slots_per_class={self.slots_per_class}, dim={self.dim}, "
            f"dtype={self.bank.dtype}, resync_every={self.resync_every}"
        )

    def next_resync_classes(self) -> torch.Tensor:
        """The classes the next enqueue resyncs (int64, possibly empty)."""
        return (self.resync_pos + self._resync_offsets).remainder(self.num_classes)

    def _update(self, feats, labels, mask):
        name, fused = self._backend_of("class_bank")
        bank_ops.class_bank_update_(name, fused, self.bank, self.count, self.ptr, self.sums, self.resync_pos,
                                    self.refused, feats, labels, mask, self._resync_offsets)

    def _joint_key(self):
        name, fused = self._backend_of("class_bank")
        if not fused:
            return None
        return name, ClassMemoryBank, self.bank.device, self.num_classes, self._resync_offsets.shape[0]

    @staticmethod
    def _update_joint(backend, banks, feats, labels, masks):
        state = _buffer_lists(banks, "bank", "count", "ptr", "sums", "resync_pos", "refused")
        bank_ops.class_banks_update_(backend, True, *state, feats, labels, masks, banks[0]._resync_offsets)

    @torch.no_grad()
    def resync(self) -> None:
        """Recompute every class's float32 sum exactly from the stored rows."""
        classes = torch.arange(self.num_classes, device=self.bank.device)
        self._impl("class_bank").class_bank_resync_(self.bank, self.count, self.sums, classes)
        self._renew_stamp()

    def sums_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sums float32 [C,D], counts int64 [C])`` of the stored rows (previous batches only).

        Eager mode returns the buffers themselves; under ``torch.compile`` it returns copies, so
        that a later ``enqueue`` in the same compiled region cannot change what a backward reads.
        """
        return _snapshot_if_compiling(self.sums, self.count)

    @torch.no_grad()
    def reset(self) -> None:
        for buf in (self.bank, self.count, self.ptr, self.sums, self.resync_pos, self.refused):
            buf.zero_()
        self._renew_stamp()


class FIFOMemoryBank(_BankBase):
    """One ring buffer of ``size`` rows for all classes: ``bank`` [N,D], ``labels`` [N] (-1 =
    empty), ``ptr`` (0-dim). Per-class sums and counts come from a segment sum over the stored
    labels (O(N*D) per call).

    ``refused`` (int64, 0-dim buffer): how many rows ``enqueue`` refused because they held a
    non-finite value, in the input or in the storage dtype (they are never stored); checkpointed,
    cleared by ``reset()``."""

    def __init__(
        self,
        size: int,
        dim: int,
        num_classes: int,
        *,
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self._stamp = _Stamp()
        self._resolved: dict = {}
        self.size = _positive_int("size", size)
        self.dim = _positive_int("dim", dim)
        self.num_classes = _positive_int("num_classes", num_classes)
        if dtype not in _STORAGE_DTYPES:
            raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        self.backend = backend
        self.register_buffer("bank", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.int64, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("refused", torch.zeros((), dtype=torch.int64, device=device))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, num_classes={self.num_classes}, dtype={self.bank.dtype}"

    def _update(self, feats, labels, mask):
        name, fused = self._backend_of("fifo_bank")
        bank_ops.fifo_bank_update_(name, fused, self.bank, self.labels, self.ptr, self.refused, feats, labels, mask)

    def _joint_key(self):
        name, fused = self._backend_of("fifo_bank")
        return (name, FIFOMemoryBank, self.bank.device, self.num_classes) if fused else None

    @staticmethod
    def _update_joint(backend, banks, feats, labels, masks):
        state = _buffer_lists(banks, "bank", "labels", "ptr", "refused")
        bank_ops.fifo_banks_update_(backend, True, *state, feats, labels, masks)

    def sums_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        # new tensors made by a segment sum (index_add or a custom op, neither of which the
        # partitioner recomputes): unlike the class bank's buffers, no snapshot is needed
        return self._impl("fifo_bank").fifo_bank_sums(self.bank, self.labels, self.num_classes)

    @torch.no_grad()
    def reset(self) -> None:
        self.bank.zero_()
        self.labels.fill_(-1)
        self.ptr.zero_()
        self.refused.zero_()
        self._renew_stamp()
