"""The loop GRPO and RLOO share: several responses per prompt, one advantage per sequence, no value
model. A stage hands ``train`` its advantage function and its loss; nothing here knows which
algorithm runs.

Shapes: B sequences of a rollout (prompts x G, rows ``[q0] * G + [q1] * G + ...``), G responses per
prompt (group size), P query tokens, T response tokens.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from typing import Callable

import torch

from ..config import GRPOConfig, ModelArgs, RLOOConfig
from ..errors import DataError
from ..losses import kl_estimate
from ..modeling import count_parameters, load_tokenizer_cached, response_logits, save_pretrained
from ..ops import token_logprobs
from ..rollout import Rollout, rollout, rollout_stats
from ..tasks import rl_prompts
from .common import make_accelerator
from .loop import RunDir, Throughput, build_optimizer, build_scheduler, load_checkpoint, peak_memory_mb, progress_bar, save_checkpoint, seed_everything, shard
from .rl_common import check_collapse, load_rl_models, model_dtype, prompt_order, reward_score_fn, sample_records

log = logging.getLogger(__name__)
_MAX_METRICS = ("ratio_max", "ratio_max_abs_dev")

GroupConfig = GRPOConfig | RLOOConfig
SampleFn = Callable[..., tuple[Rollout, dict[str, float]]]
"""``sample(policy, ref, score_fn, queries, cfg, *, eos, pad, generator) -> (rollout of B = len(queries) x G rows, metrics)``."""
AdvantageFn = Callable[[Rollout, GroupConfig], tuple[torch.Tensor, dict[str, float]]]
"""``advantages(rollout, cfg) -> ((B,) one advantage per sequence, metrics)``."""
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss(new_logprobs (b, T), micro_batch, advantages (b,), cfg, *, num_tokens, num_sequences) -> (loss, metrics)``
of one micro-batch of b sequences, normalized by the minibatch's ``num_tokens`` real tokens and
``num_sequences`` sequences."""


def group_rollout(policy, ref, score_fn, queries: list[list[int]], cfg: GroupConfig, *, eos: int, pad: int, generator: torch.Generator | None = None) -> tuple[Rollout, dict[str, float]]:
    """G responses for each query, rows ``[q0] * G + [q1] * G + ...`` (group b = rows bG .. bG + G - 1),
    sampled at ``cfg.temperature``; no extra metrics (``generator`` unused: the sampling draws from the
    global RNG)."""
    grouped = [q for q in queries for _ in range(cfg.group_size)]
    common = dict(eos_token_id=eos, pad_token_id=pad, response_length=cfg.response_length, batch_size=cfg.forward_batch_size)
    return rollout(policy, ref, score_fn, grouped, temperature=cfg.temperature, no_eos_penalty=cfg.no_eos_penalty, **common), {}


def minibatch_step(model, r: Rollout, adv: torch.Tensor, rows: list[int], cfg: GroupConfig, accelerator, *, loss_fn: LossFn, prefix: str) -> dict[str, float]:
    """Forward/backward of one minibatch in micro-batches, normalized by the minibatch's real tokens
    and sequences (exact gradient accumulation); does not step the optimizer. Metrics are named
    ``{prefix}/{name}``, weighted by each micro-batch's share of the sequences."""
    device = accelerator.device
    n_tokens, n_seqs = int(r.mask[rows].sum()), len(rows)
    chunks = [rows[i : i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]
    sums: dict[str, float] = defaultdict(float)
    for k, idx in enumerate(chunks):
        mb = r.select(idx).to(device)
        a = adv[idx].to(device)
        ctx = accelerator.no_sync(model) if k < len(chunks) - 1 else contextlib.nullcontext()
        with ctx, accelerator.autocast():
            logits = response_logits(model, mb.batch.input_ids, mb.batch.attention_mask, mb.batch.query_width)
            new_lp = token_logprobs(logits, mb.batch.responses, cfg.temperature)
            loss, m = loss_fn(new_lp, mb, a, cfg, num_tokens=n_tokens, num_sequences=n_seqs)
            accelerator.backward(loss)
        w = len(idx) / n_seqs
        sums["loss/policy"] += loss.item()
        for name, v in m.items():
            if name == "ratio_max":
                sums[f"{prefix}/ratio_max"] = max(sums[f"{prefix}/ratio_max"], v.item())
            else:
                sums[f"{prefix}/{name}"] += w * v.item()
        dev = (torch.exp(new_lp.detach() - mb.logprobs) - 1).abs()[mb.mask].max().item()
        sums[f"{prefix}/ratio_max_abs_dev"] = max(sums[f"{prefix}/ratio_max_abs_dev"], dev)
    return dict(sums)


def train(cfg: GroupConfig, name: str, *, advantages: AdvantageFn, loss: LossFn, sample: SampleFn = group_rollout) -> str:
    """Run a group RL stage called ``name`` (its metrics prefix and run label); returns the path of the
    final policy. Errors as ``grpo.train``."""
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
            r, extra = sample(accelerator.unwrap_model(model), ref, score_fn, [p.query_ids for p in batch_prompts], cfg, eos=eos, pad=pad, generator=rs_gen)
        t_rollout = time.perf_counter() - t0
        adv, adv_metrics = advantages(r, cfg)

        model.train()
        g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + update)
        n_rows = local_prompts * cfg.group_size
        totals: dict[str, float] = defaultdict(float)
        n_steps, first_dev = 0, None
        for _ in range(cfg.update_per_rollout):
            perm = torch.randperm(n_rows, generator=g).tolist()
            for s in range(0, n_rows, local_mini):
                m = minibatch_step(model, r, adv, perm[s : s + local_mini], cfg, accelerator, loss_fn=loss, prefix=prefix)
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
