"""Configs from files (``--config FILE``): a YAML recipe or any run's config.json, merged onto a preset.

A file may give only some fields, and a nested section only some of its fields: every field it names
replaces that field of the base config (the preset, or the stage's defaults), everything else keeps the
base's value. ``--preset X --config F --flag v`` is preset X, then the file's fields, then the flags.
A file's value passes the same checks as the flag's: its field's type (pydantic validates it against
the dataclass annotation, as tyro parses a flag) and its range rule, before anything touches the disk.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..errors import ConfigError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.json``, ``.yaml`` or ``.yml`` file (JSON for any other suffix whose text
    starts with ``{``, else YAML). Raises ConfigError (naming the file) when it is missing, unparsable
    or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    text = p.read_text()
    try:
        if p.suffix == ".json" or (p.suffix not in (".yaml", ".yml") and text.lstrip().startswith("{")):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - json and yaml raise their own kinds; one line names the file
        raise ConfigError(f"--config {path}: cannot parse ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field names, got {type(data).__name__}")
    return data


# pydantic error types -> what the field expects, in the words of the flag's own parse errors
_EXPECTED = {
    "int_parsing": "an integer", "int_from_float": "an integer", "int_type": "an integer",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "tuple_type": "a list", "dataclass_type": "a section (a mapping of its fields)",
}


@functools.lru_cache(maxsize=None)
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint)


def _typed(value: Any, hint: Any, dotted: str, path: str | Path) -> Any:
    """``value`` validated against the field's annotation ``hint`` by pydantic, in the lax mode a
    file needs: a list becomes a tuple, an int a float, a string a float for a float field (PyYAML
    reads ``1e-4``, with no dot, as a string); a float is not an int (``1.5``) and a word is not a
    number (``two``). Raises ConfigError naming the file and the dotted key (and the item of a list)."""
    try:
        return _adapter(hint).validate_python(value)
    except ValidationError as e:
        err = e.errors()[0]
        where = dotted + "".join(f"[{p}]" for p in err["loc"] if isinstance(p, int))
        expected = _EXPECTED.get(err["type"]) or err["msg"].replace("Input should be ", "")
        got = err["input"] if err["loc"] else value
        raise ConfigError(f"--config {path}: {where}: expected {expected}, got {got!r}") from None


def _in_range(cls_name: str, name: str, value: Any, dotted: str, path: str | Path) -> None:
    """The flag's own range rule (``validation.RULES``) on a value read from a file."""
    from ..validation import value_problem  # validation reads checkpoints (and torch): only when a file is given

    problem = value_problem(cls_name, name, value)
    if problem:
        raise ConfigError(f"--config {path}: {dotted} {value!r}: {problem}")


def merge_config(base: Any, data: dict[str, Any], *, path: str | Path = "", prefix: str = "") -> Any:
    """``base`` (a config dataclass instance) with the fields in ``data`` on top; a nested mapping is
    merged into that section of ``base`` the same way. Every value goes through the type of its field
    (``_typed``, pydantic) and the range rule of its flag (``validation.RULES``) here, before anything
    touches the disk. Raises ConfigError naming the file and the dotted key for a key the config has
    no field for, a value of the wrong type, or one out of range."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    hints = typing.get_type_hints(type(base), include_extras=True)
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        dotted = prefix + str(key)
        if name not in fields:
            raise ConfigError(f"--config {path}: unknown key '{dotted}' ({type(base).__name__} has no such field)")
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"--config {path}: {dotted}: expected a section (a mapping of its fields), got {value!r}")
            value = merge_config(current, value, path=path, prefix=dotted + ".")
        else:
            value = _typed(value, hints[name], dotted, path)
            _in_range(type(base).__name__, name, value, dotted, path)
        values[name] = value
    return dataclasses.replace(base, **values)


def config_from_file(cls: type, path: str | Path, base: Any | None = None) -> Any:
    """The config of class ``cls`` that ``path`` describes, on top of ``base`` (a preset; default: the
    class's defaults). A class with required fields and no ``base`` needs them in the file. Raises
    ConfigError for an unreadable file, an unknown key or a missing required field. Settings that run
    code are screened first (``code_settings.screen_config_file``)."""
    from .code_settings import screen_config_file

    data = screen_config_file(read_config_file(path), path)
    if base is None:
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [r for r in required if r not in data and r.replace("_", "-") not in data]
        if missing:
            raise ConfigError(f"--config {path}: missing required field(s) {', '.join(missing)}")
        filler = {r: data.get(r, data.get(r.replace("_", "-"))) for r in required}
        base = cls(**filler)
    return merge_config(base, data, path=path)
