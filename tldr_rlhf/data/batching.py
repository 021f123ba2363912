"""Token lists -> padded tensors.

One layout for every stage that scores a response: ``[left-padded query | right-padded response]``
(the N+ layout: queries left-padded, responses appended). Every response then starts at the same
column P, so response logits are one slice and only T positions go through the LM head.

Shapes: B batch, P query width (longest query in the batch), T response width (longest response).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import left_pad, right_pad


@dataclass
class QueryResponseBatch:
    """input_ids / attention_mask (B, P + T); response_mask (B, T) True on real response tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    query_width: int

    @property
    def responses(self) -> torch.Tensor:
        """(B, T) response token ids (padding included)."""
        return self.input_ids[:, self.query_width:]

    def to(self, device) -> "QueryResponseBatch":
        return QueryResponseBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device), self.query_width)


def collate_query_response(queries: list[list[int]], responses: list[list[int]], pad_token_id: int) -> QueryResponseBatch:
    """Build a QueryResponseBatch from unpadded query and response token lists of equal count."""
    if len(queries) != len(responses):
        raise ValueError(f"{len(queries)} queries but {len(responses)} responses")
    q_ids, q_mask = left_pad(queries, pad_token_id)
    r_ids, r_mask = right_pad(responses, pad_token_id)
    return QueryResponseBatch(
        input_ids=torch.cat([q_ids, r_ids], 1),
        attention_mask=torch.cat([q_mask, r_mask], 1),
        response_mask=r_mask,
        query_width=q_ids.shape[1],
    )


def collate_queries(queries: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded query ids and mask (B, P) for generation."""
    return left_pad(queries, pad_token_id)


def collate_pairs(queries: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], pad_token_id: int) -> QueryResponseBatch:
    """Chosen and rejected responses in one batch of 2B rows: rows [0, B) chosen, [B, 2B) rejected,
    so one forward pass scores both (reward model, DPO)."""
    return collate_query_response(queries + queries, chosen + rejected, pad_token_id)


def collate_preferences(examples, pad_token_id: int) -> QueryResponseBatch:
    """``collate_pairs`` of preference examples (anything with ``query_ids``, ``chosen_ids`` and
    ``rejected_ids``): 2B rows, chosen responses in [0, B), rejected in [B, 2B), each after its query."""
    return collate_pairs([e.query_ids for e in examples], [e.chosen_ids for e in examples], [e.rejected_ids for e in examples], pad_token_id)
