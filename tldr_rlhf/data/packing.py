"""Padding-free (packed) batches: the rows of a micro-batch concatenated into one row, no padding.

A padded ``[left-padded query | right-padded response]`` micro-batch (``batching.QueryResponseBatch``)
runs every row at the width of the longest query plus the longest response; TL;DR queries average
about 347 of their 512 tokens, so a quarter or more of the work can be padding. Packed, the B rows'
real tokens are laid end to end in one (1, S) row, S = the real token count, with ``position_ids``
restarting at 0 for each row. Attention stays inside each row: a model on SDPA runs ``segment_sdpa``
(one causal SDPA call per row, registered with transformers' attention interface) for the packed
forward; FlashAttention-2/3 on CUDA read the row boundaries from the ``position_ids`` themselves
(varlen); eager attention gets transformers' block-diagonal causal mask built from the same restarts.

Only the positions that predict a response token go through the LM head (``logits_to_keep``), as in
the padded ``modeling.response_logits``; the log-probs are put back at their (row, column) of the
padded (B, T) response layout, so every loss written for padded batches applies unchanged.

Preference pairs (reward model, DPO) share the prompt: the padded path runs each query once and both
responses on its key/value cache. Packing keeps that: ``pack_query_response(num_queries=B)`` lays each
query once, its chosen response continuing it, and its rejected response as a branch whose positions
restart at the query length, which ``segment_sdpa`` reads as "attend to the row's first q tokens and
to yourself" (FlashAttention's varlen and eager masks cannot say this: ``can_pack`` asks for SDPA).
Without the shared prompt the 2B full rows are packed as above. Rewards are read at ``last_at`` (each
response's EOS, N+ detail 12).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops import token_logprobs
from .batching import QueryResponseBatch


@dataclass
class PackedBatch:
    """A padded batch packed into one row. ``input_ids`` / ``position_ids`` (1, S); ``predict_at``
    (N,) the packed positions whose logits predict the N real response tokens ``targets`` (N,);
    ``rows`` / ``cols`` (N,) where each goes in the padded (B, T) response layout of ``shape``;
    ``last_at`` (B,) the packed position of each row's last real token (its response's EOS: where a
    reward model reads the reward, N+ detail 12)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    predict_at: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    shape: tuple[int, int]
    last_at: torch.Tensor


def pack_query_response(batch: QueryResponseBatch, *, num_queries: int | None = None) -> PackedBatch:
    """Pack a ``[left-padded query | right-padded response]`` batch (input_ids, attention_mask
    (B, P + T)) into one row of its real tokens.

    Without ``num_queries``: each row's real tokens (contiguous: the query's tail, then the
    response's head), in row order, positions restarting at 0 per row.

    ``num_queries`` = Q, the shared prompt (row r continues the query of row r % Q: ``collate_pairs``'
    chosen / rejected halves, Q = B / 2): each distinct query once, followed by its rows' responses,
    in query order. The first response continues the query (positions go on); each further one is a
    branch whose positions restart at the query length q, so it attends to the query's q tokens and
    to itself only (``segment_sdpa`` reads this from the positions). A branch's first token is
    predicted by the query's last position, as in the padded shared-prompt pass. Example, queries
    [a b], responses x y (row 0) and z (row 1), Q = 1: ids [a b x y z], positions [0 1 2 3 2].

    Raises ValueError for a row whose real tokens are not contiguous, that has no query token (the
    first response token needs a position before it), with ``num_queries``: B not a multiple of Q
    or a response without tokens (a branch needs one)."""
    mask = batch.attention_mask.bool()
    b, width = mask.shape
    p = batch.query_width
    starts = mask.long().argmax(1)  # first real column of each row
    contiguous = (mask.long().cumsum(1) == (torch.arange(width, device=mask.device) - starts[:, None] + 1).clamp(min=0)) | ~mask
    if not bool(contiguous.all()):
        raise ValueError("pack_query_response: a row's real tokens are not contiguous (not a left-padded query + right-padded response batch)")
    q_len, r_len = mask[:, :p].sum(1), mask[:, p:].sum(1)
    if bool((q_len == 0).any()):
        raise ValueError("pack_query_response: a row has no query token")
    q = b if num_queries is None else num_queries
    if q < 1 or b % q:
        raise ValueError(f"pack_query_response: {b} rows do not continue {num_queries} queries")
    if q < b and bool((r_len == 0).any()):
        raise ValueError("pack_query_response: a shared-prompt row has no response token")
    # Packed order: query 0, its rows' responses (rows 0, Q, 2Q, ...), query 1, ... (Q = B: row order).
    order = torch.arange(b, device=mask.device).view(b // q, q).t()  # (Q, B / Q): the rows of each query
    seg_len = torch.cat([q_len[:q, None], r_len[order]], 1).flatten()  # query, responses, next query, ...
    seg_start = torch.cumsum(seg_len, 0) - seg_len
    seg_start = seg_start.view(q, -1)
    q_start, r_start = seg_start[:, 0], torch.empty_like(r_len)
    r_start[order.flatten()] = seg_start[:, 1:].flatten()
    src_rows = torch.cat([torch.arange(q, device=mask.device)[:, None], order], 1).flatten()  # padded row of each segment
    src_col0 = torch.cat([(p - q_len[:q])[:, None], torch.full_like(order, p)], 1).flatten()
    pos0 = torch.cat([torch.zeros_like(q_len[:q])[:, None], q_len[order]], 1).flatten()  # a segment's first position
    seg_of = torch.repeat_interleave(torch.arange(seg_len.numel(), device=mask.device), seg_len)  # (S,)
    within = torch.arange(int(seg_len.sum()), device=mask.device) - seg_start.flatten()[seg_of]
    input_ids = batch.input_ids[src_rows[seg_of], src_col0[seg_of] + within][None]
    position_ids = (pos0[seg_of] + within)[None]
    rows, cols = batch.response_mask.bool().nonzero(as_tuple=True)  # real response tokens, row-major
    query_last = q_start + q_len[:q] - 1  # predicts each query's responses' first token
    predict_at = torch.where(cols == 0, query_last[rows % q], r_start[rows] + cols - 1)
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, predict_at=predict_at, targets=batch.responses[rows, cols],
        rows=rows, cols=cols, shape=(b, width - p), last_at=r_start + r_len - 1,
    )


SEGMENT_ATTENTION = "tldr_rlhf_segment_sdpa"
"""The attention implementation a packed forward runs under (registered with transformers on first use)."""


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(start, end, prefix start, prefix length) of each packed segment: a segment starts where the
    position is not the previous one + 1. One starting at position 0 is a new row (no prefix); one
    starting at k > 0 is a shared-prompt branch that also sees its row's first k tokens. Raises
    ValueError for a branch longer than the row before it."""
    pos = position_ids[0].tolist()
    cuts = [t for t in range(1, len(pos)) if pos[t] != pos[t - 1] + 1] + [len(pos)]
    out, a, row = [], 0, 0
    for b in cuts:
        if pos[a] == 0:
            row = a
        elif pos[a] > a - row:
            raise ValueError(f"segment_sdpa: a segment starts at position {pos[a]} after {a - row} tokens of its row")
        out.append((a, b, row, pos[a]))
        a = b
    return out


def segment_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, *, scaling: float | None = None, dropout: float = 0.0, position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed row, one ``scaled_dot_product_attention(is_causal=True)`` per
    row: the variable-length attention CPU SDPA lacks. A block-diagonal mask over the whole packed
    row would make SDPA compute all S x S scores (measured: a packed SFT step 10% slower than the
    padded one); per row it computes each row's causal triangle only.

    Shared-prompt branches (``pack_query_response(num_queries=...)``): a segment whose positions
    restart at k > 0 attends to its row's first k tokens (the query) and causally to itself, one SDPA
    with a (L, k + L) mask; the tokens between (the first response) stay invisible to it.

    Shapes: query (1, H, S, D), key / value (1, H_kv, S, D), position_ids (1, S) restarting at 0 at
    each row's first token. Returns ((1, S, H, D), None) as transformers' attention functions do."""
    if position_ids is None or query.shape[0] != 1:
        raise ValueError("segment_sdpa: needs one packed row (batch 1) and its position_ids")
    gqa = query.shape[1] != key.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    outs = []
    for a, b, row, k in _segments(position_ids):
        if k == 0:
            outs.append(sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=gqa))
            continue
        keys = torch.cat([key[:, :, row : row + k], key[:, :, a:b]], 2)
        values = torch.cat([value[:, :, row : row + k], value[:, :, a:b]], 2)
        visible = torch.ones(b - a, k + b - a, dtype=torch.bool, device=query.device).tril(k)  # the prefix, then causal
        outs.append(sdpa(query[:, :, a:b], keys, values, attn_mask=visible, scale=scaling, dropout_p=dropout, enable_gqa=gqa))
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


def _register_segment_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, lambda *args, **kwargs: None)  # no mask: rows come from position_ids


class segment_attention:
    """Context manager: every config of ``model`` that asks for SDPA runs ``segment_sdpa`` inside it
    (restored on exit). FlashAttention and others stay as they are: FlashAttention-2/3 already read
    the rows from the position ids (varlen)."""

    def __init__(self, model: nn.Module):
        self.configs = []
        seen = set()
        for m in model.modules():
            c = getattr(m, "config", None)
            if c is not None and id(c) not in seen and getattr(c, "_attn_implementation", None) == "sdpa":
                seen.add(id(c))
                self.configs.append(c)

    def __enter__(self):
        if self.configs:
            _register_segment_attention()
        for c in self.configs:
            c._attn_implementation = SEGMENT_ATTENTION
        return self

    def __exit__(self, *exc):
        for c in self.configs:
            c._attn_implementation = "sdpa"
        return False


def packed_response_logprobs(model: nn.Module, batch: QueryResponseBatch, *, temperature: float = 1.0) -> torch.Tensor:
    """log pi(response_t | query, response_<t) of every real response token, computed on the packed
    batch: (B, T) float32 in the padded response layout, 0 at padding (mask with
    ``batch.response_mask``). Equal to ``ops.token_logprobs(modeling.response_logits(...))`` at the
    real tokens up to float rounding (different kernels, same math)."""
    packed = pack_query_response(batch)
    with segment_attention(model):
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, logits_to_keep=packed.predict_at, use_cache=False).logits[0]
    lp = token_logprobs(logits, packed.targets, temperature)  # (N,)
    out = lp.new_zeros(packed.shape)
    return out.index_put((packed.rows, packed.cols), lp)


def can_pack(model: nn.Module) -> bool:
    """Whether a packed forward of ``model`` (``segment_attention``) attends exactly as its padded one:
    every attention config is on SDPA (``segment_sdpa`` then runs the rows and the shared-prompt
    branches, which FlashAttention's varlen and eager masks cannot express) and none uses a sliding
    window (``segment_sdpa`` sees the whole row). Callers also keep padded rows under activation
    checkpointing (its recomputation runs outside the packed attention)."""
    configs = [c for m in model.modules() if (c := getattr(m, "config", None)) is not None and hasattr(c, "_attn_implementation")]
    if not configs or any(c._attn_implementation != "sdpa" for c in configs):
        return False
    return not any(getattr(c, "use_sliding_window", False) or any("sliding" in str(t) for t in (getattr(c, "layer_types", None) or [])) for c in configs)


def packed_hidden_states(backbone: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Final hidden states (S, H) of a packed batch: ``backbone`` (a decoder without its head) run on
    the one packed row under ``segment_attention``."""
    with segment_attention(backbone):
        return backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).last_hidden_state[0]
