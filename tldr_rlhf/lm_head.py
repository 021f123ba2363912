"""Response log-probs without materialising (rows, T, V) logits, and with each query run once.

Two speed and memory devices for every stage that scores responses (DPO here; RM, PPO and GRPO can
use them too):

* ``chunked_target_logprobs``: log pi(target) from the final hidden states and the LM head weight,
  computed a block of the vocabulary at a time and recomputed in backward, so the peak is one block
  of logits (4 MiB on CPU, 256 MiB on CUDA) instead of all of them (16 x 133 x 151,936 floats = 1.3 GB for a Qwen DPO micro-batch),
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
from .data.packing import can_pack, pack_query_response, packed_hidden_states, segment_attention
from .distributed import is_sharded
from .modeling import AdaptersDisabled, checkpointing_active, kv_cache_kwargs, response_logits
from .ops import position_ids_from_mask, token_logprobs

# Logits block budget: on CPU a block that stays in cache is fastest (measured: 4 MiB blocks 2x faster
# than 64 MiB ones for 151 rows x 151,665 columns); on GPUs bigger blocks mean fewer kernel launches.
_CHUNK_BYTES = {"cpu": 4 * 2**20, "cuda": 256 * 2**20}
# Config attributes that change logits after the LM head (softcapping, scaling); models with any of
# them set take the plain path (full forward, logits for response positions only).
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class _ChunkedTargetLogprobs(torch.autograd.Function):
    """log softmax(hidden @ W^T + b)[target] / temperature, a block of the vocabulary at a time;
    backward recomputes each block's logits instead of storing them.

    Blocks run over the vocabulary, not over rows: the LM head weight is then streamed once per
    pass whatever the number of rows (on CPU the head is bound by reading W, 155 MB for Qwen's
    151,936 x 256), and the per-block log-sum-exps combine exactly at the end.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, targets, temperature, block):
        n, v = hidden.shape[0], weight.shape[0]
        buf = _buffer(hidden, block)
        lse_parts = []
        target_logit = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, v, block):
            e = min(v, s + block)
            logits = _block_logits(hidden, weight, bias, s, e, temperature, buf)
            lse_parts.append(torch.logsumexp(logits, 1))
            inside = (targets >= s) & (targets < e)
            picked = logits.gather(1, (targets - s).clamp(0, e - s - 1)[:, None]).squeeze(1)
            target_logit = torch.where(inside, picked, target_logit)
        lse = torch.logsumexp(torch.stack(lse_parts, 1), 1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.block = temperature, block
        return target_logit - lse

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # recompute the blocks under the forward's autocast state
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        t, block = ctx.temperature, ctx.block
        n, v = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        g = grad_out.float()
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        h32 = hidden.float() if need_w else None
        buf = _buffer(hidden, block)
        rows = torch.arange(n, device=hidden.device)
        for s in range(0, v, block):
            e = min(v, s + block)
            # d log p_target / d logit_v = (onehot_target - softmax)_v / temperature
            d = _block_logits(hidden, weight, bias, s, e, t, buf).sub_(lse[:, None]).exp_().mul_(-g[:, None])
            inside = (targets >= s) & (targets < e)
            d.index_put_((rows[inside], targets[inside] - s), g[inside], accumulate=True)
            if t != 1.0:
                d.div_(t)
            if need_h:
                w = weight[s:e]
                grad_h.addmm_(d, w if w.dtype == torch.float32 else w.float())
            if need_w:
                if grad_w.dtype == torch.float32:
                    torch.mm(d.t(), h32, out=grad_w[s:e])
                else:
                    grad_w[s:e] = (d.t() @ h32).to(grad_w.dtype)
            if need_b:
                grad_b[s:e] = d.sum(0).to(grad_b.dtype)
        return (grad_h.to(hidden.dtype) if need_h else None), grad_w, grad_b, None, None, None


def _buffer(hidden: torch.Tensor, block: int) -> torch.Tensor | None:
    """One reusable float32 logits buffer for the blocks (fresh big allocations page-fault on every
    block); None under autocast, where the block matmul must stay an autocast op."""
    if hidden.dtype != torch.float32 or torch.is_autocast_enabled(hidden.device.type):
        return None
    return torch.empty(hidden.shape[0] * block, dtype=torch.float32, device=hidden.device)


def _block_logits(h, weight, bias, s: int, e: int, temperature: float, buf) -> torch.Tensor:
    """(N, e - s) float32 logits of vocabulary rows [s, e)."""
    w = weight[s:e]
    b = bias[s:e] if bias is not None else None
    if buf is not None and w.dtype == torch.float32:
        out = buf[: h.shape[0] * (e - s)].view(h.shape[0], e - s)
        if b is None:
            torch.mm(h, w.t(), out=out)
        else:
            torch.addmm(b, h, w.t(), out=out)
    else:
        out = (h @ w.to(h.dtype).t() if b is None else torch.addmm(b.to(h.dtype), h, w.to(h.dtype).t())).float()
    return out.div_(temperature) if temperature != 1.0 else out


def chunked_target_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *, temperature: float = 1.0, vocab_block: int | None = None
) -> torch.Tensor:
    """Log-probability of each target token under the LM head, without keeping (N, V) logits.

    Shapes: hidden (N, H) final hidden states (after the model's last norm), weight (V, H), bias (V,)
    or None, targets (N,) int64. Returns (N,) float32 ``log softmax((hidden W^T + b) / temperature)``
    at the targets. Memory: one (N, vocab_block) float32 block of logits at a time (default: 4 MiB
    worth on CPU, 256 MiB on CUDA, at least 1,024 columns); backward recomputes the blocks. Gradients flow to hidden,
    weight and bias.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * weight.sum()
    if vocab_block is None:
        budget = _CHUNK_BYTES.get(hidden.device.type, _CHUNK_BYTES["cuda"])
        vocab_block = min(weight.shape[0], max(1024, budget // (4 * hidden.shape[0])))
    return _ChunkedTargetLogprobs.apply(hidden, weight, bias, targets, float(temperature), int(vocab_block))


def split_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, LM head) of a causal LM (peft-wrapped or not) whose logits are exactly
    ``head(backbone(...).last_hidden_state)``; None when that does not hold or is not known to hold
    (logit softcapping or scaling, a LoRA-wrapped head, no ``get_decoder``, an FSDP-sharded model:
    its weights are gathered only inside its own forward)."""
    if is_sharded(model) or isinstance(model, AdaptersDisabled):  # its backbone and head run with the adapters on
        return None
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


def uses_sliding_window(model: nn.Module) -> bool:
    """True when ``model``'s (text) config has sliding-window attention layers (a ``layer_types``
    entry naming one, or ``use_sliding_window``), or when it has no config at all: the shared-prompt
    paths (one query, several responses continuing from its key/value cache) then run full rows."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return True
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any("sliding" in str(t) for t in (getattr(cfg, "layer_types", None) or [])):
        return True
    return bool(getattr(cfg, "use_sliding_window", False))


def response_token_logprobs(model: nn.Module, batch: QueryResponseBatch, *, num_queries: int | None = None, temperature: float = 1.0, padding_free: bool = False) -> torch.Tensor:
    """Per-token log pi(response_t | query, response_<t) of ``[left-padded query | right-padded
    response]`` rows, 0 on padding.

    Shapes: batch input_ids (R, P + T), response_mask (R, T); returns (R, T) float32.
    ``num_queries`` = Q turns on the shared prompt: rows ``0..Q-1`` hold Q distinct queries and row r
    has the query of row ``r % Q`` (the ``collate_pairs`` layout, Q = B, R = 2B). The queries then
    run once and the R responses continue from their key/value cache: the same numbers as the full
    rows up to float rounding. Models without a plain LM head (see ``split_lm_head``) take
    ``modeling.response_logits`` over full rows; sliding-window models never share the prompt, nor
    does a training forward under activation checkpointing (``modeling.checkpointing_active``:
    transformers ignores key/value caches there), which runs full rows.
    A LoRA reference (``modeling.AdaptersDisabled``) runs as its policy inside
    ``policy.disable_adapter()``: the base weights, on the shared prompt too.
    ``padding_free``: the rows packed into one (``data.packing``; with ``num_queries`` each query
    once, its responses as branches), same numbers without the padding's work, where the model can
    (``packing.can_pack``, no activation checkpointing; else the paths above).
    Raises ValueError when R is not a multiple of ``num_queries``.
    """
    if isinstance(model, AdaptersDisabled):
        with model.policy.disable_adapter():
            return response_token_logprobs(model.policy, batch, num_queries=num_queries, temperature=temperature, padding_free=padding_free)
    parts = split_lm_head(model)
    mask = batch.response_mask
    if padding_free and can_pack(model) and not checkpointing_active(model):
        return _packed_token_logprobs(model, parts, batch, num_queries, temperature)
    if parts is None:
        logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.query_width)
        return token_logprobs(logits, batch.responses, temperature) * mask
    backbone, head = parts
    share = num_queries and not uses_sliding_window(model) and not checkpointing_active(backbone)  # checkpointing drops the cache
    hidden = _response_hidden(backbone, batch, num_queries if share else None)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    real = chunked_target_logprobs(hidden[mask], head.weight, head.bias, batch.responses[mask], temperature=temperature)
    return out.masked_scatter(mask, real)


def _packed_token_logprobs(model: nn.Module, parts, batch: QueryResponseBatch, num_queries: int | None, temperature: float) -> torch.Tensor:
    """``response_token_logprobs`` on the packed batch: (R, T) float32, 0 on padding. With a plain LM
    head (``parts`` = (backbone, head)) the head runs in vocabulary blocks on the N predicting
    positions; otherwise the whole model with ``logits_to_keep`` = those positions."""
    packed = pack_query_response(batch, num_queries=num_queries)
    if parts is not None:
        backbone, head = parts
        hidden = packed_hidden_states(backbone, packed)[packed.predict_at]
        real = chunked_target_logprobs(hidden, head.weight, head.bias, packed.targets, temperature=temperature)
    else:
        with segment_attention(model):
            logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, logits_to_keep=packed.predict_at, use_cache=False).logits[0]
        real = token_logprobs(logits, packed.targets, temperature)
    return real.new_zeros(packed.shape).index_put((packed.rows, packed.cols), real)


def _response_hidden(backbone: nn.Module, batch: QueryResponseBatch, num_queries: int | None) -> torch.Tensor:
    """(R, T, H) final hidden states at the positions that predict each response token."""
    ids, attn, p = batch.input_ids, batch.attention_mask, batch.query_width
    rows, t = ids.shape[0], ids.shape[1] - p
    if num_queries is None:
        pos = position_ids_from_mask(attn)
        h = backbone(input_ids=ids, attention_mask=attn.long(), position_ids=pos, use_cache=False).last_hidden_state
        return h[:, p - 1 : p - 1 + t]
    if rows % num_queries:
        raise ValueError(f"{rows} response rows do not split into groups of {num_queries} queries")
    q = num_queries
    return _grouped_response_hidden(backbone, batch, torch.arange(q, device=ids.device), torch.arange(q, device=ids.device).repeat(rows // q))


def query_groups(batch: QueryResponseBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct queries of a ``[left-padded query | right-padded response]`` batch.

    Two rows share a query when their first P columns agree in ids and in mask (the mask too: with
    Qwen pad = EOS). Returns (first (Q,) int64: the first row holding each distinct query, in row
    order; index (R,) int64: the distinct query of each row, ``first[index[r]]`` holds row r's
    query). Any row order works: group-contiguous GRPO rows (r // G), DPO pairs (r % Q), a shuffled
    micro-batch holding part of a group."""
    p, rows = batch.query_width, batch.input_ids.shape[0]
    key = torch.cat([batch.input_ids[:, :p], batch.attention_mask[:, :p].long()], 1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    r = torch.arange(rows, device=key.device)
    first_of = torch.full((int(inverse.max()) + 1 if rows else 0,), rows, dtype=torch.long, device=key.device).scatter_reduce(0, inverse, r, "amin")
    order = torch.argsort(first_of)  # distinct queries numbered in the order they first appear
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=key.device)
    return first_of[order], rank[inverse]


def expand_cache(cache, index: torch.Tensor) -> None:
    """Expand a key/value cache of Q rows to R = len(index) rows, row r a copy of cached row
    ``index[r]``, in place. With one cached row (Q = 1: a micro-batch inside one group) every layer
    becomes a stride-0 ``expand`` view: no memory; otherwise ``index_select`` (one copy per layer,
    which the next step's concatenation with the new keys would make anyway). Caches without plain
    ``layers[i].keys / values`` tensors use ``cache.batch_select_indices``."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(getattr(l, "keys", None), torch.Tensor) and isinstance(getattr(l, "values", None), torch.Tensor) for l in layers):
        cache.batch_select_indices(index)
        return
    rows = index.numel()
    for layer in layers:
        if layer.keys.shape[0] == 1:
            layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
            layer.values = layer.values.expand(rows, *layer.values.shape[1:])
        else:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)


def _grouped_response_hidden(backbone: nn.Module, batch: QueryResponseBatch, first: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(R, T, H) final hidden states predicting each response token, with the Q queries of rows
    ``first`` run once and row r's response continuing from the cache of query ``index[r]``."""
    from transformers import DynamicCache

    ids, attn, p = batch.input_ids, batch.attention_mask, batch.query_width
    t = ids.shape[1] - p
    pos = position_ids_from_mask(attn)
    cache = DynamicCache()
    out = backbone(input_ids=ids[first, :p], attention_mask=attn[first, :p].long(), position_ids=pos[first, :p], use_cache=True, **kv_cache_kwargs(backbone, cache))
    last = out.last_hidden_state[:, -1:].index_select(0, index)  # predicts response token 0 (queries are left-padded)
    if t == 1:
        return last
    expand_cache(cache, index)
    h = backbone(input_ids=ids[:, p:-1], attention_mask=attn[:, :-1].long(), position_ids=pos[:, p:-1], use_cache=True, **kv_cache_kwargs(backbone, cache)).last_hidden_state
    return torch.cat([last, h], 1)


def can_share_prompt(model: nn.Module) -> bool:
    """True when ``grouped_response_logits`` runs each query once for ``model``: a plain LM head
    (``split_lm_head``) and no sliding-window attention. A DDP-wrapped model is False (its forward
    must run through the wrapper for the gradient all-reduce)."""
    return split_lm_head(model) is not None and not uses_sliding_window(model)


def grouped_response_logits(model: nn.Module, batch: QueryResponseBatch, *, shared_prompt: bool = True) -> torch.Tensor:
    """Logits (R, T, V) predicting the response tokens of ``[left-padded query | right-padded
    response]`` rows, with each distinct query (``query_groups``) run once.

    ``out[:, t]`` is the distribution of token ``input_ids[:, P + t]``: the same numbers as
    ``modeling.response_logits`` (the full rows) up to float rounding. The Q distinct queries run
    through the backbone once on a key/value cache, every response continues on the cache of its
    query (``expand_cache``), and the LM head sees the T response positions only. Gradients reach
    the shared query positions from every response of its group (the sum over the group, as the
    full rows give). Rows may come in any order and a micro-batch may hold part of a group.
    Falls back to ``modeling.response_logits`` with ``shared_prompt`` False, when the model cannot
    share (``can_share_prompt``), or in a training forward under activation checkpointing
    (``modeling.checkpointing_active``). A LoRA reference (``modeling.AdaptersDisabled``) runs as
    its policy inside ``policy.disable_adapter()``. Shapes: batch input_ids (R, P + T); V vocabulary.
    """
    if isinstance(model, AdaptersDisabled):  # explicit: the backbone and head below would run with the adapters on
        with model.policy.disable_adapter():
            return grouped_response_logits(model.policy, batch, shared_prompt=shared_prompt)
    if not shared_prompt or not can_share_prompt(model):
        return response_logits(model, batch.input_ids, batch.attention_mask, batch.query_width)
    backbone, head = split_lm_head(model)
    if checkpointing_active(backbone):  # transformers drops the key/value cache under activation checkpointing
        return response_logits(model, batch.input_ids, batch.attention_mask, batch.query_width)
    first, index = query_groups(batch)
    return head(_grouped_response_hidden(backbone, batch, first, index))
