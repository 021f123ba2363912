"""Configuration: one frozen dataclass per concern, composed into one per stage (the schema; the presets
by name are in ``presets.py``).

- ``parts.py``: the shared sections (model, optimizer, run folder, task data, reward normalization,
  LLM judge) and saving / rebuilding a run's config.json;
- one config per stage, composed of those sections, by family: ``supervised.py`` (sft, rm, dpo),
  ``rl.py`` (ppo, grpo, rloo, online-dpo) and ``runs.py`` (evaluate-rm, evaluate, gold, report, pipeline).

Every field's docstring becomes its ``--help`` text (tyro). Defaults are the known-good TL;DR
values of the N+ paper and the seed setup (Qwen2.5-0.5B on one DGX Spark). Derived sizes are
properties that raise on inexact division; nothing is mutated after parsing. Import from here:
``from tldr_rlhf.config import SFTConfig, OptimArgs``.
"""

from .parts import (
    SHARED,
    JudgeArgs,
    ModelArgs,
    OptimArgs,
    PreferenceDataArgs,
    RewardNormArgs,
    RolloutEngineArgs,
    RunArgs,
    TaskArgs,
    TldrDataArgs,
    TruncatedISArgs,
    from_dict,
    save_config,
    to_dict,
)
from .rl import GRPOConfig, OnlineDPOConfig, PPOConfig, RLOOConfig
from .runs import EvaluateConfig, EvaluateRMConfig, GoldConfig, PipelineConfig, ReportConfig
from .supervised import DPOConfig, RMConfig, SFTConfig

__all__ = [
    "SHARED", "JudgeArgs", "ModelArgs", "OptimArgs", "PreferenceDataArgs", "RewardNormArgs", "RolloutEngineArgs", "RunArgs", "TaskArgs",
    "TldrDataArgs", "TruncatedISArgs", "from_dict", "save_config", "to_dict", "DPOConfig", "EvaluateConfig", "EvaluateRMConfig",
    "GoldConfig", "GRPOConfig", "OnlineDPOConfig", "PipelineConfig", "PPOConfig", "ReportConfig", "RLOOConfig", "RMConfig", "SFTConfig",
]
