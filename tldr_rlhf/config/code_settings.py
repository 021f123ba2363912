"""Settings that make tldr-rlhf run code, and files: nothing of the kind comes from a file unnoticed.

* ``--run.trust-checkpoint`` (unpickle a ``state.pt`` that runs code) holds for the invocation that
  passes the flag, never longer: a run's config.json does not record it (``without_invocation_only``,
  applied by ``parts.to_dict``), and a ``--config`` file that sets it is not obeyed (a warning names
  the file). Else the README's rerun ``--config runs/X/config.json`` would carry it into a new run,
  where a planted ``state.pt`` would run its code with no warning.
* A reward term ``module:function`` (``reward/specs.py``) imports and calls Python code. When a
  ``--config`` file names one (``reward``, ``best_of_n_reward``, ``gold_reward``, in any section), a
  warning names the file, the field and the module, so that a recipe cannot run code unseen.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INVOCATION_ONLY = ("trust_checkpoint",)
"""Fields of a ``run`` section that hold for one invocation: never saved, never read from a file."""

_CALLABLE = re.compile(r"^\s*([A-Za-z_][\w.]*):([A-Za-z_]\w*)\s*(:[^,]*)?$")  # module:function[:weight]


def _is_invocation_only(section: str, key: str) -> bool:
    return section == "run" and str(key).replace("-", "_") in INVOCATION_ONLY


def without_invocation_only(data: dict[str, Any], section: str = "") -> dict[str, Any]:
    """A copy of a config mapping (``to_dict`` output, a config file's mapping) without the
    invocation-only fields of every ``run`` section, at any depth (a pipeline's stage sections)."""
    return {
        k: (without_invocation_only(v, str(k)) if isinstance(v, dict) else v)
        for k, v in data.items()
        if not _is_invocation_only(section, k)
    }


def _callable_terms(spec: str) -> list[str]:
    """The ``module:function`` terms of a reward spec (``reward/specs.py``: ``TERM[:WEIGHT],...``) that is
    not a path on disk; [] for anything else."""
    terms = []
    for part in spec.split(","):
        m = _CALLABLE.match(part)
        if m and not Path(part.strip()).exists():
            terms.append(f"{m.group(1)}:{m.group(2)}")
    return terms


def screen_config_file(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The mapping of ``--config`` file ``path`` as it may be applied: invocation-only fields dropped
    (a warning when one is set, naming the file and the flag to pass instead), and a warning for
    every reward term that runs Python code, naming the file, the field and the function."""
    _screen(data, path, "")
    return without_invocation_only(data)


def _screen(data: dict[str, Any], path: str | Path, prefix: str) -> None:
    section = prefix.rstrip(".").rpartition(".")[2]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _screen(value, path, dotted + ".")
        elif _is_invocation_only(section, key):
            if value:
                log.warning("--config %s: %s ignored: it holds only for a command that passes --%s itself", path, dotted, dotted.replace("_", "-"))
        elif str(key).replace("-", "_").endswith("reward") and isinstance(value, str):
            for term in _callable_terms(value):
                log.warning("--config %s: %s names Python code '%s': its module will be imported and run (named by this file)", path, dotted, term)
