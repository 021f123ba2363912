"""Set-up every stage shares: accelerator, dtype, policy loading with optional LoRA, how weights are saved."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ModelArgs, RunArgs
from . import fsdp
from ..modeling import apply_lora, enable_gradient_checkpointing, load_causal_lm, load_tokenizer, save_pretrained
from ..precision import master_weights_dtype, saved_weights_dtype, uses_bf16_autocast

log = logging.getLogger(__name__)


def make_accelerator(model_args: ModelArgs, run_args: RunArgs):
    """An accelerate Accelerator: bf16 mixed precision (``accelerator.autocast()`` is bf16 autocast)
    on CUDA when dtype is auto/bfloat16 and on CPU when it is bfloat16 (``modeling.uses_bf16_autocast``:
    the CUDA regime, testable on CPU), else fp32; data-parallel when launched with torchrun /
    accelerate launch (gloo on CPU)."""
    from accelerate import Accelerator

    if run_args.num_threads:
        torch.set_num_threads(run_args.num_threads)
    cuda = torch.cuda.is_available()
    mixed = "bf16" if uses_bf16_autocast(model_args.dtype, cuda=cuda) else "no"
    _forget_other_mixed_precision(mixed)
    return Accelerator(cpu=not cuda, mixed_precision=mixed)


def _forget_other_mixed_precision(mixed: str) -> None:
    """accelerate keeps one process-wide ``AcceleratorState`` and refuses an Accelerator whose
    mixed precision differs from the first one's (a pipeline's fp32 stage, then a bf16 stage in the
    same process). The precision part of that state is dropped when it differs; the distributed
    part (``PartialState``: process group, ranks) is kept."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed):
        AcceleratorState._reset_state(reset_partial_state=False)


def load_policy(model_args: ModelArgs, tokenizer):
    """Causal LM in float32 master weights (bf16 autocast gives bf16 compute with "bfloat16", or "auto" on CUDA), dropout off,
    LoRA adapters when ``lora_r`` > 0, activation checkpointing with ``gradient_checkpointing``."""
    model = load_causal_lm(model_args.path, dtype=master_weights_dtype(model_args.dtype), tokenizer=tokenizer, load_in_4bit=getattr(model_args, "load_in_4bit", False))
    if model_args.lora_r > 0:
        model = apply_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha)
    if model_args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def tokenizer_for(model_args: ModelArgs):
    """The tokenizer of ``model_args.tokenizer``, else of the model path."""
    return load_tokenizer(model_args.tokenizer or model_args.path)



def weights_saver(model: nn.Module, tokenizer, dtype_name: str, run_args: RunArgs, *, save: Callable = save_pretrained) -> Callable[[Path], None]:
    """``save_weights(folder)``: how a stage writes ``final/`` and each checkpoint's Hugging Face
    folder, ``save(model, tokenizer, folder, dtype=...)`` (``modeling.save_pretrained``, or
    ``save_reward_model``) in the dtype ``saved_weights_dtype`` gives for ``dtype_name`` and
    ``--run.save-fp32``. ``model`` is the module being trained, not the accelerator's wrapper (its
    weights are read at each call). Every process may call it: only process 0 writes, and under
    FSDP every process must (the full weights are gathered first)."""
    dtype = saved_weights_dtype(dtype_name, fp32=run_args.save_fp32)

    def save_weights(folder: Path) -> None:
        # FSDP: every process gathers the full weights (a collective), process 0 writes them
        full = fsdp.full_state_dict(model) if fsdp.is_sharded(model) else None
        if fsdp.rank() == 0:
            save(model, tokenizer, folder, dtype=dtype, state_dict=full)

    return save_weights


def shard_if_asked(model: nn.Module, run_args: RunArgs, accelerator) -> nn.Module:
    """``--run.fsdp``: the model sharded in place over the job's processes (``fsdp.shard_model``),
    else unchanged. Call before building the optimizer."""
    if not run_args.fsdp:
        return model
    model = fsdp.shard_model(model, accelerator.device)
    if accelerator.is_main_process:
        log.info("FSDP2: %s sharded over %d processes", type(model).__name__, fsdp.world_size())
    return model


def prepare(accelerator, model: nn.Module, optimizer):
    """(model, optimizer) ready for the loop: an FSDP-sharded model as it is (FSDP does the
    gradient reduction DDP would), else ``accelerator.prepare`` (DDP when launched on several
    processes)."""
    if fsdp.is_sharded(model):
        return model, optimizer
    return accelerator.prepare(model, optimizer)
