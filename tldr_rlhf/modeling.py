"""Loading and saving models and tokenizers; dropout off; LoRA; the precision rules; frozen
reference and reward models; reward-model construction; response-only logits.

A model path is a hub id, a local Hugging Face folder, or a ``.gguf`` file (llama.cpp format,
dequantized by transformers on load; it then saves as an ordinary safetensors checkpoint).
What a model folder holds (its kind, whether a run's final/ is complete, a fingerprint of its
files) is read without loading it in ``checkpoints.py``.
Every Auto-class load passes ``trust_remote_code=False``: a checkpoint's own code (our reward
model's ``auto_map``) is never run, and transformers raises instead of asking on stdin.
Shapes: B batch, P query tokens (left-padded), T response tokens, V vocabulary.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError, hub_unreachable, hub_unreachable_message
from .ops import position_ids_from_mask

log = logging.getLogger(__name__)


def _split_gguf(path: str) -> tuple[str, dict[str, Any]]:
    """Return ``(folder_or_id, extra_kwargs)`` for ``from_pretrained``; a .gguf file becomes gguf_file=."""
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in {".gguf", ".safetensors", ".bin"} or path.count("/") > 1


@functools.lru_cache(maxsize=1)
def hub_host_resolves() -> bool:
    """Whether the Hugging Face hub's host name (``HF_ENDPOINT``, default huggingface.co) resolves; asked
    once per process. False on a machine without network, where huggingface_hub would otherwise retry
    each file for about 50 s with a warning per try."""
    import os
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def offline_kwargs(path: str) -> dict[str, Any]:
    """``{"local_files_only": True}`` for a hub id when the hub cannot be reached (its host does not
    resolve): a cached model then loads at once and an uncached one fails at once (one line, see
    ``errors.hub_unreachable_message``) instead of after minutes of retries; {} otherwise."""
    import os

    if Path(path).expanduser().exists() or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or hub_host_resolves():
        return {}
    return {"local_files_only": True}


def check_model_exists(path: str) -> None:
    """ModelLoadError for a local path that does not exist, or for a checkpoint folder written before
    checkpoints held loadable weights (a ``state.pt`` and no ``config.json``)."""
    p = Path(path).expanduser()
    if looks_local(path) and not p.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if p.is_dir() and (p / "state.pt").is_file() and not (p / "config.json").is_file():
        raise ModelLoadError(
            f"{path} holds only resumable training state (state.pt, written by an older tldr-rlhf), no loadable model; "
            "load the run's final/, or a checkpoint written since checkpoints hold a Hugging Face folder"
        )


def load_tokenizer(path: str, *, padding_side: str = "left"):
    """Load a tokenizer from a hub id, folder or .gguf file and make padding safe.

    If the tokenizer has no pad token, pad is set to EOS (Qwen2.5's own choice: pad = EOS =
    ``<|endoftext|>``); masks are then built from lengths, never from ``ids != pad`` (N+ detail 3).
    Raises ModelLoadError for a missing path, an unreachable hub, or a tokenizer without EOS.
    """
    from transformers import AutoTokenizer

    check_model_exists(path)
    where, kw = _split_gguf(path)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **kw, **offline_kwargs(path))
    except Exception as e:  # noqa: BLE001
        if hub_unreachable(e):
            raise ModelLoadError(hub_unreachable_message("tokenizer", path)) from e
        raise ModelLoadError(f"cannot load tokenizer from '{path}' ({type(e).__name__}: {e})") from e
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer '{path}' has no EOS token; responses must end in EOS (N+ detail 3)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
_TOKENIZERS: dict[tuple[str, str], Any] = {}


def load_tokenizer_cached(path: str):
    """``modeling.load_tokenizer`` memoized by content: checkpoint folders whose tokenizer files are
    byte-identical (every policy of a pipeline) share one tokenizer, parsed once (a Qwen2.5
    tokenizer takes ~1 s). Other paths (hub ids, .gguf files) are keyed by path. Callers must not
    modify the tokenizer."""
    import hashlib

    p = Path(path)
    key = ("path", path)
    if p.is_dir():
        h = hashlib.sha256()
        for name in _TOKENIZER_FILES:
            if (p / name).is_file():
                h.update(name.encode() + b"\0" + (p / name).read_bytes())
        key = ("content", h.hexdigest())
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(path)
    return _TOKENIZERS[key]


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0, in modules and in the config (N+ detail 7). In place."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "hidden_dropout", "attn_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key, value in list(vars(cfg).items()):
            if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
                setattr(cfg, key, 0.0)
    return model


def _strip_gguf_quantizer(model: nn.Module) -> None:
    # transformers marks GGUF-loaded models as quantized although the weights are plain floats;
    # the marker blocks save_pretrained, so drop it (see ../shared/models/README.md).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_causal_lm(path: str, *, dtype: torch.dtype = torch.float32, tokenizer=None, load_in_4bit: bool = False):
    """Load a causal LM (hub id, folder or .gguf file) with dropout off and pad/EOS ids set.

    ``tokenizer`` (optional) supplies pad/eos ids to the model and generation configs.
    ``load_in_4bit``: base weights in 4-bit NF4 (bitsandbytes, QLoRA: Dettmers et al. 2023), compute
    in bf16; CUDA only (``quantization_4bit``). Raises ModelLoadError for a missing path or an
    unreachable hub, ConfigError for 4-bit without CUDA or bitsandbytes.
    """
    from transformers import AutoModelForCausalLM

    check_model_exists(path)
    where, kw = _split_gguf(path)
    if load_in_4bit:
        kw = {**kw, "quantization_config": quantization_4bit(), "device_map": {"": torch.cuda.current_device()}}  # 4-bit weights are placed at load
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=False, **kw, **offline_kwargs(path))
    except Exception as e:  # noqa: BLE001
        if hub_unreachable(e):
            raise ModelLoadError(hub_unreachable_message("model", path)) from e
        raise ModelLoadError(f"cannot load model from '{path}' ({type(e).__name__}: {e})") from e
    if kw:
        _strip_gguf_quantizer(model)
    if tokenizer is not None:
        set_special_ids(model, tokenizer)
    return disable_dropout(model)


def set_special_ids(model: nn.Module, tokenizer) -> None:
    """Copy the tokenizer's EOS and pad ids into the model and generation configs."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        gen.eos_token_id = tokenizer.eos_token_id


def apply_lora(model: nn.Module, *, r: int = 16, alpha: int = 32, target_modules: str | list[str] = "all-linear", task_type: str | None = "CAUSAL_LM", head: str | None = None):
    """Wrap ``model`` with peft LoRA adapters (Hu et al. 2021: W + (alpha / r) B A, B initialized to
    0 so the wrapped model starts equal to ``model``; no LoRA dropout: N+ detail 7). ``head``: the
    name of a module trained in full instead of adapted (the reward model's scalar ``score``; saved
    with the adapters), ``task_type`` None for models that are not causal LMs (a reward model, a
    value model's backbone). A model with 4-bit weights is prepared for k-bit training first.
    Returns the peft model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    extra = {"exclude_modules": [head], "modules_to_save": [head]} if head else {}
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, task_type=task_type, **extra)
    return get_peft_model(model, cfg)


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model (LoRA adapters)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class AdaptersDisabled(nn.Module):
    """The reference policy of a LoRA run: the peft ``policy`` itself with its adapters disabled
    (``with policy.disable_adapter():``), i.e. the base (SFT) weights, with no second copy in memory.
    It shares the policy's parameters (so it follows the policy's device) and is frozen in the
    sense that matters: its forward runs without the adapters. ``train``/``eval`` on it leave the
    policy's mode alone. Call it like the policy (same arguments, same outputs)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        if not is_lora(policy):
            raise TypeError(f"{type(policy).__name__} has no LoRA adapters to disable")
        self.policy = policy
        self.training = False

    def train(self, mode: bool = True) -> "AdaptersDisabled":
        return self

    @property
    def config(self):
        return self.policy.config

    def forward(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


def quantization_4bit():
    """bitsandbytes 4-bit NF4 weights with double quantization and bf16 compute (the QLoRA recipe).
    Raises ConfigError without CUDA or without bitsandbytes (``pip install bitsandbytes``)."""
    if not torch.cuda.is_available():
        raise ConfigError("--load-in-4bit: 4-bit (QLoRA) base weights need a CUDA GPU (bitsandbytes); this machine has none. Use LoRA without it (--lora-r)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError("--load-in-4bit: needs bitsandbytes (pip install bitsandbytes)") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"):
    each transformer block keeps only its input in the forward pass and recomputes its activations in
    backward, so a block's activations are held one block at a time (about one extra forward of
    compute). Hugging Face's own implementation, non-reentrant (``use_reentrant=False``: gradients
    reach inputs that need none, frozen embeddings and LoRA included). ``model``: a Hugging Face
    model, a peft-wrapped one, or any module holding such models (PPO's value model: its
    backbone); every ``PreTrainedModel`` in it that supports checkpointing gets it. The same
    numbers come out: recomputation repeats the forward's operations exactly (dropout is off).
    Under checkpointing a training forward with gradients ignores key/value caches (transformers
    drops them), so the shared-prompt paths take full rows there (``checkpointing_active``).
    Raises ValueError when nothing in ``model`` supports it. In place; returns ``model``."""
    from transformers import PreTrainedModel

    done = False
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing and not checkpointing_enabled(m):
            # transformers >= 5.2x names it activation_checkpointing_enable (the old name warns)
            enable = getattr(m, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        done = done or checkpointing_enabled(m)
    if not done:
        raise ValueError(f"{type(model).__name__} holds no model that supports gradient checkpointing")
    return model


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether any layer of ``model`` has activation checkpointing switched on (the
    ``gradient_checkpointing`` flag transformers sets on its layers)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def checkpointing_active(model: nn.Module) -> bool:
    """Whether a forward of ``model`` now runs under activation checkpointing: enabled
    (``enable_gradient_checkpointing``), in training mode, with gradients on. Its key/value cache
    is then ignored by transformers, so a shared-prompt forward must take full rows instead."""
    return model.training and torch.is_grad_enabled() and checkpointing_enabled(model)


def unwrap_for_save(model: nn.Module) -> nn.Module:
    """A plain transformers model to save: LoRA adapters merged into a copy of the weights."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def cast_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every floating-point tensor cast to ``dtype`` (detached; tensors
    already in ``dtype`` are the model's own). Tensors that share storage in the model (tied input and
    output embeddings) share one cast tensor, so ``save_pretrained`` still recognizes the tie and
    stores the weight once."""
    out: dict[str, torch.Tensor] = {}
    cast: dict[tuple, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if t.is_floating_point() and t.dtype != dtype:
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if key not in cast:
                cast[key] = t.to(dtype)
            t = cast[key]
        out[name] = t
    return out


def write_weights(model: nn.Module, path: Path, dtype: torch.dtype | None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``model.save_pretrained(path)`` (safetensors), the floating-point weights cast to ``dtype``
    first when given (the model itself is not changed) and config.json's ``dtype`` saying so.
    ``state_dict``: the weights to write instead of the model's own (an FSDP-sharded model's
    gathered full weights, ``train.fsdp.full_state_dict``)."""
    if state_dict is not None:
        cast = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state_dict.items()}
        model.save_pretrained(path, safe_serialization=True, state_dict=cast)
        if dtype is None:
            return
    else:
        params = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if dtype is None or params == {dtype}:
            model.save_pretrained(path, safe_serialization=True)
            return
        model.save_pretrained(path, safe_serialization=True, state_dict=cast_state_dict(model, dtype))
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if isinstance(config.get("text_config"), dict) and "dtype" in config["text_config"]:
        config["text_config"]["dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_pretrained(model: nn.Module, tokenizer, path: str | Path, *, dtype: torch.dtype | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save an ordinary Hugging Face checkpoint (safetensors) plus tokenizer to ``path``: LoRA adapters
    merged (``unwrap_for_save``), floating-point weights cast to ``dtype`` when given
    (``saved_weights_dtype``), else as they are; ``state_dict`` the weights to write instead of the
    model's own (an FSDP-sharded model's gathered weights)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_weights(unwrap_for_save(model), path, dtype, state_dict)
    tokenizer.save_pretrained(path)
    save_adapter(model, path)


ADAPTER_DIR = "adapter"


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """For a LoRA model: its adapters alone, in PEFT format (adapter_config.json +
    adapter_model.safetensors, float32), in ``path/adapter`` next to the merged weights;
    ``PeftModel.from_pretrained(base, path/adapter)`` on the base model rebuilds the trained model.
    Nothing for a model without adapters."""
    if is_lora(model):
        model.save_pretrained(Path(path) / ADAPTER_DIR, safe_serialization=True)


# ----------------------------------------------------------------------------------------------
# Frozen models


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, dropout off (N+ detail 7), no gradients. In place."""
    disable_dropout(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_frozen_reference(path: str, tokenizer, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The frozen reference policy: the SFT checkpoint again (N+ section 4). Raises ModelLoadError
    for a path that does not load."""
    return freeze(load_causal_lm(path, dtype=dtype, tokenizer=tokenizer))


def response_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_width: int) -> torch.Tensor:
    """Logits that predict the response tokens of ``[left-padded query | right-padded response]`` rows.

    Shapes: input_ids, attention_mask (B, P + T) with the query in the first ``query_width`` = P
    columns. Returns (B, T, V): ``out[:, t]`` is the distribution of token ``input_ids[:, P + t]``.
    Only T positions go through the LM head (``logits_to_keep``), which is where most of the time
    goes with a 150k vocabulary; position ids come from the mask (N+ detail 9).
    """
    t = input_ids.shape[1] - query_width
    keep = torch.arange(query_width - 1, query_width - 1 + t, device=input_ids.device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=keep,
        use_cache=False,
    )
    return out.logits


def kv_cache_kwargs(model: nn.Module, cache) -> dict[str, Any]:
    """``{keyword: cache}`` that hands a key/value cache (a ``transformers.Cache``, filled in place)
    to ``model.forward``: ``cache`` from transformers 5.24 on, where ``past_key_values`` is deprecated
    (to be removed in 5.40), ``past_key_values`` before. Read from the forward's signature, so model
    classes of either age (remote code too) get the name they know. A PEFT model (LoRA) passes its
    keywords through to the model it wraps: that model's signature decides."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_kv_cache_keyword(type(inner)): cache}


@functools.cache
def _kv_cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
