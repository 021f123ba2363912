"""The precision rules of training and evaluation, in one place: float32 master weights, bf16 autocast
("bfloat16" on any device, "auto" on CUDA), the dtype a run saves its weights in, and the dtype of an
RL stage's frozen models.

This module knows nothing about loading or saving models; it only answers which dtype.
"""

from __future__ import annotations

import contextlib

import torch


def master_weights_dtype(dtype_name: str) -> torch.dtype:
    """Weights dtype of a model that is trained, or evaluated in the training regime: float32 master
    weights always; with "bfloat16" (any device) or "auto" on CUDA, bf16 autocast gives bf16 compute
    (``uses_bf16_autocast``, ``bf16_autocast``, ``common.make_accelerator``). Until issue 14 item 4,
    "bfloat16" on a machine without CUDA meant bf16 weights without autocast, a regime CUDA never
    runs; now the CPU runs the CUDA one. ``dtype_name`` is kept for the callers' symmetry."""
    del dtype_name
    return torch.float32


def saved_weights_dtype(dtype_name: str, *, fp32: bool = False) -> torch.dtype:
    """Dtype of the weights a run saves (``final/`` and each checkpoint's Hugging Face folder): the
    training precision when that is bfloat16 ("bfloat16", or "auto" on CUDA: bf16 compute), so a
    0.5B policy takes 1 GB instead of 2; float32 otherwise, or always with ``fp32``
    (``--run.save-fp32``: keep the float32 master weights)."""
    if fp32:
        return torch.float32
    return torch.bfloat16 if uses_bf16_autocast(dtype_name, cuda=torch.cuda.is_available()) else torch.float32


def uses_bf16_autocast(dtype_name: str, *, cuda: bool) -> bool:
    """Whether a training stage runs under bf16 autocast (mixed precision: float32 master weights,
    bf16 matmuls): "bfloat16" on any device (on CPU this is how the CUDA regime is tested, since bf16
    autocast exists there too), "auto" on CUDA only. ``common.make_accelerator`` reads it."""
    return dtype_name == "bfloat16" or (dtype_name == "auto" and cuda)


def frozen_weights_dtype(dtype_name: str) -> torch.dtype:
    """Weights dtype of the frozen models of an RL stage (reference policy, reward model): always
    float32, the dtype of the policy's master weights, because they run under the same autocast as
    the policy's rollout pass (``accelerator.autocast``). With bf16 autocast they then compute in
    exactly the policy's precision regime (fp32 embeddings, norms and residual stream; bf16 matmuls
    of the same bf16-rounded weights), so at the first update the KL is exactly 0 and the PPO ratio
    exactly 1. Frozen models held in bf16 instead (what this returned before) computed a different
    regime (bf16 residual stream): on SmolLM2-135M per-token log-prob noise of std 0.10 nats and a
    per-sequence "KL" of -0.97 .. +0.99 before any update (issue 14 item 4). The cost is float32
    memory for the frozen models; LoRA (the reference is the base with adapters disabled) removes the
    reference copy altogether. ``dtype_name`` is accepted for the callers' symmetry and unused."""
    del dtype_name
    return torch.float32


def bf16_autocast(device: torch.device, dtype_name: str):
    """bf16 autocast on ``device`` when ``uses_bf16_autocast`` says so ("bfloat16" on any device,
    "auto" on CUDA), else a context that does nothing."""
    if uses_bf16_autocast(dtype_name, cuda=device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
