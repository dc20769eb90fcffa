"""``icakd-train`` / ``python -m icakd_fast.train``: see ``icakd-train --help``."""

from __future__ import annotations

import signal
import sys
from typing import Sequence

from .errors import TrainingDiverged, TrainingStopped, UserError

PROG = "icakd-train"
EXIT_DIVERGED = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 done, 2 a usage / input error, 3 stopped
    after ``--max-bad-steps`` consecutive non-finite steps, 128 + the signal number (143 SIGTERM,
    130 SIGINT) stopped by a signal with a checkpoint to ``--resume`` from."""
    from .config import parse_args

    try:
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
    except TrainingStopped as exc:  # the trainer said so in one line; the checkpoint is written
        return 128 + int(getattr(signal, exc.signal_name))
    except TrainingDiverged as exc:
        if _is_rank0():
            sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_DIVERGED
    except UserError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    return 0


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
