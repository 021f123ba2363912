"""RLOO: REINFORCE with leave-one-out baselines (Ahmadian et al. 2024), k responses per prompt
against a frozen reward model, no value model.

Shapes: B sequences of a rollout (prompts x G), G = k responses per prompt, T response tokens.

Each rollout (the loop is ``group_rl.train``, which GRPO and RLOO share):

1. k responses per prompt (4), sampled at temperature 0.7, truncated after the first EOS, scored by
   the reward model at the EOS, -1 without EOS (``group_rl.group_rollout``);
2. the KL penalty in the reward, ``R = score - kl_coef * sum_t KL_t`` (0.05, k1), and advantage =
   R minus the mean R of the other k - 1 responses of its prompt (``leave_one_out_advantages``),
   one per sequence, broadcast over its response tokens: (B, T), 0 on padding;
3. ``update_per_rollout`` (1) passes over the rollout in shuffled minibatches, each an optimizer
   step over micro-batches: REINFORCE on the summed response log-prob, ``-A * rho`` with the
   sequence ratio rho clipped (0.2) on passes after the first (``sequence_loss``), averaged over the
   minibatch's sequences;
4. metrics, samples and checkpoints of the update.

The prompt order, rollout, reference and reward model are PPO's (``rl_common``). The learning rate
follows the shared cosine-with-warmup schedule per optimizer step.
"""

from __future__ import annotations

import torch

from ..advantages import broadcast_over_response, rloo_advantages, rloo_baselines, sequence_advantages, sequence_rlhf_rewards
from ..config import RLOOConfig
from ..importance_sampling import rollout_is_weights
from ..losses import rloo_loss
from ..rollout import Rollout
from . import group_rl


def leave_one_out_advantages(r: Rollout, cfg: RLOOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Step 2: advantages (B, T): each sequence's KL-penalized reward
    (``advantages.sequence_rlhf_rewards``) minus the mean of the other k - 1 in its group
    (``advantages.rloo_advantages``), on every real token of its response, 0 on padding
    (``advantages.broadcast_over_response``); and their metrics."""
    rewards, _ = sequence_rlhf_rewards(r.scores, r.logprobs, r.ref_logprobs, r.mask, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
    grouped = rewards.view(-1, cfg.group_size)  # (B,) -> (B / k, k)
    adv = rloo_advantages(grouped).flatten()
    return broadcast_over_response(adv, r.mask), {"objective/rlhf_reward": rewards.mean().item(), "rloo/baseline_mean": rloo_baselines(grouped).mean().item()}


def sequence_loss(new_lp: torch.Tensor, mb: Rollout, adv: torch.Tensor, cfg: RLOOConfig, *, num_tokens: int, num_sequences: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 3 on one micro-batch: ``losses.rloo_loss`` of new log-probs (b, T) against the rollout's, with
    each sequence's one advantage read from the per-token advantages (b, T)
    (``advantages.sequence_advantages``; ValueError where they differ along a response), averaged over
    the minibatch's ``num_sequences`` (``num_tokens`` unused). A rollout sampled by another engine
    (vllm) weights each sequence by its truncated importance weight (``--tis-cap``; per sequence
    whatever ``--tis-level``: RLOO has one action per sequence)."""
    w = rollout_is_weights(mb.logprobs, mb.sample_logprobs, mb.mask, cap=cfg.tis_cap, level="sequence")
    return rloo_loss(new_lp, mb.logprobs, sequence_advantages(adv, mb.mask), mb.mask, clip_range=cfg.clip_range or None, num_sequences=num_sequences, is_weights=None if w is None else w[:, 0])


def train(cfg: RLOOConfig) -> str:
    """Run RLOO; returns the path of the final policy (a Hugging Face checkpoint).

    Raises DataError for bad prompts (before any model loads), ValueError for sizes that do not
    divide, ModelLoadError for bad model paths, RunDirError for a finished run folder.
    """
    return group_rl.train(cfg, "rloo", advantages=leave_one_out_advantages, loss=sequence_loss)
