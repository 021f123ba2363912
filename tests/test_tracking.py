"""--report-to: TensorBoard event files read back with tensorboard's own reader equal metrics.jsonl (also
across a crash and resume), W&B offline writes its run folder, the per-step log line, and clear errors."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import POSTS

from tldr_rlhf import tracking
from tldr_rlhf.cli import main, parse
from tldr_rlhf.config import ModelArgs, OptimArgs, RunArgs, SFTConfig, TldrDataArgs
from tldr_rlhf.errors import ConfigError
from tldr_rlhf.train import sft
from tldr_rlhf.train.run_dir import RunDir


def _cfg(model_dir, out, **run):
    return SFTConfig(
        model=ModelArgs(path=str(model_dir)),
        data=TldrDataArgs(train=str(POSTS), max_query_length=96, limit=16, valid_limit=4, valid_fraction=0.01),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=str(out), progress=False, **{"eval_every": 2, "save_every": 2, **run}),
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        num_sample_posts=1,
    )


def _jsonl_scalars(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {metric: {step: value}} over the numbers a tracker gets."""
    out: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in tracking.numeric_metrics(record).items():
            out.setdefault(key, {})[record["step"]] = value
    return out


def _event_scalars(run: Path) -> dict[str, dict[int, float]]:
    """The scalars of RUN/tensorboard/ as tensorboard's own EventAccumulator reads them (it applies
    the purge a resumed writer records)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _same_as_float32(events: dict[str, dict[int, float]], jsonl: dict[str, dict[int, float]]) -> None:
    """TensorBoard stores float32: each event is the record's value rounded to float32, bit for bit."""
    assert set(events) == set(jsonl)
    for key in jsonl:
        assert events[key] == {s: float(np.float32(v)) for s, v in jsonl[key].items()}, key


def test_tensorboard_events_equal_metrics_jsonl(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    sft.train(_cfg(tiny_model_dir, out, max_steps=4, report_to=("tensorboard",)))
    jsonl = _jsonl_scalars(out)
    assert set(jsonl["loss/sft"]) == {1, 2, 3, 4} and set(jsonl["valid/loss"]) == {0, 2, 4}
    _same_as_float32(_event_scalars(out), jsonl)


def test_tensorboard_after_crash_and_resume_equals_metrics_jsonl(tiny_model_dir, tmp_path, monkeypatch):
    """Step 3 is logged, the run dies before its step-4 checkpoint, the resume replays step 3 from the
    step-2 checkpoint: the events must hold each step once, with the replayed values (the purge)."""
    out = tmp_path / "run"
    real_log = RunDir.log_metrics

    def log_then_die(self, record):
        real_log(self, record)
        if record.get("step") == 3:
            raise KeyboardInterrupt("simulated crash after step 3 was logged")

    monkeypatch.setattr(RunDir, "log_metrics", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        sft.train(_cfg(tiny_model_dir, out, max_steps=4, report_to=("tensorboard",)))
    monkeypatch.setattr(RunDir, "log_metrics", real_log)
    from tldr_rlhf.opened_runs import close_opened_runs

    close_opened_runs()  # what the CLI does when a command stops
    # The crashed attempt's step-3 event, with a value the replay must replace (a different lr step
    # would give the same value; make the stale one unmistakable).
    stale = _event_scalars(out)["loss/sft"][3]
    sft.train(_cfg(tiny_model_dir, out, max_steps=4, report_to=("tensorboard",)))
    events, jsonl = _event_scalars(out), _jsonl_scalars(out)
    assert set(jsonl["loss/sft"]) == {1, 2, 3, 4}
    _same_as_float32(events, jsonl)
    assert events["loss/sft"][3] == pytest.approx(stale, abs=1e-6)  # resume is exact: the replay equals the lost step


def test_tensorboard_without_the_purge_would_keep_the_crashed_steps(tiny_model_dir, tmp_path, monkeypatch):
    """The check above can fail: with the purge switched off, the crashed attempt's step-3 event
    stays beside the replayed one and the reader sees two step-3 points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    real_log = RunDir.log_metrics

    def log_then_die(self, record):
        real_log(self, record)
        if record.get("step") == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log_metrics", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        sft.train(_cfg(tiny_model_dir, out, max_steps=4, report_to=("tensorboard",)))
    monkeypatch.setattr(RunDir, "log_metrics", real_log)
    from tldr_rlhf.opened_runs import close_opened_runs

    close_opened_runs()
    real_truncate = RunDir.truncate_logs

    def truncate_without_purge(self, step):
        real_truncate(self, step)
        if self.trackers is not None:
            self.trackers.resume_step = None

    monkeypatch.setattr(RunDir, "truncate_logs", truncate_without_purge)
    sft.train(_cfg(tiny_model_dir, out, max_steps=4, report_to=("tensorboard",)))
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/sft")]
    assert steps.count(3) == 2


def test_wandb_offline_writes_its_run_folder(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # wandb's own cache/config files stay in the test folder
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    out = tmp_path / "run"
    sft.train(_cfg(tiny_model_dir, out, max_steps=2, report_to=("wandb",)))
    run_id = json.loads((out / tracking.STATE_FILE).read_text())["wandb_id"]
    folders = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 1, list((out / "wandb").iterdir())
    assert (folders[0] / f"run-{run_id}.wandb").stat().st_size > 0
    assert (out / "final" / "COMPLETE.json").is_file()


def test_a_failing_tracker_never_stops_the_run(tiny_model_dir, tmp_path, monkeypatch, caplog):
    from accelerate.tracking import TensorBoardTracker

    def broken(self, values, step=None, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardTracker, "log", broken)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="tldr_rlhf.tracking"):
        sft.train(_cfg(tiny_model_dir, out, max_steps=2, report_to=("tensorboard",)))
    assert (out / "final" / "COMPLETE.json").is_file()
    assert sorted(_jsonl_scalars(out)["loss/sft"]) == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["--run.report-to tensorboard: log failed (OSError: disk full); this tracker is dropped, metrics.jsonl still has every record"]


def test_per_step_log_line_hand_values(monkeypatch):
    monkeypatch.setattr(tracking.time, "monotonic", lambda: 130.0)
    record = {"step": 7, "loss/sft": 1.7, "lr": 3e-5, "valid/loss": float("nan"), "epoch": 0.5, "grad_norm": 0.25}
    # 5 steps (2 -> 7) in 30 s = 6 s/step; 13 steps left = 78 s
    assert tracking.log_line("sft", record, total=20, started=100.0, first_step=2) == (
        "sft step 7/20 | loss 1.7 | lr 3e-05 | grad_norm 0.25 | 6 s/step | ETA 1m 18s"
    )
    assert tracking.log_line("ppo", {"step": 1, "objective/scores": -0.123456, "objective/kl": 0.0}) == "ppo step 1 | score -0.1235 | kl 0"
    assert tracking.log_line("ppo", {"step": 2, "perf/peak_memory_mb": 900.0}) == ""  # nothing worth a line


def test_numeric_metrics_keeps_finite_numbers_only():
    record = {"step": 3, "a": 1.7, "b": 2, "ok": True, "nan": math.nan, "inf": math.inf, "list": [1.0], "text": "x", "none": None}
    assert tracking.numeric_metrics(record) == {"a": 1.7, "b": 2.0, "ok": 1.0}


def test_report_to_errors_name_the_flag(monkeypatch):
    with pytest.raises(ConfigError, match=r"^--run.report-to: unknown tracker 'comet'; choose from none, tensorboard, wandb, trackio, mlflow$"):
        tracking.check_report_to(["comet"])
    with pytest.raises(ConfigError, match=r"^--run.report-to: 'none' cannot be combined with \['wandb'\]$"):
        tracking.check_report_to(["none", "wandb"])
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError, match=r"^--sft.run.report-to mlflow: the mlflow package is not installed \(pip install mlflow\)$"):
        tracking.check_report_to(["tensorboard", "mlflow"], "--sft.run.report-to")


def test_cli_report_to_short_flag_and_missing_package_before_anything_on_disk(tmp_path, monkeypatch, capsys):
    _, cfg = parse(["sft", "--report-to", "tensorboard", "wandb"])
    assert cfg.run.report_to == ("tensorboard", "wandb")
    _, cfg = parse(["pipeline", "--report-to", "tensorboard"])
    assert cfg.report_to == ("tensorboard",)
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    out = tmp_path / "run"
    assert main(["sft", "--report-to=wandb", "--run.output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "tldr-rlhf: error: --run.report-to wandb: the wandb package is not installed (pip install wandb)"
    assert not out.exists()
