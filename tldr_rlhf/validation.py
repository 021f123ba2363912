"""Check a stage's config before anything runs: every value in range, derived batch sizes that divide,
every input path present. Each problem is one ConfigError line naming the flag, e.g.

    --optim.lr -1.0: must be > 0
    --sft-path runs/sft/final: model path does not exist
    --sft-path runs/sft/final: the run's final/ is incomplete (its save did not finish); rerun that stage
    --rm-path runs/sft/final is a causal LM policy, not a reward model

The CLI calls ``validate_config`` right after parsing and every stage calls it again when it opens its
run folder (``train.lifecycle.start_run``), so library use gets the same checks before anything on disk is touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError
from .checkpoints import HUB_ID, check_input, require_kind
from .tracking import check_report_to
from .reward.specs import check_reward_spec

# field name -> (rule, what it must be). A field of the same name means the same thing in every stage.
_Rule = tuple[Callable[[Any], bool], str]
_GT0: _Rule = (lambda v: v > 0, "must be > 0")
_GE0: _Rule = (lambda v: v >= 0, "must be >= 0")
_UNIT: _Rule = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_OPEN_UNIT: _Rule = (lambda v: 0 < v < 1, "must be in (0, 1)")
RULES: dict[str, _Rule] = {
    **dict.fromkeys(
        (
            "lr", "eps", "micro_batch_size", "gradient_accumulation_steps", "epochs", "batch_size", "eval_batch_size",
            "forward_batch_size", "rollout_batch_size", "num_mini_batches", "ppo_epochs", "response_length",
            "max_query_length", "max_response_length", "max_cnndm_query_length", "total_episodes", "rollout_prompts",
            "mini_batch_size", "update_per_rollout", "log_every", "keep_checkpoints", "beta", "max_parallel",
            "timeout_s", "sample_max_new_tokens", "max_new_tokens", "rs_candidates", "rs_temperature", "rs_beta",
            "lora_alpha", "temperature", "proxy_pairs",
        ),
        _GT0,
    ),
    **dict.fromkeys(
        (
            "min_lr", "warmup_steps", "decay_steps", "weight_decay", "max_grad_norm", "eval_every", "save_every",
            "max_steps", "num_threads", "limit", "valid_limit", "valid_count", "num_sample_posts", "lora_r", "kl_coef", "vf_coef",
            "vf_clip_range", "clip_range", "cnndm_limit", "judge_limit", "table_posts", "train_layers", "min_score_gap",
            "retries", "num_posts", "best_of_n",
        ),
        _GE0,
    ),
    **dict.fromkeys(("gamma", "lam"), _UNIT),
    **dict.fromkeys(("valid_fraction", "eval_fraction"), _OPEN_UNIT),
    "warmup_ratio": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    "dual_clip": (lambda v: v == 0 or v > 1, "must be 0 (off) or > 1"),
    "vllm_kv_cache_gb": _GE0,  # 0: from the memory plan
    "vllm_gpu_memory_utilization": (lambda v: 0 <= v <= 1, "must be in [0, 1] (0: from the memory plan)"),
    "tis_cap": _GE0,
    "group_size": (lambda v: v >= 2, "must be >= 2 (a group baseline needs two responses)"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
}
# (config class name, field) -> rule, where one class means something else by a common name; None: any
# finite number (the LLM judge's temperature < 0 sends none)
CLASS_RULES: dict[tuple[str, str], _Rule | None] = {
    ("JudgeArgs", "temperature"): None,
    ("GoldConfig", "best_of_n"): (lambda v: all(n >= 1 for n in v), "must be numbers >= 1"),
}
# fields naming an input: a local file or folder, or a hub id
INPUT_FIELDS = {
    "path", "tokenizer", "sft_path", "rm_path", "judge_rm_path", "train", "valid", "comparisons",
    "valid_comparisons", "cnndm", "policy_samples", "posts", "reference",
}
# fields holding a reward spec (reward/specs.py): a reward-model path, a built-in, module:function or a weighted sum
REWARD_FIELDS = {"reward", "best_of_n_reward"}
MODEL_FIELDS = {"path", "tokenizer", "sft_path", "rm_path", "judge_rm_path", "reference"}
# classes whose `model` field is an input path rather than a nested config or a judge's model name
MODEL_PATH_CLASSES = {"EvaluateRMConfig", "GenerateArgs"}
# input fields that must hold one kind of model (checked from a local folder's config.json)
KIND_FIELDS = {"sft_path": "policy", "rm_path": "reward_model", "judge_rm_path": "reward_model", "reference": "policy"}
KIND_CLASS_FIELDS = {("EvaluateRMConfig", "model"): "reward_model", ("GenerateArgs", "model"): "policy"}
# (config class name, field) -> the name its flag has where that differs from the field's (one spelling
# across commands: evaluate-rm's reward model is --rm-path like every other command's)
FLAG_NAMES = {("EvaluateRMConfig", "model"): "rm_path", ("DPOConfig", "sample_max_new_tokens"): "sample_response_length"}
# (config class name, field) of run folders that must be named: empty would write into the current folder
REQUIRED_DIRS = {("RunArgs", "output_dir"), ("EvaluateConfig", "output_dir"), ("GoldConfig", "output_dir"), ("PipelineConfig", "run_dir")}


def flag(path: tuple[str, ...]) -> str:
    """The command-line flag of a (nested) field: ("optim", "lr") -> "--optim.lr",
    ("micro_batch_size",) -> "--micro-batch-size"."""
    return "--" + ".".join(p.replace("_", "-") for p in path)


def value_problem(cls_name: str, name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``name`` of config class ``cls_name`` by its range rule
    (``RULES`` / ``CLASS_RULES``), e.g. "must be > 0"; None when it is in range. The flag's check and a
    ``--config`` file's (``config.files``) both use it."""
    rule = CLASS_RULES[(cls_name, name)] if (cls_name, name) in CLASS_RULES else RULES.get(name)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if rule is not None and isinstance(value, (int, float, tuple)) and not rule[0](value):
        return rule[1]
    return None


def _check_value(cls_name: str, name: str, value: Any, where: tuple[str, ...]) -> None:
    problem = value_problem(cls_name, name, value)
    if problem:
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
        raise ConfigError(f"{flag(where)} {shown}: {problem}")


def _walk(cfg: Any, prefix: tuple[str, ...], check_paths: bool) -> None:
    cls_name = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        where = prefix + (FLAG_NAMES.get((cls_name, f.name), f.name),)
        if dataclasses.is_dataclass(value):
            _walk(value, where, check_paths)
            continue
        _check_value(cls_name, f.name, value, where)
        if (cls_name, f.name) in REQUIRED_DIRS and isinstance(value, str) and not value.strip():
            raise ConfigError(f"{flag(where)} '{value}': needs a folder name (empty would write the run into the current folder)")
        if f.name == "report_to":
            check_report_to(value, flag(where))
        if f.name == "push_to_hub" and value and not HUB_ID.match(value):
            raise ConfigError(f"{flag(where)} {value}: expected a Hub repo id, NAMESPACE/NAME")
        if f.name in REWARD_FIELDS and isinstance(value, str) and value:  # syntax always; callables and paths with check_paths

            check_reward_spec(value, flag=flag(where), check_paths=check_paths)
        if not check_paths:
            continue
        if f.name == "policies":
            for item in value:
                pname, sep, ppath = item.partition("=")
                if not sep or not pname or not ppath:
                    raise ConfigError(f"{flag(where)} {item}: expected NAME=PATH")
                check_input(ppath, f"{flag(where)} {pname}=", "model path")
                if Path(ppath).is_dir():
                    require_kind(ppath, "policy", f"{flag(where)} {pname}=")
        elif isinstance(value, str) and (f.name in INPUT_FIELDS or (f.name == "model" and cls_name in MODEL_PATH_CLASSES)):
            check_input(value, flag(where), "model path" if f.name in MODEL_FIELDS or f.name == "model" else "file or folder")
            kind = KIND_CLASS_FIELDS.get((cls_name, f.name)) or KIND_FIELDS.get(f.name)
            if kind and value and Path(value).is_dir():  # a policy where a reward model belongs, or the reverse
                require_kind(value, kind, flag(where))
    # cross-field rules
    model_lora = getattr(getattr(cfg, "model", None), "lora_r", 0)
    if isinstance(model_lora, int) and model_lora > 0 and getattr(cfg, "train_layers", 0):
        raise ConfigError(f"{flag(prefix + ('train_layers',))} {cfg.train_layers}: not with LoRA ({flag(prefix + ('model', 'lora_r'))} {model_lora}), which already trains only adapters; use one of them")
    if getattr(cfg, "load_in_4bit", None) is True:  # QLoRA: adapters on 4-bit base weights, CUDA only
        if not getattr(cfg, "lora_r", 0):
            raise ConfigError(f"{flag(prefix + ('load_in_4bit',))}: 4-bit base weights are frozen, so it needs LoRA adapters to train ({flag(prefix + ('lora_r',))} > 0)")
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{flag(prefix + ('load_in_4bit',))}: 4-bit (QLoRA) base weights need a CUDA GPU (bitsandbytes); this machine has none: drop the flag and keep {flag(prefix + ('lora_r',))}")
    if getattr(getattr(cfg, "run", None), "fsdp", False) is True:  # FSDP shards full weights; LoRA keeps them frozen
        lora = [(k, v) for k, v in ((("lora_r",), getattr(cfg, "lora_r", 0)), (("model", "lora_r"), model_lora)) if isinstance(v, int) and v > 0]
        if lora:
            raise ConfigError(f"{flag(prefix + ('run', 'fsdp'))}: not with LoRA ({flag(prefix + lora[0][0])} {lora[0][1]}); LoRA already keeps the trained state small: drop one of them")
    optim_lr, min_lr = getattr(cfg, "lr", None), getattr(cfg, "min_lr", None)
    if isinstance(optim_lr, float) and isinstance(min_lr, float) and min_lr > optim_lr:
        raise ConfigError(f"{flag(prefix + ('min_lr',))} {min_lr}: must not exceed {flag(prefix + ('lr',))} {optim_lr}")


def _check_sizes(cfg: Any, prefix: tuple[str, ...], world: int) -> None:
    """Derived batch sizes must divide exactly (the config's own properties raise ValueError)."""
    calls = [m for m in ("num_updates", "gradient_accumulation_steps", "optimizer_steps") if callable(getattr(cfg, m, None))]
    for m in calls:
        fn = getattr(cfg, m)
        try:
            fn() if m == "num_updates" else fn(world)
        except ValueError as e:
            where = f" ({'.'.join(prefix)})" if prefix else ""
            raise ConfigError(f"batch sizes{where}: {e} with {world} process{'es' if world > 1 else ''}; check --total-episodes, the batch-size flags and --micro-batch-size") from e
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_sizes(value, prefix + (f.name,), world)


def check_launcher_precision(cfg: Any, environ: dict[str, str] | None = None) -> None:
    """Refuse a mixed precision asked of the launcher (``accelerate launch --mixed_precision bf16``, or
    an accelerate config: both reach the processes as ACCELERATE_MIXED_PRECISION) that this config's
    own precision flag (``--model.dtype`` or ``--dtype``) does not give: the stages build their
    Accelerator from that flag, so the launcher's setting would be silently ignored. "no" (the
    launcher's default) and a matching bf16 pass. Raises ConfigError naming the flag to use."""
    asked = (environ if environ is not None else os.environ).get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if asked == "no":
        return
    model = getattr(cfg, "model", None)
    where = ("model", "dtype") if dataclasses.is_dataclass(model) and hasattr(model, "dtype") else ("dtype",)
    dtype = getattr(model, "dtype", None) if where[0] == "model" else getattr(cfg, "dtype", None)
    if dtype is None:
        return
    import torch

    gives_bf16 = dtype == "bfloat16" or (dtype == "auto" and torch.cuda.is_available())
    if asked == "bf16" and gives_bf16:
        return
    launcher = f"accelerate's mixed precision {asked} (ACCELERATE_MIXED_PRECISION, from accelerate launch --mixed_precision or its config)"
    if asked != "bf16":
        raise ConfigError(f"{launcher}: tldr-rlhf has no {asked}; launch with --mixed_precision no (or bf16) and set the precision with {flag(where)}")
    raise ConfigError(f"{launcher} is not applied: tldr-rlhf trains in {flag(where)} {dtype}; pass {flag(where)} bfloat16")


def validate_config(cfg: Any, *, check_paths: bool = True, world_size: int | None = None) -> None:
    """Check every field of a (nested) config dataclass: ranges (``RULES``), finite floats, derived
    batch sizes for ``world_size`` processes (default: the launcher's WORLD_SIZE, else 1), the
    launcher's mixed precision (``check_launcher_precision``) and, with ``check_paths``, every input path. Raises ConfigError naming the flag; returns None when all is
    well. Pure: reads the file system only to see whether inputs exist."""
    if not dataclasses.is_dataclass(cfg):
        return
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    _walk(cfg, (), check_paths)
    _check_sizes(cfg, (), world)
    check_launcher_precision(cfg)
