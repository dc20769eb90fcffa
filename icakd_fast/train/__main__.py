"""``icakd-train`` / ``python -m icakd_fast.train``: see ``icakd-train --help``."""

from __future__ import annotations

import signal
import sys
from typing import Callable, Sequence

from .errors import TrainingDiverged, TrainingStopped, UserError

PROG = "icakd-train"
EXIT_DIVERGED = 3


def run_command(prog: str, body: Callable[[], int], stopped_hint: str | None = None) -> int:
    """``body()``'s exit status, with the trainer's exceptions turned into one line on stderr and
    an exit status: 2 a usage / input error, 3 stopped after ``--max-bad-steps`` consecutive
    non-finite steps, 128 + the signal number (143 SIGTERM, 130 SIGINT) stopped by a signal with a
    checkpoint written (the trainer said so; ``stopped_hint``, if given, is printed after it)."""
    try:
        return body()
    except TrainingStopped as exc:
        if stopped_hint:
            sys.stderr.write(f"{prog}: stopped by {exc.signal_name}; {stopped_hint}\n")
        return 128 + int(getattr(signal, exc.signal_name))
    except TrainingDiverged as exc:
        if _is_rank0():
            sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_DIVERGED
    except UserError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, else as :func:`run_command`)."""
    return run_command(PROG, lambda: _train_command(argv))


def _train_command(argv: Sequence[str] | None) -> int:
    from .config import parse_args

    try:
        cfg, demo, given = parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if demo:
        from .demo import run_demo

        run_demo(cfg, given)
    else:
        from .engine import train

        summary = train(cfg)
        if summary.get("world_size", 1) == 1 or _is_rank0():
            print(f"done: {summary['method']} {summary['student']} top-1 {summary['top1']:.2f} "
                  f"(best {summary['best_top1']:.2f}), top-5 {summary['top5']:.2f}, "
                  f"{summary['images_per_s']:.0f} img/s; checkpoints in {summary['out']}")
    return 0


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
