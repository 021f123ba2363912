"""Progress with an ETA for long work outside the training loops: ``evaluate``'s generation and
scoring, ``generate --posts``, ``inspect``, ``evaluate-rm`` (and every scoring pass of
``scoring.sharded_scores``).

On a terminal: a tqdm bar (done / total, elapsed < remaining, rate), as the training loops show.
Elsewhere (a log file, CI, a pipe, where a bar's carriage returns pile up into one unreadable line):
one log line every ``every`` items (default: a tenth of the total) and at the end, the same numbers
in tqdm's own words, e.g. ``generating sft:  25% 40/158 [00:12<00:36,  3.25post/s]``.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


def _on_terminal() -> bool:
    """Whether stderr (where tqdm draws) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class LogProgress:
    """A tqdm-like counter that logs a line (INFO, ``tldr_rlhf.progress``) every ``every`` items and
    when it reaches ``total``: ``update``, ``set_description``, ``set_postfix``, ``close`` and use as
    a context manager, as a tqdm bar."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", every: int | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.every = every or max(1, math.ceil((total or 10) / 10))
        self.n, self._logged, self._postfix = 0, 0, ""
        self._start = time.monotonic()
        self._lock = threading.Lock()  # updates may come from worker threads (the LLM judge's requests)

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            if self.n - self._logged >= self.every or (self.total is not None and self.n >= self.total and self._logged < self.n):
                self._log()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        with self._lock:
            if self.n > self._logged:
                self._log()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _log(self) -> None:
        from tqdm import tqdm

        line = tqdm.format_meter(self.n, self.total, time.monotonic() - self._start, unit=self.unit, prefix=self.desc, ncols=0, postfix=self._postfix or None)
        log.info("%s", line)
        self._logged = self.n


def progress(total: int | None, desc: str, *, unit: str = "it", enabled: bool = True, every: int | None = None):
    """A progress meter over ``total`` items (None: unknown) of kind ``unit`` ("post", "pair"):
    a tqdm bar with ETA on a terminal, else a ``LogProgress`` that logs every ``every`` items (default
    a tenth of ``total``); a silent tqdm when not ``enabled`` (``--no-progress``, other processes).
    Use it as tqdm: ``with progress(n, "scoring", unit="post") as bar: ... bar.update(k)``."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if _on_terminal():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return LogProgress(total, desc, unit=unit, every=every)
