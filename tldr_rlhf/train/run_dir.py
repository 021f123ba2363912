"""The run folder and its checkpoints: ``config.json metrics.jsonl samples.jsonl checkpoints/step-N/
final/``, written so that nothing finished is ever lost (see ``RunDir``), and checkpoints that restore
weights, optimizer, scheduler and RNG exactly."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import save_config, to_dict
from ..errors import RunDirError
from ..checkpoints import COMPLETE, completeness_record, final_is_complete, final_problem
from ..tracking import Trackers, log_line
from ..validation import validate_config

log = logging.getLogger(__name__)
FINAL = "final"
CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------------------------
# Run folder

_ACTIVE: list["RunDir"] = []  # run folders opened by this process (the CLI's Ctrl-C / error lines)
_PUSH_FAILURES: list[str] = []  # failed --run.push-to-hub uploads of this command (the CLI exits non-zero)


def _record_step(line: str) -> int | None:
    """The ``step`` of one metrics / samples JSON line; None for a blank or torn line (a process killed
    mid-write leaves a partial last line, which a resume drops)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


def _replaced_path(path: Path) -> Path:
    """Where ``--run.overwrite`` keeps the old run until the new one has its first checkpoint."""
    return path.parent / f".{path.name}.replaced"


class RunDir:
    """A run folder ``config.json metrics.jsonl samples.jsonl checkpoints/ final/``.

    Nothing finished is lost:
    - opening refuses a folder whose ``final/`` is complete (a finished run) unless ``overwrite``;
    - with ``overwrite`` the old run is moved aside (``.NAME.replaced`` beside it) and deleted only
      once the new run has its first checkpoint or its ``final/``; a run that fails before that gets
      the old one back (``restore_replaced`` from the CLI, or the next open of the folder);
    - ``final/`` is written under a temporary name, marked complete (``COMPLETE.json``) and renamed
      into place, so a crash or full disk never leaves a ``final/`` that looks finished;
    - a folder that cannot be written is a RunDirError naming ``--run.output-dir``.
    Only the main process writes.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.replaced: Path | None = None
        self.restored = False  # the run --run.overwrite replaced was put back (``restore_replaced``)
        self.trust_checkpoint = False  # --run.trust-checkpoint: resume from a state.pt that runs pickled code
        self.stage = self.path.name  # the stage's name once ``open`` knows its config
        self.cfg: Any = None
        self.trackers: Trackers | None = None  # --run.report-to (``open``)
        self.total_steps: int | None = None  # set by the stage: the log line's "/N" and ETA
        self._clock: tuple[float, int] | None = None  # (monotonic time, step) of the first record
        if is_main:
            self._restore_if_unfinished()
        if final_is_complete(self.path / FINAL) and not overwrite:
            raise RunDirError(
                f"{self.path} already holds a finished run ({self.path / FINAL}); pass --run.overwrite to replace it "
                "or choose another --run.output-dir"
            )
        if not is_main:
            return
        if (self.path / FINAL).exists() and not final_is_complete(self.path / FINAL):
            log.warning("%s is incomplete (%s); the run resumes and writes it again", self.path / FINAL, final_problem(self.path / FINAL))
        try:
            if overwrite and self.path.exists():
                aside = _replaced_path(self.path)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(self.path, aside)
                self.replaced = aside
                log.info("--run.overwrite: the old run is kept in %s until the new one has its first checkpoint", aside)
            (self.path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            self.restore_replaced()
            raise RunDirError(f"--run.output-dir {self.path}: cannot write there ({e.strerror or e})") from e
        _ACTIVE.append(self)

    def _has_progress(self) -> bool:
        return final_is_complete(self.path / FINAL) or self.latest_checkpoint() is not None

    def _restore_if_unfinished(self) -> None:
        """Bring back a run that an earlier ``--run.overwrite`` moved aside when the run that replaced
        it died before its first checkpoint (killed, or an error the CLI did not see)."""
        aside = _replaced_path(self.path)
        if aside.exists() and not self._has_progress():
            shutil.rmtree(self.path, ignore_errors=True)
            os.replace(aside, self.path)
            log.warning("restored %s: the --run.overwrite run that replaced it stopped before its first checkpoint", self.path)

    def restore_replaced(self) -> None:
        """Put the run that ``--run.overwrite`` moved aside back in place, unless the new run already
        has a checkpoint or a final/ (then the old one is gone for good)."""
        if self.replaced is not None and self.replaced.exists() and not self._has_progress():
            shutil.rmtree(self.path, ignore_errors=True)
            os.replace(self.replaced, self.path)
            self.restored = True
            log.warning("restored the previous run in %s (the --run.overwrite run stopped before its first checkpoint)", self.path)
        self.replaced = None

    def _drop_replaced(self) -> None:
        """The new run has progress of its own: the old one it replaced can go."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    @classmethod
    def open(cls, cfg: Any, *, is_main: bool = True) -> tuple["RunDir", Path | None]:
        """Open ``cfg.run.output_dir`` for a stage config with a ``run: RunArgs`` field: returns the
        run folder and the checkpoint to resume from (None for a fresh start). Every config value and
        input path is checked first (ConfigError), before anything on disk is touched. A resume must
        use the same config outside ``run`` (RunDirError otherwise); the resolved config is then
        written. A fresh start drops the metrics and samples of an earlier attempt that never reached
        a checkpoint. On CUDA the memory plan runs first (``plan.preflight``)."""
        validate_config(cfg)
        from ..plan import preflight

        stage = _stage_of(cfg)
        preflight(stage or "", cfg)  # a stage that cannot fit on the GPU stops here, before the folder is touched
        run = cls(cfg.run.output_dir, overwrite=cfg.run.overwrite, is_main=is_main)
        run.trust_checkpoint = cfg.run.trust_checkpoint
        run.cfg, run.stage = cfg, stage or run.stage
        if is_main:
            run.trackers = Trackers(cfg.run.report_to, run.path, to_dict(cfg), stage=run.stage)
        resume_from = run.latest_checkpoint() if cfg.run.resume else None
        if resume_from is not None:
            run.check_config_matches(cfg)
        else:
            run.truncate_logs(-1)
        run.write_config(cfg)
        return run, resume_from

    @property
    def final_dir(self) -> Path:
        return self.path / FINAL

    def write_final(self, save: Callable[[Path], None], *, step: int, stage: str) -> Path:
        """Write ``final/`` atomically: ``save(tmp)`` fills a temporary folder, the completeness marker
        (stage, step, files and sizes) is written last, then the folder is renamed to ``final/``.
        Every process calls it: ``save`` (``common.weights_saver``) gathers FSDP-sharded weights on
        every process and writes on the main one; nothing else happens off the main process.
        Returns the final path."""
        if not self.is_main:
            save(self.path / f".{FINAL}.tmp")  # gathers sharded weights; writes nothing here
            return self.final_dir
        tmp = self.path / f".{FINAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        self._write_card(tmp, stage=stage, step=step)
        record = completeness_record(tmp)  # sizes of every file, sha256 of the small ones: checked by final_is_complete
        (tmp / COMPLETE).write_text(json.dumps({"stage": stage, "step": step, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}, indent=2) + "\n")
        old = self.path / f".{FINAL}.old"
        if self.final_dir.exists():  # a final/ left incomplete by an earlier attempt
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final_dir, old)
        os.replace(tmp, self.final_dir)
        shutil.rmtree(old, ignore_errors=True)
        self._drop_replaced()
        self.close_trackers()
        self._push(stage=stage, step=step)
        return self.final_dir

    def _write_card(self, folder: Path, *, stage: str, step: int) -> None:
        """final/README.md, the model card (``cards.model_card``), unless the save wrote one. A card
        that cannot be built is a warning: it never costs the run its final/."""
        from ..cards import CARD, model_card

        if (folder / CARD).exists():
            return
        try:
            (folder / CARD).write_text(model_card(self.path, folder, stage=stage, step=step))
        except Exception as e:  # noqa: BLE001
            log.warning("final/%s: model card not written (%s: %s)", CARD, type(e).__name__, e)

    def _push(self, *, stage: str, step: int) -> None:
        """``--run.push-to-hub REPO_ID``: upload final/. A failed upload logs one error line with the
        command that retries it; the run stays finished."""
        repo = getattr(getattr(self.cfg, "run", None), "push_to_hub", "")
        if not repo:
            return
        from ..cards import push_folder
        from ..errors import TldrRlhfError

        try:
            url = push_folder(self.final_dir, repo, private=self.cfg.run.hub_private, message=f"tldr-rlhf {stage}: step {step}")
            log.info("--run.push-to-hub: %s -> %s", self.final_dir, url)
        except TldrRlhfError as e:
            log.error("--run.push-to-hub: %s", e)
            _PUSH_FAILURES.append(f"--run.push-to-hub: {e} (the run is saved in {self.final_dir})")

    def write_config(self, cfg: Any) -> None:
        if self.is_main:
            save_config(cfg, self.path / "config.json")

    def check_config_matches(self, cfg: Any) -> None:
        """Raise RunDirError when resuming with a config that changes what was trained."""
        f = self.path / "config.json"
        if not f.exists():
            return
        old, new = json.loads(f.read_text()), json.loads(json.dumps(to_dict(cfg)))
        ignore = {"run"}  # run cadence / resume flags may change between attempts
        diff = sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))
        if diff:
            raise RunDirError(f"{f}: resuming with a different config (fields {diff}); pass --run.overwrite to start afresh")

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append a record (``step`` and metrics) to metrics.jsonl, send it to the ``--run.report-to``
        trackers and log its key metrics in one line (main process only)."""
        if not self.is_main:
            return
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)
        step = record.get("step")
        if isinstance(step, int):
            if self._clock is None:
                self._clock = (time.monotonic(), step)
            line = log_line(self.stage, record, total=self.total_steps, started=self._clock[0], first_step=self._clock[1])
            if line:
                log.info("%s", line)

    def log_samples(self, records: list[dict[str, Any]]) -> None:
        """Append sample records to samples.jsonl and send them to the trackers (main process only)."""
        if self.is_main:
            with (self.path / "samples.jsonl").open("a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            if self.trackers is not None:
                self.trackers.log_samples(records)

    def close_trackers(self) -> None:
        """End the tracker runs (after final/, or when the command stops)."""
        if self.trackers is not None:
            self.trackers.finish()

    def truncate_logs(self, step: int) -> None:
        """Drop metric/sample records after ``step`` (a resume replays those steps)."""
        if not self.is_main:
            return
        if self.trackers is not None and step >= 0:
            self.trackers.resume_step = step  # TensorBoard drops its events after the checkpoint's step
        for name in ("metrics.jsonl", "samples.jsonl"):
            f = self.path / name
            if f.exists():
                kept = [line for line in f.read_text().splitlines() if _record_step(line) is not None and _record_step(line) <= step]
                f.write_text("".join(line + "\n" for line in kept))

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders holding a ``state.pt``, oldest first."""
        ckpts = sorted((self.path / CHECKPOINTS).glob("step-*"), key=_step_of)
        return [c for c in ckpts if (c / STATE).exists()]

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint folder, or None (``load_checkpoint`` falls back past a corrupt one)."""
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def prune_checkpoints(self, keep: int) -> None:
        if not self.is_main:
            return
        ckpts = sorted((self.path / CHECKPOINTS).glob("step-*"), key=_step_of)
        for old in ckpts[: max(0, len(ckpts) - keep)]:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Checkpoints
#
# checkpoints/step-N/ is two things at once:
# * a Hugging Face folder (config.json, model.safetensors, tokenizer; what final/ would hold at that
#   step), written by the stage's ``save_weights``: `generate`, `evaluate` and `from_pretrained` load it;
# * state.pt, the rest of what a resume needs: optimizer, scheduler, RNG, step, ``extra`` and the
#   trainable tensors that the Hugging Face folder does not hold bit for bit (LoRA adapters, PPO's
#   value model, float32 master weights saved as bfloat16). Every other trainable tensor is named in
#   ``model_from_weights`` and read back from the folder's safetensors, so weights are not stored twice.
# state.pt holds only tensors, numbers, strings, lists, tuples and dicts and is read with
# ``torch.load(weights_only=True)``: a pickle that names any other Python object is refused unread.

STATE = "state.pt"
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
    from .fsdp import SHARDED, barrier, is_sharded, rank, save_sharded, world_size

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
        torch.save(rng_state(), tmp / f"rng-{rank()}.pt")  # its own RNG state: the processes sample different rollouts
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
    torch.save({"format": STATE_FORMAT, "step": step, **state, "scheduler": scheduler.state_dict(), "rng": rng_state(), "extra": extra or {}}, tmp / STATE)
    if several:
        barrier()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    run.prune_checkpoints(keep)
    run._drop_replaced()
    return final


def _load_sharded_checkpoint(candidate: Path, model, optimizer) -> None:
    """Restore a sharded checkpoint's weights and optimizer states (``fsdp.load_sharded``, resharded
    to this job). Raises RunDirError naming the folder when the shards are unreadable."""
    from .fsdp import SHARDED, load_sharded

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
    older = sorted((p for p in path.parent.glob("step-*") if (p / STATE).exists() and _step_of(p) < _step_of(path)), key=_step_of, reverse=True)
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
    from .fsdp import is_sharded, rank

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


def _stage_of(cfg: Any) -> str | None:
    """The command whose config class ``cfg`` is (``stages.STAGES``), None for another class."""
    from ..stages import STAGES

    return next((s.name for s in STAGES if s.config.endswith(":" + type(cfg).__name__)), None)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


# ----------------------------------------------------------------------------------------------
# The run folders of one command (the CLI's crash and Ctrl-C handling)


def forget_opened_runs() -> None:
    """Start a new command: forget the run folders opened before it in this process."""
    _ACTIVE.clear()
    _PUSH_FAILURES.clear()


def push_failures() -> list[str]:
    """One line per ``--run.push-to-hub`` upload of this command that failed (its run is finished)."""
    return list(_PUSH_FAILURES)


def close_opened_runs() -> None:
    """End the tracker runs (``--run.report-to``) of every run folder this command opened."""
    for run in _ACTIVE:
        run.close_trackers()


def restore_replaced_runs() -> None:
    """Every run opened by this command with ``--run.overwrite`` that stopped before its first
    checkpoint gives the old run back (``RunDir.restore_replaced``)."""
    for run in _ACTIVE:
        run.restore_replaced()


def resume_hint() -> str:
    """Where the newest run this command opened can be resumed from, as a clause for the CLI's crash
    or Ctrl-C line ("" when it opened none)."""
    if not _ACTIVE:
        return ""
    run = _ACTIVE[-1]
    if run.restored:  # the folder holds the old run again: rerunning with --run.overwrite starts the new one afresh
        return f"; {run.path} holds the previous run again (the --run.overwrite run stopped before its first checkpoint): rerun the same command to start the new run afresh"
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        return f"; {run.path} has no checkpoint yet: rerun the same command to start it again"
    return f"; newest checkpoint {ckpt}: rerun the same command to resume from step {_step_of(ckpt)}"

