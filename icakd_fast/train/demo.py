"""The embedded demo: ``icakd-train`` with no arguments.

On the ``synthetic`` dataset it trains (once, then caches) a teacher, distils the same student
with ce, kd, cskd and icakd under one fixed budget (same epochs, batch, schedule and seed),
prints a comparison table and writes into ``runs/demo/`` (or ``--out``):

* ``metrics.csv`` -- one row per method and epoch;
* ``summary.json`` -- ``{"methods": {name: {"top1": ..., ...}}, "teacher": ..., "device": ...,
  "versions": ...}``;
* ``cams.png`` -- teacher vs student class activation maps on test images;
* ``curves.png`` -- test top-1 and training loss per epoch;
* ``teacher/`` (the cached teacher) and one sub-folder of checkpoints per method.

One seed on a toy task: for a comparison of methods over seeds with paired intervals use
``icakd-study`` (:mod:`icakd_fast.study`, docs/study.md), which runs this budget by default.

Options that apply: ``--out``, ``--epochs`` (student epochs), ``--batch-size``, ``--lr``,
``--seed``, ``--device``, ``--amp``, ``--channels-last``, ``--compile``, ``--threads``,
``--teacher`` / ``--student``, ``--num-classes``, ``--image-size``, ``--limit-train-batches``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import build_datasets
from .engine import environment_info, load_weights, resolve_device, train
from .models import build_model, canonical_name

__all__ = ["run_demo", "demo_config", "free_cpus", "DEMO_DEFAULTS"]

#: the demo's budget (chosen to finish in a few minutes on a 2-core CPU)
DEMO_DEFAULTS: dict[str, Any] = {
    "out": "runs/demo",
    "teacher": "resnet20",
    "student": "resnet8",
    "epochs": 6,
    "batch_size": 64,
    "lr": 0.05,
    "schedule": "cosine",
    "weight_decay": 5e-4,
    "synthetic": {"num_classes": 12, "image_size": 32, "train_per_class": 250, "test_per_class": 100},
}
TEACHER_EPOCHS = 8
METHOD_ORDER = ("ce", "kd", "cskd", "icakd")
_N_CAM_IMAGES = 8


def _say(msg: str) -> None:
    print(msg, flush=True)


def demo_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """``cfg`` with the demo's budget for every option not in ``given`` (the synthetic dataset)."""
    cfg = dataclasses.replace(cfg)
    for key, value in DEMO_DEFAULTS.items():
        if key == "synthetic":
            merged = dict(value)
            merged.update(cfg.synthetic)
            cfg.synthetic = merged
        elif key not in given:
            setattr(cfg, key, value)
    cfg.dataset = "synthetic"
    cfg.resume = None
    return cfg


def _fingerprint(cfg: TrainConfig, epochs: int) -> str:
    key = {"arch": canonical_name(cfg.teacher), "synthetic": cfg.synthetic, "seed": cfg.seed, "epochs": epochs,
           "batch_size": cfg.batch_size, "lr": cfg.lr, "limit": cfg.limit_train_batches, "amp": cfg.amp}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def free_cpus() -> int:
    """CPU threads to use: the cores not already busy (1-minute load average), at least one.

    Running more OpenMP threads than there are free cores makes PyTorch's CPU kernels wait on
    each other, which can slow training several-fold.
    """
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return cpus
    return max(1, min(cpus, math.ceil(cpus - load - 0.25)))


def _fresh(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


@torch.no_grad()
def _cams(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of class ``y`` (closed form for the GAP + linear head), [N, H_img, W_img] in [0, 1]."""
    from icakd_fast import FeatureTap
    from icakd_fast import functional as IF

    model.eval()
    with FeatureTap(model) as tap:
        model(x)
        feats = tap.features.float()
        alpha = IF.cam_weights_from_linear(tap.fc_weight.float(), y, feats.shape[-2] * feats.shape[-1])
        cam = IF.grad_cam(feats, alpha)
    cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.flatten(1).min(1).values[:, None, None]
    hi = cam.flatten(1).max(1).values[:, None, None]
    return (cam - lo) / (hi - lo + 1e-7)


@torch.no_grad()
def _cam_agreement(student, teacher, loader, device) -> float:
    """Mean cosine similarity between student and teacher CAMs of the true class over ``loader``."""
    total, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        cs = _cams(student, x, y).flatten(1)
        ct = _cams(teacher, x, y).flatten(1)
        total += F.cosine_similarity(cs, ct, dim=1).sum().item()
        n += y.numel()
    return total / max(n, 1)


def _load(arch: str, num_classes: int, path: Path, device) -> torch.nn.Module:
    model = build_model(arch, num_classes)
    load_weights(model, str(path), arch)
    return model.to(device).eval()


def run_demo(cfg: TrainConfig | None = None, given: set[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns what it writes to ``summary.json``."""
    t_start = time.perf_counter()
    cfg = demo_config(cfg or TrainConfig(), given or set())
    if cfg.threads is None:
        cfg.threads = free_cpus()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    cfg.device = str(device)

    _say(f"icakd-train demo: synthetic shapes ({cfg.synthetic['num_classes']} classes, "
         f"{cfg.synthetic['image_size']}x{cfg.synthetic['image_size']}), teacher {cfg.teacher}, "
         f"student {cfg.student}, {cfg.epochs} epochs per method, device {device}"
         + (f" ({cfg.threads} CPU threads)" if device.type == "cpu" else "") + f", output {out}/")
    t0 = time.perf_counter()
    data = build_datasets("synthetic", seed=cfg.seed, synthetic=cfg.synthetic)
    _say(f"generated {len(data.train)} training and {len(data.test)} test images in {time.perf_counter() - t0:.1f}s")

    # ---- teacher (cached)
    teacher_dir = out / "teacher"
    t_epochs = max(TEACHER_EPOCHS, cfg.epochs)
    fp = _fingerprint(cfg, t_epochs)
    stamp = teacher_dir / "fingerprint.txt"
    teacher_ckpt = teacher_dir / "last.pt"
    teacher_result: dict[str, Any]
    if teacher_ckpt.is_file() and stamp.is_file() and stamp.read_text().strip() == fp:
        info = json.loads((teacher_dir / "result.json").read_text())
        teacher_result = info
        _say(f"using the cached teacher {teacher_ckpt} (top-1 {info['top1']:.2f})")
    else:
        _fresh(teacher_dir)
        tcfg = dataclasses.replace(cfg, method="ce", student=cfg.teacher, epochs=t_epochs, out=str(teacher_dir),
                                   teacher_ckpt=None)
        _say(f"training the teacher ({cfg.teacher}, {t_epochs} epochs; cached for later runs)")
        teacher_result = train(tcfg, data=data, desc=f"teacher {cfg.teacher}", log=_say)
        teacher_result = {k: v for k, v in teacher_result.items() if k not in ("history", "env")}
        (teacher_dir / "result.json").write_text(json.dumps(teacher_result, indent=2))
        stamp.write_text(fp)

    # ---- students
    results: dict[str, dict[str, Any]] = {}
    for method in METHOD_ORDER:
        mdir = out / method
        _fresh(mdir)
        mcfg = dataclasses.replace(cfg, method=method, out=str(mdir), teacher_ckpt=str(teacher_ckpt))
        results[method] = train(mcfg, data=data, desc=f"{method:>5s} {cfg.student}", log=_say)

    # ---- CAM agreement, figures, files
    eval_loader = torch.utils.data.DataLoader(data.test, batch_size=256, shuffle=False)
    teacher = _load(cfg.teacher, data.num_classes, teacher_ckpt, device)
    students = {m: _load(cfg.student, data.num_classes, out / m / "last.pt", device) for m in METHOD_ORDER}
    for m, model in students.items():
        results[m]["cam_agreement"] = _cam_agreement(model, teacher, eval_loader, device)

    mem_label = results[METHOD_ORDER[0]]["peak_mem_kind"]
    env = environment_info(device)
    summary = {
        "methods": {m: {k: r[k] for k in ("top1", "top5", "best_top1", "images_per_s", "peak_mem_mib",
                                          "rss_growth_mib", "train_time_s", "epochs", "steps", "cam_agreement")}
                    for m, r in results.items()},
        "teacher": {"arch": canonical_name(cfg.teacher), "top1": teacher_result["top1"],
                    "top5": teacher_result["top5"], "epochs": teacher_result["epochs"]},
        "student": canonical_name(cfg.student),
        "peak_mem_kind": mem_label,
        "dataset": {"name": "synthetic", **cfg.synthetic, "seed": cfg.seed},
        "budget": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "schedule": cfg.schedule,
                   "limit_train_batches": cfg.limit_train_batches, "amp": cfg.amp},
        "device": env["device"],
        "device_name": env["device_name"],
        "cpu_threads": env["cpu_threads"],
        "versions": env["versions"],
    }
    rows = [{"method": m, **row} for m, r in results.items() for row in r["history"]]
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    from .plots import have_matplotlib, plot_cams, plot_curves

    if have_matplotlib():
        plot_curves({m: r["history"] for m, r in results.items()}, out / "curves.png",
                    reference={f"teacher {cfg.teacher}": teacher_result["top1"]},
                    title=f"synthetic: {cfg.teacher} -> {cfg.student}, {cfg.epochs} epochs")
        idx = _cam_examples(data.test.targets, _N_CAM_IMAGES)
        x = torch.stack([data.test[i][0] for i in idx]).to(device)
        y = torch.tensor([int(data.test.targets[i]) for i in idx], device=device)
        mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)
        imgs = (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        cam_rows = {f"teacher {cfg.teacher}": _cams(teacher, x, y).cpu().numpy()}
        notes = {}
        for m in METHOD_ORDER:
            cam_rows[f"{m} student"] = _cams(students[m], x, y).cpu().numpy()
            notes[f"{m} student"] = f"agree {results[m]['cam_agreement']:.2f}"
        plot_cams(imgs, cam_rows, out / "cams.png", titles=[data.classes[int(v)] for v in y.tolist()],
                  row_notes=notes)
        summary["figures"] = ["cams.png", "curves.png"]
    else:
        sys.stderr.write("icakd-train: warning: matplotlib is not installed; skipping cams.png and curves.png "
                         "(pip install 'icakd_fast[vision]')\n")
        summary["figures"] = []
    summary["total_time_s"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    _say("")
    _say(_table(summary, teacher_result, mem_label))
    _say(f"\nwrote {out}/metrics.csv, summary.json" + (", cams.png, curves.png" if summary["figures"] else "")
         + f"  (total {summary['total_time_s']:.0f}s)")
    return summary


def _cam_examples(targets, n: int) -> list[int]:
    """Up to ``n`` test indices, one per class first."""
    seen, idx = set(), []
    for i, t in enumerate(int(v) for v in targets):
        if t not in seen:
            seen.add(t)
            idx.append(i)
        if len(idx) == n:
            break
    return idx


def _table(summary: dict[str, Any], teacher: dict[str, Any], mem_label: str) -> str:
    mem_col = "peak mem MiB*"
    head = ["method", "top-1 %", "top-5 %", "images/s", mem_col, "CAM agreement", "train s"]
    lines = [[f"teacher {summary['teacher']['arch']} (ce)", f"{teacher['top1']:.2f}", f"{teacher['top5']:.2f}",
              f"{teacher['images_per_s']:.0f}", f"{teacher['peak_mem_mib']:.0f}", "1.00",
              f"{teacher['train_time_s']:.0f}"]]
    for m, r in summary["methods"].items():
        lines.append([f"{m} -> {summary['student']}", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                      f"{r['images_per_s']:.0f}", f"{r['peak_mem_mib']:.0f}", f"{r['cam_agreement']:.2f}",
                      f"{r['train_time_s']:.0f}"])
    widths = [max(len(head[i]), *(len(row[i]) for row in lines)) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep, *map(fmt, lines), f"* {mem_label}"])


if __name__ == "__main__":  # pragma: no cover
    run_demo()
