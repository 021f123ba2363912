"""The whole reproduction in one command: SFT -> reward model (+ its evaluation) -> {DPO, PPO, GRPO,
optionally RLOO} -> evaluation of every policy -> report, in one run folder:

    RUN_DIR/pipeline.json        stage status (done / skipped / failed), seconds, output
    RUN_DIR/pipeline_config.json the resolved configuration of this invocation
    RUN_DIR/sft/ rm/ dpo/ ppo/ grpo/ rloo/ online-dpo/   each a normal stage run folder (config.json, metrics.jsonl, final/)
    RUN_DIR/rm/eval_rm.json      reward-model accuracy (held-out, CNN/DM, agreement with GPT-3.5)
    RUN_DIR/evaluate/            eval.json, summaries.jsonl, eval_table.md
    RUN_DIR/gold/                the gold experiment (optional stage gold): its runs, evaluations, gold.json
    RUN_DIR/report/              report.md, report.html, *.png

Each stage is the stage's own ``train(cfg)`` (or ``evaluate``) with its config taken from the
pipeline config and wired: output folder ``RUN_DIR/<stage>``, the SFT checkpoint as DPO's and the RL
stages' starting policy and as the KL reference, the reward model as the RL stages' reward (unless a
stage sets its own ``reward``) and the evaluation's scorer, the SFT stage's held-out posts as the
evaluation set; the gold experiment (``gold.py``) gets the SFT checkpoint, the SFT stage's data and
``RUN_DIR/gold``.

Resuming: a stage whose output exists (``final/`` for training stages, ``eval_rm.json`` /
``eval.json`` for the evaluations) is skipped; a training stage that crashed part-way resumes from its
newest checkpoint when the command is run again (the stages' own resume). The report is rebuilt on
every run. ``--rerun STAGE`` redoes a finished stage from scratch (later stages are not redone: name
them too). Seconds per stage accumulate in pipeline.json across invocations (a skipped stage keeps the
time it took when it ran).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import PipelineConfig, ReportConfig, save_config
from .errors import DataError
from .stages import COMMANDS, PIPELINE_STAGES, POLICY_STAGES, RL_STAGES
from .checkpoints import FINAL, final_is_complete
from .validation import validate_config

log = logging.getLogger(__name__)
STATE_FILE = "pipeline.json"
CONFIG_FILE = "pipeline_config.json"


def _run(cfg_run, run_dir: Path, stage: str, threads: int, overwrite: bool, report_to: tuple[str, ...] = ()):
    extra = {"num_threads": threads} if threads else {}
    if report_to:  # the pipeline's --report-to: every training stage (a stage's own --STAGE.run.report-to otherwise)
        extra["report_to"] = report_to
    return dataclasses.replace(cfg_run, output_dir=str(run_dir / stage), overwrite=overwrite, **extra)


def final_dir(run_dir: str | Path, stage: str) -> Path:
    """The checkpoint folder a training stage leaves in the run folder."""
    return Path(run_dir) / stage / FINAL


def stage_output(run_dir: str | Path, stage: str) -> Path | None:
    """What marks ``stage`` as finished: its final/ (training stages, or any run folder named ``stage``),
    its results file (evaluations: ``stages.Stage.output``); None for the report (always rebuilt)."""
    row = COMMANDS.get(stage)
    if row is None or row.train:
        return final_dir(run_dir, stage)
    return Path(run_dir) / row.output if row.output else None


def stage_done(run_dir: str | Path, stage: str) -> bool:
    """Whether ``stage``'s output is complete: a training stage's final/ with its completeness marker
    (a final/ left half-written by a crash or a full disk does not count), an evaluation's results
    file; the report is never done (always rebuilt)."""
    marker = stage_output(run_dir, stage)
    if marker is None:
        return False
    return final_is_complete(marker) if marker.name == FINAL else marker.exists()


def check_stages(cfg: PipelineConfig) -> list[str]:
    """The stages to run in pipeline order. Raises DataError for an unknown stage name (in `stages`
    or `rerun`) or a stage whose inputs no earlier stage and no existing output provide."""
    for field_name in ("stages", "rerun"):
        for s in getattr(cfg, field_name):
            if s not in PIPELINE_STAGES:
                raise DataError(f"unknown stage '{s}'; stages are {', '.join(PIPELINE_STAGES)}", field=field_name)
    stages = [s for s in PIPELINE_STAGES if s in cfg.stages]
    run_dir = Path(cfg.run_dir)

    def available(dep: str) -> bool:
        return dep in stages or stage_done(run_dir, dep)

    for s in stages:
        missing = [d for d in COMMANDS[s].needs(cfg) if not available(d)]
        if missing:
            raise DataError(f"stage '{s}' needs the output of {', '.join(missing)}: add it to --stages or run it first", field="stages")
    return stages


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Every stage's config wired into the run folder (see the module docstring). Pure: reads nothing
    but ``cfg`` and which stage outputs exist in the run folder (for the evaluated policies)."""
    run_dir = Path(cfg.run_dir)
    t = cfg.num_threads
    sft_final, rm_final = str(final_dir(run_dir, "sft")), str(final_dir(run_dir, "rm"))
    redo = set(cfg.rerun)
    out: dict[str, Any] = {}
    out["sft"] = dataclasses.replace(cfg.sft, run=_run(cfg.sft.run, run_dir, "sft", t, "sft" in redo, cfg.report_to))
    rm_model = dataclasses.replace(cfg.rm.model, path=sft_final) if cfg.rm_from_sft else cfg.rm.model
    out["rm"] = dataclasses.replace(cfg.rm, model=rm_model, run=_run(cfg.rm.run, run_dir, "rm", t, "rm" in redo, cfg.report_to))
    out["evaluate-rm"] = dataclasses.replace(cfg.evaluate_rm, model=rm_final, output="", from_run=True, **({"num_threads": t} if t else {}))
    out["dpo"] = dataclasses.replace(cfg.dpo, sft_path=sft_final, tokenizer=None, run=_run(cfg.dpo.run, run_dir, "dpo", t, "dpo" in redo, cfg.report_to))
    for name in RL_STAGES:
        stage_cfg = getattr(cfg, name.replace("-", "_"))
        rm_path = "" if stage_cfg.reward else rm_final  # a stage with its own --reward does not use the reward model
        out[name] = dataclasses.replace(stage_cfg, sft_path=sft_final, rm_path=rm_path, tokenizer=None, run=_run(stage_cfg.run, run_dir, name, t, name in redo, cfg.report_to))
    policies = [f"base={cfg.base_model or cfg.sft.model.path}", f"sft={sft_final}"]
    policies += [f"{s}={final_dir(run_dir, s)}" for s in POLICY_STAGES if s in cfg.stages or stage_done(run_dir, s)]
    rm_ok = "rm" in cfg.stages or stage_done(run_dir, "rm")
    out["evaluate"] = dataclasses.replace(
        cfg.evaluate, policies=tuple(policies), sft_path=sft_final, rm_path=rm_final if rm_ok else "",
        data=cfg.sft.data, output_dir=str(run_dir / "evaluate"), **({"num_threads": t} if t else {}),
    )
    out["gold"] = dataclasses.replace(cfg.gold, sft_path=sft_final, data=cfg.sft.data, output_dir=str(run_dir / "gold"), **({"num_threads": t} if t else {}))
    out["report"] = ReportConfig(run_dir=str(run_dir), table_posts=cfg.table_posts)
    return out


def _load_state(path: Path) -> dict[str, Any]:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; starting a new stage record", path)
    return {"stages": {}}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def run_pipeline(cfg: PipelineConfig, *, stage_functions: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """Run the pipeline; returns the state written to ``pipeline.json``: {"stages": {name: {status,
    seconds, output, ...}}, "total_seconds"}.

    Raises DataError for unknown stage names or missing inputs (before anything runs), and re-raises a
    stage's own error after recording it as failed in pipeline.json.
    """
    stages = check_stages(cfg)
    for stage_cfg in stage_configs(cfg).values():  # every value, before anything on disk is touched
        validate_config(stage_cfg, check_paths=False)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    save_config(cfg, run_dir / CONFIG_FILE)
    state_path = run_dir / STATE_FILE
    state = _load_state(state_path)
    overrides = dict(stage_functions or {})
    t_all = time.perf_counter()
    for stage in stages:
        configs = stage_configs(cfg)  # re-read after each stage: evaluated policies depend on what exists
        marker = stage_output(run_dir, stage)
        record = state["stages"].get(stage, {})
        if stage_done(run_dir, stage) and stage not in cfg.rerun:
            log.info("pipeline: %s already done (%s); skipping", stage, marker)
            state["stages"][stage] = {**record, "status": "skipped", "output": str(marker)}
            _save_state(state_path, state)
            continue
        if stage in cfg.rerun and COMMANDS[stage].output and marker.exists():  # an evaluation redone: its results go first
            marker.unlink()
        log.info("pipeline: running %s", stage)
        if stage != "report":  # the report reads pipeline.json: it shows the stages before it, not itself running
            state["stages"][stage] = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _save_state(state_path, state)
        t0 = time.perf_counter()
        try:
            fn = overrides.get(stage) or COMMANDS[stage].function()  # tests swap stages through ``stage_functions``
            fn(configs[stage])
        except BaseException as e:
            state["stages"][stage] = {"status": "failed", "seconds": round(time.perf_counter() - t0, 2), "error": f"{type(e).__name__}: {e}"}
            _save_state(state_path, state)
            raise
        seconds = round(time.perf_counter() - t0, 2)
        status = "done" if marker is None or stage_done(run_dir, stage) else "incomplete"  # e.g. a gold --worker: its share only
        state["stages"][stage] = {"status": status, "seconds": seconds, "output": str(marker) if marker is not None else str(run_dir / "report"), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _save_state(state_path, state)
        log.info("pipeline: %s %s in %.1f s", stage, status, seconds)
        if torch.cuda.is_available():  # hand the finished stage's GPU memory back before the next stage
            gc.collect()
            torch.cuda.empty_cache()
    state["last_run_seconds"] = round(time.perf_counter() - t_all, 2)
    state["total_seconds"] = round(sum(s.get("seconds", 0.0) for s in state["stages"].values()), 2)
    _save_state(state_path, state)
    return state


def main(cfg: PipelineConfig) -> dict[str, Any]:
    """``tldr-rlhf pipeline``: run, then print the stage times and where the report is."""
    state = run_pipeline(cfg)
    print(f"\npipeline {cfg.run_dir}:")
    for name, s in state["stages"].items():
        seconds = s.get("seconds")
        print(f"  {name:<12} {s['status']:<8} {'' if seconds is None else f'{seconds / 60:6.1f} min'}")
    print(f"  {'total':<12} {'':<8} {state['total_seconds'] / 60:6.1f} min")
    report = Path(cfg.run_dir) / "report" / "report.md"
    if report.exists():
        print(f"\nreport: {report}")
    return state

