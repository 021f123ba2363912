"""GRPO: critic-free policy optimization with G responses per prompt (Shao et al. 2024,
DeepSeekMath eq. 3; the seed setup, N+ details 24-25).

Shapes: B sequences of a rollout (prompts x G), G responses per prompt, T response tokens.

Each rollout (the loop is ``group_rl.train``, which GRPO and RLOO share):

1. G responses per prompt (8), sampled at temperature 0.7 (top_k 0, top_p 1), truncated after the
   first EOS, scored by the reward model at the EOS, -1 without EOS (``group_rl.group_rollout``);
   optionally statistical rejection sampling (Liu et al. 2023, ``sample_groups``): 64 candidates per
   prompt at a high temperature, G kept by rejection against their scores with temperature beta,
   log-probs of the kept ones at the training temperature;
2. advantages ``(r - mean_group) / std_group`` (``group_relative_advantages``; without the std
   division = Dr. GRPO; optional global normalization afterwards), one per sequence, broadcast over
   its response tokens: (B, T), 0 on padding;
3. ``update_per_rollout`` (4) passes over the rollout in shuffled minibatches (64 sequences), each
   an optimizer step over micro-batches (8): clipped surrogate (0.2) with dual clip (c = 3) for
   negative advantages, plus 0.05 x the k3 KL estimator to the reference in the loss, reduced by
   ``loss_aggregation`` ("seq-mean-token-mean") over the minibatch's sequences / tokens
   (``token_loss``); the loss covers the tokens up to and including the truncation (EOS) token only;
4. metrics, samples and checkpoints of the update.

GRPO shares the prompt order, rollout, reference and reward model of PPO (``rl_common``); there is
no value model. The learning rate follows the shared cosine-with-warmup schedule per optimizer step.
"""

from __future__ import annotations

import torch

from ..advantages import broadcast_over_response, group_advantages, group_std, statistical_rejection_sampling, tied_groups
from ..config import GRPOConfig
from ..importance_sampling import rollout_is_weights
from ..losses import grpo_loss
from ..rollout import Rollout, apply_no_eos_penalty, finish_rollout, sample_and_score, select_rows
from . import group_rl


def sample_groups(policy, ref, score_fn, queries: list[list[int]], cfg: GRPOConfig, *, eos: int, pad: int, generator: torch.Generator | None = None, engine=None, seed: int | None = None, policy_logprobs: bool = True) -> tuple[Rollout, dict[str, float]]:
    """Step 1: ``group_rl.group_rollout``, or with ``cfg.rejection_sampling``: ``rs_candidates``
    responses per query sampled at ``rs_temperature``, scored (no-EOS penalty applied before the
    rejection), G kept per query by ``statistical_rejection_sampling`` with ``rs_beta`` (draws from
    ``generator``); log-probs of the kept rows at ``cfg.temperature``. Returns the rollout (rows
    ``[q0] * G + [q1] * G + ...``) and extra metrics. ``engine`` (``rollout_engine``) samples, with
    requests seeded from ``seed``; rejection-sampled candidates are drawn at ``rs_temperature`` and
    selected, off-policy by design, so they carry no truncated importance-sampling correction. Without
    ``policy_logprobs`` the policy's log-probs are left to the update (``group_rl.update_fills_logprobs``)."""
    if not cfg.rejection_sampling:
        return group_rl.group_rollout(policy, ref, score_fn, queries, cfg, eos=eos, pad=pad, generator=generator, engine=engine, seed=seed, policy_logprobs=policy_logprobs)
    g, n = cfg.group_size, cfg.rs_candidates
    common = dict(eos_token_id=eos, pad_token_id=pad, response_length=cfg.response_length, batch_size=cfg.forward_batch_size)
    shared = cfg.shared_prompt or group_rl.samples_elsewhere(engine)
    if shared:  # each prompt prefilled once for its n candidates, scored once per group
        batch, has_eos, _ = group_rl.sample_groups_shared(policy, queries, n, eos=eos, pad=pad, response_length=cfg.response_length, temperature=cfg.rs_temperature, batch_size=cfg.forward_batch_size, engine=engine, seed=seed)
        raw = group_rl.score_groups(score_fn, batch, n, batch_size=cfg.forward_batch_size)
    else:
        candidates = [q for q in queries for _ in range(n)]
        batch, raw, has_eos = sample_and_score(policy, score_fn, candidates, temperature=cfg.rs_temperature, **common)
    scores = apply_no_eos_penalty(raw, has_eos, cfg.no_eos_penalty)
    # (prompts, n) candidate scores -> (prompts, G) kept indices -> flat rows of the candidate batch
    kept = statistical_rejection_sampling(scores.view(len(queries), n), g, beta=cfg.rs_beta, generator=generator)
    rows = (kept + torch.arange(len(queries))[:, None] * n).flatten().tolist()
    sub = select_rows(batch, rows, pad)
    if shared:
        r = group_rl.finish_group_rollout(policy, ref, sub, raw[rows], has_eos[rows], cfg, policy_logprobs=policy_logprobs)
    else:
        r = finish_rollout(policy, ref, sub, raw[rows], has_eos[rows], temperature=cfg.temperature, no_eos_penalty=cfg.no_eos_penalty, batch_size=cfg.forward_batch_size, policy_logprobs=policy_logprobs)
    return r, {"rs/candidate_score_mean": scores.mean().item(), "rs/kept_score_mean": scores[rows].mean().item()}


def group_relative_advantages(r: Rollout, cfg: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Step 2: advantages (B, T) of a grouped rollout: each sequence's score normalized within its
    group (``advantages.group_advantages``) on every real token of its response, 0 on padding
    (``advantages.broadcast_over_response``); and their metrics."""
    grouped = r.scores.view(-1, cfg.group_size)  # (B,) -> (B / G, G)
    adv = group_advantages(grouped, scale_by_std=cfg.scale_by_std, global_normalize=cfg.global_normalize).flatten()
    # ties decided on the scores (max == min), not on a float32 std that is rounding residue for them
    return broadcast_over_response(adv, r.mask), {"grpo/group_score_std": group_std(grouped).mean().item(), "grpo/zero_std_groups": tied_groups(grouped).float().mean().item()}


def token_loss(new_lp: torch.Tensor, mb: Rollout, adv: torch.Tensor, cfg: GRPOConfig, *, num_tokens: int, num_sequences: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 3 on one micro-batch: ``losses.grpo_loss`` (clipped surrogate with dual clip plus the KL
    estimator in the loss) of new log-probs (b, T) against the rollout's, advantages (b, T). Its
    ``pg_loss`` metric is left out (the logged ``loss/policy`` is the whole loss). A rollout sampled by
    another engine (vllm) weights each token's policy-gradient term by its truncated importance
    weight (``--tis-cap``, ``--tis-level``)."""
    loss, m = grpo_loss(
        new_lp, mb.logprobs, mb.ref_logprobs, adv, mb.mask, clip_range=cfg.clip_range, dual_clip=cfg.dual_clip or None,
        kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, aggregation=cfg.loss_aggregation, num_tokens=num_tokens, num_sequences=num_sequences,
        is_weights=rollout_is_weights(mb.logprobs, mb.sample_logprobs, mb.mask, cap=cfg.tis_cap, level=cfg.tis_level),
    )
    m.pop("pg_loss")
    return loss, m


def train(cfg: GRPOConfig) -> str:
    """Run GRPO; returns the path of the final policy (a Hugging Face checkpoint).

    Raises DataError for bad prompts (before any model loads), ValueError for sizes that do not
    divide, ModelLoadError for bad model paths, RunDirError for a finished run folder.
    """
    # its KL is in the loss, not the reward: with one optimizer step per rollout the update gives the old log-probs
    return group_rl.train(cfg, "grpo", advantages=group_relative_advantages, loss=token_loss, sample=sample_groups, token_metrics=True, logprobs_from_update=True)
