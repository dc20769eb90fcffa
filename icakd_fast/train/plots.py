"""Figures of the demo: learning curves and teacher-vs-student class activation maps.

Needs matplotlib (the ``vision`` extra); :func:`have_matplotlib` says whether it is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["have_matplotlib", "plot_curves", "plot_cams"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(histories: dict[str, list[dict[str, Any]]], path: str | Path, *,
                reference: dict[str, float] | None = None, title: str = "") -> None:
    """Test top-1 and training cross-entropy per epoch, one line per method."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in histories.items():
        ep = [r["epoch"] for r in rows]
        ax1.plot(ep, [r["test_top1"] for r in rows], marker="o", ms=3, label=name)
        ax2.plot(ep, [float(r["loss_ce"] if r.get("loss_ce", "") != "" else r["train_loss"]) for r in rows],
                 marker="o", ms=3, label=name)
    for name, value in (reference or {}).items():
        ax1.axhline(value, ls="--", lw=1, color="gray", label=name)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test top-1 (%)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("training cross-entropy")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cams(images: np.ndarray, rows: dict[str, np.ndarray], path: str | Path, *,
              titles: Sequence[str] = (), row_notes: dict[str, str] | None = None) -> None:
    """``images`` [N,H,W,3] in [0,1]; ``rows`` name -> CAMs [N,H,W] in [0,1] (overlaid in order)."""
    plt = _plt()
    n = images.shape[0]
    nrows = 1 + len(rows)
    fig, axes = plt.subplots(nrows, n, figsize=(1.25 * n + 0.8, 1.3 * nrows + 0.3), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j], interpolation="nearest")
        if j < len(titles):
            axes[0, j].set_title(titles[j], fontsize=6)
    axes[0, 0].set_ylabel("image", fontsize=8)
    for i, (name, cams) in enumerate(rows.items(), start=1):
        for j in range(n):
            axes[i, j].imshow(images[j], interpolation="nearest")
            axes[i, j].imshow(cams[j], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")
        label = name if not row_notes or name not in row_notes else f"{name}\n{row_notes[name]}"
        axes[i, 0].set_ylabel(label, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
