"""The sampler / trainer mismatch of a rollout engine and its correction: truncated importance
sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training"; verl's ``rollout_is``, TRL's ``vllm_importance_sampling_correction``).

A fast engine (vLLM) samples the responses with its own kernels, so the log-probs it drew a token
with, ``logp_sample``, differ from the policy's recomputed ones, ``logp_train``, used as the
rollout's "old" log-probs: the tokens come from a slightly different distribution than the one the
policy-gradient estimator assumes. TIS reweights each token's policy-gradient loss by

    w_t = min(exp(logp_train_t - logp_sample_t), C)          (token level)
    w_b = min(exp(sum_t (logp_train_t - logp_sample_t)), C)  (sequence level, broadcast over t)

detached (a constant of the loss), truncated at ``C`` (verl's default 2.0) to bound the variance.
With the ``hf`` engine the sampler is the policy and ``logp_sample`` is ``logp_train`` itself: every
weight is exactly 1 and the loss is unchanged bit for bit.

Pure functions: tensors in, tensors out. Shapes: B sequences, T response tokens; ``mask`` True on
real tokens. Log-probs in nats at the sampling temperature.
"""

from __future__ import annotations

import torch

TIS_LEVELS = ("token", "sequence")
MISMATCH_THRESHOLD = 0.1
"""Nats: a token whose |logp_train - logp_sample| exceeds this counts in ``mismatch/frac_above_threshold``."""


def truncated_is_weights(train_logprobs: torch.Tensor, sample_logprobs: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0, level: str = "token") -> torch.Tensor:
    """Truncated importance-sampling weights (Yao et al. 2025): ``min(exp(logp_train - logp_sample), cap)``
    per token (``level="token"``) or per sequence over its real tokens (``level="sequence"``, the
    weight broadcast to every token of the row). Padded positions get 1.

    Shapes: train_logprobs, sample_logprobs, mask (B, T) -> weights (B, T) float32, detached.
    Raises ValueError for ``cap`` <= 0, an unknown ``level`` or mismatched shapes.
    """
    if cap <= 0:
        raise ValueError(f"truncated importance sampling: cap must be > 0, got {cap}")
    if level not in TIS_LEVELS:
        raise ValueError(f"truncated importance sampling: unknown level '{level}' (choose from {TIS_LEVELS})")
    if train_logprobs.shape != sample_logprobs.shape or train_logprobs.shape != mask.shape:
        raise ValueError(f"truncated importance sampling: shapes differ: train {tuple(train_logprobs.shape)}, sample {tuple(sample_logprobs.shape)}, mask {tuple(mask.shape)}")
    log_ratio = (train_logprobs.detach().float() - sample_logprobs.detach().float()).masked_fill(~mask, 0.0)
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)
    weights = torch.exp(log_ratio).clamp(max=cap)
    return torch.where(mask, weights, torch.ones_like(weights))


def sequence_is_weights(train_logprobs: torch.Tensor, sample_logprobs: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0) -> torch.Tensor:
    """Per-sequence truncated importance-sampling weights (B,) for a loss with one action per sequence
    (RLOO): ``min(exp(sum_t (logp_train_t - logp_sample_t)), cap)``. Shapes as ``truncated_is_weights``."""
    return truncated_is_weights(train_logprobs, sample_logprobs, mask, cap=cap, level="sequence")[:, 0]


def mismatch_stats(train_logprobs: torch.Tensor, sample_logprobs: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0, threshold: float = MISMATCH_THRESHOLD) -> dict[str, float]:
    """How far the engine's sampling log-probs are from the policy's recomputed ones, over real tokens:
    ``mismatch/logprob_abs_diff_mean`` and ``_max`` (nats), ``mismatch/frac_above_threshold`` (share
    of tokens with |difference| > ``threshold``), ``mismatch/k3_kl`` (token mean of the k3 estimate of
    KL(sampler || trainer), >= 0) and ``mismatch/frac_truncated`` (share of tokens whose ratio
    ``exp(logp_train - logp_sample)`` exceeds ``cap``: the ones TIS truncates). All 0 when the two agree.

    Shapes: (B, T) each. Returns floats; an empty mask gives zeros.
    """
    d = (train_logprobs.float() - sample_logprobs.float())[mask]
    if d.numel() == 0:
        return {k: 0.0 for k in ("mismatch/logprob_abs_diff_mean", "mismatch/logprob_abs_diff_max", "mismatch/frac_above_threshold", "mismatch/k3_kl", "mismatch/frac_truncated")}
    return {
        "mismatch/logprob_abs_diff_mean": d.abs().mean().item(),
        "mismatch/logprob_abs_diff_max": d.abs().max().item(),
        "mismatch/frac_above_threshold": (d.abs() > threshold).float().mean().item(),
        # k3 with the sampler as the sampling distribution: exp(train - sample) - (train - sample) - 1
        "mismatch/k3_kl": (torch.expm1(d) - d).mean().item(),
        "mismatch/frac_truncated": (torch.exp(d) > cap).float().mean().item(),
    }


def padded_logprobs(logprobs: list[list[float]], width: int) -> torch.Tensor:
    """Ragged per-response sampling log-probs as a right-padded (B, ``width``) float32 tensor (0 after
    each response's end), the layout of a rollout's log-probs. Raises ValueError for a response longer
    than ``width``."""
    out = torch.zeros(len(logprobs), width, dtype=torch.float32)
    for i, row in enumerate(logprobs):
        if len(row) > width:
            raise ValueError(f"sampling log-probs of row {i} have {len(row)} tokens, more than the response width {width}")
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def rollout_is_weights(logprobs: torch.Tensor, sample_logprobs: torch.Tensor | None, mask: torch.Tensor, *, cap: float, level: str) -> torch.Tensor | None:
    """The truncated importance-sampling weights (B, T) a loss multiplies its policy-gradient term by,
    or None (no correction) when the policy itself sampled (``sample_logprobs`` None: the hf engine)
    or ``cap`` is 0 (--tis-cap 0). Shapes and errors as ``truncated_is_weights``."""
    if sample_logprobs is None or not cap:
        return None
    return truncated_is_weights(logprobs, sample_logprobs, mask, cap=cap, level=level)
