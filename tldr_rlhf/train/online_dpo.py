"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback", Alg. 1):
DPO on pairs sampled from the current policy and labelled by a reward, against the frozen SFT
reference.

Shapes: N prompts of an update (one pair each), B = 2N sequences of its rollout (rows ``[q0, q0, q1,
q1, ...]``: pair i is rows 2i and 2i + 1), T response tokens; b pairs of a micro-batch.

Each update:

1. two responses per prompt from the current policy, sampled at temperature 0.7 (top_k 0, top_p 1),
   truncated after the first EOS, scored by the reward (``--reward``: a reward model, a built-in such
   as ``rouge-l``, a Python function or a weighted sum, ``reward/specs.py``; else the reward model
   ``--rm-path``), -1 without EOS (the EOS trick, N+ detail 23); policy and reference log-probs at
   the sampling temperature (``group_rl.group_rollout`` with G = 2);
2. each pair labelled by its scores (``label_pairs``): the higher-scored response is chosen, the
   other rejected; a tie (equal scores, for example both without EOS) carries no preference and is
   left out of the loss;
3. ``update_per_rollout`` (1) passes over the pairs in shuffled minibatches of ``mini_batch_size``
   pairs, each one optimizer step (gradient clipping, the cosine-with-warmup schedule per optimizer
   step) over micro-batches: the DPO loss (``losses.dpo_loss``, Rafailov et al. 2023 eq. 7; IPO and
   label smoothing as options) of the summed response log-probs of chosen and rejected under the
   policy and the frozen reference, averaged over the minibatch's untied pairs (``pair_loss``: exact
   gradient accumulation);
4. metrics, samples and checkpoints of the update (``rl_common``: the run folder, resume, progress
   bar and report conventions of PPO, GRPO and RLOO).

Decided here: the DPO log-probs are those of the tempered policy (logits / temperature), as every
RL stage of this package computes them (N+ detail 21), so the rollout's reference log-probs serve the
loss unchanged and, before the first optimizer step, policy and reference agree: the first
minibatch's loss is exactly ``log 2`` (DPO, no label smoothing). The reference is the SFT checkpoint
(Guo et al.'s ``pi_ref = pi_SFT``), held frozen as a second model like PPO's.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch

from ..config import OnlineDPOConfig
from ..losses import dpo_loss, kl_estimate
from ..modeling import response_logits
from ..ops import token_logprobs
from ..rollout import Rollout, rollout_stats
from .group_rl import group_rollout
from .rl_common import add_micro_metrics, checkpoint_update_if_due, finish_rl_run, log_update, accumulation_micro_batches, open_engine, open_rl_run, rl_accelerator, start_policy_updates, sync_engine, update_passes, update_prompts

log = logging.getLogger(__name__)
NAME = "online-dpo"
PREFIX = "online_dpo"


def label_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2: chosen and rejected rows of each pair from the scores (2N,) of a rollout with rows
    ``[q0, q0, q1, q1, ...]``: pair i is rows 2i and 2i + 1, the higher score chosen. Returns (chosen
    rows (N,), rejected rows (N,), tied (N,) bool: equal scores, no preference; its rows are then
    2i chosen, 2i + 1 rejected). Raises ValueError for an odd number of scores."""
    if scores.dim() != 1 or scores.shape[0] % 2:
        raise ValueError(f"label_pairs needs scores of shape (2N,), got {tuple(scores.shape)}")
    s = scores.view(-1, 2)  # (N, 2)
    second = s[:, 1] > s[:, 0]  # (N,) the second response wins
    base = torch.arange(s.shape[0]) * 2
    return base + second.long(), base + (~second).long(), s[:, 0] == s[:, 1]


def pair_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, keep: torch.Tensor, *, num_pairs: int, beta: float,
    label_smoothing: float = 0.0, loss_type: str = "sigmoid", lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 3 on one micro-batch of b pairs: the DPO loss (``losses.dpo_loss``: ``-log sigmoid(beta
    ((pi_c - ref_c) - (pi_r - ref_r)))`` with label smoothing, or IPO) of the kept pairs, summed and
    divided by ``num_pairs``, the kept pairs of the whole minibatch (exact gradient accumulation).

    Shapes: policy_logps, ref_logps (2b,) summed response log-probs in nats, rows [0, b) chosen and
    [b, 2b) rejected; keep (b,) bool (False: a tied pair, left out); lengths (2b,) response tokens
    (IPO's per-token form; None = summed). Returns (loss (), the kept pairs' ``dpo_loss`` metrics; {}
    when none is kept, with a loss of 0 that still has a gradient graph)."""
    b = keep.shape[0]
    if not bool(keep.any()):
        return policy_logps.sum() * 0.0, {}
    pc, pr, rc, rr = policy_logps[:b][keep], policy_logps[b:][keep], ref_logps[:b][keep], ref_logps[b:][keep]
    lc, lr = (lengths[:b][keep], lengths[b:][keep]) if lengths is not None else (None, None)
    mean, m = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    return mean * (int(keep.sum()) / max(1, num_pairs)), m


def minibatch_step(model, r: Rollout, chosen: torch.Tensor, rejected: torch.Tensor, tied: torch.Tensor, pairs: list[int], cfg: OnlineDPOConfig, accelerator) -> dict[str, float] | None:
    """Step 3 on one minibatch (``pairs``, local pair indices): forward/backward in micro-batches of
    ``micro_batch_size`` pairs (2x sequences: chosen rows then rejected rows), log-probs at the
    sampling temperature summed over each response's real tokens; does not step the optimizer.
    Returns its metrics (``loss/policy``, ``online_dpo/...`` weighted by each micro-batch's share of
    the kept pairs, and the ratio deviation from the rollout's log-probs), or None when no process
    has an untied pair in it: no preference, so no forward, no gradient and no optimizer step
    (``rl_common.update_passes``), where AdamW would still move the weights (decay, momentum)."""
    device = accelerator.device
    n_pairs = int((~tied[pairs]).sum())
    if accelerator.reduce(torch.tensor(n_pairs, device=device), reduction="sum").item() == 0:  # every process agrees
        return None
    sums: dict[str, float] = defaultdict(float)
    for idx, sync in accumulation_micro_batches(pairs, cfg.micro_batch_size, accelerator, model):
        mb = r.select(chosen[idx].tolist() + rejected[idx].tolist()).to(device)  # 2b rows: chosen then rejected
        keep = ~tied[idx].to(device)  # (b,)
        with sync, accelerator.autocast():
            logits = response_logits(model, mb.batch.input_ids, mb.batch.attention_mask, mb.batch.query_width)
            new_lp = token_logprobs(logits, mb.batch.responses, cfg.temperature)  # (2b, T)
            mask = mb.mask
            policy_logps = torch.where(mask, new_lp, 0.0).sum(-1)  # (2b,)
            ref_logps = torch.where(mask, mb.ref_logprobs, 0.0).sum(-1)
            lengths = mask.sum(-1).float() if cfg.loss_type == "ipo" else None
            loss, m = pair_loss(policy_logps, ref_logps, keep, num_pairs=n_pairs, beta=cfg.beta, label_smoothing=cfg.label_smoothing, loss_type=cfg.loss_type, lengths=lengths)
            accelerator.backward(loss)
        sums["loss/policy"] += loss.item()
        add_micro_metrics(sums, PREFIX, m, int(keep.sum()) / max(1, n_pairs), new_lp, mb)
    return dict(sums)


def train(cfg: OnlineDPOConfig) -> str:
    """Run online DPO; returns the path of the final policy (a Hugging Face checkpoint).

    Raises DataError for bad prompts or a missing reward (before any model loads), ValueError for
    sizes that do not divide, ConfigError for a bad ``--reward``, ModelLoadError for bad model paths,
    RunDirError for a finished run folder.
    """
    # set-up: sizes, prompts, run folder, models and reward, optimizer and schedule, resume
    accelerator = rl_accelerator(cfg, NAME)
    world = accelerator.num_processes
    num_updates = cfg.num_updates()
    local_prompts, local_mini = cfg.local_prompts(world), cfg.local_mini_batch_size(world)
    plan = f"{num_updates} updates of {cfg.rollout_prompts} prompts x 2 responses"
    rl = open_rl_run(cfg, NAME, accelerator, batch=cfg.rollout_prompts, group=2, passes=cfg.update_per_rollout, num_updates=num_updates, plan=plan)
    start, model, optimizer, scheduler, score_fn = start_policy_updates(rl, world, unit="update")
    eos, pad = rl.tokenizer.eos_token_id, rl.tokenizer.pad_token_id
    engine = open_engine(rl, accelerator.unwrap_model(model), cfg.response_length)  # --rollout-engine

    for update in range(start, rl.total):
        t0 = time.perf_counter()
        prompts = update_prompts(rl, update)
        # 1. two responses per prompt: B = 2N rows [q0, q0, q1, q1, ...], scored, log-probs of policy and reference
        with accelerator.autocast():
            r, extra = group_rollout(accelerator.unwrap_model(model), rl.ref, score_fn, [p.query_ids for p in prompts], cfg, eos=eos, pad=pad, engine=engine, seed=cfg.run.seed * 1_000_033 + update)
        t_rollout = time.perf_counter() - t0
        engine.sleep()  # CUDA sleep mode: the engine's KV cache freed for the update, woken by the next sync (a no-op for hf and on CPU)
        # 2. label each pair by its scores (ties left out)
        chosen, rejected, tied = label_pairs(r.scores)
        # 3. passes over the pairs, one optimizer step per minibatch
        stats = update_passes(
            model, optimizer, accelerator, lambda pairs: minibatch_step(model, r, chosen, rejected, tied, pairs, cfg, accelerator),
            passes=cfg.update_per_rollout, n_rows=local_prompts, mini=local_mini,
            generator=torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + update), max_grad_norm=cfg.optim.max_grad_norm, prefix=PREFIX, scheduler=scheduler,
        )
        sync_engine(rl, engine, accelerator.unwrap_model(model), update + 1, stats)
        # 4. metrics, samples, checkpoint
        kl = (kl_estimate(r.logprobs, r.ref_logprobs, "k1") * r.mask).sum(-1)  # (B,) nats per response
        untied = ~tied
        stats.update({k: v for k, v in extra.items() if k.startswith("mismatch/")})  # --rollout-engine vllm: sampler vs policy log-probs
        margin = (r.scores[chosen] - r.scores[rejected])[untied]
        stats.update(rollout_stats(r))
        stats.update({
            "objective/kl": kl.mean().item(),
            f"{PREFIX}/tied_pairs": tied.float().mean().item(),
            f"{PREFIX}/score_margin": margin.mean().item() if len(margin) else 0.0,
            f"{PREFIX}/chosen_length": r.lengths[chosen].float().mean().item(),
            f"{PREFIX}/rejected_length": r.lengths[rejected].float().mean().item(),
        })
        log_update(rl, update + 1, r, prompts, stats, lr=scheduler.get_last_lr()[0], t0=t0, t_rollout=t_rollout)
        checkpoint_update_if_due(rl, update + 1, model, optimizer, scheduler)
    engine.close()
    return finish_rl_run(rl, accelerator.unwrap_model(model))
