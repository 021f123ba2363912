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
    ``rows`` / ``cols`` (N,) where each goes in the padded (B, T) response layout of ``shape``."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    predict_at: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    shape: tuple[int, int]


def pack_query_response(batch: QueryResponseBatch) -> PackedBatch:
    """Pack a ``[left-padded query | right-padded response]`` batch (input_ids, attention_mask
    (B, P + T)): each row's real tokens (contiguous: the query's tail, then the response's head), in
    row order. Raises ValueError for a row whose real tokens are not contiguous or that has no query
    token (the first response token needs a position before it)."""
    mask = batch.attention_mask.bool()
    b, width = mask.shape
    p = batch.query_width
    lengths = mask.sum(1)
    starts = mask.long().argmax(1)  # first real column of each row
    contiguous = (mask.long().cumsum(1) == (torch.arange(width, device=mask.device) - starts[:, None] + 1).clamp(min=0)) | ~mask
    if not bool(contiguous.all()):
        raise ValueError("pack_query_response: a row's real tokens are not contiguous (not a left-padded query + right-padded response batch)")
    q_len = mask[:, :p].sum(1)
    if bool((q_len == 0).any()):
        raise ValueError("pack_query_response: a row has no query token")
    input_ids = batch.input_ids[mask][None]  # row-major: row 0's real tokens, then row 1's, ...
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])  # (B,) packed start of each row
    position_ids = (torch.arange(int(lengths.sum()), device=mask.device) - offsets.repeat_interleave(lengths))[None]
    rows, cols = batch.response_mask.bool().nonzero(as_tuple=True)  # real response tokens, row-major
    predict_at = offsets[rows] + q_len[rows] + cols - 1  # the position before response token (row, col)
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, predict_at=predict_at, targets=batch.responses[rows, cols],
        rows=rows, cols=cols, shape=(b, width - p),
    )


SEGMENT_ATTENTION = "tldr_rlhf_segment_sdpa"
"""The attention implementation a packed forward runs under (registered with transformers on first use)."""


def segment_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, *, scaling: float | None = None, dropout: float = 0.0, position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed row, one ``scaled_dot_product_attention(is_causal=True)`` per
    row: the variable-length attention CPU SDPA lacks. A block-diagonal mask over the whole packed
    row would make SDPA compute all S x S scores (measured: a packed SFT step 10% slower than the
    padded one); per row it computes each row's causal triangle only.

    Shapes: query (1, H, S, D), key / value (1, H_kv, S, D), position_ids (1, S) restarting at 0 at
    each row's first token. Returns ((1, S, H, D), None) as transformers' attention functions do."""
    if position_ids is None or query.shape[0] != 1:
        raise ValueError("segment_sdpa: needs one packed row (batch 1) and its position_ids")
    s = query.shape[2]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [s]
    gqa = query.shape[1] != key.shape[1]
    outs = [
        torch.nn.functional.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=gqa)
        for a, b in zip(starts[:-1], starts[1:])
    ]
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
