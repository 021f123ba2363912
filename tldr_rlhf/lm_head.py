"""Response log-probs without materialising (rows, T, V) logits, and with each query run once.

Two speed and memory devices for every stage that scores responses (DPO here; RM, PPO and GRPO can
use them too):

* ``chunked_target_logprobs``: log pi(target) from the final hidden states and the LM head weight,
  computed a block of rows at a time and recomputed in backward, so the peak is one block of logits
  (about 64 MiB) instead of all of them (16 x 133 x 151,936 floats = 1.3 GB for a Qwen DPO micro-batch),
  and only real response tokens go through the head (padding is skipped).
* shared prompt: when several responses continue the same query (chosen and rejected of a
  comparison, a GRPO group), the query runs through the model once and every response runs on its
  key/value cache. The result is the same as running each full row; the query part, usually the
  longest (TL;DR queries ~300-512 tokens, responses ~30-60), is computed once instead of per response.

Shapes: Q distinct queries, R response rows, P query width, T response width, H hidden, V vocabulary,
N real response tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .data.batching import QueryResponseBatch
from .modeling import response_logits
from .ops import position_ids_from_mask, token_logprobs

_CHUNK_BYTES = 64 * 2**20
# Config attributes that change logits after the LM head (softcapping, scaling); models with any of
# them set take the plain path (full forward, logits for response positions only).
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class _ChunkedTargetLogprobs(torch.autograd.Function):
    """log softmax(hidden @ W^T + b)[target] / temperature, a block of rows at a time; backward
    recomputes each block's logits instead of storing them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, rows):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        for s in range(0, hidden.shape[0], rows):
            logits = _block_logits(hidden[s : s + rows], w, b, temperature)
            lse[s : s + rows] = torch.logsumexp(logits, -1)
            out[s : s + rows] = logits.gather(1, targets[s : s + rows, None]).squeeze(1) - lse[s : s + rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.rows = temperature, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows]
            g = grad_out[s : s + rows].float()
            # d log p_target / d logit_v = (onehot_target - softmax)_v / temperature
            probs = torch.exp(_block_logits(h, w, b, t) - lse[s : s + rows, None])
            d = probs.mul_(-g[:, None])
            d.scatter_add_(1, targets[s : s + rows, None], g[:, None])
            if t != 1.0:
                d.div_(t)
            if need_h:
                grad_h[s : s + rows] = (d.to(h.dtype) @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(d.t(), h.float())
            if need_b:
                grad_b.add_(d.sum(0))
        return grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None, None, None, None


def _block_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, temperature: float) -> torch.Tensor:
    logits = (h @ w.t() if b is None else torch.addmm(b, h, w.t())).float()
    return logits / temperature if temperature != 1.0 else logits


def chunked_target_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *, temperature: float = 1.0, rows: int | None = None
) -> torch.Tensor:
    """Log-probability of each target token under the LM head, without keeping (N, V) logits.

    Shapes: hidden (N, H) final hidden states (after the model's last norm), weight (V, H), bias (V,)
    or None, targets (N,) int64. Returns (N,) float32 ``log softmax(hidden W^T + b) / temperature``
    at the targets. Memory: one block of ``rows`` x V float32 logits at a time (default: 64 MiB worth);
    backward recomputes the blocks. Gradients flow to hidden, weight and bias.
    """
    if rows is None:
        rows = max(8, _CHUNK_BYTES // (4 * weight.shape[0]))
    return _ChunkedTargetLogprobs.apply(hidden, weight, bias, targets, float(temperature), int(rows))


def split_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, LM head) of a causal LM (peft-wrapped or not) whose logits are exactly
    ``head(backbone(...).last_hidden_state)``; None when that does not hold or is not known to hold
    (logit softcapping or scaling, a LoRA-wrapped head, no ``get_decoder``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    cfg = getattr(base, "config", None)
    if cfg is None or not hasattr(base, "get_decoder") or not hasattr(base, "get_output_embeddings"):
        return None
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any(getattr(text_cfg, a, None) not in (None, 1.0) for a in _LOGIT_POSTPROCESSING):
        return None
    head = base.get_output_embeddings()
    backbone = base.get_decoder()
    if type(head) is not nn.Linear or backbone is None or backbone is base:
        return None
    return backbone, head


def _uses_sliding_window(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return True
    if any("sliding" in str(t) for t in (getattr(cfg, "layer_types", None) or [])):
        return True
    return bool(getattr(cfg, "use_sliding_window", False))


def response_token_logprobs(model: nn.Module, batch: QueryResponseBatch, *, num_queries: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log pi(response_t | query, response_<t) of ``[left-padded query | right-padded
    response]`` rows, 0 on padding.

    Shapes: batch input_ids (R, P + T), response_mask (R, T); returns (R, T) float32.
    ``num_queries`` = Q turns on the shared prompt: rows ``0..Q-1`` hold Q distinct queries and row r
    has the query of row ``r % Q`` (the ``collate_pairs`` layout, Q = B, R = 2B). The queries then
    run once and the R responses continue from their key/value cache: the same numbers as the full
    rows up to float rounding. Models without a plain LM head (see ``split_lm_head``) take
    ``modeling.response_logits`` over full rows; sliding-window models never share the prompt.
    Raises ValueError when R is not a multiple of ``num_queries``.
    """
    parts = split_lm_head(model)
    mask = batch.response_mask
    if parts is None:
        logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.query_width)
        return token_logprobs(logits, batch.responses, temperature) * mask
    backbone, head = parts
    hidden = _response_hidden(backbone, batch, num_queries if num_queries and not _uses_sliding_window(model) else None)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    real = chunked_target_logprobs(hidden[mask], head.weight, head.bias, batch.responses[mask], temperature=temperature)
    return out.masked_scatter(mask, real)


def _response_hidden(backbone: nn.Module, batch: QueryResponseBatch, num_queries: int | None) -> torch.Tensor:
    """(R, T, H) final hidden states at the positions that predict each response token."""
    ids, attn, p = batch.input_ids, batch.attention_mask, batch.query_width
    rows, t = ids.shape[0], ids.shape[1] - p
    pos = position_ids_from_mask(attn)
    if num_queries is None:
        h = backbone(input_ids=ids, attention_mask=attn.long(), position_ids=pos, use_cache=False).last_hidden_state
        return h[:, p - 1 : p - 1 + t]
    if rows % num_queries:
        raise ValueError(f"{rows} response rows do not split into groups of {num_queries} queries")
    from transformers import DynamicCache

    q = num_queries
    out = backbone(input_ids=ids[:q, :p], attention_mask=attn[:q, :p].long(), position_ids=pos[:q, :p], past_key_values=DynamicCache(), use_cache=True)
    last = out.last_hidden_state[:, -1:].repeat(rows // q, 1, 1)  # predicts response token 0 (queries are left-padded)
    if t == 1:
        return last
    cache = out.past_key_values
    cache.batch_select_indices(torch.arange(q, device=ids.device).repeat(rows // q))
    h = backbone(input_ids=ids[:, p:-1], attention_mask=attn[:, :-1].long(), position_ids=pos[:, p:-1], past_key_values=cache, use_cache=True).last_hidden_state
    return torch.cat([last, h], 1)
