"""Saving and loading a checkpoint's contents (``checkpoints/step-N/`` of a run folder): the model's
Hugging Face folder written by the stage, and ``state.pt`` with the optimizer, scheduler, RNG and the
trainable tensors that folder does not hold bit for bit; a torn checkpoint falls back to the one before.

This module knows nothing about the run folder's other files (``run_dir.RunDir``) or a run's lifecycle.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoints import CHECKPOINTS, STATE, step_of
from ..errors import RunDirError
from .fsdp import SHARDED, barrier, is_sharded, load_sharded, rank, save_sharded, world_size
from .run_dir import RunDir

log = logging.getLogger(__name__)

# # checkpoints/step-N/ is two things at once:
# * a Hugging Face folder (config.json, model.safetensors, tokenizer; what final/ would hold at that
#   step), written by the stage's ``save_weights``: `generate`, `evaluate` and `from_pretrained` load it;
# * state.pt, the rest of what a resume needs: optimizer, scheduler, RNG, step, ``extra`` and the
#   trainable tensors that the Hugging Face folder does not hold bit for bit (LoRA adapters, PPO's
#   value model, float32 master weights saved as bfloat16). Every other trainable tensor is named in
#   ``model_from_weights`` and read back from the folder's safetensors, so weights are not stored twice.
# state.pt holds only tensors, numbers, strings, lists, tuples and dicts and is read with
# ``torch.load(weights_only=True)``: a pickle that names any other Python object is refused unread.

# torch's zip writer (inline_container.cc) reports a failed write, a full disk among them, as a
# RuntimeError without an errno: "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
# is what torch 2.13 raised on a full 64 KiB tmpfs.
_TORCH_WRITER = "inline_container"
_FULL_BELOW = 1 << 20  # bytes free under which a failed write is taken for a full disk


def write_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, with torch's own write failure (``_TORCH_WRITER``) raised as the OSError
    it is: ENOSPC ("No space left on device") when under 1 MiB is free on ``path``'s disk, else EIO with
    torch's message; either way the CLI ends with one line and where to resume. Other errors propagate."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        if _TORCH_WRITER not in str(e):
            raise
        if shutil.disk_usage(path.parent).free < _FULL_BELOW:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise OSError(errno.EIO, f"torch.save failed ({str(e).strip()})", str(path)) from e


STATE_FORMAT = 2  # 1 (no "format" key): everything pickled in state.pt, numpy RNG state included


class UnsafeCheckpointError(RunDirError):
    """A ``state.pt`` that would run code when unpickled. Not a crash artifact: a resume stops here
    instead of falling back to an older checkpoint."""


def rng_state() -> dict[str, Any]:
    """The Python, numpy, torch (and CUDA) RNG states as tensors, ints, floats, strings and tuples
    only, so that ``torch.load(weights_only=True)`` reads them back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (or the numpy tuple of a format-1 checkpoint)."""
    random.setstate(state["python"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only trainable tensors (the LoRA adapters under LoRA; everything otherwise), detached, on the
    model's device (not copied)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in model.state_dict().items() if k in names}


def _safetensors_index(folder: Path) -> dict[str, str]:
    """``{tensor name: file name}`` over the ``*.safetensors`` files directly in ``folder``."""
    from safetensors import safe_open

    index: dict[str, str] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            index.update(dict.fromkeys(st.keys(), f.name))
    return index


def _stored_in_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Which of ``tensors`` the Hugging Face folder's safetensors hold exactly (same dtype, shape and
    every bit): ``{key: [file, tensor name]}``. A key is looked up as it is and without its leading
    module names (``policy.model.x`` -> ``model.x`` -> ``x``: PPO's policy inside PolicyAndValue);
    only an exact match counts, so a resume from the folder is bit-identical."""
    from safetensors import safe_open

    index = _safetensors_index(folder)
    files = {f: safe_open(folder / f, framework="pt") for f in set(index.values())}
    found: dict[str, list[str]] = {}
    for key, t in tensors.items():
        parts = key.split(".")
        for name in (".".join(parts[i:]) for i in range(len(parts))):
            saved = files[index[name]].get_tensor(name) if name in index else None
            if saved is not None and _same_bits(saved, t):
                found[key] = [index[name], name]
                break
    return found


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike ``torch.equal``, tells -0.0 from 0.0 and matches NaNs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().contiguous().reshape(-1).view(torch.uint8), b.detach().cpu().contiguous().reshape(-1).view(torch.uint8))


def save_checkpoint(
    run: RunDir, step: int, model, optimizer, scheduler, extra: dict[str, Any] | None = None, *, keep: int = 2, save_weights: Callable[[Path], None] | None = None,
) -> Path | None:
    """Write ``checkpoints/step-N/``: the Hugging Face folder ``save_weights(folder)`` writes (None: no
    folder, every trainable tensor in state.pt), then ``state.pt`` (format 2: optimizer, scheduler,
    step, RNG, ``extra``, and the trainable tensors of ``model`` that the folder does not hold
    exactly). ``extra`` must hold only tensors, numbers, strings, lists, tuples and dicts (what
    ``torch.load(weights_only=True)`` reads). Every process calls it: with several processes each
    other process R writes its RNG state to ``rng-R.pt`` (restored by ``load_checkpoint``, so that a
    resumed run samples what the uninterrupted one would); the main process writes the rest and
    returns the folder (None elsewhere). FSDP-sharded models (``--run.fsdp``): every process also
    writes its shard of weights and optimizer states to ``sharded/`` (``fsdp.save_sharded``), the
    Hugging Face folder holds the gathered weights, and state.pt (``"sharded": True``) holds no
    weights or optimizer states.

    Written to a temporary name and renamed, so a crash mid-save never leaves a half checkpoint that
    a resume would pick up; checkpoints beyond the newest ``keep`` are deleted. A checkpoint has no
    completeness marker (COMPLETE.json): it is never taken for a finished run's final/.
    """
    sharded, several = is_sharded(model), world_size() > 1
    final = run.path / CHECKPOINTS / f"step-{step}"
    tmp = run.path / CHECKPOINTS / f".tmp-step-{step}"
    if run.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if several:
        barrier()  # the temporary folder exists for every process
    if sharded:  # collective: every process gathers the full weights (process 0 writes them) and writes its shards
        if save_weights is not None:
            save_weights(tmp)
        save_sharded(tmp / SHARDED, model, optimizer)
    if not run.is_main:
        write_torch(rng_state(), tmp / f"rng-{rank()}.pt")  # its own RNG state: the processes sample different rollouts
        barrier()  # process 0 renames the folder once every process has written its part
        return None
    if sharded:  # weights and optimizer states are in sharded/
        state: dict[str, Any] = {"sharded": True, "model": {}, "model_from_weights": {}, "optimizer": {}}
    else:
        if save_weights is not None:
            save_weights(tmp)
        trainable = trainable_state_dict(model)
        in_weights = _stored_in_weights(tmp, trainable) if save_weights is not None else {}
        state = {
            "model": {k: v.cpu().clone() for k, v in trainable.items() if k not in in_weights},
            "model_from_weights": in_weights,
            "optimizer": optimizer.state_dict(),
        }
    write_torch({"format": STATE_FORMAT, "step": step, **state, "scheduler": scheduler.state_dict(), "rng": rng_state(), "extra": extra or {}}, tmp / STATE)
    if several:
        barrier()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    run.prune_checkpoints(keep)
    run.drop_replaced()
    return final


def _load_sharded_checkpoint(candidate: Path, model, optimizer) -> None:
    """Restore a sharded checkpoint's weights and optimizer states (``fsdp.load_sharded``, resharded
    to this job). Raises RunDirError naming the folder when the shards are unreadable."""
    try:
        load_sharded(candidate / SHARDED, model, optimizer)
    except Exception as e:  # noqa: BLE001 - a missing or torn shard file
        raise RunDirError(f"{candidate / SHARDED}: unreadable sharded checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _read_rng(file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RunDirError(f"{file}: unreadable RNG state ({type(e).__name__})") from e


def _read_state(file: Path, *, trust: bool = False) -> dict[str, Any]:
    """Read one ``state.pt`` without running code: ``torch.load(weights_only=True)`` after a static
    look at the pickle's globals. Raises UnsafeCheckpointError (naming the file and the globals) for
    a file that names anything but tensors and plain containers, including a format-1 checkpoint of
    an older tldr-rlhf (its numpy RNG state), unless ``trust`` (``--run.trust-checkpoint``: a full
    unpickle that runs whatever the file contains); RunDirError naming the file for a truncated or
    otherwise unreadable one."""
    def unreadable(e: Exception) -> RunDirError:
        return RunDirError(f"{file}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")

    if not trust:
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        except Exception as e:  # not a torch zip file (truncated, torn, something else)
            raise unreadable(e) from e
        if unsafe:
            raise _unsafe(file, unsafe)
    try:
        state = torch.load(file, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):  # the restricted unpickler met a global the static look missed
            raise _unsafe(file, re.findall(r"GLOBAL ([\w.]+)", str(e)) or ["a Python object"]) from e
        raise unreadable(e) from e
    except Exception as e:  # torch raises RuntimeError / EOFError for a torn file
        raise unreadable(e) from e
    if not isinstance(state, dict) or not {"step", "model", "optimizer", "scheduler", "rng"} <= set(state):
        raise unreadable(ValueError("not a tldr-rlhf checkpoint (keys missing)"))
    return state


def _unsafe(file: Path, names: list[str]) -> UnsafeCheckpointError:
    """The one-line error for a ``state.pt`` that names the Python objects ``names``."""
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    if all(n.startswith("numpy.") for n in names):
        return UnsafeCheckpointError(
            f"{file}: a checkpoint of an older tldr-rlhf, whose loading runs pickled code ({shown}); if you wrote it yourself, "
            "rerun with --run.trust-checkpoint to load it, or pass --run.overwrite to start afresh"
        )
    return UnsafeCheckpointError(
        f"{file}: refused: loading it would run pickled code ({shown}), and a tldr-rlhf checkpoint holds only tensors, numbers "
        f"and strings; not falling back to an older checkpoint (an altered file is no crash artifact): delete {file.parent} "
        "to resume from the one before, or pass --run.overwrite to start afresh"
    )


def _read_weights(folder: Path, refs: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """The tensors ``refs`` ({key: [file, tensor name]}) names, read from ``folder``'s safetensors.
    Raises RunDirError naming the folder when a file or tensor is missing or unreadable."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        by_file: dict[str, list[tuple[str, str]]] = {}
        for key, (f, name) in refs.items():
            by_file.setdefault(f, []).append((key, name))
        for f, pairs in by_file.items():
            with safe_open(folder / f, framework="pt") as st:
                for key, name in pairs:
                    out[key] = st.get_tensor(name)
    except Exception as e:  # missing file, torn safetensors, missing tensor
        raise RunDirError(f"{folder}: unreadable checkpoint weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return out


def load_checkpoint(path: Path, model, optimizer, scheduler, *, trust: bool = False) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns the state dict (``step``, ``extra``, and
    ``path``: the checkpoint actually used).

    When ``path``'s ``state.pt`` or weights are unreadable (truncated by a crash or a full disk), the
    next older checkpoint of the same run is used instead, with a warning that names the bad file;
    RunDirError when none is readable. A ``state.pt`` that would run code (UnsafeCheckpointError, see
    ``_read_state``; ``trust`` skips the check) stops the resume with no fall-back: it was altered or
    written by something else, and an older checkpoint of a run that holds one deserves no more trust.
    A checkpoint whose weights do not fit the model is a RunDirError.
    """
    path = Path(path)
    older = sorted((p for p in path.parent.glob("step-*") if (p / STATE).exists() and step_of(p) < step_of(path)), key=step_of, reverse=True)
    errors = []
    for candidate in [path, *older]:
        try:
            state = _read_state(candidate / STATE, trust=trust)
            weights = {**_read_weights(candidate, state.get("model_from_weights", {})), **state["model"]}
        except UnsafeCheckpointError:
            raise
        except RunDirError as e:
            errors.append(str(e))
            log.warning("%s; falling back to an older checkpoint", e)
            continue
        break
    else:
        raise RunDirError("no readable checkpoint to resume from: " + "; ".join(errors) + " (pass --run.overwrite to start afresh)")
    own_rng = candidate / f"rng-{rank()}.pt"  # process R > 0's own RNG state; process 0's is in state.pt
    if rank() > 0 and own_rng.exists():
        state["rng"] = _read_rng(own_rng)
    if state.get("sharded"):
        _load_sharded_checkpoint(candidate, model, optimizer)
    elif is_sharded(model):
        raise RunDirError(f"{candidate}: written without --run.fsdp; resume it without --run.fsdp (or pass --run.overwrite to start afresh)")
    else:
        missing = set(weights) - set(model.state_dict())
        if missing:
            raise RunDirError(f"{candidate}: checkpoint has weights the model lacks: {sorted(missing)[:5]}")
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    state["path"] = candidate
    return state
