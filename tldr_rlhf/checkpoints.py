"""What a model path holds, read from its files without loading any weights: whether a run's
``final/`` is complete (its ``COMPLETE.json`` marker), whether a checkpoint is a policy or a reward
model (its config.json), and a fingerprint of its contents for cache keys. Commands use these to
refuse a model given to the wrong flag, or a half-written one, before they load or generate anything.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelLoadError
from .modeling import looks_local, offline_kwargs
from .reward.reward_model import MODEL_TYPE

FINAL = "final"  # a run folder's finished model
CHECKPOINTS = "checkpoints"  # a run folder's checkpoints/step-N/ folders
STATE = "state.pt"  # a checkpoint's optimizer, scheduler, RNG and extra tensors (train/checkpointing.py)
COMPLETE = "COMPLETE.json"  # written last into a run's final/: a final/ without it is not a finished run


def step_of(checkpoint: Path) -> int:
    """The step N of a ``checkpoints/step-N`` folder."""
    return int(checkpoint.name.split("-")[1])


SMALL_FILE_BYTES = 1 << 20  # files up to 1 MiB (configs, card, small tokenizer files) are hashed in the marker


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def completeness_record(folder: str | Path) -> dict[str, dict[str, Any]]:
    """What ``COMPLETE.json`` records of a model folder just written: ``files`` (relative path ->
    size in bytes, every file) and ``sha256`` (relative path -> hex digest, files up to
    ``SMALL_FILE_BYTES``). ``final_problem`` checks the folder against it."""
    folder = Path(folder)
    files = {p: p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {
        "files": {str(p.relative_to(folder)): size for p, size in files.items()},
        "sha256": {str(p.relative_to(folder)): _sha256(p) for p, size in files.items() if size <= SMALL_FILE_BYTES},
    }


def final_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a finished ``final/`` folder, or None when it is: its completeness marker
    (``RunDir.write_final`` writes it last) exists, and every file it records is there with the
    recorded size and, for the small files it hashed, the recorded sha256. A ``final/`` left
    half-written by a crash or a full disk has no marker; a damaged one (a truncated weights file, an
    edited config) fails the sizes or hashes. A marker from before sizes were recorded is taken as it is."""
    p = Path(path)
    try:
        record = json.loads((p / COMPLETE).read_text())
    except FileNotFoundError:
        return f"no {COMPLETE}: its save did not finish"
    except (OSError, ValueError):
        return f"its {COMPLETE} is unreadable"
    if not isinstance(record, dict):
        return f"its {COMPLETE} is unreadable"
    for name, size in (record.get("files") or {}).items():
        f = p / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {COMPLETE} recorded {size}"
    for name, digest in (record.get("sha256") or {}).items():
        if not (p / name).is_file() or _sha256(p / name) != digest:
            return f"{name} is not the file that was written (sha256 differs from {COMPLETE})"
    return None


def final_is_complete(path: str | Path) -> bool:
    """True when ``path`` is a ``final/`` folder whose save finished and whose files are the ones
    written (``final_problem`` finds nothing)."""
    return final_problem(path) is None


# Architecture name endings of the Hugging Face classes each kind loads as.
_POLICY_ARCHS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_REWARD_ARCHS = ("ForSequenceClassification", "ScalarRewardModel")
_KIND_WORDS = {"policy": "a causal LM policy", "reward_model": "a reward model"}


def hub_config(repo_id: str) -> dict | None:
    """A hub model's config.json: from the local cache, else downloaded; None when unreadable."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        f = try_to_load_from_cache(repo_id, "config.json")
        if not isinstance(f, str):
            if offline_kwargs(repo_id):
                return None  # no network: the loader says so in one line
            f = hf_hub_download(repo_id, "config.json", etag_timeout=5)
        return json.loads(Path(f).read_text())
    except Exception:  # noqa: BLE001 - offline, gated, not a model repo: the loader will say
        return None


def kind_from_config(config: dict) -> str:
    """"policy", "reward_model" or "unknown" from a config.json dict: our reward model's
    ``model_type`` or an ``auto_map`` / ``architectures`` entry of a sequence classifier is a reward
    model; a ``...ForCausalLM`` (or ``LMHeadModel``, ``ForConditionalGeneration``) architecture is a
    policy; anything else (no architectures, an encoder) is unknown."""
    if config.get("model_type") == MODEL_TYPE or "AutoModelForSequenceClassification" in (config.get("auto_map") or {}):
        return "reward_model"
    archs = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith(_REWARD_ARCHS) for a in archs):
        return "reward_model"
    if any(a.endswith(_POLICY_ARCHS) for a in archs) or "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        return "policy"
    return "unknown"


def checkpoint_kind(path: str) -> str:
    """What a model path holds, read from its config.json without loading weights: "policy" (a
    causal LM), "reward_model" (a sequence classifier, ours or another) or "unknown" (no readable
    config, a missing path, an unreachable hub). A ``.gguf`` file is a policy; a hub id is looked
    up in the hub cache, else downloaded (config.json only)."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        return "policy"
    if p.is_dir():
        try:
            config = json.loads((p / "config.json").read_text())
        except (OSError, ValueError):
            return "unknown"
    elif looks_local(path) or p.exists():
        return "unknown"
    else:
        config = hub_config(path)
    return kind_from_config(config) if isinstance(config, dict) else "unknown"


def require_kind(path: str, kind: str, flag: str) -> None:
    """Raise ModelLoadError "FLAG PATH is a reward model, not a policy" (or the other way round)
    when ``checkpoint_kind(path)`` is known and is not ``kind`` ("policy" or "reward_model");
    an unknown kind passes (the loader decides). A ``flag`` ending in "=" is joined to the path
    without a space (``--policies ppo=PATH``)."""
    found = checkpoint_kind(path)
    if found != "unknown" and found != kind:
        want = "a policy" if kind == "policy" else "a reward model"
        where = flag + ("" if flag.endswith("=") else " ") + str(path)
        raise ModelLoadError(f"{where} is {_KIND_WORDS[found]}, not {want}")


def checkpoint_fingerprint(path: str) -> str:
    """A sha256 hex digest of what is stored at a model or tokenizer ``path``, for cache keys that
    must change when the weights do (a checkpoint retrained at the same path):

    * a local folder: the name, size and content of every file directly in it (weights, configs,
      tokenizer files);
    * a local file (a ``.gguf``): its name, size and content;
    * a hub id: the commit of its locally cached snapshot (what ``from_pretrained`` loads offline),
      or the id alone when no snapshot is cached.

    Contents, not modification times: a rewrite of a file with the same size within one clock
    tick keeps its mtime. Hashing reads the weights once more (about a second per GB).
    """
    import hashlib

    h = hashlib.sha256()
    p = Path(path).expanduser()
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    if files:
        for f in files:
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()
    revision = None
    try:
        from huggingface_hub import snapshot_download

        revision = Path(snapshot_download(path, local_files_only=True)).name
    except Exception:  # noqa: BLE001 -- not a cached hub model (or not a valid id)
        pass
    h.update(f"hub\0{path}\0{revision}".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# An input path given to a flag

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # NAMESPACE/NAME (inputs, --run.push-to-hub, model cards)
_FILE_SUFFIXES = (".json", ".jsonl", ".gguf", ".parquet", ".safetensors", ".bin", ".pt", ".csv", ".txt")


def check_input(value: str, name: str, what: str = "file or folder") -> None:
    """Raise ConfigError when ``value`` (the input of flag ``name``) is neither an existing path nor a
    plausible hub id, or is a run's ``final/`` whose save never completed."""
    if not value:
        return
    name = name if name.endswith("=") else name + " "  # "--policies ppo=PATH", "--sft-path PATH"
    p = Path(value)
    if p.exists():
        if p.is_dir() and p.name == "final" and (p.parent / "config.json").is_file() and not final_is_complete(p):
            raise ConfigError(f"{name}{value}: the run's final/ is incomplete ({final_problem(p)}); rerun that stage to complete it")
        return
    first = p.parts[0] if p.parts else ""
    looks_local = (
        p.is_absolute() or first in (".", "..", "~") or value.endswith(_FILE_SUFFIXES) or not HUB_ID.match(value) or Path(first).is_dir()
    )
    if looks_local:
        raise ConfigError(f"{name}{value}: {what} does not exist")
