"""The run folders the current command opened, for the CLI's crash and Ctrl-C handling: end their
tracker runs, give back an old run that ``--run.overwrite`` moved aside, and say where to resume.

This module knows nothing about what a run folder holds: it calls the methods of the folders that
registered themselves (``train.run_dir.RunDir``: ``close_trackers``, ``restore_replaced``,
``latest_checkpoint``, ``path``).
"""

from __future__ import annotations

from typing import Any

from .checkpoints import step_of

_ACTIVE: list[Any] = []  # run folders opened by this process (the CLI's Ctrl-C / error lines)


def register(run: Any) -> None:
    """A run folder this command opened (``RunDir`` registers itself)."""
    _ACTIVE.append(run)


def forget_opened_runs() -> None:
    """Start a new command: forget the run folders opened before it in this process."""
    _ACTIVE.clear()


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
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        return f"; {run.path} has no checkpoint yet: rerun the same command to start it again"
    return f"; newest checkpoint {ckpt}: rerun the same command to resume from step {step_of(ckpt)}"
