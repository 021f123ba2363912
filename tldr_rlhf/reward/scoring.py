"""Scoring passes of a scalar-head reward model, shared by reward-model training (held-out
accuracy, normalization), ``evaluate-rm`` and ``evaluate``: no gradients, eval mode (restored
after), rows in length order (less padding), and with several processes each scores a share and the
results are gathered (``scoring.sharded_scores``).

* ``pair_rewards``: the chosen and rejected rewards of a ``collate_preferences`` batch in one
  forward pass (with ``shared_prompt`` the queries run once and both responses continue from their
  key/value cache: the same scores as full rows); ``scoring.score_preference_pairs`` with it gives the
  (N, 2) rewards of preference examples (chosen, rejected);
* ``score_responses``: (N,) rewards of (query, response) items (the normalization references).

Shapes: B pairs of a batch, N examples.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from ..data.batching import QueryResponseBatch, collate_query_response
from ..data.packing import can_pack, pack_query_response, segment_attention
from ..data.tldr import SFTExample
from ..lm_head import uses_sliding_window
from ..modeling import checkpointing_active
from .reward_model import ScalarRewardModel
from ..scoring import sharded_scores

# (query, reference summary) pairs to score once for normalization: the SFT example format.
ScoredText = SFTExample


def pair_rewards(model: nn.Module, batch: QueryResponseBatch, *, shared_prompt: bool = True, padding_free: bool = False) -> torch.Tensor:
    """Rewards of a ``collate_pairs`` batch (2B rows) in one forward pass -> (2B,) float32:
    [0, B) chosen, [B, 2B) rejected. ``shared_prompt`` runs each query once (same scores).

    ``padding_free``: the batch packed into one row of its real tokens (``data.packing``): with
    ``shared_prompt`` each query once, then its chosen response, then its rejected one as a branch
    that attends to the query only; else the 2B full rows end to end. Each reward is read at its
    response's EOS (the packed ``last_at``: N+ detail 12); same scores and gradients as the padded
    rows, without the padding's work. Only a ``ScalarRewardModel`` that ``packing.can_pack`` and is
    not under activation checkpointing; others take the padded path."""
    b = batch.input_ids.shape[0] // 2
    inner = model.module if hasattr(model, "module") else model
    if padding_free and isinstance(inner, ScalarRewardModel) and can_pack(inner) and not checkpointing_active(inner):
        packed = pack_query_response(batch, num_queries=b if shared_prompt else None)
        with segment_attention(inner):
            return model(input_ids=packed.input_ids, position_ids=packed.position_ids, score_at=packed.last_at).rewards
    share = shared_prompt and isinstance(inner, ScalarRewardModel) and not uses_sliding_window(inner)
    kwargs = dict(num_queries=b, query_width=batch.query_width) if share else {}
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).rewards


@torch.no_grad()
def score_responses(model: nn.Module, items: Sequence[ScoredText], *, pad_token_id: int, batch_size: int = 16, accelerator=None, desc: str = "scoring", progress: bool = False) -> torch.Tensor:
    """Reward of each (query, response): (N,) float32 on CPU (``[left-padded query | right-padded
    response]`` rows, read at each response's EOS)."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()

    def chunk_scores(chunk: list[int]) -> torch.Tensor:
        batch = collate_query_response([items[i].query_ids for i in chunk], [items[i].response_ids for i in chunk], pad_token_id).to(device)
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).rewards.float().cpu()[:, None]

    lengths = [len(x.query_ids) + len(x.response_ids) for x in items]
    try:
        return sharded_scores(len(items), lengths, 1, chunk_scores, batch_size=batch_size, accelerator=accelerator, desc=desc, progress=progress)[:, 0]
    finally:
        model.train(was_training)
