"""Peer comparisons for ``e2e_bench.py --peers``: each peer used the way its users use it.

* pytorch-metric-learning ``CrossBatchMemory`` (a FIFO queue of embeddings) vs our
  ``FIFOMemoryBank`` / ``ClassMemoryBank``: enqueue alone, and enqueue + per-class centroids
  (for the queue: a segment sum over its labels, written as a user would).
* pytorch-grad-cam ``GradCAM`` (target layer ``layer4``) vs ``icakd_fast.functional.grad_cam``,
  closed form (no backward pass) and generic path (autograd gradient of the target logits), each
  upsampled and min-max normalised like pytorch-grad-cam's output. pytorch-grad-cam returns
  NumPy arrays: it is not differentiable, ours are tensors in the autograd graph.
* a plain eager CSKD loss (per-class means by one-hot matmul, two full C x C cosine matrices) vs
  ``ICAKDLoss(method="cskd")``.

The peer packages are optional: a missing one is recorded as skipped. ``tasks(bench, E)`` returns
``(kind, default_seconds, base_row, fn, metric)`` for the budgeted runner of ``e2e_bench`` (``E``).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

import icakd_fast.functional as IF
from icakd_fast import ClassMemoryBank, FeatureTap, FIFOMemoryBank, ICAKDLoss


def _ours(bench, E) -> list[str]:
    names = ["reference", "cpp", "triton"] + (["auto"] if bench.device.type == "cuda" else [])
    return [b for b in names if E.skip_reason(b, bench.device, bench.dry) is None]


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------------------------
# memory queues
# ----------------------------------------------------------------------------------------------


def xbm_sizes(bench):
    if bench.dry:
        return dict(C=10, S=4, D=16, B=8)
    return dict(C=1000, S=16, D=2048 if bench.device.type == "cuda" else 512, B=256)


def run_xbm(bench, E) -> None:
    from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory

    z = xbm_sizes(bench)
    C, S, D, B = z["C"], z["S"], z["D"], z["B"]
    N = C * S
    dev = bench.device
    shape = f"N={N} (C={C} x S={S}) D={D} B={B} float32"
    base = dict(mode="peers", case="memory queue", method="enqueue", shape=shape)
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [(F.normalize(torch.randn(B, D, device=dev, generator=g), dim=1),
                torch.randint(0, C, (B,), device=dev, generator=g)) for _ in range(8)]
    fill = -(-N // B)  # enqueues that fill the queue once: steady state before timing

    def feeder():
        it = itertools.cycle(batches)
        return lambda: next(it)

    # pytorch-metric-learning: the queue of CrossBatchMemory, filled by add_to_memory (what its forward calls)
    xbm = CrossBatchMemory(ContrastiveLoss(), D, memory_size=N).to(dev)
    nxt = feeder()
    for _ in range(fill):
        e, y = nxt()
        xbm.add_to_memory(e, y, B)

    def xbm_enqueue():
        e, y = nxt()
        xbm.add_to_memory(e, y, B)

    def xbm_centroids():
        xbm_enqueue()
        emb = xbm.embedding_memory if xbm.has_been_filled else xbm.embedding_memory[: xbm.queue_idx]
        lab = xbm.label_memory if xbm.has_been_filled else xbm.label_memory[: xbm.queue_idx]
        sums = torch.zeros(C, D, device=dev).index_add_(0, lab, emb)
        counts = torch.bincount(lab, minlength=C)
        return sums / counts.clamp(min=1).unsqueeze(1), counts

    label = f"pytorch-metric-learning {_version('pytorch-metric-learning')} CrossBatchMemory"
    ms = E.time_op_ms(xbm_enqueue, dev)
    bench.record(dict(base, backend=label), "ms", ms, "ms", "ok", "add_to_memory (its forward also computes a loss over B x N pairs)")
    bench.record(dict(base, backend=label), "rows_per_s", B / ms * 1e3, "rows/s")
    ms = E.time_op_ms(xbm_centroids, dev)
    bench.record(dict(base, method="enqueue + class centroids", backend=label), "ms", ms, "ms", "ok",
                 "centroids by index_add over the whole queue, O(N*D)")
    bench.record(dict(base, backend=label), "state_mib", (N * D * 4 + N * 8) / E.MIB, "MiB")

    for b in _ours(bench, E):
        be = E.loss_backend(b)
        fifo = FIFOMemoryBank(N, D, C, backend=be, device=dev)
        cls = ClassMemoryBank(C, S, D, backend=be, device=dev)
        for bank, kind in ((fifo, "FIFOMemoryBank"), (cls, "ClassMemoryBank")):
            nxt = feeder()
            for _ in range(fill):
                bank.enqueue(*nxt())
            lbl = f"icakd_fast {kind} ({b})"

            def enqueue(bank=bank, nxt=nxt):
                bank.enqueue(*nxt())

            def with_centroids(bank=bank, nxt=nxt):
                bank.enqueue(*nxt())
                return bank.centroids()

            ms = E.time_op_ms(enqueue, dev)
            bench.record(dict(base, backend=lbl), "ms", ms, "ms")
            bench.record(dict(base, backend=lbl), "rows_per_s", B / ms * 1e3, "rows/s")
            ms = E.time_op_ms(with_centroids, dev)
            note = "segment sum over the queue, O(N*D)" if kind == "FIFOMemoryBank" else "running sums, O(C*D)"
            bench.record(dict(base, method="enqueue + class centroids", backend=lbl), "ms", ms, "ms", "ok", note)
            bench.record(dict(base, backend=lbl), "state_mib", E.module_bytes(bank) / E.MIB, "MiB")
        # same FIFO semantics as the queue: same centroids after the same enqueues
        xbm_check = CrossBatchMemory(ContrastiveLoss(), D, memory_size=N).to(dev)
        fifo_check = FIFOMemoryBank(N, D, C, backend=be, device=dev)
        nxt = feeder()
        for _ in range(fill + 3):
            e, y = nxt()
            xbm_check.add_to_memory(e, y, B)
            fifo_check.enqueue(e, y)
        sums = torch.zeros(C, D, device=dev).index_add_(0, xbm_check.label_memory, xbm_check.embedding_memory)
        mu_ref = sums / torch.bincount(xbm_check.label_memory, minlength=C).clamp(min=1).unsqueeze(1)
        err = E.abs_err(fifo_check.centroids()[0], mu_ref)
        bench.record(dict(base, method="centroids agreement", backend=f"icakd_fast FIFOMemoryBank ({b})"),
                     "max_abs_err_vs_peer", err, "", "ok" if err < 1e-4 else "mismatch")
        del fifo, cls, fifo_check, xbm_check


# ----------------------------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------------------------


def gradcam_sizes(bench):
    if bench.dry:
        return dict(arch="resnet18", C=10, image=64, B=2)
    if bench.device.type == "cuda":
        return dict(arch="resnet50", C=1000, image=224, B=64)
    return dict(arch="resnet18", C=1000, image=224, B=8)


def _scale(cam: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's per-image scaling: ``x - min``, then ``/ (1e-7 + max)``."""
    flat = cam.flatten(1)
    cam = cam - flat.amin(1).view(-1, 1, 1)
    return cam / (1e-7 + cam.flatten(1).amax(1).view(-1, 1, 1))


def upsample_like_peer(cam: torch.Tensor, size: int) -> torch.Tensor:
    cam = _scale(cam.float())
    cam = F.interpolate(cam.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
    return _scale(cam)


def run_gradcam(bench, E) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from icakd_fast.train.models import build_model

    z = gradcam_sizes(bench)
    dev = bench.device
    shape = f"{z['arch']} {z['image']}x{z['image']} C={z['C']} B={z['B']} fp32 eval"
    base = dict(mode="peers", case="grad-cam", shape=shape)
    torch.manual_seed(0)
    with torch.device(dev):
        model = build_model(z["arch"], z["C"]).eval()
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(z["B"], 3, z["image"], z["image"], device=dev, generator=g)
    y = torch.randint(0, z["C"], (z["B"],), device=dev, generator=g)

    # pytorch-grad-cam: forward + backward of the summed target logits, NumPy maps at input size
    cam = GradCAM(model=model, target_layers=[model.layer4[-1]])
    targets = [ClassifierOutputTarget(int(c)) for c in y.tolist()]
    peer_out = torch.from_numpy(cam(input_tensor=x, targets=targets)).to(dev)
    label = f"pytorch-grad-cam {_version('grad-cam')} GradCAM"
    ms = E.time_op_ms(lambda: cam(input_tensor=x, targets=targets), dev, reps=5)
    bench.record(dict(base, method="batched CAM", backend=label), "ms", ms, "ms", "ok",
                 "forward + backward through the whole model; returns NumPy arrays: not differentiable")
    bench.record(dict(base, method="batched CAM", backend=label), "images_per_s", z["B"] / ms * 1e3, "images/s")
    cam.activations_and_grads.release()
    del cam

    tap = FeatureTap(model)
    with torch.no_grad():
        model(x)  # finds the feature layer
    hw = tap.features.shape[-2] * tap.features.shape[-1]
    for b in _ours(bench, E):
        be = E.loss_backend(b)

        def closed_form(be=be):
            with torch.no_grad():
                model(x)
                w = IF.cam_weights_from_linear(tap.fc_weight, y, hw)
                return upsample_like_peer(IF.grad_cam(tap.features, w, backend=be), z["image"])

        def generic(be=be):
            logits = model(x)
            feats = tap.features
            (grads,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), feats)
            w = IF.grad_cam_weights(grads, backend=be)
            return upsample_like_peer(IF.grad_cam(feats.detach(), w, backend=be), z["image"])

        for method, fn, note in (
            ("closed form (no backward)", closed_form, "W_fc[y] / HW; differentiable into features and W_fc"),
            ("generic (autograd weights)", generic,
             "autograd.grad of the target logits w.r.t. layer4 only (no backward through the trunk)"),
        ):
            lbl = f"icakd_fast grad_cam ({b})"
            err = E.abs_err(fn(), peer_out)
            bench.record(dict(base, method=method, backend=lbl), "max_abs_diff_vs_peer", err, "",
                         "ok" if err < 1e-2 else "mismatch", "normalised maps at input size (bilinear vs cv2.resize)")
            ms = E.time_op_ms(fn, dev, reps=5)
            bench.record(dict(base, method=method, backend=lbl), "ms", ms, "ms", "ok", note)
            bench.record(dict(base, method=method, backend=lbl), "images_per_s", z["B"] / ms * 1e3, "images/s")
    tap.remove()


# ----------------------------------------------------------------------------------------------
# CSKD loss
# ----------------------------------------------------------------------------------------------


class PlainCSKD(nn.Module):
    """CSKD written directly in PyTorch: CE + KD + intra + inter over batch class means, with
    one-hot matmuls and full C x C cosine relation matrices."""

    def __init__(self, num_classes: int, student_dim: int, teacher_dim: int, tau: float = 4.0):
        super().__init__()
        self.num_classes, self.tau = num_classes, tau
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, feat_s, logit_s, feat_t, logit_t, labels):
        t = self.tau
        ce = F.cross_entropy(logit_s.float(), labels)
        kd = F.kl_div(F.log_softmax(logit_s.float() / t, 1), F.softmax(logit_t.float() / t, 1),
                      reduction="batchmean") * t * t
        f_s = F.normalize(self.proj(feat_s.float().mean((2, 3))), dim=1)
        f_t = F.normalize(feat_t.float().mean((2, 3)), dim=1)
        onehot = F.one_hot(labels, self.num_classes).float()  # [B, C]
        n = onehot.sum(0)
        mu_s = onehot.t() @ f_s / n.clamp(min=1).unsqueeze(1)
        mu_t = onehot.t() @ f_t / n.clamp(min=1).unsqueeze(1)
        intra = ((f_s - mu_s[labels].detach()) - (f_t - mu_t[labels])).pow(2).sum(1).mean()
        ns, nt = F.normalize(mu_s, dim=1), F.normalize(mu_t, dim=1)
        present = (n > 0).float()
        mask = present.unsqueeze(0) * present.unsqueeze(1)
        inter = ((ns @ ns.t() - nt @ nt.t()) * mask).pow(2).sum() / mask.sum()
        return ce + kd + intra + inter


def cskd_sizes(bench):
    if bench.dry:
        return dict(B=8, Ds=12, Dt=16, H=4, classes=[10])
    if bench.device.type == "cuda":
        return dict(B=256, Ds=512, Dt=2048, H=7, classes=[1000, 21841])
    return dict(B=64, Ds=256, Dt=256, H=8, classes=[100, 4096])


def run_cskd(bench, E, C: int) -> None:
    z = cskd_sizes(bench)
    B, Ds, Dt, H = z["B"], z["Ds"], z["Dt"], z["H"]
    dev = bench.device
    shape = f"C={C} B={B} Ds={Ds} Dt={Dt} {H}x{H} fp32"
    base = dict(mode="peers", case=f"cskd loss C={C}", method="loss fwd+bwd", shape=shape)
    avail = E.available_bytes(dev)
    if dev.type == "cpu" and avail is not None and 8 * C * C * 4 > 0.5 * avail:
        bench.record(dict(base, backend="plain PyTorch CSKD"), "ms",
                     status=f"skipped: predicted out of memory (C x C matrices, {avail / 2**30:.1f} GiB available)")
        return
    g = torch.Generator(device=dev).manual_seed(0)
    fs = torch.randn(B, Ds, H, H, device=dev, generator=g).relu_()
    ft = torch.randn(B, Dt, H, H, device=dev, generator=g).relu_()
    zs = torch.randn(B, C, device=dev, generator=g)
    zt = torch.randn(B, C, device=dev, generator=g)
    y = torch.randint(0, C, (B,), device=dev, generator=g)
    ws = torch.randn(C, Ds, device=dev, generator=g) * 0.01
    wt = torch.randn(C, Dt, device=dev, generator=g) * 0.01
    torch.manual_seed(0)
    plain = PlainCSKD(C, Ds, Dt).to(dev)

    def run(fn):
        a = fs.detach().requires_grad_(True)
        loss = fn(a, zs.detach().requires_grad_(True))
        loss.backward()
        return loss.detach(), a.grad

    contenders = [("plain PyTorch CSKD", lambda a, b: plain(a, b, ft, zt, y))]
    for bk in _ours(bench, E):
        crit = ICAKDLoss(C, Ds, Dt, method="cskd", backend=E.loss_backend(bk)).to(dev).train()
        with torch.no_grad():
            crit.projector.weight.copy_(plain.proj.weight)
        contenders.append((f"icakd_fast ICAKDLoss cskd ({bk})", lambda a, b, crit=crit: crit(a, b, ft, zt, y, ws, wt).loss))

    ref_loss = ref_grad = None
    for label, fn in contenders:
        row = dict(base, backend=label)
        try:
            loss, grad = run(fn)
            if ref_loss is None:
                ref_loss, ref_grad = loss, grad
            else:
                e = E.abs_err(loss, ref_loss) / max(abs(ref_loss.item()), 1e-12)
                eg = E.rel_err(grad, ref_grad)
                st = "ok" if e < 1e-4 and eg < 1e-3 else "mismatch"
                bench.record(row, "check_loss_rel_err_vs_plain", e, "", st)
                bench.record(row, "check_grad_rel_err_vs_plain", eg, "", st)
            del loss, grad
            with E.PeakMemory(dev) as mem:
                ms = E.time_op_ms(lambda: run(fn), dev, reps=5)
                peak = mem.peak_mib()
            bench.record(row, "ms", ms, "ms")
            bench.record(row, "peak_extra_mib", peak, "MiB", "ok", "above the inputs")
        except Exception as exc:  # e.g. the C x C matrices do not fit
            bench.record(row, "ms", status=E.status_of(exc))
        E.free_memory(dev)


# ----------------------------------------------------------------------------------------------


def _have(module: str) -> str | None:
    """None if ``module`` imports, else the skip status (missing package or a missing dependency)."""
    import importlib

    pip = {"pytorch_metric_learning": "pytorch-metric-learning", "pytorch_grad_cam": "grad-cam"}[module]
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken dependency (e.g. ttach, cv2)
        return f"skipped: {module} does not import ({type(exc).__name__}: {exc}); pip install {pip}"
    return None


def tasks(bench, E):
    gpu = bench.device.type == "cuda"
    out = []
    z = xbm_sizes(bench)
    base = dict(mode="peers", case="memory queue", method="enqueue", backend="pytorch-metric-learning CrossBatchMemory",
                shape=f"N={z['C'] * z['S']} D={z['D']} B={z['B']}")
    reason = _have("pytorch_metric_learning")
    if reason:
        bench.record(base, "ms", status=reason)
    else:
        out.append(("peer_xbm", 10.0 if gpu else 20.0, base, lambda: run_xbm(bench, E), "ms"))
    z = gradcam_sizes(bench)
    base = dict(mode="peers", case="grad-cam", method="batched CAM", backend="pytorch-grad-cam GradCAM",
                shape=f"{z['arch']} {z['image']}x{z['image']} B={z['B']}")
    reason = _have("pytorch_grad_cam")
    if reason:
        bench.record(base, "ms", status=reason)
    else:
        out.append(("peer_gradcam", 20.0 if gpu else 40.0, base, lambda: run_gradcam(bench, E), "ms"))
    for C in cskd_sizes(bench)["classes"]:
        base = dict(mode="peers", case=f"cskd loss C={C}", method="loss fwd+bwd", backend="plain PyTorch CSKD")
        out.append(("peer_cskd", 10.0 if gpu else 20.0, base, lambda C=C: run_cskd(bench, E, C), "ms"))
    return out
