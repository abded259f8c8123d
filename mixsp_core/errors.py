"""Errors that name the file and the line (or field) at fault."""

from __future__ import annotations

from pathlib import Path


class MixSPError(Exception):
    """Base class for errors a user can act on."""


class DataError(MixSPError, ValueError):
    """Bad input data: the message reads ``path:line: what`` (line omitted when unknown)."""

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ConfigError(MixSPError, ValueError):
    """A bad configuration value: the message names the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field '{field}': {message}")


class CheckpointError(MixSPError, ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


class HistoryError(MixSPError, RuntimeError):
    """A run that cannot be versioned or brought back: a DVC or git command that failed (its message
    included), or a run id / commit that names no recorded dvc.lock."""


class OutputBusyError(MixSPError, RuntimeError):
    """An output that another live process is writing (it holds the output's lock,
    :func:`mixsp_core.io.output_lock`). ``holder``: what that process recorded in the lock file (pid, host,
    command, started, what); empty when it could not be read or was stale."""

    def __init__(self, message: str, holder: dict | None = None):
        self.holder = dict(holder or {})
        super().__init__(message)
