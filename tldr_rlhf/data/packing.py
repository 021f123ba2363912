"""Padding-free (packed) batches: the rows of a micro-batch concatenated into one row, no padding.

A padded ``[left-padded query | right-padded response]`` micro-batch (``batching.QueryResponseBatch``)
runs every row at the width of the longest query plus the longest response; TL;DR queries average
about 347 of their 512 tokens, so a quarter or more of the work can be padding. Packed, the B rows'
real tokens are laid end to end in one (1, S) row, S = the real token count, with ``position_ids``
restarting at 0 for each row. Attention stays inside each row: transformers (5.x, ``masking_utils``)
reads the restarts of ``position_ids`` when no attention mask is given and builds the block-diagonal
causal mask (SDPA / eager), or the FlashAttention varlen boundaries on CUDA.

Only the positions that predict a response token go through the LM head (``logits_to_keep``), as in
the padded ``modeling.response_logits``; the log-probs are put back at their (row, column) of the
padded (B, T) response layout, so every loss written for padded batches applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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


def packed_response_logprobs(model: nn.Module, batch: QueryResponseBatch, *, temperature: float = 1.0) -> torch.Tensor:
    """log pi(response_t | query, response_<t) of every real response token, computed on the packed
    batch: (B, T) float32 in the padded response layout, 0 at padding (mask with
    ``batch.response_mask``). Equal to ``ops.token_logprobs(modeling.response_logits(...))`` at the
    real tokens up to float rounding (different kernels, same math)."""
    from ..ops import token_logprobs

    packed = pack_query_response(batch)
    logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, logits_to_keep=packed.predict_at, use_cache=False).logits[0]
    lp = token_logprobs(logits, packed.targets, temperature)  # (N,)
    out = lp.new_zeros(packed.shape)
    return out.index_put((packed.rows, packed.cols), lp)
