"""Batched generation with left padding, stopping at EOS; responses truncated after the first EOS.

Shapes: B batch, P query tokens (left-padded), T new tokens.
"""

from __future__ import annotations

import torch

from .data.batching import collate_queries
from .ops import truncate_after_eos


@torch.no_grad()
def generate(
    model,
    queries: list[list[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int = 63,
    temperature: float = 0.7,
    greedy: bool = False,
    batch_size: int = 16,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Sample (or greedily decode) one response per query; returns token lists that end at the first
    EOS inclusive (or are ``max_new_tokens`` long without EOS).

    Sampling is pure temperature sampling (top_k 0, top_p 1.0), as in N+. ``min_new_tokens`` > 0
    is refused: with EOS set it masks EOS out entirely for those steps, the pitfall the seeds hit
    (N+ detail 19), and the EOS trick needs free EOS. Raises ValueError for it.
    """
    if min_new_tokens:
        raise ValueError("min_new_tokens > 0 suppresses EOS (N+ detail 19); sample freely and truncate after EOS instead")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for i in range(0, len(queries), batch_size):
        ids, mask = collate_queries(queries[i : i + batch_size], pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        seq = model.generate(
            input_ids=ids,
            attention_mask=mask.long(),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        responses = seq[:, ids.shape[1]:]
        truncated, rmask = truncate_after_eos(responses, eos_token_id, pad_token_id)
        for row, m in zip(truncated.tolist(), rmask.tolist()):
            out.append([t for t, keep in zip(row, m) if keep])
    model.train(was_training)
    return out


def decode_response(tokenizer, ids: list[int]) -> str:
    """Response text without the EOS token and the leading space the format adds."""
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False).strip()
