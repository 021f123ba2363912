"""Reading JSON-lines files with errors that name the file, line and field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import DataError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSON-lines file (1-based lines).

    Raises DataError naming the file and line for a line that is not UTF-8 text (a binary file given
    as data), invalid JSON or a line that is not an object, and for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=str(path))
    with path.open("rb") as f:
        for number, data in enumerate(f, start=1):
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start + 1}); expected JSON lines, is it a binary file?", path=str(path), line=number) from None
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=str(path), line=number) from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", path=str(path), line=number)
            yield number, record


def require(record: dict[str, Any], field: str, *, path: str | None, line: int | None, kind: type = str) -> Any:
    """Return ``record[field]`` (dotted names reach into nested objects), checking presence and type.

    Raises DataError naming path, line and the dotted field name.
    """
    value: Any = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError("missing field", path=path, line=line, field=field)
        value = value[part]
    if not isinstance(value, kind):
        raise DataError(f"expected {kind.__name__}, got {type(value).__name__}", path=path, line=line, field=field)
    return value


def in_valid_split(key: str, fraction: float, salt: str = "tldr-rlhf") -> bool:
    """Deterministic membership of ``key`` (a post id) in a held-out ``fraction``: sha256(salt + key)
    mapped to [0, 1) is below ``fraction``. Independent of record order and count."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"valid fraction must be in [0, 1], got {fraction}")
    return split_position(key, salt) < fraction


def split_position(key: str, salt: str = "tldr-rlhf") -> float:
    """Where ``key`` (a post id) falls in [0, 1): sha256(salt + key), the value ``in_valid_split`` compares."""
    return int(hashlib.sha256((salt + key).encode()).hexdigest()[:15], 16) / float(16**15)


def held_out_keys(keys: Iterable[str], count: int, salt: str = "tldr-rlhf") -> set[str]:
    """The ``count`` distinct keys (post ids) with the lowest ``split_position``: a held-out set of an exact
    size, independent of record order (ties broken by the key). Raises ValueError when ``count`` is negative
    or more than the distinct keys."""
    unique = sorted(set(keys), key=lambda k: (split_position(k, salt), k))
    if not 0 <= count <= len(unique):
        raise ValueError(f"cannot hold out {count} of {len(unique)} distinct post ids")
    return set(unique[:count])


def check_local_source(source: str | Path) -> None:
    """Raise DataError("file not found") for a source that is plainly a local path (absolute,
    relative with ./, or ending in .json/.jsonl) but does not exist, instead of asking the hub."""
    text = str(source)
    if Path(text).exists():
        return
    if text.startswith(("/", "./", "../", "~")) or text.endswith((".json", ".jsonl")):
        raise DataError("file not found", path=text)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file ([] when it does not exist). Raises DataError naming the file
    and line for invalid JSON."""
    return [r for _, r in read_jsonl(path)] if path.is_file() else []
