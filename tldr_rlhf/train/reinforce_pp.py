"""REINFORCE++ (Hu et al. 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
Models"; OpenRLHF's and verl's ``reinforce_plus_plus`` estimator): PPO's token-level machinery without a
critic. Against a frozen reward model (or a ``--reward``), G responses per prompt.

Shapes: B sequences of a rollout (prompts x G), T response tokens; b sequences of a micro-batch.

Each rollout (the loop is ``group_rl.train``, which GRPO and RLOO share):

1. G responses per prompt, sampled at the policy's temperature, truncated after the first EOS, scored
   by the reward at the EOS, -1 without EOS (``group_rl.group_rollout``);
2. per-token rewards with the KL penalty, ``r_t = -kl_coef * KL_t`` plus the score at the last real
   token (``advantages.kl_shaped_rewards``), their discounted return ``G_t = sum_{s >= t} gamma^(s-t)
   r_s``, and advantages = the returns whitened over every real token of the rollout (zero mean, unit
   variance), no critic and no per-prompt baseline (``reinforce_pp_advantages``): (B, T) per token;
3. ``update_per_rollout`` passes over the rollout in shuffled minibatches, each an optimizer step over
   micro-batches: PPO's clipped surrogate on the per-token ratio (``losses.ppo_policy_loss``,
   token-mean over the minibatch's real tokens);
4. metrics, samples and checkpoints of the update.

With several processes each whitens its own share of the rollout (the loop hands the advantage function
the local rollout); with one process the whitening is over the whole batch, as in the paper.
"""

from __future__ import annotations

import torch

from ..advantages import kl_shaped_rewards
from ..config.rl import ReinforcePPConfig
from ..importance_sampling import rollout_is_weights
from ..losses import ppo_policy_loss
from ..ops import masked_whiten
from ..rollout import Rollout
from . import group_rl

NAME = "reinforce-pp"


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over real tokens, 0 after the last real token (no bootstrap: the
    episode ends at the EOS). Shapes: rewards (B, T) float, mask (B, T) bool prefix mask -> (B, T).
    Example: rewards [[0.1, -0.2, 1.7]], gamma 0.5 -> [[0.425, 0.65, 1.7]]."""
    m = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        out[:, t] = running
    return out


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ advantages (Hu et al. 2025 eq. 6-7): the discounted returns of the per-token rewards
    (``discounted_returns``), whitened over every real token of the batch (``ops.masked_whiten``: zero
    mean, unit unbiased variance, 0 on padding). Shapes (B, T) -> (B, T); at least two real tokens."""
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask, shift_mean=True)


def token_advantages(r: Rollout, cfg: ReinforcePPConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Step 2: per-token advantages (B, T) of the rollout and their metrics."""
    rewards, m = kl_shaped_rewards(r.scores, r.logprobs, r.ref_logprobs, r.mask, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
    adv = reinforce_pp_advantages(rewards, r.mask, gamma=cfg.gamma)
    return adv, {"objective/rlhf_reward": (r.scores + m["non_score_reward"]).mean().item()}


def clipped_loss(new_lp: torch.Tensor, mb: Rollout, adv: torch.Tensor, cfg: ReinforcePPConfig, *, num_tokens: int, num_sequences: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 3 on one micro-batch: ``losses.ppo_policy_loss`` of new log-probs (b, T) against the
    rollout's, per-token advantages (b, T), normalized by the minibatch's ``num_tokens`` real tokens
    (``num_sequences`` unused). A rollout sampled by another engine (vllm) weights each token's
    policy-gradient term by its truncated importance weight (``--tis-cap``, ``--tis-level``)."""
    w = rollout_is_weights(mb.logprobs, mb.sample_logprobs, mb.mask, cap=cfg.tis_cap, level=cfg.tis_level)
    return ppo_policy_loss(new_lp, mb.logprobs, adv, mb.mask, clip_range=cfg.clip_range, num_tokens=num_tokens, is_weights=w)


def train(cfg: ReinforcePPConfig) -> str:
    """Run REINFORCE++; returns the path of the final policy (a Hugging Face checkpoint).

    Raises DataError for bad prompts (before any model loads), ValueError for sizes that do not
    divide, ModelLoadError for bad model paths, RunDirError for a finished run folder.
    """
    return group_rl.train(cfg, NAME, advantages=token_advantages, loss=clipped_loss, token_metrics=True)  # clipfrac, KL: token means
