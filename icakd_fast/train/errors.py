"""The exceptions the CLI turns into a single ``icakd-train: error: ...`` line."""

from __future__ import annotations

__all__ = ["UserError", "TrainingDiverged", "TrainingStopped"]


class UserError(Exception):
    """A problem with the user's input (flags, config, paths, names): reported without traceback."""


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped the run after a step, with a checkpoint to ``--resume`` from.

    ``signal_name`` is ``"SIGTERM"`` or ``"SIGINT"``; ``summary`` is what :func:`train` would
    have returned (``"stopped"`` names the signal)."""

    def __init__(self, message: str, signal_name: str, summary: dict | None = None) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.summary = summary or {}


class TrainingDiverged(UserError):
    """Too many consecutive steps with a non-finite loss or gradient (``--max-bad-steps``): the run
    stopped without writing anything, so the last checkpoint is the last good state."""
