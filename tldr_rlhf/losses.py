"""Pure loss functions: tensors and scalars in, ``(loss, metrics)`` out; no config objects.

Shapes: B batch, T response tokens. ``mask`` is True on real tokens. Metrics are detached
0-dim tensors (the caller converts with ``.item()`` when it logs).
"""

from __future__ import annotations

import torch

from .ops import masked_sum


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: int | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level cross-entropy of the targets, summed over real tokens and divided by
    ``num_tokens`` (default: the real tokens in this batch).

    Passing the token count of the whole global batch as ``num_tokens`` makes gradient accumulation
    and data parallelism give exactly the token mean of the global batch, whatever the split into
    micro-batches. Shapes: logprobs (B, T) log pi(target), mask (B, T). Returns loss () and
    {nll_sum, tokens}.
    """
    nll = -masked_sum(logprobs, mask)
    tokens = mask.sum()
    denom = float(num_tokens) if num_tokens is not None else tokens.clamp(min=1).to(logprobs.dtype)
    return nll / denom, {"nll_sum": nll.detach(), "tokens": tokens.detach()}
