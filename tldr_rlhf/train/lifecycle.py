"""A training run's lifecycle around its run folder, the same for every stage:

* ``start_run``: validate the config (ConfigError before anything on disk is touched) -> the memory
  preflight on CUDA (``memory.preflight``: a stage that cannot fit stops here) -> open the run folder
  (``RunDir``) -> start the ``--run.report-to`` trackers -> the checkpoint to resume from (a resume must
  use the same config), and the resolved config written;
* ``finish_run``: write ``final/`` (weights, then the model card, then the completeness marker) -> end
  the trackers -> ``--run.push-to-hub``.

The run folder itself (``run_dir.RunDir``) knows nothing about validation, memory plans, trackers'
start, model cards or the hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from ..cards import CARD, model_card, push_folder
from ..config import to_dict
from ..errors import TldrRlhfError
from ..memory import preflight
from ..stages import STAGES
from ..tracking import Trackers
from ..validation import validate_config
from .run_dir import RunDir

log = logging.getLogger(__name__)


def stage_of(cfg: Any) -> str | None:
    """The command whose config class ``cfg`` is (``stages.STAGES``), None for another class."""
    return next((s.name for s in STAGES if s.config.endswith(":" + type(cfg).__name__)), None)


def start_run(cfg: Any, *, is_main: bool = True) -> tuple[RunDir, Path | None]:
    """Open ``cfg.run.output_dir`` for a stage config with a ``run: RunArgs`` field: returns the run
    folder and the checkpoint to resume from (None for a fresh start). Every config value and input
    path is checked first (ConfigError), before anything on disk is touched; on CUDA the memory plan
    runs next (``memory.preflight``, ConfigError when it cannot fit). A resume must use the same config
    outside ``run`` (RunDirError otherwise); the resolved config is then written. A fresh start drops
    the metrics and samples of an earlier attempt that never reached a checkpoint."""
    validate_config(cfg)
    stage = stage_of(cfg)
    preflight(stage or "", cfg)  # a stage that cannot fit on the GPU stops here, before the folder is touched
    run = RunDir(cfg.run.output_dir, overwrite=cfg.run.overwrite, is_main=is_main)
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


def _write_card(run: RunDir, folder: Path, *, stage: str, step: int) -> None:
    """final/README.md, the model card (``cards.model_card``), unless the save wrote one. A card that
    cannot be built is a warning: it never costs the run its final/."""
    if (folder / CARD).exists():
        return
    try:
        (folder / CARD).write_text(model_card(run.path, folder, stage=stage, step=step))
    except Exception as e:  # noqa: BLE001
        log.warning("final/%s: model card not written (%s: %s)", CARD, type(e).__name__, e)


def _push(run: RunDir, *, stage: str, step: int) -> None:
    """``--run.push-to-hub REPO_ID``: upload final/. A failed upload logs one error line with the
    command that retries it; the run stays finished."""
    repo = getattr(getattr(run.cfg, "run", None), "push_to_hub", "")
    if not repo:
        return
    try:
        url = push_folder(run.final_dir, repo, private=run.cfg.run.hub_private, message=f"tldr-rlhf {stage}: step {step}")
        log.info("--run.push-to-hub: %s -> %s", run.final_dir, url)
    except TldrRlhfError as e:
        log.error("--run.push-to-hub: %s", e)


def finish_run(run: RunDir, save: Callable[[Path], None], *, step: int, stage: str) -> Path:
    """The end of a stage at optimizer step / update ``step``: ``final/`` written atomically
    (``RunDir.write_final``: ``save`` fills it, the model card follows on the main process, the
    completeness marker last), the trackers ended, then ``--run.push-to-hub``. Every process calls it
    (``save`` gathers FSDP-sharded weights on each). Returns the final path."""

    def save_with_card(folder: Path) -> None:
        save(folder)
        if run.is_main:
            _write_card(run, folder, stage=stage, step=step)

    final = run.write_final(save_with_card, step=step, stage=stage)
    if run.is_main:
        _push(run, stage=stage, step=step)
    return final
