"""The run folder: ``config.json metrics.jsonl samples.jsonl checkpoints/step-N/ final/``, written so
that nothing finished is ever lost (see ``RunDir``). Saving and loading a checkpoint's contents is
``train/checkpointing.py``; the commands' record of the folders they opened is ``opened_runs.py``.

The run folder knows nothing about validation, memory plans, starting trackers, model cards or the hub:
those are the run's lifecycle (``train/lifecycle.py``: ``start_run`` / ``finish_run``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable


from ..config import save_config, to_dict
from ..errors import RunDirError
from .. import opened_runs
from ..checkpoints import CHECKPOINTS, COMPLETE, FINAL, STATE, completeness_record, final_is_complete, final_problem, step_of
from ..tracking import Trackers, log_line

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Run folder

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
        self.stage = self.path.name  # the stage's name once ``start_run`` knows its config
        self.cfg: Any = None
        self.trackers: Trackers | None = None  # --run.report-to (started by ``start_run``)
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
        opened_runs.register(self)

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

    def drop_replaced(self) -> None:
        """The new run has progress of its own: the old one it replaced can go."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    @property
    def final_dir(self) -> Path:
        return self.path / FINAL

    def write_final(self, save: Callable[[Path], None], *, step: int, stage: str) -> Path:
        """Write ``final/`` atomically (``lifecycle.finish_run`` calls it, with the model card in ``save``):
        ``save(tmp)`` fills a temporary folder, the completeness marker
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
        record = completeness_record(tmp)  # sizes of every file, sha256 of the small ones: checked by final_is_complete
        (tmp / COMPLETE).write_text(json.dumps({"stage": stage, "step": step, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}, indent=2) + "\n")
        old = self.path / f".{FINAL}.old"
        if self.final_dir.exists():  # a final/ left incomplete by an earlier attempt
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final_dir, old)
        os.replace(tmp, self.final_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.drop_replaced()
        self.close_trackers()
        return self.final_dir

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
        ckpts = sorted((self.path / CHECKPOINTS).glob("step-*"), key=step_of)
        return [c for c in ckpts if (c / STATE).exists()]

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint folder, or None (``load_checkpoint`` falls back past a corrupt one)."""
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def prune_checkpoints(self, keep: int) -> None:
        if not self.is_main:
            return
        ckpts = sorted((self.path / CHECKPOINTS).glob("step-*"), key=step_of)
        for old in ckpts[: max(0, len(ckpts) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
