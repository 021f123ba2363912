"""Loading, building and saving reward models: a frozen scorer for the RL stages and the evaluations
(any one-output ``AutoModelForSequenceClassification``, this project's ``ScalarRewardModel`` included),
a reward-model checkpoint to continue training, a fresh one from a causal LM (``init_reward_model``),
and the save that writes it as a Hugging Face folder.

This module knows nothing about how a reward is read or scored (``reward/reward_model.py``,
``reward/scoring.py``) or about the ``--reward`` spec (``reward/specs.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError, hub_unreachable, hub_unreachable_message
from ..modeling import (
    apply_lora,
    check_vocab_fits,
    check_model_exists,
    disable_dropout,
    enable_gradient_checkpointing,
    freeze,
    load_causal_lm,
    offline_kwargs,
    save_adapter,
    unwrap_for_save,
    write_weights,
)
from ..precision import master_weights_dtype
from . import reward_model
from .reward_model import MODEL_TYPE, RewardModelConfig, ScalarRewardModel


def _load_reward_classifier(path: str, *, dtype: torch.dtype) -> nn.Module:
    """A one-output sequence classifier through ``AutoModelForSequenceClassification`` (this
    project's ``ScalarRewardModel`` checkpoints register themselves on import; other one-label
    classifiers load as they are), dropout off. Raises ModelLoadError for a missing path or a
    checkpoint that is not a one-output classifier."""
    from transformers import AutoModelForSequenceClassification

    check_model_exists(path)
    try:
        # trust_remote_code=False: the class registered in-process is used; a checkpoint's copy of
        # reward_model.py (its auto_map) is never executed, and transformers does not stop to ask.
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, trust_remote_code=False, **offline_kwargs(path))
    except Exception as e:  # noqa: BLE001
        if hub_unreachable(e):
            raise ModelLoadError(hub_unreachable_message("reward model", path)) from e
        raise ModelLoadError(f"cannot load reward model from '{path}' ({type(e).__name__}: {e})") from e
    if model.config.num_labels != 1:
        raise ModelLoadError(f"reward model '{path}' has {model.config.num_labels} outputs; a reward model has 1")
    return disable_dropout(model)


def load_frozen_reward_model(path: str, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A reward model to score with (RL stages, ``evaluate``'s judges), frozen: a scalar-head
    ``tldr_rlhf_reward`` checkpoint or any other one-label sequence classifier, from a Hugging Face
    folder or hub id. Raises ModelLoadError for a missing path or a checkpoint that is not a
    one-output classifier."""
    return freeze(_load_reward_classifier(path, dtype=dtype))


def load_reward_checkpoint(path: str, *, dtype: torch.dtype = torch.float32, tokenizer=None):
    """A saved tldr-rlhf reward model (``tldr_rlhf_reward`` checkpoint, a ``ScalarRewardModel``)
    through the Auto classes, dropout off, trainable; ``tokenizer`` (optional) supplies its pad and
    EOS ids. Raises ModelLoadError for a missing path or a checkpoint that is not a tldr-rlhf reward
    model (other classifiers load with ``load_frozen_reward_model``)."""
    model = _load_reward_classifier(path, dtype=dtype)
    if not isinstance(model, ScalarRewardModel):
        raise ModelLoadError(f"'{path}' is a {type(model).__name__}, not a tldr-rlhf reward model (model_type {MODEL_TYPE})")
    if tokenizer is not None:
        check_vocab_fits(model, tokenizer, path)
        _set_reward_special_ids(model, tokenizer)
    return model


def build_reward_model(path: str, *, dtype: torch.dtype = torch.float32, tokenizer=None):
    """A new ``ScalarRewardModel``: the backbone of a base or SFT causal LM (hub id, folder, .gguf
    file; its LM head is dropped) and a fresh head N(0, 1/sqrt(d_model + 1)), bias 0 (N+ detail
    11), dropout off. Raises ModelLoadError for a path that does not load or a model without a
    backbone."""
    lm = load_causal_lm(path, dtype=dtype, tokenizer=tokenizer)
    backbone = lm.base_model
    if backbone is lm:
        raise ModelLoadError(f"cannot find the backbone of '{path}' ({type(lm).__name__} has no base model)")
    text_config = backbone.config
    config = RewardModelConfig(text_config=text_config, pad_token_id=text_config.pad_token_id, eos_token_id=text_config.eos_token_id)
    config.name_or_path = str(path)
    model = ScalarRewardModel(config, backbone=backbone)
    model.reset_head()
    del lm
    return disable_dropout(model.to(dtype))


def is_reward_checkpoint(path: str) -> bool:
    """Whether ``path`` holds a ``tldr_rlhf_reward`` checkpoint (its config's model_type); anything
    unreadable counts as a causal LM path."""
    p = Path(path)
    if p.suffix == ".gguf":
        return False
    if p.is_dir():
        f = p / "config.json"
        return f.is_file() and json.loads(f.read_text()).get("model_type") == MODEL_TYPE
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, trust_remote_code=False).model_type == MODEL_TYPE
    except Exception:  # noqa: BLE001 - not reachable / not a config: treat as a causal LM path
        return False


def init_reward_model(model_args, tokenizer):
    """The reward model a training run starts from (``model_args``: a ``config.ModelArgs``): a
    reward-model checkpoint as it is (to continue training), or ``build_reward_model`` on the
    backbone of a causal LM, in ``master_weights_dtype``; with ``lora_r`` > 0 LoRA adapters on the
    backbone's linear layers and the scalar head trained in full (``apply_lora(head="score")``);
    activation checkpointing with ``gradient_checkpointing``. Raises ModelLoadError for a path that
    does not load, ConfigError for 4-bit weights (not offered for the reward model: its backbone is
    built from a causal LM's weights in memory)."""
    if getattr(model_args, "load_in_4bit", False):
        raise ConfigError("--model.load-in-4bit: not supported for the reward model; use --model.lora-r alone")
    dtype = master_weights_dtype(model_args.dtype)
    if is_reward_checkpoint(model_args.path):
        model = load_reward_checkpoint(model_args.path, dtype=dtype, tokenizer=tokenizer)
    else:
        model = build_reward_model(model_args.path, dtype=dtype, tokenizer=tokenizer)
    if getattr(model_args, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
    if model_args.lora_r > 0:
        model = apply_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha, task_type=None, head="score")
    return model


def _set_reward_special_ids(model: nn.Module, tokenizer) -> None:
    for cfg in (model.config, model.config.text_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id


def save_reward_model(model: nn.Module, tokenizer, path: str | Path, *, dtype: torch.dtype | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save a ``ScalarRewardModel`` as a Hugging Face checkpoint (safetensors, config with auto_map,
    this package's reward_model.py, tokenizer, the tokenizer's pad and EOS ids) that
    ``AutoModelForSequenceClassification`` loads back; floating-point weights cast to ``dtype`` when
    given, else as they are. A LoRA reward model is saved merged, and its adapters (with the head)
    alone in ``path/adapter`` (``save_adapter``). ``state_dict``: the weights to write instead of the
    model's own (an FSDP-sharded model's gathered weights)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _set_reward_special_ids(model, tokenizer)
    write_weights(unwrap_for_save(model), path, dtype, state_dict)
    tokenizer.save_pretrained(path)
    save_adapter(model, path)
