"""The loop GRPO and RLOO share: several responses per prompt, one advantage per sequence, no value
model. A stage hands ``train`` its rollout, its advantage function and its loss; nothing here knows
which algorithm runs.

Shapes: B sequences of a rollout (prompts x G, rows ``[q0] * G + [q1] * G + ...``), G responses per
prompt (group size), P query tokens, T response tokens; b sequences of a micro-batch.

Each rollout:

1. ``sample``: G responses per prompt and their scores, policy and reference log-probs (B, T);
2. ``advantages``: one advantage per sequence, (B,);
3. ``update_per_rollout`` passes over the rollout in shuffled minibatches of ``mini_batch_size``
   sequences, each one optimizer step (gradient clipping, the cosine-with-warmup schedule stepped per
   optimizer step) over micro-batches whose ``loss`` is normalized by the minibatch's real tokens and
   sequences (exact gradient accumulation);
4. metrics (``{name}/...`` for the loss's, ``objective/kl`` the k1 KL to the reference summed over
   each response), samples and checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Callable

import torch

from ..config import GRPOConfig, RLOOConfig
from ..losses import kl_estimate
from ..modeling import response_logits
from ..ops import token_logprobs
from ..rollout import Rollout, rollout, rollout_stats
from .loop import build_optimizer, build_scheduler
from .rl_common import add_micro_metrics, checkpoint_if_due, finish_rl_run, log_update, micro_batches, open_rl_run, rl_accelerator, start_updates, update_passes, update_prompts

log = logging.getLogger(__name__)

GroupConfig = GRPOConfig | RLOOConfig
SampleFn = Callable[..., tuple[Rollout, dict[str, float]]]
"""``sample(policy, ref, score_fn, queries, cfg, *, eos, pad, generator) -> (rollout of B = len(queries) x G rows, metrics)``."""
AdvantageFn = Callable[[Rollout, GroupConfig], tuple[torch.Tensor, dict[str, float]]]
"""``advantages(rollout, cfg) -> ((B,) one advantage per sequence, metrics)``."""
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss(new_logprobs (b, T), micro_batch, advantages (b,), cfg, *, num_tokens, num_sequences) -> (loss, metrics)``
of one micro-batch, normalized by the minibatch's ``num_tokens`` real tokens and ``num_sequences``
sequences."""


def group_rollout(policy, ref, score_fn, queries: list[list[int]], cfg: GroupConfig, *, eos: int, pad: int, generator: torch.Generator | None = None) -> tuple[Rollout, dict[str, float]]:
    """Step 1 without extras: G responses for each query, rows ``[q0] * G + [q1] * G + ...`` (group
    b = rows bG .. bG + G - 1), sampled at ``cfg.temperature``; no extra metrics (``generator`` is
    unused: sampling draws from the global RNG)."""
    grouped = [q for q in queries for _ in range(cfg.group_size)]
    common = dict(eos_token_id=eos, pad_token_id=pad, response_length=cfg.response_length, batch_size=cfg.forward_batch_size)
    return rollout(policy, ref, score_fn, grouped, temperature=cfg.temperature, no_eos_penalty=cfg.no_eos_penalty, **common), {}


def minibatch_step(model, r: Rollout, adv: torch.Tensor, rows: list[int], cfg: GroupConfig, accelerator, *, loss_fn: LossFn, prefix: str) -> dict[str, float]:
    """Step 3 on one minibatch (``rows`` of the local rollout): forward/backward in micro-batches, the
    loss normalized by the minibatch's real tokens and sequences (exact gradient accumulation); does
    not step the optimizer. Returns its metrics (``loss/policy``, ``{prefix}/...`` weighted by each
    micro-batch's share of the sequences)."""
    device = accelerator.device
    n_tokens, n_seqs = int(r.mask[rows].sum()), len(rows)
    sums: dict[str, float] = defaultdict(float)
    for idx, sync in micro_batches(rows, cfg.micro_batch_size, accelerator, model):
        mb = r.select(idx).to(device)
        a = adv[idx].to(device)  # (b,)
        with sync, accelerator.autocast():
            logits = response_logits(model, mb.batch.input_ids, mb.batch.attention_mask, mb.batch.query_width)
            new_lp = token_logprobs(logits, mb.batch.responses, cfg.temperature)  # (b, T)
            loss, m = loss_fn(new_lp, mb, a, cfg, num_tokens=n_tokens, num_sequences=n_seqs)
            accelerator.backward(loss)
        sums["loss/policy"] += loss.item()
        add_micro_metrics(sums, prefix, m, len(idx) / n_seqs, new_lp, mb)
    return dict(sums)


def train(cfg: GroupConfig, name: str, *, advantages: AdvantageFn, loss: LossFn, sample: SampleFn = group_rollout) -> str:
    """Run a group RL stage called ``name`` (its metrics prefix, run label and log name) with the
    stage's ``sample`` (step 1), ``advantages`` (step 2) and micro-batch ``loss`` (step 3); returns
    the path of the final policy (a Hugging Face checkpoint).

    Raises DataError for bad prompts (before any model loads), ValueError for sizes that do not
    divide or a group under 2, ModelLoadError for bad model paths, RunDirError for a finished run
    folder.
    """
    # set-up: sizes, prompts, run folder, models, optimizer and schedule, resume
    accelerator = rl_accelerator(cfg, name)
    world = accelerator.num_processes
    num_updates = cfg.num_updates()
    local_prompts, local_mini = cfg.local_prompts(world), cfg.local_mini_batch_size(world)
    if cfg.group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group baseline needs two responses), got {cfg.group_size}")
    plan = f"{num_updates} rollouts of {cfg.rollout_prompts} prompts x {cfg.group_size}"
    rl = open_rl_run(cfg, name, accelerator, batch=cfg.rollout_prompts, group=cfg.group_size, num_updates=num_updates, plan=plan)
    optimizer = build_optimizer(rl.policy.parameters(), cfg.optim, device_type=rl.device.type)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.optimizer_steps(world))
    steps = f"{cfg.optimizer_steps(world)} optimizer steps"
    start, model, optimizer, score_fn = start_updates(rl, rl.policy, optimizer, scheduler, unit="rollout", describe="policy", steps=steps)
    eos, pad = rl.tokenizer.eos_token_id, rl.tokenizer.pad_token_id

    for update in range(start, rl.total):
        t0 = time.perf_counter()
        prompts = update_prompts(rl, update)
        # 1. G responses per prompt: B = len(prompts) x G rows, [q0] * G + [q1] * G + ...
        rs_gen = torch.Generator().manual_seed(cfg.run.seed * 7_919 + update)
        with accelerator.autocast():
            r, extra = sample(accelerator.unwrap_model(model), rl.ref, score_fn, [p.query_ids for p in prompts], cfg, eos=eos, pad=pad, generator=rs_gen)
        t_rollout = time.perf_counter() - t0
        # 2. one advantage per sequence, (B,)
        adv, adv_metrics = advantages(r, cfg)
        # 3. passes over the rollout, one optimizer step per minibatch
        stats = update_passes(
            model, optimizer, accelerator, lambda rows: minibatch_step(model, r, adv, rows, cfg, accelerator, loss_fn=loss, prefix=name),
            passes=cfg.update_per_rollout, n_rows=local_prompts * cfg.group_size, mini=local_mini,
            generator=torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + update), max_grad_norm=cfg.optim.max_grad_norm, prefix=name, scheduler=scheduler,
        )
        # 4. metrics, samples, checkpoint
        kl = (kl_estimate(r.logprobs, r.ref_logprobs, "k1") * r.mask).sum(-1)  # (B, T) -> (B,) nats per response
        stats.update(rollout_stats(r))
        stats.update(adv_metrics)
        stats.update(extra)
        stats.update({"objective/kl": kl.mean().item(), f"{name}/advantage_abs_mean": adv.abs().mean().item()})
        log_update(rl, update + 1, r, prompts, stats, lr=scheduler.get_last_lr()[0], t0=t0, t_rollout=t_rollout)
        checkpoint_if_due(rl, update + 1, model, optimizer, scheduler)
    return finish_rl_run(rl, accelerator.unwrap_model(model))
