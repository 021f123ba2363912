"""PPO against a learned reward model (Stiennon et al. 2020 sec. 3.4, eq. 2; Schulman et al. 2017;
N+ section 5, details 7, 16-23).

Shapes: B sequences of a rollout (one per prompt), T response tokens, P query tokens; b sequences of
a micro-batch.

Each update:

1. rollout (``sample_rollout``, ``rollout.rollout``): one response per prompt sampled at temperature
   0.7 (top_k 0, top_p 1) for ``response_length`` tokens, truncated after the first EOS; policy and
   reference log-probs at the sampling temperature; reward-model score at the EOS, -1 for responses
   without EOS; values of every response position from the value model;
2. rewards and advantages (``ppo_advantages``): ``-kl_coef * KL_t`` at every real token plus the
   score at the last real token (not one past it, see ``advantages``), GAE with gamma 1, lambda 0.95,
   advantages whitened over real tokens (reward whitening optional);
3. ``ppo_epochs`` passes over the batch in ``num_mini_batches`` shuffled minibatches, each one
   optimizer step over micro-batches (``ppo_minibatch_step``): clipped surrogate (0.2, optional dual
   clip) + ``vf_coef`` x clipped value loss (0.2), both token means over the minibatch's real tokens;
4. the learning rate anneals linearly to 0 over the updates;
5. metrics, samples and checkpoints of the update.

Models: policy and frozen reference from the SFT checkpoint, frozen reward model, value model a
trainable copy of the reward model (backbone and head); dropout is off in all four. Policy and
value model are one module (``PolicyAndValue``) under one AdamW.

Departures from the N+ code, on purpose: the score sits at the EOS, not one token past it (see
``advantages``); losses are token means over the whole minibatch rather than means of micro-batch
means (the same when micro-batches hold equal token counts); rollouts are padded to the batch's
longest query and response, not to fixed widths (speed, not results).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch

from ..advantages import explained_variance, gae, kl_shaped_rewards, whiten_advantages, whiten_rewards
from ..config import PPOConfig
from ..data.batching import collate_query_response
from ..importance_sampling import mismatch_stats, padded_logprobs, rollout_is_weights
from ..losses import ppo_policy_loss, value_loss
from ..modeling import apply_lora, enable_gradient_checkpointing
from ..ops import token_logprobs
from ..rollout import Rollout, finish_rollout, rollout, rollout_stats, score_batch
from ..value_model import PolicyAndValue, ValueModel
from .common import shard_if_asked
from .loop import build_optimizer
from .rl_common import (
    RLRun, add_micro_metrics, checkpoint_update_if_due, finish_rl_run, linear_anneal, log_update, accumulation_micro_batches, open_engine, open_rl_run, rl_accelerator,
    start_updates, sync_engine, update_passes, update_prompts,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def rollout_values(value_model: ValueModel, r: Rollout, device, batch_size: int) -> torch.Tensor:
    """Values (B, T) of a rollout's response positions, in no-grad chunks, on the CPU."""
    out = []
    b = r.batch
    for i in range(0, len(r), batch_size):
        out.append(value_model(b.input_ids[i : i + batch_size].to(device), b.attention_mask[i : i + batch_size].to(device), b.query_width).float().cpu())
    return torch.cat(out)


def sample_rollout(rl: RLRun, model: PolicyAndValue, score_fn, prompts: list, cfg: PPOConfig, *, engine=None, seed: int | None = None) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
    """Step 1: one response per prompt from the (unwrapped) policy, or from a rollout ``engine`` that
    samples with its own copy of the weights (vllm; requests seeded from ``seed``), scored, with
    policy and reference log-probs (B, T) recomputed by the models; the value model's values (B, T)
    of the response positions; and the engine's ``mismatch/*`` metrics (empty for the policy)."""
    queries, eos, pad = [p.query_ids for p in prompts], rl.tokenizer.eos_token_id, rl.tokenizer.pad_token_id
    extra: dict[str, float] = {}
    with rl.accelerator.autocast():
        if engine is None or engine.name == "hf":
            r = rollout(
                model.policy, rl.ref, score_fn, queries, eos_token_id=eos, pad_token_id=pad,
                response_length=cfg.response_length, temperature=cfg.temperature, no_eos_penalty=cfg.no_eos_penalty,
                batch_size=cfg.forward_batch_size,
            )
        else:
            responses, logps = engine.sample_groups(model.policy, queries, 1, eos_token_id=eos, pad_token_id=pad, max_new_tokens=cfg.response_length, temperature=cfg.temperature, seed=seed)
            batch = collate_query_response(queries, responses, pad)
            has_eos = torch.tensor([bool(x) and x[-1] == eos for x in responses])
            raw = score_batch(score_fn, batch, batch_size=cfg.forward_batch_size)
            r = finish_rollout(model.policy, rl.ref, batch, raw, has_eos, temperature=cfg.temperature, no_eos_penalty=cfg.no_eos_penalty, batch_size=cfg.forward_batch_size)
            r.sample_logprobs = padded_logprobs(logps, batch.responses.shape[1])
            extra = mismatch_stats(r.logprobs, r.sample_logprobs, r.mask, cap=cfg.tis_cap or 2.0)
        values = rollout_values(model.value, r, rl.device, cfg.forward_batch_size)
    return r, values, extra


def ppo_advantages(r: Rollout, values: torch.Tensor, cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Step 2: KL-shaped per-token rewards (score at the last real token), GAE and whitened
    advantages. Returns (advantages (B, T), returns (B, T), the rollout's objective/* and val/*
    metrics)."""
    mask = r.mask
    rewards, km = kl_shaped_rewards(r.scores, r.logprobs, r.ref_logprobs, mask, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = whiten_rewards(rewards, mask)
    advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    raw_adv_mean = (advantages[mask]).mean().item()
    advantages = whiten_advantages(advantages, mask)
    non_score = km["non_score_reward"]
    return advantages, returns, {
        "objective/kl": km["kl_sum"].mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (r.scores + non_score).mean().item(),
        "val/mean": values[mask].mean().item(),
        "val/returns_mean": returns[mask].mean().item(),
        "val/advantages_raw_mean": raw_adv_mean,
        "val/explained_variance": explained_variance(values, returns, mask).item(),
    }


def ppo_minibatch_step(
    model, r: Rollout, values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, rows: list[int], cfg: PPOConfig, accelerator
) -> dict[str, float]:
    """Step 3 on one minibatch (``rows`` of the local rollout): forward/backward in micro-batches,
    with losses normalized by the minibatch's real tokens. Does not step the optimizer. Returns the
    minibatch's metrics, token-weighted over its micro-batches."""
    device = accelerator.device
    n_tokens = int(r.mask[rows].sum())
    sums: dict[str, float] = defaultdict(float)
    for idx, sync in accumulation_micro_batches(rows, cfg.micro_batch_size, accelerator, model):
        mb = r.select(idx).to(device)
        old_values, adv, ret = values[idx].to(device), advantages[idx].to(device), returns[idx].to(device)  # (b, T) each
        with sync, accelerator.autocast():
            logits, new_values = model(mb.batch.input_ids, mb.batch.attention_mask, mb.batch.query_width)
            new_logprobs = token_logprobs(logits, mb.batch.responses, cfg.temperature)  # (b, T)
            tis = rollout_is_weights(mb.logprobs, mb.sample_logprobs, mb.mask, cap=cfg.tis_cap, level=cfg.tis_level)  # None unless vllm sampled
            pg_loss, pm = ppo_policy_loss(new_logprobs, mb.logprobs, adv, mb.mask, clip_range=cfg.clip_range, dual_clip=cfg.dual_clip or None, num_tokens=n_tokens, is_weights=tis)
            vf_loss, vm = value_loss(new_values, old_values, ret, mb.mask, clip_range=cfg.vf_clip_range, num_tokens=n_tokens)
            loss = pg_loss + cfg.vf_coef * vf_loss
            accelerator.backward(loss)
        sums["loss/policy"] += pg_loss.item()
        sums["loss/value"] += vf_loss.item()
        sums["loss/total"] += loss.item()
        add_micro_metrics(sums, "ppo", {**pm, **vm}, float(mb.mask.sum()) / max(1, n_tokens), new_logprobs, mb)
    return dict(sums)


def train(cfg: PPOConfig) -> str:
    """Run PPO; returns the path of the final policy (a Hugging Face checkpoint).

    Raises DataError for bad prompts (before any model loads), ValueError for batch sizes that do
    not divide, ModelLoadError for bad model paths, RunDirError for a finished run folder.
    """
    # set-up: sizes, prompts, run folder, models (value model = trainable copy of the reward model), optimizer, resume
    accelerator = rl_accelerator(cfg, "ppo")
    world = accelerator.num_processes
    num_updates = cfg.num_updates()
    local_batch, local_mini = cfg.local_batch_size(world), cfg.local_mini_batch_size(world)
    cfg.gradient_accumulation_steps(world)  # raises on inexact division
    plan = f"{num_updates} updates of {cfg.rollout_batch_size} prompts"
    rl = open_rl_run(cfg, "ppo", accelerator, batch=cfg.rollout_batch_size, group=1, passes=cfg.ppo_epochs, num_updates=num_updates, plan=plan)
    # without a reward model (a text reward: reward/specs.py) the value model is the SFT backbone with a fresh head near 0
    value = ValueModel.from_scalar_model(rl.reward_model) if rl.reward_model is not None else ValueModel.from_causal_lm(rl.policy)
    model = PolicyAndValue(rl.policy, value.float())
    if cfg.lora_r > 0:  # the value model's own adapters on its copy of the reward model's backbone; head trained in full
        model.value.backbone = apply_lora(model.value.backbone, r=cfg.lora_r, alpha=cfg.lora_alpha, task_type=None)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model.value)  # the policy's: open_rl_run
    # --run.fsdp: policy and value model each sharded (two FSDP roots), before the optimizer sees them
    model.policy = rl.policy = shard_if_asked(model.policy, cfg.run, accelerator)
    model.value = rl.value = shard_if_asked(model.value, cfg.run, accelerator)
    optimizer = build_optimizer(model.parameters(), cfg.optim, device_type=rl.device.type)
    scheduler = linear_anneal(optimizer, num_updates)
    steps = f"{cfg.num_mini_batches} minibatches x {cfg.ppo_epochs} epochs per update"
    start, model, optimizer, score_fn = start_updates(rl, model, optimizer, scheduler, unit="update", describe="policy + value", steps=steps)
    engine = open_engine(rl, accelerator.unwrap_model(model).policy, cfg.response_length)  # --rollout-engine

    for update in range(start, rl.total):
        t0 = time.perf_counter()
        prompts = update_prompts(rl, update)
        # 1. rollout: B = len(prompts) responses, values (B, T)
        r, values, extra = sample_rollout(rl, accelerator.unwrap_model(model), score_fn, prompts, cfg, engine=engine, seed=cfg.run.seed * 1_000_033 + update)
        t_rollout = time.perf_counter() - t0
        engine.sleep()  # CUDA sleep mode: the engine's KV cache freed for the update, woken by the next sync (a no-op for hf and on CPU)
        # 2. KL-shaped rewards, GAE: advantages and returns (B, T)
        advantages, returns, adv_stats = ppo_advantages(r, values, cfg)
        # 3. ppo_epochs passes over the rollout, one optimizer step per minibatch
        stats = update_passes(
            model, optimizer, accelerator, lambda rows: ppo_minibatch_step(model, r, values, advantages, returns, rows, cfg, accelerator),
            passes=cfg.ppo_epochs, n_rows=local_batch, mini=local_mini,
            generator=torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + update), max_grad_norm=cfg.optim.max_grad_norm, prefix="ppo",
        )
        # 4. linear learning-rate anneal, once per update
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        sync_engine(rl, engine, accelerator.unwrap_model(model).policy, update + 1, stats)  # the next rollout samples the new weights
        # 5. metrics, samples, checkpoint
        stats.update(rollout_stats(r))
        stats.update(adv_stats)
        stats.update(extra)
        log_update(rl, update + 1, r, prompts, stats, lr=lr_used, t0=t0, t_rollout=t_rollout)
        checkpoint_update_if_due(rl, update + 1, model, optimizer, scheduler)
    engine.close()
    return finish_rl_run(rl, accelerator.unwrap_model(model).policy)
