"""The memory of the vLLM rollout engine (``--rollout-engine vllm``, ``rollout_engine.py``): its own copy
of the policy's weights, the KV cache of one rollout's sequences, and on CUDA a margin for its
profiling activations and CUDA graphs. ``memory.estimate_stage`` adds it to a stage's plan as the
``engine`` part, and ``rollout_engine.engine_for`` sizes the engine from it when the user leaves
``--vllm-kv-cache-gb`` (CPU) or ``--vllm-gpu-memory-utilization`` (CUDA) at 0:

* KV cache bytes = sequences x tokens x layers x 2 (key and value) x kv_heads x head_dim x bytes per
  element, sequences = prompts x G of one rollout, tokens = query + response rounded up to vLLM's KV
  block (``BLOCK_TOKENS``: 128 tokens on the CPU, 16 on CUDA; an upper bound: prefix caching stores
  the G samples' shared prompt once), never below ``KV_FLOOR_BYTES`` nor two sequences of the
  engine's context (vLLM refuses a cache that cannot hold one). A smaller cache than the rollout
  needs schedules fewer sequences at once, and may preempt running ones: slower, and a preempted
  seeded request on the CPU cannot rewind its generator.
* CUDA: ``gpu_memory_utilization`` = (weights + KV cache + ``CUDA_MARGIN_BYTES``) / the GPU's memory,
  rounded up to a hundredth: vLLM takes that share of the GPU, the training keeps the rest.

No torch at import: ``tldr-rlhf plan`` uses it without loading models.
"""

from __future__ import annotations

import math
from typing import Literal

GIB = 2**30
KV_FLOOR_BYTES = 64 * 2**20  # 64 MiB: a few blocks of every layer at the tiny test shapes
BLOCK_TOKENS = {"cpu": 128, "cuda": 16}  # vLLM's default KV block (tokens): a sequence takes whole blocks
CUDA_MARGIN_BYTES = 1 * GIB  # vLLM's profiling activations (max_num_batched_tokens tokens), sampler logits, CUDA graphs


def engine_dtype_bytes(vllm_dtype: str, device: Literal["cuda", "cpu"]) -> int:
    """Bytes per weight / KV element of the engine: ``--vllm-dtype`` auto is float32 on the CPU (4) and
    bfloat16 on CUDA (2), as ``rollout_engine.engine_dtype`` resolves it."""
    if vllm_dtype == "auto":
        return 2 if device == "cuda" else 4
    return 2 if vllm_dtype == "bfloat16" else 4


def kv_cache_bytes(sequences: int, tokens: int, layers: int, kv_heads: int, head_dim: int, bytes_per: int) -> int:
    """KV cache of ``sequences`` sequences of ``tokens`` tokens (query + response) each:
    sequences x tokens x layers x 2 (key, value) x kv_heads x head_dim x ``bytes_per`` bytes.
    SmolLM2-135M (30 layers, 3 key/value heads of 64) in float32: 46,080 bytes per token."""
    return sequences * tokens * layers * 2 * kv_heads * head_dim * bytes_per


def planned_kv_cache_bytes(sequences: int, tokens: int, layers: int, kv_heads: int, head_dim: int, bytes_per: int, *, block: int = 1) -> int:
    """``kv_cache_bytes`` of one rollout with each sequence's ``tokens`` rounded up to whole KV blocks
    of ``block`` tokens, floored at ``KV_FLOOR_BYTES`` and at two sequences (the engine's context)."""
    tokens = -(-tokens // block) * block
    need = kv_cache_bytes(sequences, tokens, layers, kv_heads, head_dim, bytes_per)
    return max(need, KV_FLOOR_BYTES, kv_cache_bytes(2, tokens, layers, kv_heads, head_dim, bytes_per))


def engine_bytes(params: int, kv_bytes: int, bytes_per: int, device: Literal["cuda", "cpu"]) -> int:
    """The engine's whole footprint: ``params`` weights at ``bytes_per`` bytes, its KV cache
    ``kv_bytes``, and on CUDA ``CUDA_MARGIN_BYTES`` (on the CPU its runtime is the process's, counted
    in the plan's overhead)."""
    return params * bytes_per + kv_bytes + (CUDA_MARGIN_BYTES if device == "cuda" else 0)


def gpu_memory_utilization(engine: int, device_total: int) -> float:
    """vLLM's ``gpu_memory_utilization`` for an engine of ``engine`` bytes on a GPU of ``device_total``
    bytes: the share, rounded up to a hundredth, at most 1. Raises ValueError for a GPU size <= 0."""
    if device_total <= 0:
        raise ValueError(f"device_total must be > 0 bytes, got {device_total}")
    return min(1.0, math.ceil(100 * engine / device_total) / 100)


def stage_engine_bytes(cfg, params: int, layers: int, kv_heads: int, head_dim: int, *, sequences: int, tokens: int, device: Literal["cuda", "cpu"]) -> tuple[int, int]:
    """(the engine's footprint, its KV cache) in bytes for an RL stage's ``cfg`` with
    ``--rollout-engine vllm``, the policy of ``params`` weights and the given layers / heads, one
    rollout of ``sequences`` sequences of ``tokens`` tokens: ``cfg.vllm_kv_cache_gb`` GiB of KV cache
    on the CPU when set, else ``planned_kv_cache_bytes``; the footprint is ``engine_bytes``."""
    per = engine_dtype_bytes(cfg.vllm_dtype, device)
    kv = planned_kv_cache_bytes(sequences, tokens, layers, kv_heads, head_dim, per, block=BLOCK_TOKENS[device])
    if device == "cpu" and cfg.vllm_kv_cache_gb:
        kv = int(cfg.vllm_kv_cache_gb * GIB)
    return engine_bytes(params, kv, per, device), kv
