"""Live experiment tracking and the per-step log line.

Every metrics record a stage writes to ``metrics.jsonl`` (``RunDir.log_metrics``) also goes, with the same
metric names and the same ``step``, to the trackers named by ``--report-to`` (``--run.report-to``):

* ``tensorboard``: event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN``);
* ``wandb``: a Weights & Biases run, project ``$WANDB_PROJECT`` or ``tldr-rlhf``, named after the run
  folder, its files under ``RUN/wandb/`` (``WANDB_MODE=offline`` needs no network; ``wandb sync`` later);
* ``trackio``: a trackio run, project ``$TRACKIO_PROJECT`` or ``tldr-rlhf``;
* ``mlflow``: an MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``tldr-rlhf`` (tracking URI from
  ``MLFLOW_TRACKING_URI``, mlflow's own default otherwise).

The trackers are accelerate's (``accelerate.tracking``), used one by one rather than through an
``Accelerator`` because a pipeline runs several stages, each with its own run, in one process.
``metrics.jsonl`` stays the record the report reads; the trackers are for watching and comparing runs
live. Only numbers are sent (lists, strings and None in a record stay in metrics.jsonl), and sample
summaries go to a W&B table / TensorBoard text. A resumed run continues where its checkpoint was:
TensorBoard purges the events after that step and W&B resumes the same run id (kept in
``RUN/tracking.json``).

A tracker whose package is missing is a ConfigError naming the flag and the pip command, raised when the
config is validated (before anything on disk is touched). A tracker that fails while training logs one
warning and is dropped: a dashboard never stops a multi-hour run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError

log = logging.getLogger(__name__)

FLAG = "--run.report-to"
# tracker name -> (module imported, pip requirement)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}
STATE_FILE = "tracking.json"  # the W&B run id, so that a resume continues the same run
PROJECT = "tldr-rlhf"

# The metrics shown in the per-step log line, in this order, when a record has them.
KEY_METRICS: tuple[tuple[str, str], ...] = (
    ("loss/sft", "loss"), ("loss/rm", "loss"), ("loss/dpo", "loss"), ("loss/policy", "pg_loss"), ("loss/value", "vf_loss"),
    ("rm/accuracy", "acc"), ("rewards/accuracy", "acc"), ("objective/scores", "score"), ("objective/kl", "kl"),
    ("objective/rlhf_reward", "rlhf_reward"), ("objective/response_length", "len"), ("objective/eos_rate", "eos"),
    ("valid/loss", "valid_loss"), ("valid/accuracy", "valid_acc"), ("lr", "lr"), ("grad_norm", "grad_norm"),
)


def check_report_to(report_to: Sequence[str], flag: str = FLAG) -> None:
    """Raise ConfigError (one line naming ``flag``, by default ``--run.report-to``) for an unknown
    tracker, ``none`` beside another one, or a tracker whose package is not installed."""
    names = list(report_to)
    unknown = [n for n in names if n != "none" and n not in TRACKERS]
    if unknown:
        raise ConfigError(f"{flag}: unknown tracker {unknown[0]!r}; choose from none, {', '.join(TRACKERS)}")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"{flag}: 'none' cannot be combined with {[n for n in names if n != 'none']}")
    for name in names:
        if name == "none":
            continue
        module, requirement = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{flag} {name}: the {module} package is not installed (pip install {requirement})")


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record, ``step`` left out (it is the x axis): what a tracker gets.
    Booleans become 0/1; lists, strings, None, NaN and infinities are left out."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def _format(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1e4 else f"{value:.4g}"


def log_line(stage: str, record: dict[str, Any], *, total: int | None = None, started: float | None = None, first_step: int = 0) -> str:
    """One line with a record's key metrics: ``sft step 12/100 | loss 2.31 | lr 3e-05 | 1.5 s/step | ETA 2m 12s``.
    ``total`` adds ``/total``; ``started`` (the ``time.monotonic()`` when step ``first_step`` was done)
    adds seconds per step and the ETA. "" for a record with none of the key metrics."""
    step = record.get("step")
    parts = [f"{stage} step {step}" + (f"/{total}" if total else "")]
    for key, short in KEY_METRICS:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            parts.append(f"{short} {_format(float(value))}")
    if len(parts) == 1:
        return ""  # a record without key metrics (the end-of-run memory record) gets no line
    if started is not None and isinstance(step, int) and step > first_step:
        per_step = (time.monotonic() - started) / (step - first_step)
        parts.append(f"{per_step:.3g} s/step")
        if total and total > step:
            parts.append(f"ETA {_duration((total - step) * per_step)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict flattened to ``section.field`` keys with bool/int/float/str values (tuples
    and lists as their JSON text): what the trackers' hyperparameter tables take."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class Trackers:
    """The trackers of one run folder (main process only). Started lazily at the first record, so a
    run that fails before training opens no tracker run, and a resume knows its step by then."""

    def __init__(self, names: Sequence[str], run_path: Path, config: dict[str, Any], *, stage: str):
        self.names = [n for n in names if n != "none"]
        self.run_path = Path(run_path)
        self.config = config
        self.stage = stage
        self.resume_step: int | None = None  # set by RunDir.truncate_logs on a resume
        self.active: dict[str, Any] = {}
        self.started = False

    def _state(self) -> dict[str, Any]:
        f = self.run_path / STATE_FILE
        try:
            return json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def _make(self, name: str):
        from accelerate import tracking

        run_name = self.run_path.resolve().name
        if name == "tensorboard":
            kwargs = {"purge_step": self.resume_step + 1} if self.resume_step is not None else {}
            return tracking.TensorBoardTracker("tensorboard", self.run_path, **kwargs)
        if name == "wandb":
            state = self._state()
            run_id = state.get("wandb_id")
            if not run_id:
                run_id = uuid.uuid4().hex[:8]  # W&B's own id form: 8 lowercase alphanumerics
                (self.run_path / STATE_FILE).write_text(json.dumps({**state, "wandb_id": run_id}) + "\n")
            return tracking.WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, dir=str(self.run_path), id=run_id, resume="allow", job_type=self.stage)
        if name == "trackio":
            return tracking.TrackioTracker(os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_name)
        if name == "mlflow":
            return tracking.MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT), run_name=run_name)
        raise ValueError(name)

    def _start(self) -> None:
        self.started = True
        for name in self.names:
            try:
                tracker = self._make(name)
                tracker.start()
                if name == "tensorboard":
                    tracker.writer.add_text("config", "```\n" + json.dumps(self.config, indent=2) + "\n```", global_step=0)
                else:
                    tracker.store_init_configuration(flat_config(self.config))
                self.active[name] = tracker
                log.info("%s: logging to %s", FLAG, name + (f" ({self.run_path / 'tensorboard'})" if name == "tensorboard" else ""))
            except Exception as e:  # noqa: BLE001 - a dashboard never stops a training run
                log.warning("%s %s: could not start (%s: %s); metrics.jsonl still has every record", FLAG, name, type(e).__name__, e)

    def _each(self, what: str, call) -> None:
        for name, tracker in list(self.active.items()):
            try:
                call(name, tracker)
            except Exception as e:  # noqa: BLE001
                log.warning("%s %s: %s failed (%s: %s); this tracker is dropped, metrics.jsonl still has every record", FLAG, name, what, type(e).__name__, e)
                self.active.pop(name, None)

    def log(self, record: dict[str, Any]) -> None:
        """Send a metrics record's numbers at its ``step``."""
        if not self.names:
            return
        if not self.started:
            self._start()
        values, step = numeric_metrics(record), record.get("step")
        if values:
            self._each("log", lambda name, t: t.log(values, step=step))

    def log_samples(self, records: Sequence[dict[str, Any]]) -> None:
        """Sample summaries: a W&B table (step, query, response, score) and TensorBoard text."""
        if not self.names or not records:
            return
        if not self.started:
            self._start()
        columns = sorted({k for r in records for k, v in r.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)})
        rows = [[r.get(c) for c in columns] for r in records]
        step = next((r["step"] for r in records if isinstance(r.get("step"), int)), None)

        def send(name, tracker):
            if name == "wandb":
                tracker.log_table("samples", columns=columns, data=rows, step=step)
            elif name == "tensorboard":
                table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
                table += "".join("| " + " | ".join(str(v).replace("\n", " ").replace("|", "\\|") for v in row) + " |\n" for row in rows)
                tracker.writer.add_text("samples", table, global_step=step)

        self._each("log_samples", send)

    def finish(self) -> None:
        """Close every tracker run (flushes TensorBoard, ends the W&B run)."""
        self._each("finish", lambda name, t: t.finish())
        self.active = {}
