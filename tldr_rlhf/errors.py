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


_OFFLINE_WORDS = ("couldn't connect", "could not connect", "connection error", "failed to resolve", "name or service not known", "temporary failure in name resolution", "network is unreachable", "max retries exceeded", "connecterror", "connecttimeout")


def hub_unreachable(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) says the Hugging Face hub could not be reached:
    huggingface_hub's LocalEntryNotFoundError (not cached and no connection), a connection or timeout
    error of requests / httpx, or an OSError whose text says it could not connect."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        kind = type(e).__name__
        if kind in ("LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ConnectionError", "ReadTimeout", "OfflineModeIsEnabled"):
            return True
        if any(w in str(e).lower() for w in _OFFLINE_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


def hub_unreachable_message(what: str, name: str) -> str:
    """The one line for a hub id that could not be fetched: what to set to skip the network."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return f"{what} '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once with the network on, or give a local path"
    return (f"could not reach the Hugging Face hub for {what} '{name}'; set HF_HUB_OFFLINE=1 to use the local "
            "cache without the network, or give a local path (folder, .json/.jsonl file, .gguf file)")


class RewardError(TldrRlhfError, ValueError):
    """A reward term (``--reward``) that failed while scoring: it raised, or returned something other
    than one finite number per response. Names the flag and the term."""
