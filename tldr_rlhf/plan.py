"""``tldr-rlhf plan``: the memory estimate (``memory.py``) of every training stage of a pipeline preset,
per device, split into weights, gradients, optimizer states, activations, generation KV cache, frozen
models and overhead; whether it fits, and the cheapest change that makes it fit.

This module is the command only: it knows nothing about how the estimate is computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError
from .memory import GIB, MemoryShape, StageEstimate, estimate_stage, gib, suggestion
from .stages import STAGES, TRAIN_STAGES


@dataclass(frozen=True)
class PlanArgs:
    """Estimated peak memory per device of every training stage of a pipeline preset (or of a --config
    file's stage), split into weights, gradients, optimizer states, activations, generation KV cache,
    frozen models and overhead; whether it fits, and the cheapest change that makes it fit."""

    preset: str = "seed"
    """A pipeline preset (tldr-rlhf pipeline --help lists them)."""
    gpus: int = 1
    """Devices the stages run on (data parallel: each holds a full copy; with --fsdp each a shard)."""
    fsdp: bool = False
    """Plan the stages with --run.fsdp: trained weights, gradients and AdamW states sharded over the GPUs."""
    gpu_memory_gb: float = 80.0
    """Memory per device in GB (GiB): 80 for an H100 / A100-80GB, 128 for a DGX Spark (unified)."""
    device: Literal["cuda", "cpu"] = "cuda"
    """The device kind the estimate is for (its precision rules and overhead)."""
    stages: tuple[str, ...] = TRAIN_STAGES
    """Stages to plan (default: every training stage of the stage table)."""
    rollout_engine: Literal["hf", "vllm"] = "hf"
    """Plan the RL stages with --rollout-engine vllm: the engine's weights and KV cache in an engine
    column (engine_memory.py), instead of the policy's generation KV cache."""


def plan_table(args: PlanArgs, stage_configs: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the plan: one row per stage, sizes in GiB."""
    shapes: dict[str, MemoryShape] = {}
    budget = args.gpu_memory_gb * GIB
    ests = {stage: estimate_stage(stage, stage_configs[stage], device=args.device, world=args.gpus, shapes=shapes) for stage in args.stages}
    # the engine column (--rollout-engine vllm: its weights and KV cache) only when a stage has one
    parts = [p for p in StageEstimate.PARTS if p != "engine" or any(e.engine for e in ests.values())]
    header = ["stage", *parts, "total", "fits", "cheapest change that fits"]
    rows = []
    for stage, est in ests.items():
        change = suggestion(stage, stage_configs[stage], est, budget=budget, device=args.device, world=args.gpus, shapes=shapes)
        rows.append([stage, *(gib(getattr(est, p)) for p in parts), gib(est.total), "yes" if est.total <= budget else "NO", change or "-"])
    return header, rows


def plan(args: PlanArgs) -> list[list[str]]:
    """``tldr-rlhf plan``: print the per-stage table for a pipeline preset; returns its rows."""
    # lazy: `tldr-rlhf plan --help` parses PlanArgs without torch and transformers
    from .evaluate import markdown_table
    from .pipeline import stage_configs
    from .presets import PIPELINE_PRESETS

    if args.preset not in PIPELINE_PRESETS:
        raise ConfigError(f"--preset {args.preset}: unknown pipeline preset; choose from {sorted(PIPELINE_PRESETS)}")
    pipe = PIPELINE_PRESETS[args.preset]
    configs = stage_configs(pipe)
    # the RL stages' inputs are the pipeline's own SFT and RM outputs, which do not exist yet: plan
    # them from the models those stages start from
    sft_model, rm_model = configs["sft"].model.path, (configs["sft"].model.path if pipe.rm_from_sft else configs["rm"].model.path)
    for row in STAGES:
        if row.name in args.stages and row.family in ("preference", "rl"):
            changes = {"sft_path": sft_model, **({"rm_path": rm_model} if row.family == "rl" else {})}
            configs[row.name] = dataclasses.replace(configs[row.name], **changes)
    if args.fsdp:
        configs = {name: dataclasses.replace(c, run=dataclasses.replace(c.run, fsdp=True)) if hasattr(c, "run") else c for name, c in configs.items()}
    if args.rollout_engine != "hf":
        configs = {name: dataclasses.replace(c, rollout_engine=args.rollout_engine) if hasattr(c, "rollout_engine") else c for name, c in configs.items()}
    header, rows = plan_table(args, configs)
    sharding = (", FSDP" if args.fsdp else "") + (f", rollouts by {args.rollout_engine}" if args.rollout_engine != "hf" else "")
    print(f"Memory plan: pipeline preset '{args.preset}', {args.gpus} x {args.gpu_memory_gb:g} GiB {args.device} device(s){sharding}; GiB per device, estimates")
    print(markdown_table(header, rows))
    return rows
