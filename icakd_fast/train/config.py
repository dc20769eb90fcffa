"""Training configuration: defaults < TOML file (``--config``) < command-line flags.

A TOML file uses the flag names as keys (``batch-size`` or ``batch_size``), plus two optional
tables: ``[loss]`` (keyword options of :class:`icakd_fast.ICAKDLoss`, e.g. ``w_cam``, ``tau``,
``slots_per_class``, ``bank``) and ``[synthetic]`` (``num_classes``, ``image_size``,
``train_per_class``, ``test_per_class``). Relative paths in a file are relative to the working
directory, like those on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..methods import method_names
from .errors import UserError

__all__ = ["TrainConfig", "METHODS", "build_parser", "parse_args", "load_toml", "config_from_mapping"]

# every method name of icakd_fast.methods (baselines, icakd, its ablations, cskd-official)
METHODS = method_names()
AMP_MODES = ("off", "bf16", "fp16")
SCHEDULES = ("multistep", "cosine")


@dataclass
class TrainConfig:
    dataset: str = "synthetic"
    data_dir: str | None = None
    download: bool = False
    method: str = "icakd"
    teacher: str = "resnet20"
    student: str = "resnet8"
    teacher_ckpt: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: list[float] | None = None
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    seed: int = 0
    device: str = "auto"
    out: str = "runs/train"
    resume: str | None = None
    save_every: int | None = None
    max_bad_steps: int = 20
    limit_train_batches: int | None = None
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    workers: int | None = None
    eval_batch_size: int | None = None
    image_size: int | None = None
    threads: int | None = None
    progress: bool = True
    loss: dict[str, Any] = field(default_factory=dict)
    synthetic: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.amp not in AMP_MODES:
            raise UserError(f"unknown amp mode {self.amp!r}; choose one of: {', '.join(AMP_MODES)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.limit_train_batches is not None and self.limit_train_batches < 1:
            raise UserError(f"limit-train-batches must be >= 1, got {self.limit_train_batches}")
        if self.save_every is not None and self.save_every < 1:
            raise UserError(f"save-every must be >= 1, got {self.save_every}")
        if self.max_bad_steps < 0:
            raise UserError(f"max-bad-steps must be >= 0 (0: never stop), got {self.max_bad_steps}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"workers must be >= 0, got {self.workers}")
        if not isinstance(self.loss, dict) or not isinstance(self.synthetic, dict):
            raise UserError("[loss] and [synthetic] must be TOML tables")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TABLES = ("loss", "synthetic")


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Check/convert a TOML value to the field's type (ints accepted for floats)."""
    default = _FIELDS[name].default
    typ = _FIELDS[name].type
    if value is None:
        return None
    if name == "milestones":
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
            raise UserError(f"{origin}: 'milestones' must be a list of numbers")
        return [float(v) for v in value]
    if isinstance(default, bool) or typ == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{origin}: '{name}' must be true or false, got {value!r}")
        return value
    want_float = "float" in str(typ)
    want_int = "int" in str(typ) and not want_float
    if want_int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{origin}: '{name}' must be an integer, got {value!r}")
        return value
    if want_float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{origin}: '{name}' must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise UserError(f"{origin}: '{name}' must be a string, got {value!r}")
    return value


def config_from_mapping(data: dict[str, Any], origin: str = "config", base: TrainConfig | None = None) -> TrainConfig:
    """Apply a mapping (e.g. a parsed TOML file) onto ``base`` (default: the defaults)."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    cfg.loss = dict(cfg.loss)
    cfg.synthetic = dict(cfg.synthetic)
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key in _TABLES:
            if not isinstance(value, dict):
                raise UserError(f"{origin}: '{raw_key}' must be a table ([{raw_key}])")
            getattr(cfg, key).update(value)
            continue
        if key not in _FIELDS:
            raise UserError(f"{origin}: unknown key '{raw_key}' "
                            f"(known: {', '.join(sorted(k.replace('_', '-') for k in _FIELDS))})")
        setattr(cfg, key, _coerce(key, value, origin))
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a name without a file of that name is a preset shipped with the package
    (``icakd_fast/train/presets/<name>.toml``, e.g. ``manyclass``)."""
    p = Path(path)
    if not p.is_file():
        from .presets import preset_path

        preset = preset_path(str(path))
        if preset is None:
            raise UserError(f"config file not found: {path}")
        p = preset
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from exc


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single ``icakd-train: error: ...`` line (exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string
    return key.strip(), parsed


def _milestones(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = OneLineErrorParser(
        prog="icakd-train",
        description=(
            "Distil a student from a teacher with ICAKD (or the ce / kd / cskd baselines). "
            "Without arguments (or with --demo) runs the embedded demo on the synthetic dataset: "
            "trains and caches a teacher, distils one student with each method under the same "
            "budget, prints a comparison table and writes runs/demo/. Every option can also be "
            "set in a TOML file given with --config; flags override the file."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    a = p.add_argument
    a("--config", metavar="FILE", help="TOML file with any of these options (flag names as keys, "
      "plus [loss] and [synthetic] tables)")
    a("--demo", action="store_true", help="run the embedded demo (the default when no training option is given)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"synthetic | cifar10 | cifar100 | tiny-imagenet | imagenet (default {d.dataset})")
    g.add_argument("--data-dir", metavar="DIR", help="dataset root (not needed for synthetic)")
    g.add_argument("--download", action="store_true", help="download CIFAR-10/100 into --data-dir if missing")
    g.add_argument("--workers", type=int, metavar="N", help="data-loading processes (default: 0 for synthetic, "
                   "else min(8, CPUs))")
    g.add_argument("--image-size", type=int, metavar="PX", help="input size (ImageNet crop; synthetic image size)")
    g.add_argument("--num-classes", type=int, metavar="C", help="number of classes of the synthetic dataset")
    g = p.add_argument_group("models and method")
    g.add_argument("--method", help=f"one of {', '.join(METHODS)}; 'ce' trains --student alone, which is "
                   f"how a teacher is trained (default {d.method})")
    g.add_argument("--teacher", metavar="ARCH", help=f"teacher architecture (default {d.teacher})")
    g.add_argument("--student", metavar="ARCH", help=f"student architecture (default {d.student})")
    g.add_argument("--teacher-ckpt", metavar="PATH", help="teacher weights: a checkpoint written by this trainer "
                   "(best.pt / last.pt), a plain state_dict, or 'torchvision' for torchvision's ImageNet weights")
    g.add_argument("--loss-opt", action="append", type=_kv, metavar="KEY=VALUE",
                   help="ICAKDLoss option, e.g. --loss-opt w_cam=50 --loss-opt bank=fifo (repeatable)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    g.add_argument("--batch-size", type=int, metavar="B", help=f"batch size per process (default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"peak SGD learning rate (default {d.lr})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    g.add_argument("--weight-decay", type=float, help=f"SGD weight decay (default {d.weight_decay})")
    g.add_argument("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default {d.schedule})")
    g.add_argument("--milestones", type=_milestones, metavar="E1,E2,..",
                   help="multistep decay epochs (default 150/240, 180/240, 210/240 of --epochs)")
    g.add_argument("--warmup-epochs", type=float, metavar="E", help="linear warm-up epochs (default 0)")
    g.add_argument("--limit-train-batches", type=int, metavar="N", help="at most N training steps per epoch")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--out", metavar="DIR", help="output directory: metrics.csv, last.pt, best.pt "
                   "(default runs/train, runs/demo for the demo)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                   help="continue from a last.pt (or a directory holding one); without PATH: <out>/last.pt "
                   "when there is one, else start fresh")
    g.add_argument("--save-every", type=int, metavar="N", help="also write <out>/last.pt every N steps "
                   "(default: at the end of each epoch only)")
    g.add_argument("--max-bad-steps", type=int, metavar="N", help="stop after N consecutive steps with a "
                   f"non-finite loss or gradient, which are skipped (0: never stop; default {d.max_bad_steps})")
    g.add_argument("--amp", choices=AMP_MODES, help="mixed precision (default off)")
    g.add_argument("--channels-last", action="store_true", help="use the channels_last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the student")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


# flags whose presence means "train", not "demo"
_TRAIN_SELECTORS = ("config", "dataset", "data_dir", "method", "teacher_ckpt", "resume")


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool, set[str]]:
    """Parse ``argv`` -> (config, run_demo, names of options given on the command line)."""
    ns = vars(build_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))
    given = set(ns)
    demo = bool(ns.pop("demo", False)) or not (given & set(_TRAIN_SELECTORS))
    cfg = TrainConfig()
    if "config" in ns:
        path = ns.pop("config")
        cfg = config_from_mapping(load_toml(path), origin=str(path))
    loss_opts = ns.pop("loss_opt", None) or []
    num_classes = ns.pop("num_classes", None)
    for key, value in ns.items():
        setattr(cfg, key, value)
    for key, value in loss_opts:
        cfg.loss[key] = value
    if num_classes is not None:
        cfg.synthetic["num_classes"] = num_classes
    if cfg.image_size is not None and cfg.dataset == "synthetic":
        cfg.synthetic["image_size"] = cfg.image_size
    return cfg.validate(), demo, given
