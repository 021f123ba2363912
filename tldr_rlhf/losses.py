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


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization loss, mean over the batch (Rafailov et al. 2023, eq. 7).

    With ``h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)`` (summed response-token
    log-probs, nats):

    * ``loss_type="sigmoid"``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``; ``eps =
      label_smoothing`` > 0 is conservative DPO (Mitchell 2023: labels flipped with probability eps;
      the seed used 0.1, N+ detail 26), ``eps = 0`` plain DPO (``log 2`` when policy == reference).
    * ``loss_type="ipo"``: ``(h - 1 / (2 beta))^2`` (Azar et al. 2023, eq. 17, beta as tau). With
      ``chosen_lengths`` / ``rejected_lengths`` (B,) token counts, each log ratio is first divided by
      its length (the per-token form TRL uses); without them the summed form of the paper.

    Shapes: the four log-prob inputs (B,). Implicit rewards are ``beta * (pi - ref)``. Returns loss ()
    and detached metrics {chosen_reward, rejected_reward, reward_margin, reward_accuracy (share of
    pairs with chosen reward strictly above rejected; ties count as wrong), logps_chosen,
    logps_rejected}. Raises ValueError for beta <= 0, label_smoothing outside [0, 0.5), label
    smoothing with IPO, or an unknown loss_type.
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = pi_chosen - ref_chosen
    rejected_ratio = pi_rejected - ref_rejected
    if loss_type == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        logsig = torch.nn.functional.logsigmoid
        losses = -(1.0 - label_smoothing) * logsig(logits) - label_smoothing * logsig(-logits)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("dpo_loss: label_smoothing applies to the sigmoid loss, not to IPO")
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise ValueError("dpo_loss: give both chosen_lengths and rejected_lengths, or neither")
        c, r = chosen_ratio, rejected_ratio
        if chosen_lengths is not None:
            c = c / chosen_lengths.to(c.dtype).clamp(min=1.0)
            r = r / rejected_lengths.to(r.dtype).clamp(min=1.0)
        losses = (c - r - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss: unknown loss_type '{loss_type}' (sigmoid or ipo)")
    chosen_reward = (beta * chosen_ratio).detach()
    rejected_reward = (beta * rejected_ratio).detach()
    metrics = {
        "chosen_reward": chosen_reward.mean(),
        "rejected_reward": rejected_reward.mean(),
        "reward_margin": (chosen_reward - rejected_reward).mean(),
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
        "logps_chosen": pi_chosen.detach().mean(),
        "logps_rejected": pi_rejected.detach().mean(),
    }
    return losses.mean(), metrics


# ----------------------------------------------------------------------------------------------
# RL losses (PPO, GRPO, RLOO) and per-token KL estimators. Shapes: B sequences, T response tokens;
# ``advantages`` is (B, T) per token, 0 on padding, for every algorithm (a sequence-level estimator
# broadcast over the response: ``advantages.broadcast_over_response``); RLOO's loss, one action per
# sequence, takes each sequence's one advantage (B,) (``advantages.sequence_advantages``).

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
    "Approximating KL divergence"). With ``d = log pi - log pi_ref``:

    * ``k1 = d`` (unbiased, can be negative; N+ PPO, detail 20);
    * ``k2 = d^2 / 2`` (biased, low variance);
    * ``k3 = exp(-d) + d - 1 = exp(ref - logp) - (ref - logp) - 1`` (unbiased, always >= 0; GRPO,
      N+ detail 24).

    Shapes: logprobs, ref_logprobs (B, T) -> (B, T); no masking (callers mask). Raises ValueError
    for an unknown estimator.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator '{estimator}' (choose from {KL_ESTIMATORS})")


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    num_tokens: int | float | None = None,
    num_sequences: int | float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) over real tokens to ().

    * ``token-mean``: sum over all real tokens / ``num_tokens`` (default: real tokens here);
    * ``seq-mean-token-sum``: per-sequence sum, then / ``num_sequences`` (default B);
    * ``seq-mean-token-mean``: per-sequence mean over its own real tokens, then / ``num_sequences``.

    Passing the counts of the whole minibatch makes the sum of micro-batch losses equal the loss of
    the minibatch, whatever the micro-batch split (gradient accumulation). A sequence with no real
    token contributes 0. Raises ValueError for an unknown mode.
    """
    m = mask.to(per_token.dtype)
    if mode == "token-mean":
        denom = float(num_tokens) if num_tokens is not None else m.sum().clamp(min=1.0)
        return (per_token * m).sum() / denom
    n_seq = float(num_sequences) if num_sequences is not None else float(per_token.shape[0])
    seq_sum = (per_token * m).sum(-1)
    if mode == "seq-mean-token-sum":
        return seq_sum.sum() / n_seq
    if mode == "seq-mean-token-mean":
        return (seq_sum / m.sum(-1).clamp(min=1.0)).sum() / n_seq
    raise ValueError(f"unknown loss aggregation '{mode}' (choose from {LOSS_AGGREGATIONS})")


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO clipped-surrogate loss (Schulman et al. 2017, eq. 7), negated for descent:

        l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps)),   r_t = exp(logp_t - old_logp_t)

    and with ``dual_clip = c`` (> 1; Ye et al. 2020, eq. 5), for A_t < 0 only: ``min(l_t, -c A_t)``,
    which bounds the loss of a token whose ratio has grown large under a negative advantage.

    Shapes: logprobs, old_logprobs (B, T); advantages (B, T) or (B,) (broadcast over T). Returns
    per-token loss (B, T) and per-token detached metrics {ratio, log_ratio, clipped (bool, the
    clipped branch was taken), dual_clipped (bool)}. Raises ValueError for clip_range <= 0 or
    dual_clip <= 1.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    return loss, {"ratio": ratio.detach(), "log_ratio": log_ratio.detach(), "clipped": clipped, "dual_clipped": dual}


def _token_metrics(m: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    mf = mask.to(m["ratio"].dtype)
    n = mf.sum().clamp(min=1.0)
    return {
        "clipfrac": (m["clipped"] * mf).sum() / n,
        "dual_clipfrac": (m["dual_clipped"] * mf).sum() / n,
        # 0.5 E[(log r)^2]: the k2 estimate of KL(old || new), N+'s "approxkl".
        "approx_kl": (0.5 * m["log_ratio"] ** 2 * mf).sum() / n,
        "ratio_mean": (m["ratio"] * mf).sum() / n,
        "ratio_max": torch.where(mask, m["ratio"], torch.zeros_like(m["ratio"])).max(),
    }


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    dual_clip: float | None = None,
    num_tokens: int | float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO policy loss: ``clipped_surrogate`` averaged over real tokens (token-mean, as N+ detail 16;
    ``num_tokens`` = real tokens of the whole minibatch for exact gradient accumulation), each token's
    loss multiplied by its truncated importance-sampling weight ``is_weights`` (B, T) when given
    (``importance_sampling.truncated_is_weights``: a sampler other than the policy).

    Shapes: logprobs (with grad), old_logprobs (rollout), advantages (B, T) whitened; mask (B, T).
    Returns loss () and detached metrics {clipfrac, dual_clipfrac, approx_kl, ratio_mean, ratio_max}.
    """
    per_token, m = clipped_surrogate(logprobs, old_logprobs, advantages, clip_range=clip_range, dual_clip=dual_clip)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate_loss(per_token, mask, "token-mean", num_tokens=num_tokens)
    return loss, _token_metrics(m, mask)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    num_tokens: int | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 / N+ detail 16):

        l_t = 0.5 * max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -eps, eps) - R_t)^2)

    averaged over real tokens (token-mean; ``num_tokens`` as in ``ppo_policy_loss``). The caller
    multiplies by vf_coef (0.1 in N+). Shapes: values (with grad), old_values, returns, mask (B, T).
    Returns loss () and metrics {vf_clipfrac (share of tokens where the clipped branch is larger),
    value_mean}. Raises ValueError for clip_range <= 0.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    loss1 = (values - returns) ** 2
    loss2 = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(loss1, loss2)
    loss = aggregate_loss(per_token, mask, "token-mean", num_tokens=num_tokens)
    mf = mask.to(values.dtype)
    n = mf.sum().clamp(min=1.0)
    metrics = {"vf_clipfrac": ((loss2 > loss1).to(mf.dtype) * mf).sum().detach() / n, "value_mean": (values.detach() * mf).sum() / n}
    return loss, metrics


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    dual_clip: float | None = 3.0,
    kl_coef: float = 0.05,
    kl_estimator: str = "k3",
    aggregation: str = "seq-mean-token-mean",
    num_tokens: int | float | None = None,
    num_sequences: int | float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective (Shao et al. 2024, DeepSeekMath eq. 3), negated:

        l_t = w_t * clipped_surrogate(r_t, A_t) + kl_coef * k3(logp_t, ref_t)

    with ``w_t`` the truncated importance-sampling weights ``is_weights`` (B, T) of a sampler other
    than the policy (``importance_sampling.truncated_is_weights``; None = 1, the policy sampled),
    reduced by ``aggregation`` (``aggregate_loss``; the seed's "seq-mean-token-mean" is the paper's
    1/G sum_i 1/|o_i| sum_t). Defaults are N+ detail 24: dual clip c = 3 for negative advantages,
    k3 estimator with coefficient 0.05 in the loss (not in the reward).

    Shapes: logprobs (with grad), old_logprobs, ref_logprobs, mask, advantages (B, T) (GRPO's are
    per sequence, ``A_t = A_b`` on every real token: ``advantages.broadcast_over_response``). Returns
    loss () and detached metrics {pg_loss, kl (token mean of the estimator), clipfrac, dual_clipfrac,
    approx_kl, ratio_mean, ratio_max}. Raises ValueError for advantages of another shape than the mask.
    """
    if advantages.shape != mask.shape:
        raise ValueError(f"GRPO advantages are per token, shape {tuple(mask.shape)} as the mask, got {tuple(advantages.shape)}")
    pg, m = clipped_surrogate(logprobs, old_logprobs, advantages, clip_range=clip_range, dual_clip=dual_clip)
    if is_weights is not None:
        pg = pg * is_weights
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)
    per_token = pg + kl_coef * kl if kl_coef else pg
    loss = aggregate_loss(per_token, mask, aggregation, num_tokens=num_tokens, num_sequences=num_sequences)
    mf = mask.to(kl.dtype)
    n = mf.sum().clamp(min=1.0)
    metrics = {
        "pg_loss": aggregate_loss(pg.detach(), mask, aggregation, num_tokens=num_tokens, num_sequences=num_sequences),
        "kl": (kl.detach() * mf).sum() / n,
        **_token_metrics(m, mask),
    }
    return loss, metrics


def rloo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
    num_sequences: int | float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO REINFORCE loss (Ahmadian et al. 2024, eq. 4), one action per sequence:

        l_b = -A_b * rho_b,    rho_b = exp(sum_t (logp_t - old_logp_t))  over real tokens,

    each multiplied by its sequence's truncated importance-sampling weight ``is_weights`` (B,) when
    given (``importance_sampling.sequence_is_weights``: a sampler other than the policy),
    averaged over sequences (``num_sequences`` for gradient accumulation). At rho = 1 (on-policy,
    the first pass) the gradient is exactly REINFORCE's ``-A_b grad sum_t logp_t``; for later passes
    over the same rollout ``rho`` is clipped as in PPO (``clip_range``; None = unclipped, TRL's RLOO
    does the same). The KL penalty is in the reward that made ``A_b`` (``sequence_rlhf_rewards``).

    Shapes: logprobs, old_logprobs, mask (B, T); advantages (B,). Returns loss () and metrics
    {clipfrac (share of sequences clipped), approx_kl, ratio_mean}.
    """
    if advantages.ndim != 1:
        raise ValueError(f"RLOO advantages are per sequence, shape (B,), got {tuple(advantages.shape)}")
    mf = mask.to(logprobs.dtype)
    seq_log_ratio = ((logprobs - old_logprobs) * mf).sum(-1)
    ratio = torch.exp(seq_log_ratio)
    loss1 = -advantages * ratio
    if clip_range is not None:
        loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        per_seq = torch.maximum(loss1, loss2)
        clipped = (loss2 > loss1).float()
    else:
        per_seq, clipped = loss1, torch.zeros_like(loss1)
    if is_weights is not None:
        per_seq = per_seq * is_weights
    n_seq = float(num_sequences) if num_sequences is not None else float(per_seq.shape[0])
    metrics = {
        "clipfrac": clipped.mean().detach(),
        "approx_kl": (0.5 * seq_log_ratio.detach() ** 2).mean(),
        "ratio_mean": ratio.detach().mean(),
    }
    return per_seq.sum() / n_seq, metrics


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, num_pairs: int | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss on human comparisons (Stiennon et al. 2020 eq. 1; N+ detail 12):
    ``-log sigmoid(r_chosen - r_rejected)``, summed over pairs and divided by ``num_pairs`` (default:
    the pairs here; pass the global batch's count so accumulation gives the global mean).

    Shapes: chosen, rejected (B,) rewards. Returns loss () and metrics {accuracy (share with
    r_chosen > r_rejected strictly; a tie counts as wrong), margin (mean r_chosen - r_rejected),
    chosen, rejected (mean rewards), loss_sum}.
    """
    chosen, rejected = chosen.float(), rejected.float()
    diff = chosen - rejected
    losses = -torch.nn.functional.logsigmoid(diff)
    denom = float(num_pairs) if num_pairs is not None else max(1, diff.numel())
    metrics = {
        "accuracy": (diff > 0).float().mean().detach(),
        "margin": diff.mean().detach(),
        "chosen": chosen.mean().detach(),
        "rejected": rejected.mean().detach(),
        "loss_sum": losses.sum().detach(),
    }
    return losses.sum() / denom, metrics
