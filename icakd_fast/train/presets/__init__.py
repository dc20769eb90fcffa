"""Training presets shipped with the package: ``icakd-train --config NAME`` (``icakd-study`` too).

* ``manyclass`` -- the synthetic dataset with 100 classes at batch 64 (as CIFAR-100: about half of
  a batch's rows are alone in their class), where batch-only centroids are poor and the memory
  bank matters; sized for a study of 4 methods x 3 seeds on a 2-core CPU (see docs/study.md).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["preset_names", "preset_path"]

_HERE = Path(__file__).resolve().parent


def preset_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in _HERE.glob("*.toml")))


def preset_path(name: str) -> Path | None:
    """The TOML file of preset ``name`` (with or without ``.toml``), or None."""
    stem = name[:-5] if name.endswith(".toml") else name
    if "/" in stem or "\\" in stem or stem not in preset_names():
        return None
    return _HERE / f"{stem}.toml"
