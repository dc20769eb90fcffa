"""A progress bar: tqdm when it is installed, else a minimal text fallback (stderr)."""

from __future__ import annotations

import sys
import time

__all__ = ["progress_bar"]


class _TextBar:
    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled = max(total, 1), desc, enabled
        self.n = 0
        self.postfix = ""
        self._tty = sys.stderr.isatty()
        self._t0 = time.perf_counter()
        self._last = 0.0 if self._tty else self._t0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > (0.2 if self._tty else 10.0)
                             or (self._tty and self.n >= self.total)):
            self._last = now
            pct = 100.0 * self.n / self.total
            rate = self.n / max(now - self._t0, 1e-9)
            line = f"{self.desc} {self.n}/{self.total} ({pct:3.0f}%) {rate:.1f} it/s {self.postfix}"
            sys.stderr.write(("\r" + line) if self._tty else (line + "\n"))
            sys.stderr.flush()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if self.enabled and self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_bar(total: int, desc: str = "", enabled: bool = True):
    """An object with ``update(n)``, ``set_postfix_str(s)`` and ``close()``."""
    if not sys.stderr.isatty():  # logs and pipes: a plain line now and then, no carriage returns
        return _TextBar(total, desc, enabled)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, desc, enabled)
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5)
