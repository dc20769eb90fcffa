"""The one exception type the CLI turns into a single ``icakd-train: error: ...`` line."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A problem with the user's input (flags, config, paths, names): reported without traceback."""
