"""Set-up every stage shares: accelerator, dtype, policy loading with optional LoRA, how weights are saved."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ModelArgs, RunArgs
from ..modeling import apply_lora, load_causal_lm, load_tokenizer, save_pretrained, saved_weights_dtype

log = logging.getLogger(__name__)


def make_accelerator(model_args: ModelArgs, run_args: RunArgs):
    """An accelerate Accelerator: bf16 mixed precision on CUDA when dtype is auto/bfloat16, fp32 on
    CPU; data-parallel when launched with torchrun / accelerate launch (gloo on CPU)."""
    from accelerate import Accelerator

    if run_args.num_threads:
        torch.set_num_threads(run_args.num_threads)
    cuda = torch.cuda.is_available()
    mixed = "bf16" if cuda and model_args.dtype in ("auto", "bfloat16") else "no"
    return Accelerator(cpu=not cuda, mixed_precision=mixed)


def load_policy(model_args: ModelArgs, tokenizer):
    """Causal LM in float32 master weights (autocast gives bf16 compute on CUDA), dropout off,
    LoRA adapters when ``lora_r`` > 0."""
    dtype = torch.bfloat16 if model_args.dtype == "bfloat16" and not torch.cuda.is_available() else torch.float32
    model = load_causal_lm(model_args.path, dtype=dtype, tokenizer=tokenizer)
    if model_args.lora_r > 0:
        model = apply_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha)
    return model


def tokenizer_for(model_args: ModelArgs):
    """The tokenizer of ``model_args.tokenizer``, else of the model path."""
    return load_tokenizer(model_args.tokenizer or model_args.path)



def weights_saver(model: nn.Module, tokenizer, dtype_name: str, run_args: RunArgs, *, save: Callable = save_pretrained) -> Callable[[Path], None]:
    """``save_weights(folder)``: how a stage writes ``final/`` and each checkpoint's Hugging Face
    folder, ``save(model, tokenizer, folder, dtype=...)`` (``modeling.save_pretrained``, or
    ``save_reward_model``) in the dtype ``saved_weights_dtype`` gives for ``dtype_name`` and
    ``--run.save-fp32``. ``model`` is the module being trained, not the accelerator's wrapper (its
    weights are read at each call)."""
    dtype = saved_weights_dtype(dtype_name, fp32=run_args.save_fp32)
    return lambda folder: save(model, tokenizer, folder, dtype=dtype)
