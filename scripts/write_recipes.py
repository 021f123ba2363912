"""Write every stage's presets (tldr_rlhf/presets.py) as YAML recipes: recipes/STAGE/PRESET.yaml.

    python scripts/write_recipes.py          # rewrite recipes/ from presets.py
    python scripts/write_recipes.py --check  # exit 1 when recipes/ differs from presets.py

A recipe is the preset's whole config (every field), for a user to copy, edit and run with
``tldr-rlhf STAGE --config FILE``. Paths into the shared folder next to the repository (the local
SmolLM2 GGUF and data files of the cpu-smol presets) are written relative to the repository root as
``../shared/...``, so a recipe works on any machine with that layout when run from the repository root.
tests/test_recipes.py checks that each file equals what this script writes and loads to its preset.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tldr_rlhf.config import SHARED, to_dict  # noqa: E402
from tldr_rlhf.stages import STAGES  # noqa: E402

SHARED_RELATIVE = "../shared"


def portable(value):
    """``value`` (a config dict's entry) as plain YAML data: tuples become lists, and a string that is a
    path into the shared folder (alone or as NAME=PATH) becomes ``../shared/...`` (relative to the repository root)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str):  # a path, or NAME=PATH (evaluate's policies)
        return value.replace(str(SHARED) + "/", SHARED_RELATIVE + "/")
    return value


def recipes() -> dict[Path, str]:
    """Each recipe's path (relative to the repository root) and its YAML text."""
    out = {}
    for stage in STAGES:
        for name, cfg in stage.preset_table().items():
            header = (f"# tldr-rlhf {stage.name} --config recipes/{stage.name}/{name}.yaml  (the '{name}' preset)\n"
                      "# Generated from tldr_rlhf/presets.py by scripts/write_recipes.py; copy it and edit the copy.\n"
                      "# A recipe may keep only the fields it changes: the others come from --preset (default: the first).\n")
            out[Path("recipes") / stage.name / f"{name}.yaml"] = header + yaml.safe_dump(portable(json.loads(json.dumps(to_dict(cfg)))), sort_keys=False, width=120)
    return out


def main(argv: list[str]) -> int:
    stale = []
    for rel, text in recipes().items():
        path = ROOT / rel
        if path.exists() and path.read_text() == text:
            continue
        stale.append(str(rel))
        if "--check" not in argv:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if "--check" in argv and stale:
        print("recipes/ differs from presets.py (run python scripts/write_recipes.py): " + ", ".join(stale))
        return 1
    print(("stale: " if "--check" in argv else "wrote: ") + (", ".join(stale) or "nothing"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
