"""PPO against a learned reward model (Stiennon et al. 2020 sec. 3.4, eq. 2; Schulman et al. 2017;
N+ section 5, details 7, 16-23).

Each update:

1. rollout (``rollout.rollout``): one response per prompt sampled at temperature 0.7 (top_k 0,
   top_p 1) for ``response_length`` tokens, truncated after the first EOS; policy and reference
   log-probs at the sampling temperature; reward-model score at the EOS, -1 for responses without
   EOS; values of every response position from the value model;
2. rewards and advantages (``advantages``): ``-kl_coef * KL_t`` at every real token plus the score
   at the last real token (not one past it, see ``advantages``), GAE with gamma 1, lambda 0.95,
   advantages whitened over real tokens (reward whitening optional);
3. ``ppo_epochs`` passes over the batch in ``num_mini_batches`` shuffled minibatches, each one
   optimizer step over micro-batches: clipped surrogate (0.2, optional dual clip) + ``vf_coef`` x
   clipped value loss (0.2), both token means over the minibatch's real tokens;
4. the learning rate anneals linearly to 0 over the updates.

Models: policy and frozen reference from the SFT checkpoint, frozen reward model, value model a
trainable copy of the reward model (backbone and head); dropout is off in all four. Policy and
value model are one module (``PolicyAndValue``) under one AdamW.

Departures from the N+ code, on purpose: the score sits at the EOS, not one token past it (see
``advantages``); losses are token means over the whole minibatch rather than means of micro-batch
means (the same when micro-batches hold equal token counts); rollouts are padded to the batch's
longest query and response, not to fixed widths (speed, not results).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict

import torch

from ..advantages import explained_variance, gae, kl_shaped_rewards, whiten_advantages, whiten_rewards
from ..config import PPOConfig
from ..errors import DataError
from ..losses import ppo_policy_loss, value_loss
from ..modeling import count_parameters, load_tokenizer_cached, save_pretrained
from ..ops import token_logprobs
from ..rollout import Rollout, rollout, rollout_stats
from ..tasks import rl_prompts
from ..value_model import PolicyAndValue, ValueModel
from .common import make_accelerator
from .loop import RunDir, Throughput, build_optimizer, load_checkpoint, peak_memory_mb, progress_bar, save_checkpoint, seed_everything, shard
from .rl_common import check_collapse, linear_anneal, load_rl_models, model_dtype, prompt_order, reward_score_fn, sample_records

log = logging.getLogger(__name__)


@torch.no_grad()
def rollout_values(value_model: ValueModel, r: Rollout, device, batch_size: int) -> torch.Tensor:
    """Values (B, T) of a rollout's response positions, in no-grad chunks, on the CPU."""
    out = []
    b = r.batch
    for i in range(0, len(r), batch_size):
        out.append(value_model(b.input_ids[i : i + batch_size].to(device), b.attention_mask[i : i + batch_size].to(device), b.query_width).float().cpu())
    return torch.cat(out)


def ppo_minibatch_step(
    model, r: Rollout, values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, rows: list[int], cfg: PPOConfig, accelerator
) -> dict[str, float]:
    """Forward/backward of one minibatch (``rows`` of the local rollout) in micro-batches, with
    losses normalized by the minibatch's real tokens. Does not step the optimizer. Returns the
    minibatch's metrics, token-weighted over its micro-batches."""
    device = accelerator.device
    n_tokens = int(r.mask[rows].sum())
    chunks = [rows[i : i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]
    sums: dict[str, float] = defaultdict(float)
    for k, idx in enumerate(chunks):
        mb = r.select(idx).to(device)
        old_values, adv, ret = values[idx].to(device), advantages[idx].to(device), returns[idx].to(device)
        sync = k == len(chunks) - 1
        ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
        with ctx, accelerator.autocast():
            logits, new_values = model(mb.batch.input_ids, mb.batch.attention_mask, mb.batch.query_width)
            new_logprobs = token_logprobs(logits, mb.batch.responses, cfg.temperature)
            pg_loss, pm = ppo_policy_loss(new_logprobs, mb.logprobs, adv, mb.mask, clip_range=cfg.clip_range, dual_clip=cfg.dual_clip or None, num_tokens=n_tokens)
            vf_loss, vm = value_loss(new_values, old_values, ret, mb.mask, clip_range=cfg.vf_clip_range, num_tokens=n_tokens)
            loss = pg_loss + cfg.vf_coef * vf_loss
            accelerator.backward(loss)
        w = float(mb.mask.sum()) / max(1, n_tokens)
        sums["loss/policy"] += pg_loss.item()
        sums["loss/value"] += vf_loss.item()
        sums["loss/total"] += loss.item()
        for name, v in {**pm, **vm}.items():
            if name == "ratio_max":
                sums["ppo/ratio_max"] = max(sums["ppo/ratio_max"], v.item())
            else:
                sums[f"ppo/{name}"] += w * v.item()
        ratio_dev = (torch.exp(new_logprobs.detach() - mb.logprobs) - 1).abs()[mb.mask].max().item()
        sums["ppo/ratio_max_abs_dev"] = max(sums["ppo/ratio_max_abs_dev"], ratio_dev)
    return dict(sums)


def train(cfg: PPOConfig) -> str:
    """Run PPO; returns the path of the final policy (a Hugging Face checkpoint).

    Raises DataError for bad prompts (before any model loads), ValueError for batch sizes that do
    not divide, ModelLoadError for bad model paths, RunDirError for a finished run folder.
    """
    if not cfg.sft_path or not cfg.rm_path:
        raise DataError("PPO needs --sft-path (policy and reference) and --rm-path (reward model)")
    accelerator = make_accelerator_for(cfg)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    num_updates = cfg.num_updates()
    local_batch, local_mini = cfg.local_batch_size(world), cfg.local_mini_batch_size(world)
    cfg.gradient_accumulation_steps(world)  # raises on inexact division
    tokenizer = load_tokenizer_cached(cfg.tokenizer or cfg.sft_path)

    prompts, truncated = rl_prompts(cfg.data, tokenizer)
    order = prompt_order(len(prompts), cfg.rollout_batch_size, cfg.run.seed, num_updates)
    total = min(num_updates, cfg.run.max_steps) if cfg.run.max_steps else num_updates
    if is_main:
        log.info("PPO prompts: %d (%d queries over %d tokens: cut for TL;DR, dropped for UltraFeedback); %d updates of %d prompts (%d run now)", len(prompts), truncated, cfg.data.max_query_length, num_updates, cfg.rollout_batch_size, total)

    run, resume_from = RunDir.open(cfg, is_main=is_main)

    seed_everything(cfg.run.seed)
    device = accelerator.device
    frozen_dtype = model_dtype(cfg.dtype)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    policy, ref, reward_model = load_rl_models(cfg.sft_path, cfg.rm_path, tokenizer, dtype=frozen_dtype, device=device)
    value = ValueModel.from_scalar_model(reward_model).float()
    model = PolicyAndValue(policy, value)
    trainable, total_params = count_parameters(model)
    optimizer = build_optimizer(model.parameters(), cfg.optim, device_type=device.type)
    scheduler = linear_anneal(optimizer, num_updates)
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        start, resume_from = state["step"], state["path"]
        run.truncate_logs(start)
        if is_main:
            log.info("resumed from %s (update %d)", resume_from, start)
    model, optimizer = accelerator.prepare(model, optimizer)
    score_fn = reward_score_fn(reward_model, device, accelerator.autocast)
    if is_main:
        log.info("policy + value: %d / %d trainable parameters; %d minibatches x %d epochs per update", trainable, total_params, cfg.num_mini_batches, cfg.ppo_epochs)

    meter = Throughput()
    bar = progress_bar(total, start, "ppo", is_main and cfg.run.progress)
    for update in range(start, total):
        t0 = time.perf_counter()
        mine = shard(order[update], accelerator.process_index, world)
        batch_prompts = [prompts[i] for i in mine]
        unwrapped = accelerator.unwrap_model(model)
        with accelerator.autocast():
            r = rollout(
                unwrapped.policy, ref, score_fn, [p.query_ids for p in batch_prompts], eos_token_id=eos, pad_token_id=pad,
                response_length=cfg.response_length, temperature=cfg.temperature, no_eos_penalty=cfg.no_eos_penalty,
                batch_size=cfg.forward_batch_size,
            )
            values = rollout_values(unwrapped.value, r, device, cfg.forward_batch_size)
        t_rollout = time.perf_counter() - t0
        mask = r.mask
        rewards, km = kl_shaped_rewards(r.scores, r.logprobs, r.ref_logprobs, mask, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = whiten_rewards(rewards, mask)
        advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        raw_adv_mean = (advantages[mask]).mean().item()
        advantages = whiten_advantages(advantages, mask)

        model.train()
        g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + update)
        totals: dict[str, float] = defaultdict(float)
        n_steps = 0
        first_dev = None
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(local_batch, generator=g).tolist()
            for start_mb in range(0, local_batch, local_mini):
                rows = perm[start_mb : start_mb + local_mini]
                m = ppo_minibatch_step(model, r, values, advantages, returns, rows, cfg, accelerator)
                if first_dev is None:
                    first_dev = m["ppo/ratio_max_abs_dev"]
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm) if cfg.optim.max_grad_norm > 0 else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for k, v in m.items():
                    totals[k] = max(totals[k], v) if k in ("ppo/ratio_max", "ppo/ratio_max_abs_dev") else totals[k] + v
                if grad_norm is not None:
                    totals["grad_norm"] += float(grad_norm)
                n_steps += 1
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        done = update + 1
        meter.add(int(r.batch.attention_mask.sum()), len(r))

        stats = {k: (v if k in ("ppo/ratio_max", "ppo/ratio_max_abs_dev") else v / n_steps) for k, v in totals.items()}
        non_score = km["non_score_reward"]
        stats.update(rollout_stats(r))
        stats.update({
            "objective/kl": km["kl_sum"].mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (r.scores + non_score).mean().item(),
            "ppo/first_minibatch_ratio_max_abs_dev": first_dev,
            "val/mean": values[mask].mean().item(),
            "val/returns_mean": returns[mask].mean().item(),
            "val/advantages_raw_mean": raw_adv_mean,
            "val/explained_variance": explained_variance(values, returns, mask).item(),
        })
        stats = {k: accelerator.reduce(torch.tensor(v, device=device), reduction="mean").item() for k, v in sorted(stats.items())}
        bar.update(1)
        bar.set_postfix(score=f"{stats['objective/scores']:.3f}", kl=f"{stats['objective/kl']:.3f}")
        if done % cfg.run.log_every == 0 or done == total:
            run.log_metrics({
                "step": done,
                "episodes": done * cfg.rollout_batch_size,
                "epoch": done * cfg.rollout_batch_size / len(prompts),
                "lr": lr_used,
                "perf/rollout_time_s": t_rollout,
                "perf/update_time_s": time.perf_counter() - t0,
                **stats,
                **meter.rates(),
            })
        if is_main and cfg.num_sample_posts and (done == 1 or done == total or (cfg.run.eval_every and done % cfg.run.eval_every == 0)):
            run.log_samples(sample_records(done, r, batch_prompts, tokenizer, cfg.num_sample_posts))
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done != total:
            save_checkpoint(run, done, accelerator.unwrap_model(model), optimizer, scheduler, keep=cfg.run.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()
    run.log_metrics({"step": total, "perf/peak_memory_mb": peak_memory_mb(device), "health/collapse_signals": check_collapse(run.path, name="PPO") if is_main else []})
    accelerator.wait_for_everyone()
    if is_main:
        run.write_final(lambda tmp: save_pretrained(accelerator.unwrap_model(model).policy, tokenizer, tmp), step=total, stage="ppo")
        log.info("PPO done: %s", run.final_dir)
    accelerator.wait_for_everyone()
    return str(run.final_dir)


def make_accelerator_for(cfg: PPOConfig):
    """``make_accelerator`` with this stage's dtype and run arguments."""
    from ..config import ModelArgs

    return make_accelerator(ModelArgs(path=cfg.sft_path, dtype=cfg.dtype), cfg.run)
