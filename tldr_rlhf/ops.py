"""Tensor primitives shared by every stage.

Shapes: B batch, T response tokens, L full sequence tokens, V vocabulary.
Mask convention everywhere in the project: ``mask`` is a bool tensor, True on real tokens.
With Qwen the pad token equals EOS, so masks are always built from lengths, never from
``ids != pad_token_id`` (N+ detail 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is True. Shapes: values and mask broadcastable, e.g. (B, T)."""
    values = values * mask.to(values.dtype)
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over real tokens. Shapes (B, T); ``dim=None`` reduces everything to ().

    Rows or batches with no real token give 0 rather than NaN (the count is clamped to 1).
    """
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over real tokens, shape (). Bessel-corrected when ``unbiased``.

    Raises ValueError when unbiased and fewer than two tokens are real (the correction is undefined).
    """
    mean = masked_mean(values, mask)
    centered = (values - mean) ** 2
    var = masked_mean(centered, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("masked_var: need at least 2 real tokens for an unbiased variance")
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten ``values`` (B, T) with the mean and unbiased variance of the real tokens (N+ detail 22).

    ``(x - mean) / sqrt(var + 1e-8)``, mean added back when ``shift_mean`` is False (used for
    reward whitening). Padded positions are set to 0 in the output.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(whitened.dtype)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each token under ``logits / temperature``.

    Shapes: logits (B, T, V) already aligned so that ``logits[:, t]`` predicts ``tokens[:, t]``;
    tokens (B, T) int64. Returns (B, T) float32. Computed as ``logit[token] - logsumexp(logits)``
    in float32, which avoids materialising the (B, T, V) log-softmax. Temperature scaling follows
    N+ detail 21 (log-probs must match the sampling distribution).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the categorical distribution given by logits (..., V); returns (...)."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Right-aligned content mask: (B,) lengths -> (B, max_len) bool, True on the first lengths[b]."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def first_true_index(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (B, T) -> (B,); T when a row has none."""
    t = bools.shape[-1]
    idx = torch.arange(t, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, torch.full_like(idx, t)).min(-1).values


def truncate_after_eos(responses: torch.Tensor, eos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first EOS and pad the rest (N+ detail 19).

    Shapes: responses (B, T) int64. Returns (truncated (B, T), mask (B, T) bool). The mask is True
    on tokens up to and including the first EOS (or on all T tokens when there is no EOS); it is
    built from positions, never from ``!= pad`` (pad may equal EOS).
    """
    first_eos = first_true_index(responses == eos_token_id)
    lengths = (first_eos + 1).clamp(max=responses.shape[1])
    mask = lengths_to_mask(lengths, responses.shape[1])
    truncated = torch.where(mask, responses, torch.full_like(responses, pad_token_id))
    return truncated, mask


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, L) ids and (B, L) bool attention mask (True on real tokens)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = True
    return ids, mask


def right_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (B, L) ids and (B, L) bool attention mask (True on real tokens)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: correct positions for left-padded inputs (N+ detail 9)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
