"""The thin trainer behind ``icakd-train`` (``python -m icakd_fast.train``).

* :func:`train` -- one run from a :class:`TrainConfig` (student with ce / kd / cskd / icakd).
* :func:`run_demo` -- the embedded demo on the synthetic dataset.
* :func:`build_datasets`, :func:`build_model` -- the data sets and networks it knows.
"""

from __future__ import annotations

from .config import METHODS, TrainConfig, parse_args
from .data import DATASETS, build_datasets
from .engine import evaluate, load_weights, train
from .errors import TrainingDiverged, TrainingStopped, UserError
from .models import build_model, model_names

__all__ = ["METHODS", "DATASETS", "TrainConfig", "UserError", "TrainingStopped", "TrainingDiverged", "parse_args", "train", "evaluate", "load_weights",
           "build_datasets", "build_model", "model_names", "run_demo", "main"]


def run_demo(*args, **kwargs):
    from .demo import run_demo as _run

    return _run(*args, **kwargs)


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
