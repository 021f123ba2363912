"""Errors with enough context for a user to fix their input."""

from __future__ import annotations


class TldrRlhfError(Exception):
    """Base class of every error this package raises on purpose."""


class DataError(TldrRlhfError, ValueError):
    """Bad input data. Names the file, the 1-based line and the field when they are known."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = path, line, field
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__((", ".join(where) + ": " if where else "") + message)


class ModelLoadError(TldrRlhfError, ValueError):
    """A model or tokenizer that cannot be loaded (missing path, unreachable hub, no EOS token)."""


class RunDirError(TldrRlhfError, RuntimeError):
    """A run folder that would be overwritten, or a resume that does not match the run."""


class ConfigError(TldrRlhfError, ValueError):
    """A config value out of range, batch sizes that do not divide, or an input path that does not
    exist. Names the flag, e.g. ``--optim.lr -1.0: must be > 0``."""
