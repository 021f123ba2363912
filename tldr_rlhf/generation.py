"""Batched generation with left padding, stopping at EOS; responses truncated after the first EOS.

Shapes: B batch, P query tokens (left-padded), T new tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

from .data.batching import collate_queries
from .distributed import is_sharded
from .ops import position_ids_from_mask, truncate_after_eos
from .lm_head import uses_sliding_window, expand_cache
from .modeling import kv_cache_kwargs


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
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Sample (or greedily decode) one response per query; returns token lists that end at the first
    EOS inclusive (or are ``max_new_tokens`` long without EOS). ``on_batch(k)`` is called after each
    batch of k queries (a progress meter's ``update``: ``progress.progress``).

    Sampling is pure temperature sampling (top_k 0, top_p 1.0), as in N+. ``min_new_tokens`` > 0
    is refused: with EOS set it masks EOS out entirely for those steps, the pitfall the seeds hit
    (N+ detail 19), and the EOS trick needs free EOS. Raises ValueError for it.
    """
    if min_new_tokens:
        raise ValueError("min_new_tokens > 0 suppresses EOS (N+ detail 19); sample freely and truncate after EOS instead")
    # an FSDP-sharded model gathers its weights at every forward: every process keeps stepping until
    # all are done (transformers' synced_gpus), else one that stopped early would leave the others waiting
    synced = is_sharded(model)
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
            synced_gpus=synced,
            **kwargs,
        )
        responses = seq[:, ids.shape[1]:]
        truncated, rmask = truncate_after_eos(responses, eos_token_id, pad_token_id)
        for row, m in zip(truncated.tolist(), rmask.tolist()):
            out.append([t for t, keep in zip(row, m) if keep])
        if on_batch is not None:
            on_batch(len(truncated))
    model.train(was_training)
    return out


@torch.no_grad()
def generate_groups(
    model,
    queries: list[list[int]],
    group_size: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int = 63,
    temperature: float = 0.7,
    batch_size: int = 16,
    shared_prompt: bool = True,
) -> tuple[list[list[int]], list[list[float]] | None]:
    """Sample G = ``group_size`` responses for each of the Q distinct ``queries``, each query's
    prompt computed once.

    Returns (responses, logprobs): R = Q x G token lists, group-contiguous (row r answers query
    ``r // G``: ``[q0] * G + [q1] * G + ...``), each ending at its first EOS inclusive (or
    ``max_new_tokens`` long without it), as ``generate`` gives for the repeated queries; and each
    sampled token's log-prob ``log softmax(logits / temperature)[token]`` (nats, float32) under the
    logits it was drawn from, or None when not sharing.

    Sharing: about ``batch_size`` rows (``batch_size // G`` prompts, at least one) at a time, the
    left-padded queries are prefilled once (Q rows of P tokens instead of Q x G), their key/value
    cache expanded to the G continuations (``lm_head.expand_cache``: a view for a single prompt),
    then tokens are drawn one step at a time for all rows: pure temperature sampling,
    ``multinomial(softmax(logits_t / temperature))``, the sampler of ``generate`` with top_k 0 and
    top_p 1 (N+ details 19, 21); a row that has sampled EOS gets ``pad_token_id`` from then on and
    the loop stops when every row has EOS or after ``max_new_tokens``. Position ids continue from
    each query's own length (``cumsum(mask) - 1``, N+ detail 9). With ``shared_prompt`` False, or a
    model that cannot share its cache (sliding-window attention), this is ``generate`` over the
    repeated queries, as for an FSDP-sharded model (whose processes must step together: ``generate``'s
    ``synced_gpus``). Raises ValueError for ``group_size`` < 1 or ``temperature`` <= 0.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not shared_prompt or uses_sliding_window(model) or is_sharded(model):
        repeated = [q for q in queries for _ in range(group_size)]
        return generate(model, repeated, eos_token_id=eos_token_id, pad_token_id=pad_token_id, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size), None
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    logps: list[list[float]] = []
    per = max(1, batch_size // group_size)
    for i in range(0, len(queries), per):
        toks, lps, lengths = _sample_group_chunk(model, queries[i : i + per], group_size, eos_token_id, pad_token_id, max_new_tokens, temperature)
        for row, lp, n in zip(toks.tolist(), lps.tolist(), lengths.tolist()):
            out.append(row[:n])
            logps.append(lp[:n])
    model.train(was_training)
    return out, logps


def _sample_group_chunk(model, queries, g, eos, pad, max_new_tokens, temperature):
    """One chunk of ``generate_groups``: (tokens (R, T) int64 padded after EOS, log-probs (R, T)
    float32, lengths (R,) up to and including the first EOS), R = len(queries) x g."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = collate_queries(queries, pad)
    ids, mask = ids.to(device), mask.to(device)
    pos = position_ids_from_mask(mask)
    index = torch.arange(len(queries), device=device).repeat_interleave(g)  # row r -> query r // g
    cache = DynamicCache()
    kv = kv_cache_kwargs(model, cache)
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=pos, use_cache=True, logits_to_keep=1, **kv).logits[:, -1].float()
    logits = logits.index_select(0, index)
    expand_cache(cache, index)
    attn = mask.long().index_select(0, index)
    next_pos = pos[:, -1].index_select(0, index) + 1
    rows = index.numel()
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    tokens, logps = [], []
    for step in range(max_new_tokens):
        scaled = logits / temperature
        tok = torch.multinomial(torch.softmax(scaled, -1), 1).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        tokens.append(tok)
        logps.append(torch.log_softmax(scaled, -1).gather(1, tok[:, None]).squeeze(1))
        is_eos = (tok == eos) & ~done
        lengths = torch.where(is_eos, torch.full_like(lengths, step + 1), lengths)
        done |= is_eos
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None], use_cache=True, **kv).logits[:, -1].float()
        next_pos = next_pos + 1
    return torch.stack(tokens, 1).cpu(), torch.stack(logps, 1).cpu(), lengths.cpu()


def decode_response(tokenizer, ids: list[int]) -> str:
    """Response text without the EOS token and the leading space the format adds."""
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False).strip()
