"""``ICAKDLoss``: the full distillation objective as one drop-in module."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate as V
from . import ops, reference
from ._backend import BackendUnavailableError, cached, resolve
from ._inter_form import gram_shape_pays
from ._inter_gram import InterGramCache, batch_centroids, first_occurrence, first_positions
from .memory import ClassMemoryBank, FIFOMemoryBank, all_gather_rows, enqueue_banks, is_distributed
from .ops import StructurePlan

__all__ = ["ICAKDLoss", "ICAKDOutput", "METHODS", "CAM_LOSSES", "catkd_cam_loss"]

METHODS = ("ce", "kd", "cskd", "icakd")
CAM_LOSSES = ("at", "catkd")
_AUTO = "auto"


def catkd_cam_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                   student_fc_weight: torch.Tensor, teacher_fc_weight: torch.Tensor, pool: int = 2) -> torch.Tensor:
    """CAT-KD-style CAM term: the raw class maps of every class (``W[c] . A[:, :, h, w]``, no ReLU),
    adaptive-average-pooled to ``pool x pool``, each map L2-normalised over its cells (so the scale,
    and the default ``w_cam``, match the attention-transfer form), then
    ``mean_{b,c} ||q_S[b,c] - q_T[b,c]||_2^2`` (teacher side constant)."""
    def maps(a, w):
        m = torch.einsum("bdhw,cd->bchw", a.float(), w.float())
        m = F.adaptive_avg_pool2d(m, (pool, pool)).flatten(2)
        return m / m.norm(dim=2, keepdim=True).clamp(min=reference.NORM_EPS)

    q_s = maps(student_features, student_fc_weight)
    with torch.no_grad():
        q_t = maps(teacher_features.detach(), teacher_fc_weight.detach())
    return (q_s - q_t).pow(2).sum(dim=2).mean()


def _weighted(weight: float, term: torch.Tensor) -> torch.Tensor:
    """``weight * term``; a weight of 1 is not multiplied in (one op and its backward fewer, and
    Inductor (torch 2.14) returns ``1.0 * ce`` without its autograd edge when ``ce`` itself is an
    output too, as ``parts["ce"]``)."""
    return term if weight == 1.0 else weight * term


@dataclass
class ICAKDOutput:
    """``loss``: the weighted total (scalar, differentiable); ``parts``: each term alone, detached."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class ICAKDLoss(nn.Module):
    """ICAKD objective ``w_ce*CE + w_kd*tau^2*KL + w_cam*L_cam + w_intra*L_intra + w_inter*L_inter``.

    ``method`` picks the active terms: ``"ce"`` (CE only), ``"kd"`` (CE + KD), ``"cskd"`` (CE + KD
    + intra + inter over batch-only centroids of globally pooled features, no CAM) and
    ``"icakd"`` (everything: Grad-CAM maps, CAM constraint, CAM-weighted features, memory bank).
    Every default of the method can be overridden (e.g. ``method="icakd", bank=None``).

    Options: ``w_ce=1``, ``w_kd=1``, ``tau=4``, ``w_cam=None`` (= ``1000 / (H_s*W_s)``),
    ``w_intra=1``, ``w_inter=1``; ``bank`` in ``{"class", "fifo", None}`` (default ``"class"``
    for icakd, ``None`` for cskd), ``slots_per_class=16``, ``bank_size`` (FIFO rows, default
    ``C * slots_per_class``), ``bank_dtype=torch.float32``, ``resync_every=1000``;
    ``cam_weighting`` (default: True for icakd); ``target`` in ``{"label", "teacher"}`` (Grad-CAM
    target class: label or teacher argmax); ``correct_only=False`` (only correctly classified rows
    enter each network's bank and batch centroids); ``min_count=1``; ``backend=None`` (automatic:
    each op's backend is resolved once per device, at the module's first step there, reading
    ``ICAKD_BACKEND`` then); ``cam_loss`` in ``{"at", "catkd"}`` (the CAM term: ``"at"`` the
    attention-transfer form of the target class's Grad-CAM, ``"catkd"`` :func:`catkd_cam_loss`
    over every class's raw map pooled to ``cam_pool x cam_pool``, default 2);
    ``incremental_inter=None`` (class bank only: keep the float64 Gram matrix of the bank
    centroids, ``[2*teacher_dim]^2``, and update it by the few classes each step changes, so the
    inter loss costs O(B*D^2) per step instead of O(C*D^2) or O(C^2*D); None turns it on where the
    full Gram form would be picked, ``num_classes >= 2 * 2*teacher_dim`` on a CPU or a GPU with
    fast float64, 64x that on other GPUs, and the classes number at least 4x the batch; never
    under ``torch.compile``, which takes the backend's op).

    Call ``forward(student_features, student_logits, teacher_features, teacher_logits, labels,
    student_fc_weight, teacher_fc_weight)``; in training mode it then enqueues the batch's
    detached features into the banks (the losses use only previous batches' bank contents).

    The student projector ``P: Linear(student_dim -> teacher_dim, bias=False)`` is a learnable
    parameter: **optimise ``loss_module.parameters()`` together with the student's**. The banks
    are buffers: they are saved by ``state_dict`` and moved by ``.to()``. Under DDP the projector
    lives outside the wrapped student: wrap the loss module too, or all-reduce its gradients.
    Under DDP every rank's centroids cover the global batch: the banks gather every rank's rows,
    and without a bank (``bank=None``, as in ``"cskd"``) the other ranks' rows of the step enter
    the centroids as constants while the rank's own rows carry the gradient. Under autocast the
    fast backends run their kernels in their own precision.
    """

    def __init__(
        self,
        num_classes: int,
        student_dim: int,
        teacher_dim: int,
        *,
        method: str = "icakd",
        w_ce: float = 1.0,
        w_kd: float = 1.0,
        tau: float = 4.0,
        w_cam: float | None = None,
        w_intra: float = 1.0,
        w_inter: float = 1.0,
        slots_per_class: int = 16,
        bank: str | None = _AUTO,
        bank_size: int | None = None,
        bank_dtype: torch.dtype = torch.float32,
        resync_every: int = 1000,
        cam_weighting: bool | None = None,
        target: str = "label",
        correct_only: bool = False,
        min_count: int = 1,
        backend: str | None = None,
        incremental_inter: bool | None = None,
        cam_loss: str = "at",
        cam_pool: int = 2,
    ):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if target not in ("label", "teacher"):
            raise ValueError(f"target must be 'label' or 'teacher', got {target!r}")
        if bank == _AUTO:
            bank = "class" if method == "icakd" else None
        if bank not in ("class", "fifo", None):
            raise ValueError(f"bank must be 'class', 'fifo' or None, got {bank!r}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau!r}")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        if cam_loss not in CAM_LOSSES:
            raise ValueError(f"cam_loss must be one of {CAM_LOSSES}, got {cam_loss!r}")
        if isinstance(cam_pool, bool) or not isinstance(cam_pool, int) or cam_pool < 1:
            raise ValueError(f"cam_pool must be an int >= 1, got {cam_pool!r}")
        if incremental_inter not in (None, True, False):
            raise ValueError(f"incremental_inter must be None, True or False, got {incremental_inter!r}")
        self.num_classes, self.student_dim, self.teacher_dim = num_classes, student_dim, teacher_dim
        self.method = method
        self.w_ce, self.w_kd, self.tau = float(w_ce), float(w_kd), float(tau)
        self.w_cam = None if w_cam is None else float(w_cam)
        self.w_intra, self.w_inter = float(w_intra), float(w_inter)
        self.cam_weighting = (method == "icakd") if cam_weighting is None else bool(cam_weighting)
        self.target, self.correct_only, self.min_count, self.backend = target, correct_only, min_count, backend
        self.use_kd = method in ("kd", "cskd", "icakd")
        self.use_structure = method in ("cskd", "icakd")
        self.use_cam_loss = method == "icakd" and self.w_cam != 0.0
        self.cam_loss, self.cam_pool = cam_loss, cam_pool
        self.bank_layout = bank if self.use_structure else None

        self.projector = nn.Linear(student_dim, teacher_dim, bias=False) if self.use_structure else None
        self.bank_s = self.bank_t = None
        if self.bank_layout == "class":
            kw = dict(dtype=bank_dtype, resync_every=resync_every, backend=backend)
            self.bank_s = ClassMemoryBank(num_classes, slots_per_class, teacher_dim, **kw)
            self.bank_t = ClassMemoryBank(num_classes, slots_per_class, teacher_dim, **kw)
        elif self.bank_layout == "fifo":
            size = bank_size or num_classes * slots_per_class
            self.bank_s = FIFOMemoryBank(size, teacher_dim, num_classes, dtype=bank_dtype, backend=backend)
            self.bank_t = FIFOMemoryBank(size, teacher_dim, num_classes, dtype=bank_dtype, backend=backend)
        if incremental_inter and self.bank_layout != "class":
            raise ValueError("incremental_inter=True needs the class bank (bank='class' with method 'cskd' or 'icakd')")
        self.incremental_inter = incremental_inter
        self._inter_gram = InterGramCache(min_count, reference.NORM_EPS) if self.bank_layout == "class" else None
        # backends resolved once per device (and constants such as empty bank sums)
        self._per_device: dict = {}

    def reset_inter_cache(self) -> None:
        """Drop the incremental inter loss's Gram matrix; the next step rebuilds it from the banks.
        Needed only after writing a bank's buffers by hand (changes made through the banks'
        methods, ``load_state_dict`` and ``.to()`` are noticed)."""
        if self._inter_gram is not None:
            self._inter_gram.invalidate()

    def _incremental(self, device: torch.device, batch: int) -> bool:
        """Whether this step takes the incremental Gram form of the inter loss."""
        if self._inter_gram is None or self.incremental_inter is False:
            return False
        if torch.compiler.is_compiling():
            return False
        if self.incremental_inter:
            return True
        # where the backend's inter op would take its full Gram form (Ds = Dt = teacher_dim) and the
        # rows one step changes (about 2B) are a small part of the C rows that form rebuilds
        return gram_shape_pays(self.num_classes, 2 * self.teacher_dim, device) and self.num_classes >= 4 * batch

    def _backend_of(self, op: str, device: torch.device, optional: bool = False) -> str:
        """The backend of ``op`` on ``device``, resolved once (``ICAKD_BACKEND`` is read then).
        ``optional``: a one-op form that a backend named by the user may lack (then the
        reference form of it runs)."""
        def make():
            try:
                return resolve(self.backend, op, torch.empty(0, device=device))
            except BackendUnavailableError:
                if not optional:
                    raise
                return "reference"

        return cached(self._per_device, (op, device), make)

    def _structure_plan(self, device: torch.device) -> StructurePlan:
        """The structure term's backends on ``device``, resolved once (per TF32 setting on CUDA,
        which the automatic choice of the inter loss reads)."""
        def make():
            probe = torch.empty(self.num_classes, self.teacher_dim, device=device)
            try:
                fused = resolve(self.backend, "structure", probe)
            except BackendUnavailableError:  # a backend named by the user without the one-op form
                fused = None
            return StructurePlan(
                None if fused == "reference" else fused,
                resolve(self.backend, "centroids", probe),
                resolve(self.backend, "intra", probe),
                resolve(self.backend, "inter", probe, probe),
            )

        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        return cached(self._per_device, ("structure", device, tf32), make)

    def _empty_state(self, device: torch.device, dim: int):
        """``(sums, counts)`` of an empty bank (constants, made once per device)."""
        def zeros():
            return (torch.zeros(self.num_classes, dim, dtype=torch.float32, device=device),
                    torch.zeros(self.num_classes, dtype=torch.int64, device=device))

        def make():
            if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
                return zeros()
            # normal tensors even when first made under torch.inference_mode (a validation pass)
            with torch.inference_mode(False):
                return zeros()

        return cached(self._per_device, ("empty", device, dim), make)

    def _structure_incremental(self, f_s, f_t, labels, keep_s, keep_t):
        """(intra, inter) with centroids of the batch's classes only ([B, D], no [C, D] tensor)
        and the inter loss in the incremental Gram form."""
        slot = first_positions(labels, self.num_classes)
        first = slot == torch.arange(labels.shape[0], device=labels.device)
        bs, bt = self.bank_s, self.bank_t
        mu_s, n_s = batch_centroids(bs.sums, bs.count, f_s, labels, keep_s, slot)
        with torch.no_grad():
            mu_t, n_t = batch_centroids(bt.sums, bt.count, f_t, labels, keep_t, slot)
        valid = (n_s >= self.min_count) & (n_t >= self.min_count)
        valid_rows = valid.index_select(0, labels)
        # intra over row-indexed centroids: row b of mu_* is the centroid of class labels[b]
        rows = torch.arange(labels.shape[0], device=labels.device)
        l_intra = ops.intra_loss(self._structure_plan(labels.device).intra, f_s, f_t, mu_s, mu_t, rows, valid_rows)
        gram = self._inter_gram
        gram.ensure(bs, bt)
        l_inter = gram.loss(bs, bt, mu_s, mu_t, valid_rows, labels, first, valid.sum())
        return l_intra, l_inter

    def _gram_rows_before(self, all_labels: torch.Tensor):
        """``(classes, first, rows)`` before the banks' enqueue: every class it may change (the
        labels of every rank, the classes the banks resync), their first occurrences, and their
        bank rows as they are now (what ``InterGramCache.update`` replaces afterwards)."""
        touched = torch.cat([all_labels, self.bank_s.next_resync_classes(), self.bank_t.next_resync_classes()])
        first = first_occurrence(touched, self.num_classes)
        return touched, first, self._inter_gram.base_rows(self.bank_s, self.bank_t, touched, first)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, num_classes={self.num_classes}, bank={self.bank_layout!r}, tau={self.tau}"

    # ----------------------------------------------------------------------------------------

    def _needed(self) -> dict[str, bool]:
        """Which inputs the active terms read (the others may be None)."""
        maps = self.use_structure
        return {
            "student_features": maps,
            "teacher_features": maps,
            "teacher_logits": self.use_kd or (maps and (self.target == "teacher" or self.correct_only)),
            "student_fc_weight": maps and (self.cam_weighting or self.use_cam_loss),
            "teacher_fc_weight": maps and (self.cam_weighting or self.use_cam_loss),
        }

    def _check(self, fs, zs, ft, zt, y, ws, wt):
        need = self._needed()
        given = {"student_features": fs, "teacher_features": ft, "teacher_logits": zt,
                 "student_fc_weight": ws, "teacher_fc_weight": wt}
        for name, value in given.items():
            if value is None and need[name]:
                raise ValueError(f"{name} is required by method={self.method!r} (got None)")
        V.floating("student_logits", zs, 2)
        V.integer("labels", y, 1)
        for name, ndim in (("student_features", 4), ("teacher_features", 4), ("teacher_logits", 2),
                           ("student_fc_weight", 2), ("teacher_fc_weight", 2)):
            if given[name] is not None:
                V.floating(name, given[name], ndim)
        V.same_device("student_logits", zs, student_features=fs, teacher_features=ft, teacher_logits=zt,
                      labels=y, student_fc_weight=ws, teacher_fc_weight=wt)
        b, c = zs.shape
        if c != self.num_classes:
            raise ValueError(f"student_logits must have {self.num_classes} classes, got shape {tuple(zs.shape)}")
        if zt is not None and zt.shape != zs.shape:
            raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(zs.shape)}, got {tuple(zt.shape)}")
        V.length("labels", y, b, "student_logits")
        if fs is not None:
            V.length("student_features", fs, b, "student_logits")
            if fs.shape[1] != self.student_dim:
                raise ValueError(f"student_features must have {self.student_dim} channels, got shape {tuple(fs.shape)}")
        if ft is not None:
            V.length("teacher_features", ft, b, "student_logits")
            if ft.shape[1] != self.teacher_dim:
                raise ValueError(f"teacher_features must have {self.teacher_dim} channels, got shape {tuple(ft.shape)}")
        if ws is not None and ws.shape != (self.num_classes, self.student_dim):
            raise ValueError(f"student_fc_weight must be [{self.num_classes}, {self.student_dim}], got {tuple(ws.shape)}")
        if wt is not None and wt.shape != (self.num_classes, self.teacher_dim):
            raise ValueError(f"teacher_fc_weight must be [{self.num_classes}, {self.teacher_dim}], got {tuple(wt.shape)}")
        V.label_range("labels", y, self.num_classes)
        if self.bank_s is not None and self.bank_s.bank.device != zs.device:
            raise ValueError(
                f"student_logits is on {zs.device} but the loss module's banks are on {self.bank_s.bank.device}; "
                "move the module with .to(device)"
            )

    def _other_ranks_batch(self, f_s, f_t, labels, keep_s, keep_t):
        """Batch-only centroids under DDP: per network ``(sums float32 [C,D], counts [C])`` of the
        rows the other ranks hold this step (constants, like a bank's contents), so that every
        rank's centroids cover the global batch (DDP training without a bank)."""
        import torch.distributed as dist

        n = labels.shape[0]
        everyone = torch.ones(n, dtype=torch.bool, device=labels.device)
        rank = torch.full((n,), dist.get_rank(), dtype=torch.int64, device=labels.device)
        g_s, g_t, g_y, g_ks, g_kt, g_rank = all_gather_rows(
            f_s, f_t, labels, everyone if keep_s is None else keep_s, everyone if keep_t is None else keep_t, rank)
        other = g_rank != dist.get_rank()
        out = []
        for rows, keep in ((g_s, g_ks), (g_t, g_kt)):
            take = keep & other
            sums = torch.zeros(self.num_classes, rows.shape[1], dtype=torch.float32, device=rows.device)
            sums.index_add_(0, g_y, rows.float() * take.unsqueeze(1))
            counts = torch.zeros(self.num_classes, dtype=torch.int64, device=rows.device).index_add_(0, g_y, take.long())
            out.append((sums, counts))
        return out

    def _other_ranks_rows(self) -> bool:
        """Whether the centroids add the other ranks' rows of this step (DDP training without a
        bank)."""
        return self.bank_s is None and self.training and is_distributed()

    def _bank_state(self, device: torch.device):
        """``(sums_s, count_s, sums_t, count_t)`` the centroids add the batch to: the banks'
        contents (previous batches), or nothing (both networks' rows are ``teacher_dim`` wide)."""
        if self.bank_s is not None:
            return self.bank_s.sums_counts() + self.bank_t.sums_counts()
        # one call per network: while torch.compile traces, each call makes its own tensors
        # (Dynamo refuses one tensor passed twice to an autograd Function)
        return self._empty_state(device, self.teacher_dim) + self._empty_state(device, self.teacher_dim)

    def forward(
        self,
        student_features: torch.Tensor | None,
        student_logits: torch.Tensor,
        teacher_features: torch.Tensor | None,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor,
        student_fc_weight: torch.Tensor | None,
        teacher_fc_weight: torch.Tensor | None,
    ) -> ICAKDOutput:
        """Inputs a method does not read may be None: ``"ce"`` reads only ``student_logits`` and
        ``labels``; ``"kd"`` adds ``teacher_logits``; ``"cskd"`` also reads both feature maps;
        ``"icakd"`` also reads both classifier weights."""
        self._check(student_features, student_logits, teacher_features, teacher_logits, labels,
                    student_fc_weight, teacher_fc_weight)
        labels = labels.long()
        # the teacher's side is a constant (detached where it carries autograd history)
        teacher_features = ops.constant(teacher_features)
        teacher_logits = ops.constant(teacher_logits)
        teacher_fc_weight = ops.constant(teacher_fc_weight)

        parts: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        parts["ce"], weights["ce"] = F.cross_entropy(student_logits.float(), labels), self.w_ce
        if self.use_kd:
            # the module's arguments were checked once, above: the ops below are called unchecked
            parts["kd"], weights["kd"] = reference.kd_loss(student_logits, teacher_logits, self.tau), self.w_kd

        if self.use_structure:
            device = labels.device
            hs, ws_ = student_features.shape[-2:]
            keep_s = keep_t = None
            if self.correct_only:
                keep_s = student_logits.detach().argmax(dim=1) == labels
                keep_t = teacher_logits.argmax(dim=1) == labels
            incremental = self._incremental(device, labels.shape[0])
            other_ranks = not incremental and self._other_ranks_rows()
            uses_cam = self.cam_weighting or self.use_cam_loss
            at_loss = self.use_cam_loss and self.cam_loss == "at"
            l_cam = None
            if uses_cam:
                targets = labels if self.target == "label" else teacher_logits.argmax(dim=1)
                cam = self._backend_of("cam", device)
                # each network's CAM step in one op each way where the CAM backend has the one-op
                # form (else its CAM op and the reference CAM loss)
                fused = cam != "reference" and self._backend_of("class_activation", device, optional=True) == cam
                # the teacher's inputs were detached above: nothing of its step is recorded
                cam_t, v_t, _ = ops.class_activation(cam, teacher_features, teacher_fc_weight, targets, fused=fused)
            if self.cam_weighting and not (incremental or other_ranks):
                # the student's CAM step, the projector, the normalisation and the structure term:
                # one autograd node where the backends have the one-op forms
                l_cam, l_intra, l_inter, f_s, f_t = ops.student_step(
                    cam, fused, self._structure_plan(device), student_features, student_fc_weight, targets,
                    cam_t if at_loss else None, *self._bank_state(device), v_t.float(), labels, keep_s, keep_t,
                    self.min_count, reference.NORM_EPS, self.projector.weight)
            else:
                if uses_cam:
                    _, v_s, l_cam = ops.class_activation(cam, student_features, student_fc_weight, targets,
                                                         cam_t if at_loss else None, fused=fused)
                if not self.cam_weighting:
                    v_s = student_features.mean(dim=(2, 3))
                    v_t = teacher_features.mean(dim=(2, 3))
                v_t = v_t.float()
                if incremental or other_ranks:
                    # these read the unit rows before the structure term
                    u_s = ops.project_rows(v_s, self.projector.weight)
                    f_s = F.normalize(u_s, dim=1, eps=reference.NORM_EPS)
                    f_t = F.normalize(v_t, dim=1, eps=reference.NORM_EPS)
                if incremental:
                    l_intra, l_inter = self._structure_incremental(f_s, f_t, labels, keep_s, keep_t)
                elif other_ranks:
                    state = self._other_ranks_batch(f_s, f_t, labels, keep_s, keep_t)
                    l_intra, l_inter = ops.structure(self._structure_plan(device), *state[0], *state[1], f_s, f_t,
                                                     labels, keep_s, keep_t, self.min_count, reference.NORM_EPS)
                else:
                    # the structure op projects (by the projector's weight) and normalises the rows
                    # itself and returns the unit rows
                    l_intra, l_inter, f_s, f_t = ops.structure(
                        self._structure_plan(device), *self._bank_state(device), v_s, v_t, labels, keep_s, keep_t,
                        self.min_count, reference.NORM_EPS, normalize=True, projection=self.projector.weight)
            if self.use_cam_loss:
                w_cam = self.w_cam if self.w_cam is not None else 1000.0 / (hs * ws_)
                if not at_loss:
                    l_cam = catkd_cam_loss(student_features, teacher_features, student_fc_weight,
                                           teacher_fc_weight, self.cam_pool)
                parts["cam"], weights["cam"] = l_cam, w_cam
            parts["intra"], weights["intra"] = l_intra, self.w_intra
            parts["inter"], weights["inter"] = l_inter, self.w_inter

            if self.training and self.bank_s is not None:
                # the incremental form reads the bank rows the update will change, before it
                # writes (with the labels the bank gathered from every rank)
                pending = enqueue_banks([self.bank_s, self.bank_t], [f_s, f_t], labels, [keep_s, keep_t], check=False,
                                        before_write=self._gram_rows_before if incremental else None)
                if incremental:
                    self._inter_gram.update(self.bank_s, self.bank_t, *pending)

        return self._total(parts, weights)

    def _total(self, parts: dict[str, torch.Tensor], weights: dict[str, float]) -> ICAKDOutput:
        """The weighted sum of the terms: one stack and one dot product (one autograd node each)
        for several terms, instead of a multiply and an add per term."""
        if len(parts) == 1:
            (name, term), = parts.items()
            return ICAKDOutput(loss=_weighted(weights[name], term), parts={name: term.detach()})
        terms = torch.stack(list(parts.values()))
        w = tuple(weights.values())

        def make():
            return torch.tensor(w, dtype=terms.dtype, device=terms.device)

        # torch.dot, unlike matmul, is not cast down under autocast
        loss = torch.dot(terms, cached(self._per_device, ("weights", terms.device, terms.dtype, w), make))
        return ICAKDOutput(loss=loss, parts=dict(zip(parts, terms.detach().unbind())))
