"""Model FLOPs and model FLOPs utilization (MFU): how much of the hardware's matrix throughput a step uses.

FLOP count (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1; Chowdhery et al.
2022, PaLM, appendix B). One token's forward pass through a decoder costs

    2 * N_body  +  4 * L * A * c  (+ 2 * N_head when its logits are computed)

FLOPs, with

* ``N_body``: the weights of the matrix multiplications the token runs through (every ``nn.Linear``
  of the transformer blocks: attention q/k/v/o and the MLP, grouped-query k/v at their real size,
  LoRA adapters included). Embedding lookups, norms, biases and activations are not counted
  (they are no multiply-accumulates over a weight matrix; biases are < 0.1% of the count).
* ``N_head``: the output head, ``hidden x vocab`` for a language model, ``hidden x 1`` for a reward
  or value head; counted only for the rows whose output is computed (a response-only LM head: the
  response tokens; a generated token: its one row of logits; a reward model: the last token).
* ``4 * L * A * c``: attention scores ``Q K^T`` and the weighted sum ``softmax(.) V``, each
  ``2 * A`` FLOPs per (query, key) pair and layer, with L layers, A = heads x head_dim (the query
  width), and ``c`` the keys the token attends to. This is PaLM's ``12 * L * H * Q * T`` training
  term divided by 3 for one forward, except that ``c`` counts the keys causal attention really uses
  (token i of a row attends to i keys, so a row of T tokens has T(T+1)/2 pairs) instead of all T,
  and a response that continues a shared prompt attends to the prompt's keys once computed.

A training step (forward and backward) is 3x its forward: backward costs two forwards (the
gradients with respect to the activations and to the weights), which is Kaplan's ``6N`` per trained
token against ``2N`` per forward-only or generated token. Activation recomputation (gradient
checkpointing) is not counted: model FLOPs count the work the model needs, not the work a memory
saving adds. Padding is never counted. Frozen weights (LoRA's base, a reward model training only its top
layers) are still counted at 6N per trained token, the usual model-FLOPs convention, although their
weight gradients are never computed: MFU reads low there, not high.

Peak: on CUDA the published dense (no sparsity) tensor-core peak of the device by name (``GPU_PEAK_TFLOPS``);
on CPU a short GEMM micro-benchmark in the run's precision, measured once per (CPU model, threads,
dtype, torch version) and cached in ``~/.cache/tldr_rlhf/peak.json`` (``$XDG_CACHE_HOME`` respected).
``--run.peak-tflops`` overrides both.

MFU = model FLOPs per second / peak FLOPs per second.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

# Dense peaks in TFLOP/s: (bf16/fp16 tensor core, tf32 tensor core, fp32 non-tensor), from the vendors'
# data sheets (H100 SXM5: 989.4 / 494.7 / 66.9; H200 the same chip; A100: 312 / 156 / 19.5; ...).
# Matched as a substring of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100").
GPU_PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 417.5, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),
    ("H200", (989.4, 494.7, 66.9)),
    ("H20", (148.0, 74.0, 44.0)),
    ("GH200", (989.4, 494.7, 66.9)),
    ("B200", (2250.0, 1100.0, 80.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A800", (312.0, 156.0, 19.5)),
    ("A10G", (70.0, 35.0, 31.2)),
    ("A10", (125.0, 62.5, 31.2)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L40", (181.0, 90.5, 90.5)),
    ("L4", (121.0, 60.0, 30.3)),
    ("RTX 4090", (165.2, 82.6, 82.6)),
    ("RTX 3090", (71.0, 35.6, 35.6)),
    ("V100", (125.0, 15.7, 15.7)),
    ("T4", (65.0, 8.1, 8.1)),
)


# ----------------------------------------------------------------------------------------------
# FLOP count


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a decoder: ``body_params`` matmul weights per token (N_body),
    ``lm_head_params`` (hidden x vocab; 0 for a model without one), ``num_layers`` L and
    ``attention_width`` A = heads x head_dim."""

    body_params: int
    lm_head_params: int
    num_layers: int
    attention_width: int
    hidden_size: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        """The shape of ``model``: a Hugging Face causal LM, a reward / value model wrapping one, any of
        them under DDP, PEFT or FSDP wrappers. N_body is every ``nn.Linear`` weight except the LM head
        (``get_output_embeddings``) and scalar heads (out_features 1). Raises ValueError when no
        module has a Hugging Face config with ``num_hidden_layers``."""
        config = next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "num_hidden_layers")), None)
        if config is None:
            raise ValueError(f"{type(model).__name__}: no Hugging Face config with num_hidden_layers found")
        head = None
        for m in model.modules():
            get = getattr(m, "get_output_embeddings", None)
            if callable(get) and isinstance(get(), nn.Linear):
                head = get()
                break
        body = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head and m.out_features > 1)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            body_params=int(body), lm_head_params=int(head.weight.numel()) if head is not None else 0,
            num_layers=int(config.num_hidden_layers), attention_width=int(heads * head_dim), hidden_size=int(config.hidden_size),
        )


def causal_pairs(lengths: Sequence[int] | torch.Tensor) -> int:
    """(query, key) pairs of causal self-attention over rows of these lengths: sum of T(T+1)/2."""
    t = torch.as_tensor(lengths, dtype=torch.int64)
    return int((t * (t + 1) // 2).sum())


def forward_flops(shape: ModelShape, *, tokens: int, pairs: int, head_rows: int, head_params: int | None = None) -> float:
    """FLOPs of one forward pass: ``2 * N_body * tokens + 4 * L * A * pairs + 2 * head_params * head_rows``
    (module docstring). ``tokens``: real token positions run through the blocks; ``pairs``: causal
    (query, key) attention pairs; ``head_rows``: rows whose head output is computed; ``head_params``
    defaults to the LM head (pass ``shape.hidden_size`` for a scalar head)."""
    hp = shape.lm_head_params if head_params is None else head_params
    return 2.0 * shape.body_params * tokens + 4.0 * shape.num_layers * shape.attention_width * pairs + 2.0 * hp * head_rows


def sequence_forward_flops(shape: ModelShape, query_lengths: torch.Tensor, response_lengths: torch.Tensor, *, head: str = "response", query_runs: torch.Tensor | None = None) -> float:
    """Forward FLOPs of rows ``[query | response]`` (real tokens only, lengths (B,) each).

    ``head``: "response" (log-probs of the response tokens: one LM-head row per response token),
    "all" (every position of the row), "scalar" (one ``hidden x 1`` output per row: reward at the
    last token) or "values" (a ``hidden x 1`` value per response token).
    ``query_runs``: the lengths of the queries actually run when rows share them (shared prompt:
    each distinct query once, (Q,)); None = every row runs its own query. A response token j
    (1-based) attends to its row's query keys and its own j-token prefix either way."""
    q = torch.as_tensor(query_lengths, dtype=torch.int64)
    r = torch.as_tensor(response_lengths, dtype=torch.int64)
    if q.shape != r.shape:
        raise ValueError(f"query_lengths {tuple(q.shape)} and response_lengths {tuple(r.shape)} differ")
    runs = q if query_runs is None else torch.as_tensor(query_runs, dtype=torch.int64)
    tokens = int(runs.sum() + r.sum())
    pairs = causal_pairs(runs) + int((q * r).sum()) + causal_pairs(r)
    rows = {"response": int(r.sum()), "all": int((q + r).sum()), "scalar": int(q.numel()), "values": int(r.sum())}
    if head not in rows:
        raise ValueError(f"head must be one of {sorted(rows)}, got {head!r}")
    head_params = shape.hidden_size if head in ("scalar", "values") else None
    return forward_flops(shape, tokens=tokens, pairs=pairs, head_rows=rows[head], head_params=head_params)


def batch_forward_flops(shape: ModelShape, attention_mask: torch.Tensor, query_width: int, *, head: str = "response", num_queries: int | None = None, group_size: int = 1) -> float:
    """``sequence_forward_flops`` of a ``[left-padded query | right-padded response]`` batch from its
    (B, P + T) attention mask. Shared prompt, either layout: ``num_queries`` Q (row k continues query
    k % Q: ``collate_pairs``' chosen / rejected halves) or ``group_size`` G > 1 (consecutive groups
    of G rows share a query: a GRPO rollout). Raises ValueError when B does not split that way."""
    q, r = batch_lengths(attention_mask, query_width)
    runs = None
    if num_queries is not None:
        if num_queries < 1 or q.numel() % num_queries:
            raise ValueError(f"{q.numel()} rows do not continue {num_queries} queries")
        runs = q[:num_queries]
    elif group_size > 1:
        if q.numel() % group_size:
            raise ValueError(f"{q.numel()} rows do not split into groups of {group_size}")
        runs = q.view(-1, group_size)[:, 0]
    return sequence_forward_flops(shape, q, r, head=head, query_runs=runs)


def batch_lengths(attention_mask: torch.Tensor, query_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real query and response lengths (B,) each of a ``[left-padded query | right-padded response]``
    batch (``data.batching.QueryResponseBatch``) from its (B, P + T) attention mask."""
    m = attention_mask.detach().to("cpu", torch.int64)
    return m[:, :query_width].sum(1), m[:, query_width:].sum(1)


def train_flops(forward: float) -> float:
    """FLOPs of forward and backward: 3x the forward (Kaplan's 6N against 2N per token)."""
    return 3.0 * forward


def rl_update_flops(
    policy: ModelShape, attention_mask: torch.Tensor, query_width: int, *, group_size: int = 1, passes: int = 1,
    no_grad_policy_forwards: int = 2, reward: ModelShape | None = None, value: ModelShape | None = None,
) -> float:
    """Model FLOPs of one RL update on a rollout of B rows (attention mask (B, P + T)):

    * generation: one policy forward over every row (prefill and the sampled tokens, one LM-head row
      per sampled token);
    * scoring: ``no_grad_policy_forwards`` forwards with response-only LM head (the policy's rollout
      log-probs and the reference's), the reward model (scalar head) and, for PPO, the value model
      (a value per response token);
    * training: ``passes`` passes of forward and backward of the policy (and the value model).

    ``group_size`` G > 1: each group of G consecutive rows runs its query once in every pass (shared
    prompt); 1 = every row its own query."""
    kw = dict(group_size=group_size)
    lm = batch_forward_flops(policy, attention_mask, query_width, head="response", **kw)
    total = lm * (1 + no_grad_policy_forwards) + passes * train_flops(lm)
    if reward is not None:
        total += batch_forward_flops(reward, attention_mask, query_width, head="scalar", **kw)
    if value is not None:
        v = batch_forward_flops(value, attention_mask, query_width, head="values", **kw)
        total += v + passes * train_flops(v)
    return total


def mfu_metrics(flops: float, seconds: float, peak_tflops: float | None) -> dict[str, float]:
    """``perf/model_tflops_per_s`` (model FLOPs / seconds / 1e12) and, with a peak, ``perf/mfu``
    (a fraction, not percent)."""
    achieved = flops / max(seconds, 1e-9) / 1e12
    out = {"perf/model_tflops_per_s": achieved}
    if peak_tflops:
        out["perf/mfu"] = achieved / peak_tflops
    return out


# ----------------------------------------------------------------------------------------------
# Peak


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo ("model name"), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def peak_cache_path() -> Path:
    """``$XDG_CACHE_HOME/tldr_rlhf/peak.json`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "tldr_rlhf" / "peak.json"


def measure_gemm_tflops(dtype: torch.dtype, *, size: int = 1024, seconds: float = 0.5) -> float:
    """Best TFLOP/s of a square ``size`` GEMM (``2 * size**3`` FLOPs, as ``x @ W^T`` and ``x @ W``) in
    ``dtype`` on this process's torch CPU threads, over repeats for about ``seconds`` of CPU time after one warm-up.

    Each repeat is timed by the CPU time this process used (``time.process_time``) divided by the
    thread count, not by the wall clock: on a machine shared with other processes the wall clock
    also counts the time the threads waited for a core, which says nothing about the hardware. The
    best repeat is kept (interference only slows a repeat down). A kernel so slow that one ``size``
    GEMM would take over half of ``seconds`` (bf16 on a CPU without bf16 instructions) is measured
    at 256 instead."""
    g = torch.Generator().manual_seed(0)
    small = torch.randn(256, 256, generator=g).to(dtype)
    t0 = time.perf_counter()
    torch.mm(small, small)
    if (time.perf_counter() - t0) * (size / 256) ** 3 > seconds / 2:  # a slow kernel (bf16 without bf16 instructions): measure small
        size = 256
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    # both layouts a model's matmuls use: x @ W^T (every Linear's forward) and x @ W (backward); the
    # best of them is the peak (torch's bf16 fallback on CPUs without bf16 instructions runs x @ W^T
    # several times faster than x @ W)
    layouts = (lambda: torch.nn.functional.linear(a, b), lambda: torch.mm(a, b))
    for op in layouts:
        op()
    threads = max(1, torch.get_num_threads())
    best, used, k = 0.0, 0.0, 0
    while used < seconds:
        c0, w0 = time.process_time(), time.perf_counter()
        layouts[k % 2]()
        k += 1
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        # CPU time below the clock's resolution: fall back to the wall clock for this repeat
        dt = cpu / threads if cpu > 1e-3 else wall
        best = max(best, 2.0 * size**3 / max(dt, 1e-9) / 1e12)
        used += max(cpu, wall / 10)
    return best


def cpu_peak_tflops(dtype: torch.dtype, *, cache: Path | None = None) -> float:
    """The measured CPU GEMM peak (``measure_gemm_tflops``) in ``dtype`` for this CPU model, torch
    thread count and torch version, read from ``cache`` (``peak_cache_path()``) or measured once and
    written there. An unreadable cache is measured again and rewritten; an unwritable one only logged."""
    cache = cache or peak_cache_path()
    key = f"{cpu_model_name()}|threads={torch.get_num_threads()}|{str(dtype).removeprefix('torch.')}|torch={torch.__version__}|cpu-time-v3"
    try:
        table = json.loads(cache.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    if isinstance(table.get(key), (int, float)) and table[key] > 0:
        return float(table[key])
    peak = measure_gemm_tflops(dtype)
    table[key] = peak
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        tmp.replace(cache)
    except OSError as e:
        log.info("CPU peak %.3f TFLOP/s not cached (%s)", peak, e)
    return peak


def gpu_peak_tflops(name: str, dtype: torch.dtype, *, tf32: bool = False) -> float | None:
    """Published dense peak of the GPU called ``name`` for ``dtype`` (bf16/fp16: tensor core; fp32:
    tf32 tensor core when ``tf32`` else plain fp32), or None for a device not in ``GPU_PEAK_TFLOPS``."""
    for sub, (half, t32, f32) in GPU_PEAK_TFLOPS:
        if sub.lower() in name.lower():
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return t32 if tf32 else f32
    return None


def peak_tflops(device: torch.device, dtype: torch.dtype, *, override: float = 0.0) -> float | None:
    """The peak MFU is measured against, in TFLOP/s: ``override`` when > 0 (``--run.peak-tflops``),
    else the GPU table (None for an unknown GPU) or the cached CPU micro-benchmark."""
    if override > 0:
        return float(override)
    if device.type == "cuda":
        peak = gpu_peak_tflops(torch.cuda.get_device_name(device), dtype, tf32=torch.backends.cuda.matmul.allow_tf32)
        if peak is None:
            log.info("no published peak for %s; perf/mfu not logged (set --run.peak-tflops)", torch.cuda.get_device_name(device))
        return peak
    return cpu_peak_tflops(dtype)
