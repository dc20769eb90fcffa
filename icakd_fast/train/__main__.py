"""``icakd-train`` / ``python -m icakd_fast.train``: see ``icakd-train --help``."""

from __future__ import annotations

import sys
from typing import Sequence

from .errors import UserError

PROG = "icakd-train"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 for a usage / input error)."""
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
