"""GRPO and RLOO: critic-free policy optimization with several responses per prompt.

GRPO (Shao et al. 2024, DeepSeekMath eq. 3; the seed setup, N+ details 24-25). Each rollout:

1. G responses per prompt (8), sampled at temperature 0.7 (top_k 0, top_p 1), truncated after the
   first EOS, scored by the reward model at the EOS, -1 without EOS (``rollout``); optionally
   statistical rejection sampling (Liu et al. 2023): 64 candidates per prompt at a high
   temperature, G kept by rejection against their scores with temperature beta, log-probs of the
   kept ones at the training temperature;
2. advantages ``(r - mean_group) / std_group`` (``advantages.group_advantages``; without the std
   division = Dr. GRPO; optional global normalization afterwards), one per sequence;
3. ``update_per_rollout`` (4) passes over the rollout in shuffled minibatches (64 sequences), each
   an optimizer step over micro-batches (8): clipped surrogate (0.2) with dual clip (c = 3) for
   negative advantages, plus 0.05 x the k3 KL estimator to the reference in the loss, reduced by
   ``loss_aggregation`` ("seq-mean-token-mean") over the minibatch's sequences / tokens;
   the loss covers the tokens up to and including the truncation (EOS) token only.

RLOO (Ahmadian et al. 2024): k responses per prompt, the KL penalty in the reward
(``score - kl_coef * sum_t KL_t``), advantage = reward minus the mean reward of the other k - 1
responses, REINFORCE loss on the summed response log-prob (``losses.rloo_loss``; ratio-clipped on
passes after the first).

Both share the prompt order, rollout, reference and reward model of PPO (``rl_common``); there is
no value model. The learning rate follows the shared cosine-with-warmup schedule per optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict

import torch

from ..advantages import group_advantages, group_std, rloo_advantages, rloo_baselines, sequence_rlhf_rewards, statistical_rejection_sampling, tied_groups
from ..config import GRPOConfig, ModelArgs, RLOOConfig
from ..errors import DataError
from ..losses import grpo_loss, kl_estimate, rloo_loss
from ..modeling import count_parameters, load_tokenizer_cached, response_logits, save_pretrained
from ..ops import token_logprobs
from ..rollout import Rollout, finish_rollout, rollout, rollout_stats, sample_and_score, select_rows
from ..tasks import rl_prompts
from .common import make_accelerator
from .loop import RunDir, Throughput, build_optimizer, build_scheduler, load_checkpoint, peak_memory_mb, progress_bar, save_checkpoint, seed_everything, shard
from .rl_common import check_collapse, load_rl_models, model_dtype, prompt_order, reward_score_fn, sample_records

log = logging.getLogger(__name__)
_MAX_METRICS = ("ratio_max", "ratio_max_abs_dev")


def group_rollout(policy, ref, score_fn, queries: list[list[int]], cfg, *, eos: int, pad: int, generator: torch.Generator | None = None) -> tuple[Rollout, dict[str, float]]:
    """G responses for each query, rows ``[q0] * G + [q1] * G + ...`` (group b = rows bG .. bG + G - 1).

    With ``cfg.rejection_sampling`` (GRPO only): ``rs_candidates`` responses per query sampled at
    ``rs_temperature``, scored (no-EOS penalty applied before the rejection), G kept per query by
    ``statistical_rejection_sampling`` with ``rs_beta``; log-probs of the kept rows at
    ``cfg.temperature``. Returns the rollout and extra metrics."""
    g = cfg.group_size
    common = dict(eos_token_id=eos, pad_token_id=pad, response_length=cfg.response_length, batch_size=cfg.forward_batch_size)
    if not getattr(cfg, "rejection_sampling", False):
        grouped = [q for q in queries for _ in range(g)]
        return rollout(policy, ref, score_fn, grouped, temperature=cfg.temperature, no_eos_penalty=cfg.no_eos_penalty, **common), {}
    n = cfg.rs_candidates
    candidates = [q for q in queries for _ in range(n)]
    batch, raw, has_eos = sample_and_score(policy, score_fn, candidates, temperature=cfg.rs_temperature, **common)
    scores = torch.where(has_eos, raw, torch.full_like(raw, cfg.no_eos_penalty))
    kept = statistical_rejection_sampling(scores.view(len(queries), n), g, beta=cfg.rs_beta, generator=generator)
    rows = (kept + torch.arange(len(queries))[:, None] * n).flatten().tolist()
    sub = select_rows(batch, rows, pad)
    r = finish_rollout(policy, ref, sub, raw[rows], has_eos[rows], temperature=cfg.temperature, no_eos_penalty=cfg.no_eos_penalty, batch_size=cfg.forward_batch_size)
    return r, {"rs/candidate_score_mean": scores.mean().item(), "rs/kept_score_mean": scores[rows].mean().item()}


def sequence_advantages(r: Rollout, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sequence advantages (B,) of a grouped rollout and their metrics (GRPO: group-normalized
    scores; RLOO: leave-one-out on the KL-penalized sequence reward)."""
    g = cfg.group_size
    if isinstance(cfg, RLOOConfig):
        rewards, m = sequence_rlhf_rewards(r.scores, r.logprobs, r.ref_logprobs, r.mask, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
        grouped = rewards.view(-1, g)
        adv = rloo_advantages(grouped).flatten()
        return adv, {"objective/rlhf_reward": rewards.mean().item(), "rloo/baseline_mean": rloo_baselines(grouped).mean().item()}
    grouped = r.scores.view(-1, g)
    adv = group_advantages(grouped, scale_by_std=cfg.scale_by_std, global_normalize=cfg.global_normalize).flatten()
    # ties decided on the scores (max == min), not on a float32 std that is rounding residue for them
    return adv, {"grpo/group_score_std": group_std(grouped).mean().item(), "grpo/zero_std_groups": tied_groups(grouped).float().mean().item()}


def minibatch_step(model, r: Rollout, adv: torch.Tensor, rows: list[int], cfg, accelerator) -> dict[str, float]:
    """Forward/backward of one minibatch in micro-batches, normalized by the minibatch's real tokens
    and sequences (exact gradient accumulation); does not step the optimizer."""
    device = accelerator.device
    n_tokens, n_seqs = int(r.mask[rows].sum()), len(rows)
    chunks = [rows[i : i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]
    sums: dict[str, float] = defaultdict(float)
    prefix = "rloo" if isinstance(cfg, RLOOConfig) else "grpo"
    for k, idx in enumerate(chunks):
        mb = r.select(idx).to(device)
        a = adv[idx].to(device)
        ctx = accelerator.no_sync(model) if k < len(chunks) - 1 else contextlib.nullcontext()
        with ctx, accelerator.autocast():
            logits = response_logits(model, mb.batch.input_ids, mb.batch.attention_mask, mb.batch.query_width)
            new_lp = token_logprobs(logits, mb.batch.responses, cfg.temperature)
            if prefix == "rloo":
                loss, m = rloo_loss(new_lp, mb.logprobs, a, mb.mask, clip_range=cfg.clip_range or None, num_sequences=n_seqs)
            else:
                loss, m = grpo_loss(
                    new_lp, mb.logprobs, mb.ref_logprobs, a, mb.mask, clip_range=cfg.clip_range, dual_clip=cfg.dual_clip or None,
                    kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, aggregation=cfg.loss_aggregation, num_tokens=n_tokens, num_sequences=n_seqs,
                )
            accelerator.backward(loss)
        w = len(idx) / n_seqs
        sums["loss/policy"] += loss.item()
        for name, v in m.items():
            if name == "ratio_max":
                sums[f"{prefix}/ratio_max"] = max(sums[f"{prefix}/ratio_max"], v.item())
            elif name != "pg_loss":
                sums[f"{prefix}/{name}"] += w * v.item()
        dev = (torch.exp(new_lp.detach() - mb.logprobs) - 1).abs()[mb.mask].max().item()
        sums[f"{prefix}/ratio_max_abs_dev"] = max(sums[f"{prefix}/ratio_max_abs_dev"], dev)
    return dict(sums)


def _train(cfg: GRPOConfig | RLOOConfig, name: str) -> str:
    if not cfg.sft_path or not cfg.rm_path:
        raise DataError(f"{name.upper()} needs --sft-path (policy and reference) and --rm-path (reward model)")
    accelerator = make_accelerator(ModelArgs(path=cfg.sft_path, dtype=cfg.dtype), cfg.run)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    num_updates = cfg.num_updates()
    local_prompts, local_mini = cfg.local_prompts(world), cfg.local_mini_batch_size(world)
    if cfg.group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group baseline needs two responses), got {cfg.group_size}")
    tokenizer = load_tokenizer_cached(cfg.tokenizer or cfg.sft_path)

    prompts, truncated = rl_prompts(cfg.data, tokenizer)
    order = prompt_order(len(prompts), cfg.rollout_prompts, cfg.run.seed, num_updates)
    total = min(num_updates, cfg.run.max_steps) if cfg.run.max_steps else num_updates
    if is_main:
        log.info("%s prompts: %d (%d queries over %d tokens: cut for TL;DR, dropped for UltraFeedback); %d rollouts of %d prompts x %d (%d run now)", name.upper(), len(prompts), truncated, cfg.data.max_query_length, num_updates, cfg.rollout_prompts, cfg.group_size, total)

    run, resume_from = RunDir.open(cfg, is_main=is_main)

    seed_everything(cfg.run.seed)
    device = accelerator.device
    frozen_dtype = model_dtype(cfg.dtype)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    policy, ref, reward_model = load_rl_models(cfg.sft_path, cfg.rm_path, tokenizer, dtype=frozen_dtype, device=device)
    trainable, total_params = count_parameters(policy)
    optimizer = build_optimizer(policy.parameters(), cfg.optim, device_type=device.type)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.optimizer_steps(world))
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy, optimizer, scheduler)
        start, resume_from = state["step"], state["path"]
        run.truncate_logs(start)
        if is_main:
            log.info("resumed from %s (rollout %d)", resume_from, start)
    model, optimizer = accelerator.prepare(policy, optimizer)
    score_fn = reward_score_fn(reward_model, device, accelerator.autocast)
    if is_main:
        log.info("policy: %d / %d trainable parameters; %d optimizer steps", trainable, total_params, cfg.optimizer_steps(world))

    prefix = name
    meter = Throughput()
    bar = progress_bar(total, start, name, is_main and cfg.run.progress)
    for update in range(start, total):
        t0 = time.perf_counter()
        mine = shard(order[update], accelerator.process_index, world)
        batch_prompts = [prompts[i] for i in mine]
        rs_gen = torch.Generator().manual_seed(cfg.run.seed * 7_919 + update)
        with accelerator.autocast():
            r, extra = group_rollout(accelerator.unwrap_model(model), ref, score_fn, [p.query_ids for p in batch_prompts], cfg, eos=eos, pad=pad, generator=rs_gen)
        t_rollout = time.perf_counter() - t0
        adv, adv_metrics = sequence_advantages(r, cfg)

        model.train()
        g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + update)
        n_rows = local_prompts * cfg.group_size
        totals: dict[str, float] = defaultdict(float)
        n_steps, first_dev = 0, None
        for _ in range(cfg.update_per_rollout):
            perm = torch.randperm(n_rows, generator=g).tolist()
            for s in range(0, n_rows, local_mini):
                m = minibatch_step(model, r, adv, perm[s : s + local_mini], cfg, accelerator)
                if first_dev is None:
                    first_dev = m[f"{prefix}/ratio_max_abs_dev"]
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm) if cfg.optim.max_grad_norm > 0 else None
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                for k, v in m.items():
                    totals[k] = max(totals[k], v) if k.endswith(_MAX_METRICS) else totals[k] + v
                if grad_norm is not None:
                    totals["grad_norm"] += float(grad_norm)
                n_steps += 1
        done = update + 1
        meter.add(int(r.batch.attention_mask.sum()), len(r))
        kl = (kl_estimate(r.logprobs, r.ref_logprobs, "k1") * r.mask).sum(-1)
        stats = {k: (v if k.endswith(_MAX_METRICS) else v / n_steps) for k, v in totals.items()}
        stats.update(rollout_stats(r))
        stats.update(adv_metrics)
        stats.update(extra)
        stats.update({"objective/kl": kl.mean().item(), f"{prefix}/first_minibatch_ratio_max_abs_dev": first_dev, f"{prefix}/advantage_abs_mean": adv.abs().mean().item()})
        stats = {k: accelerator.reduce(torch.tensor(v, device=device), reduction="mean").item() for k, v in sorted(stats.items())}
        bar.update(1)
        bar.set_postfix(score=f"{stats['objective/scores']:.3f}", kl=f"{stats['objective/kl']:.3f}")
        if done % cfg.run.log_every == 0 or done == total:
            run.log_metrics({
                "step": done,
                "episodes": done * cfg.rollout_prompts * cfg.group_size,
                "epoch": done * cfg.rollout_prompts / len(prompts),
                "lr": scheduler.get_last_lr()[0],
                "perf/rollout_time_s": t_rollout,
                "perf/update_time_s": time.perf_counter() - t0,
                **stats,
                **meter.rates(),
            })
        if is_main and cfg.num_sample_posts and (done == 1 or done == total or (cfg.run.eval_every and done % cfg.run.eval_every == 0)):
            grouped_prompts = [p for p in batch_prompts for _ in range(cfg.group_size)]
            run.log_samples(sample_records(done, r, grouped_prompts, tokenizer, cfg.num_sample_posts))
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done != total:
            save_checkpoint(run, done, accelerator.unwrap_model(model), optimizer, scheduler, keep=cfg.run.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()
    run.log_metrics({"step": total, "perf/peak_memory_mb": peak_memory_mb(device), "health/collapse_signals": check_collapse(run.path, name=name.upper()) if is_main else []})
    accelerator.wait_for_everyone()
    if is_main:
        run.write_final(lambda tmp: save_pretrained(accelerator.unwrap_model(model), tokenizer, tmp), step=total, stage=name)
        log.info("%s done: %s", name.upper(), run.final_dir)
    accelerator.wait_for_everyone()
    return str(run.final_dir)


def train(cfg: GRPOConfig) -> str:
    """Run GRPO; returns the path of the final policy (a Hugging Face checkpoint).

    Raises DataError for bad prompts (before any model loads), ValueError for sizes that do not
    divide, ModelLoadError for bad model paths, RunDirError for a finished run folder.
    """
    return _train(cfg, "grpo")


def train_rloo(cfg: RLOOConfig) -> str:
    """Run RLOO; returns the path of the final policy. Errors as ``train``."""
    return _train(cfg, "rloo")
