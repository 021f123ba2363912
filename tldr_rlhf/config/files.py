"""Configs from files (``--config FILE``): a YAML recipe or any run's config.json, merged onto a preset.

A file may give only some fields, and a nested section only some of its fields: every field it names
replaces that field of the base config (the preset, or the stage's defaults), everything else keeps the
base's value. ``--preset X --config F --flag v`` is preset X, then the file's fields, then the flags.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

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


def _coerce(value: Any, current: Any, key: str, path: str | Path) -> Any:
    """``value`` in the type of the field's current value where YAML/JSON spell it differently: a list
    becomes a tuple, an int a float, and a string a float for a float field (PyYAML reads ``1e-4``, with
    no dot, as a string)."""
    if isinstance(value, list):
        return tuple(_coerce(v, None, key, path) for v in value)
    if isinstance(current, float) and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"--config {path}: {key}: expected a number, got '{value}'") from None
    return value


def merge_config(base: Any, data: dict[str, Any], *, path: str | Path = "", prefix: str = "") -> Any:
    """``base`` (a config dataclass instance) with the fields in ``data`` on top; a nested mapping is
    merged into that section of ``base`` the same way. Raises ConfigError naming the file and the
    dotted key for a key the config has no field for."""
    fields = {f.name: f for f in dataclasses.fields(base)}
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
            value = _coerce(value, current, dotted, path)
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
