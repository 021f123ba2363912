"""Rewards and advantages for PPO, GRPO and RLOO: pure functions of tensors and scalars.

The RL loops take advantages per token, (B, T), 0 on padding, from every algorithm: a sequence-level
estimator (GRPO's ``group_advantages``, RLOO's ``rloo_advantages``) is broadcast over the response mask
(``broadcast_over_response``), as verl's ``core_algos`` does.

Shapes: B batch (prompts, or sequences for per-token functions), T response tokens, G responses
per prompt (GRPO group / RLOO k), N candidates per prompt (rejection sampling). ``mask`` (B, T) is
True on real response tokens: the tokens up to and including the first EOS, or all T tokens of a
response without EOS. Masks are built from lengths (``ops.truncate_after_eos``), never from
``ids != pad`` (N+ detail 3).

Where the score goes (N+ detail 20), decided deliberately: **at the last real token** (the EOS,
or the last token of a response that has none). The N+ reference code added the score one
position *past* the EOS, on a pad token, and widened the value mask by one to cover it. We do not:

* the action that ends the episode is emitting EOS, so the terminal reward belongs to that step.
  One step later there is no action of the policy (the pad token's log-prob is masked out), so the
  extra step only makes the value head fit a value at a pad position it never sees at rollout;
* with one extra step the score reaches every real token's advantage through one more factor of
  ``gamma * lambda`` (0.95 with the N+ values), i.e. N+ effectively shrank the score by 5% relative
  to the KL penalty; placing it at the EOS gives the textbook per-token MDP (Ouyang et al. 2022;
  Stiennon et al. 2020 eq. 2, where R(x, y) is received when the summary is complete);
* mask, rewards and values then all cover exactly the same tokens, so no ``mask_p1`` variant exists.

Nothing is added after the last real token: rewards, values, advantages and returns are 0 there.
"""

from __future__ import annotations

import math

import torch

from .losses import kl_estimate
from .ops import masked_mean, masked_whiten


def _check_prefix_mask(mask: torch.Tensor, name: str = "mask") -> None:
    """Raise ValueError unless every row of ``mask`` (B, T) is True on a prefix and False after it."""
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True on real tokens), got {mask.dtype}")
    if mask.ndim != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(mask.shape)}")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(f"{name} must be True on a prefix of each row (response tokens up to EOS) and False after it")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row: (B, T) bool prefix mask -> (B,) int64.

    Raises ValueError for a row with no real token (an empty response has no last token to
    receive the score).
    """
    lengths = mask.long().sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"rows {torch.nonzero(lengths == 0).flatten().tolist()} have no real response token")
    return lengths - 1


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token rewards of the RLHF MDP (Stiennon et al. 2020 eq. 2; N+ details 16 and 20):

        r_t = -kl_coef * KL_t                 for every real response token t,
        r_t += score                          at the last real token (the EOS),
        r_t = 0                               after the last real token.

    ``KL_t`` is the per-token estimator named by ``kl_estimator`` (``k1`` = log pi - log pi_ref,
    N+'s choice; ``k3`` = exp(ref - logp) - (ref - logp) - 1). Shapes: scores (B,); logprobs,
    ref_logprobs (B, T) log-probs of the sampled tokens at the sampling temperature; mask (B, T)
    bool prefix mask. Returns rewards (B, T) and metrics {kl (B, T) detached per-token KL,
    non_score_reward (B,) summed KL penalty, kl_sum (B,)}. Raises ValueError for a mask that is not
    a prefix mask or a row with no real token.
    """
    _check_prefix_mask(mask)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must have shape ({mask.shape[0]},), got {tuple(scores.shape)}")
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * mask
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    last = last_token_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    metrics = {"kl": kl.detach(), "non_score_reward": non_score.sum(-1).detach(), "kl_sum": kl.sum(-1).detach()}
    return rewards, metrics


def whiten_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Optional reward whitening (N+ detail 22, off in the released runs): rewards scaled to unit
    variance over real tokens with their mean kept (``ops.masked_whiten(shift_mean=False)``).
    Shapes (B, T) -> (B, T); 0 after the last real token."""
    return masked_whiten(rewards, mask, shift_mean=False)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), over real tokens only.

        delta_t = r_t + gamma * V_{t+1} - V_t,   V after the last real token = 0 (terminal)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                      (the value target)

    Shapes: rewards, values (B, T) float; mask (B, T) bool prefix mask. Returns (advantages,
    returns), both (B, T), 0 after the last real token. Defaults are N+ detail 16 (gamma 1.0,
    lambda 0.95). Raises ValueError for a mask that is not a prefix mask.
    """
    _check_prefix_mask(mask)
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    t_max = values.shape[1]
    for t in reversed(range(t_max)):
        next_value = values[:, t + 1] if t + 1 < t_max else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * m


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantages whitened over real tokens: zero mean, unit variance (N+ detail 22), 0 on padding.
    Shapes (B, T) -> (B, T). Raises ValueError with fewer than two real tokens."""
    return masked_whiten(advantages, mask, shift_mean=True)


def tied_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Groups whose G rewards are all exactly equal (``max == min``): (B, G) -> (B,) bool.

    Decided on the values themselves, never on a computed std: the float32 mean of 8 copies of 1.7
    is not 1.7, so ``r - mean`` and ``std`` of a tied group are rounding residue (~1e-7), not 0."""
    return rewards.amax(1) == rewards.amin(1)


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel) standard deviation of each group, computed in float64 and exactly 0 for a
    tied group (``tied_groups``). Shapes: rewards (B, G) -> (B,) float64."""
    std = rewards.double().std(1)
    return std.masked_fill(tied_groups(rewards), 0.0)


def group_advantages(
    rewards: torch.Tensor, *, scale_by_std: bool = True, eps: float = 1e-6, global_normalize: bool = False
) -> torch.Tensor:
    """GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath eq. 3, outcome supervision).

        A_{b,i} = (r_{b,i} - mean_j r_{b,j}) / (std_j r_{b,j} + eps)

    with the unbiased (Bessel) standard deviation over the G responses of prompt b. With
    ``scale_by_std=False`` only the mean is removed (Dr. GRPO, Liu et al. 2025, which argues the std
    division up-weights prompts whose responses all score alike). With ``global_normalize`` the
    group advantages are then normalized once more over the whole batch (B * G values; seed GPT-2
    GRPO): ``(A - mean(A)) / (std(A) + eps)``.

    A tied group (all G rewards exactly equal) gets exactly 0 before the global step: it carries
    no signal. The group statistics are computed in float64 and ties are detected on the values
    (``tied_groups``), because in float32 the rounding residue of the mean divided by
    ``std + eps`` (both ~1e-7) is not small: 8 rewards of 1.7 gave +0.106 each, of 2.3456789 +0.19.

    Shapes: rewards (B, G) -> (B, G) float32. Example: rewards [1, 0] give +-0.7071 (std sqrt(0.5))
    and +-0.5 without the std. Raises ValueError for G < 2 (no group baseline) or a non-2-D input.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (B, G), got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group size G must be at least 2 for a group baseline, got {rewards.shape[1]}")
    r = rewards.double()
    adv = r - r.mean(1, keepdim=True)
    if scale_by_std:
        adv = adv / (group_std(r)[:, None] + eps)
    adv = adv.masked_fill(tied_groups(r)[:, None], 0.0)
    if global_normalize:
        if adv.numel() < 2:
            raise ValueError("global normalization needs at least 2 advantages")
        adv = (adv - adv.mean()) / (adv.std() + eps)
    return adv.float()


def broadcast_over_response(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantages of a sequence-level estimator (GRPO, RLOO): each sequence's one advantage
    on every real token of its response, 0 on padding (verl's ``scores.unsqueeze(-1) * response_mask``),
    so that every estimator hands the RL loop the same (B, T) contract.

    Shapes: advantages (B,) float, mask (B, T) bool prefix mask -> (B, T) in the advantages' dtype.
    Example: [1.7, -0.3] with lengths [2, 1] of T = 3 -> [[1.7, 1.7, 0], [-0.3, 0, 0]]. Raises
    ValueError for a mask that is not a prefix mask or B that differs."""
    _check_prefix_mask(mask)
    if advantages.shape != mask.shape[:1]:
        raise ValueError(f"sequence advantages must have shape ({mask.shape[0]},), got {tuple(advantages.shape)}")
    return torch.where(mask, advantages[:, None], torch.zeros((), dtype=advantages.dtype))


def sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The one advantage of each sequence back from per-token advantages that a sequence-level
    estimator broadcast over its response (``broadcast_over_response``): the value at the first
    response token, for a loss with one action per sequence (RLOO's ``losses.rloo_loss``).

    Shapes: advantages (B, T) float, mask (B, T) bool prefix mask -> (B,). Raises ValueError for a
    row with no real token or whose advantages differ between its real tokens (a per-token
    estimator's: they have no one value per sequence)."""
    _check_prefix_mask(mask)
    if advantages.shape != mask.shape:
        raise ValueError(f"advantages must have the mask's shape {tuple(mask.shape)}, got {tuple(advantages.shape)}")
    last_token_index(mask)  # raises for an empty row
    if ((advantages != advantages[:, :1]) & mask).any():
        raise ValueError("advantages differ between the real tokens of a sequence: a per-sequence loss needs one advantage per sequence")
    return advantages[:, 0]


def rloo_baselines(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baselines (Kool et al. 2019; Ahmadian et al. 2024, RLOO):
    ``b_{b,i} = (sum_j r_{b,j} - r_{b,i}) / (k - 1)``, the mean reward of the other k - 1 samples of
    the same prompt. Computed in float64 and returned in the rewards' dtype; in a tied group (all k
    rewards exactly equal, ``tied_groups``) the baseline is the reward itself, so the advantage is
    exactly 0 (in float32 the sum-minus-self residue gave +-1.2e-7 for k rewards of 1.7).
    Shapes: rewards (B, k) -> (B, k). Raises ValueError for k < 2."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (B, k), got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got {k}")
    r = rewards.double()
    base = ((r.sum(1, keepdim=True) - r) / (k - 1)).to(rewards.dtype)
    return torch.where(tied_groups(rewards)[:, None], rewards, base)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO advantages ``r_{b,i} - b_{b,i}`` (see ``rloo_baselines``). Shapes (B, k) -> (B, k)."""
    return rewards - rloo_baselines(rewards)


def sequence_rlhf_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *, kl_coef: float, kl_estimator: str = "k1"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence-level KL-regularized reward for RLOO (Ahmadian et al. 2024, sec. 3; the KL goes in
    the reward): ``score - kl_coef * sum_t KL_t`` over real tokens. Shapes: scores (B,); logprobs,
    ref_logprobs, mask (B, T). Returns (B,) and metrics {kl_sum (B,)}."""
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * mask
    kl_sum = kl.sum(-1)
    return scores - kl_coef * kl_sum, {"kl_sum": kl_sum.detach()}


def statistical_rejection_sampling(
    scores: torch.Tensor, num_keep: int, *, beta: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Statistical rejection sampling (Liu et al. 2023, "Statistical Rejection Sampling Improves
    Preference Optimization", Algorithm 1): draws ``num_keep`` of the N candidates, without
    replacement, approximately from the optimal policy ``pi*(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta)``.

    Rounds repeat over the remaining candidates: each candidate i (in order) is accepted when
    ``u < exp((r_i - r_max) / beta)`` with u ~ U[0, 1) and r_max the best remaining score, until
    ``num_keep`` are accepted. The best remaining candidate is always accepted, so each round
    accepts at least one and the loop ends. Small beta keeps the top scores; large beta keeps the
    first ``num_keep`` visited, a uniform draw because candidates must come in sampling order
    (exchangeable), as in the paper: do not pass them sorted.

    Shapes: scores (B, N) or (N,); returns int64 indices (B, num_keep) or (num_keep,), in acceptance
    order. Raises ValueError for num_keep outside [1, N] or beta <= 0.
    """
    squeeze = scores.ndim == 1
    s = scores[None] if squeeze else scores
    if s.ndim != 2:
        raise ValueError(f"scores must have shape (B, N) or (N,), got {tuple(scores.shape)}")
    n = s.shape[1]
    if not 1 <= num_keep <= n:
        raise ValueError(f"num_keep must be in [1, {n}], got {num_keep}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    s = s.detach().double().cpu()
    out = torch.empty((s.shape[0], num_keep), dtype=torch.long)
    for b in range(s.shape[0]):
        remaining = list(range(n))
        accepted: list[int] = []
        while len(accepted) < num_keep:
            r_max = max(s[b, i].item() for i in remaining)
            u = torch.rand(len(remaining), generator=generator, dtype=torch.float64)
            taken = []
            for j, i in enumerate(remaining):
                if u[j].item() < math.exp((s[b, i].item() - r_max) / beta):
                    accepted.append(i)
                    taken.append(i)
                    if len(accepted) == num_keep:
                        break
            remaining = [i for i in remaining if i not in taken]
        out[b] = torch.tensor(accepted)
    return out[0] if squeeze else out


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over real tokens (1 = perfect value model, 0 =
    no better than a constant, < 0 worse). Shapes (B, T) -> (). NaN-free: 0 when Var(returns) is 0."""
    m = mask
    var_r = masked_mean((returns - masked_mean(returns, m)) ** 2, m)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, m)) ** 2, m)
    return torch.where(var_r > 0, 1 - var_d / var_r.clamp(min=1e-12), torch.zeros_like(var_r)).detach()
