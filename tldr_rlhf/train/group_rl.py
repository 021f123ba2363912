"""The loop GRPO, RLOO and REINFORCE++ share: several responses per prompt, no value model. A stage hands ``train`` its rollout, its advantage function and its loss; nothing here knows
which algorithm runs.

Shapes: B sequences of a rollout (prompts x G, rows ``[q0] * G + [q1] * G + ...``), G responses per
prompt (group size), P query tokens, T response tokens; b sequences of a micro-batch.

Each rollout:

1. ``sample``: G responses per prompt and their scores, policy and reference log-probs (B, T);
2. ``advantages``: one per response token (B, T), 0 on padding, from every algorithm (a sequence-level
   estimator's broadcast over the response: ``advantages.broadcast_over_response``);
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
from typing import Callable, Literal, Protocol

import torch

from ..config import OptimArgs, RunArgs
from ..losses import kl_estimate
from ..data.batching import QueryResponseBatch, collate_query_response
from ..importance_sampling import mismatch_stats, padded_logprobs
from ..lm_head import grouped_response_logits
from ..ops import entropy_from_logits, token_logprobs
from ..rollout import Rollout, apply_no_eos_penalty, rollout, rollout_stats, score_batch
from ..rollout_engine import HFEngine
from .rl_common import add_micro_metrics, checkpoint_update_if_due, finish_rl_run, log_update, accumulation_micro_batches, open_engine, open_rl_run, rl_accelerator, start_policy_updates, sync_engine, update_passes, update_prompts

log = logging.getLogger(__name__)



class GroupRolloutConfig(Protocol):
    """The fields of a stage config that the group rollout (step 1: ``group_rollout`` and its
    shared-prompt path) reads, declared: the group stages' configs have every one, and online DPO's
    (``config.OnlineDPOConfig``: G = 2, ``shared_prompt`` always off) samples its pairs with it."""

    group_size: int
    temperature: float
    response_length: int
    forward_batch_size: int
    no_eos_penalty: float | None
    shared_prompt: bool
    tis_cap: float


class GroupConfig(GroupRolloutConfig, Protocol):
    """The fields of a stage config that this loop reads, declared (``config.GRPOConfig``,
    ``RLOOConfig`` and ``ReinforcePPConfig`` have every one): a new group algorithm's config is
    checked against this list, not against defaults hidden in ``getattr`` calls."""

    micro_batch_size: int
    rollout_prompts: int
    update_per_rollout: int
    rollout_engine: Literal["hf", "vllm"]
    tis_level: Literal["token", "sequence"]
    optim: OptimArgs
    run: RunArgs

    def num_updates(self) -> int: ...

    def local_prompts(self, world_size: int = 1) -> int: ...

    def local_mini_batch_size(self, world_size: int = 1) -> int: ...

SampleFn = Callable[..., tuple[Rollout, dict[str, float]]]
"""``sample(policy, ref, score_fn, queries, cfg, *, eos, pad, generator, engine, seed, policy_logprobs) -> (rollout of B = len(queries) x G rows, metrics)``;
without ``policy_logprobs`` the rollout's ``logprobs`` and ``entropy`` are None (the update fills them)."""
AdvantageFn = Callable[[Rollout, GroupConfig], tuple[torch.Tensor, dict[str, float]]]
"""``advantages(rollout, cfg) -> ((B, T) one advantage per response token, 0 on padding, metrics)``."""
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss(new_logprobs (b, T), micro_batch, advantages (b, T), cfg, *, num_tokens, num_sequences) -> (loss, metrics)``
of one micro-batch, normalized by the minibatch's ``num_tokens`` real tokens and ``num_sequences``
sequences."""


def group_rollout(policy, ref, score_fn, queries: list[list[int]], cfg: GroupRolloutConfig, *, eos: int, pad: int, generator: torch.Generator | None = None, engine=None, seed: int | None = None, policy_logprobs: bool = True) -> tuple[Rollout, dict[str, float]]:
    """Step 1 without extras: G responses for each query, rows ``[q0] * G + [q1] * G + ...`` (group
    b = rows bG .. bG + G - 1), sampled at ``cfg.temperature``. With ``cfg.shared_prompt`` each
    prompt is computed once per group in every pass (``shared_group_rollout``) and the metrics
    give the split of the time (``perf/generation_time_s``, ``perf/scoring_time_s``); without it,
    ``rollout.rollout`` over the repeated queries and no extra metrics. ``generator`` is unused. A
    rollout ``engine`` other than hf (``rollout_engine``) samples instead of the policy, with requests
    seeded from ``seed``, always on the shared path; the hf engine draws from the global RNG. Without
    ``policy_logprobs`` the policy's scoring pass is skipped (``update_fills_logprobs``)."""
    if cfg.shared_prompt or samples_elsewhere(engine):
        return shared_group_rollout(policy, ref, score_fn, queries, cfg, eos=eos, pad=pad, engine=engine, seed=seed, policy_logprobs=policy_logprobs)
    grouped = [q for q in queries for _ in range(cfg.group_size)]
    common = dict(eos_token_id=eos, pad_token_id=pad, response_length=cfg.response_length, batch_size=cfg.forward_batch_size)
    return rollout(policy, ref, score_fn, grouped, temperature=cfg.temperature, no_eos_penalty=cfg.no_eos_penalty, policy_logprobs=policy_logprobs, **common), {}


def samples_elsewhere(engine) -> bool:
    """Whether ``engine`` samples with weights of its own (vllm), not the policy itself (None, hf)."""
    return engine is not None and engine.name != "hf"


def shared_group_rollout(policy, ref, score_fn, queries: list[list[int]], cfg: GroupRolloutConfig, *, eos: int, pad: int, engine=None, seed: int | None = None, policy_logprobs: bool = True) -> tuple[Rollout, dict[str, float]]:
    """``group_rollout`` with each prompt computed once per group: sampling
    (``generation.generate_groups``: one prefill per prompt, its cache expanded to the G rows), the
    reward model (``score_groups``) and the policy and reference log-probs (``group_logprobs``).
    Returns the rollout (rows ``[q0] * G + [q1] * G + ...``; responses truncated after the first
    EOS, the no-EOS penalty applied, N+ details 19, 23) and ``perf/generation_time_s`` /
    ``perf/scoring_time_s`` (seconds). With an ``engine`` that samples elsewhere (vllm) the rollout
    also keeps its sampling log-probs (``sample_logprobs``, for truncated importance sampling) and
    the metrics their distance to the policy's (``importance_sampling.mismatch_stats``; without
    ``policy_logprobs`` the loop adds them after the update has filled the policy's)."""
    t0 = time.perf_counter()
    batch, has_eos, sample_lp = sample_groups_shared(policy, queries, cfg.group_size, eos=eos, pad=pad, response_length=cfg.response_length, temperature=cfg.temperature, batch_size=cfg.forward_batch_size, engine=engine, seed=seed)
    t1 = time.perf_counter()
    raw = score_groups(score_fn, batch, cfg.group_size, batch_size=cfg.forward_batch_size)
    r = finish_group_rollout(policy, ref, batch, raw, has_eos, cfg, policy_logprobs=policy_logprobs)
    extra = {"perf/generation_time_s": t1 - t0, "perf/scoring_time_s": time.perf_counter() - t1}
    r.sample_logprobs = sample_lp
    extra.update(engine_mismatch(r, cfg))
    return r, extra


def engine_mismatch(r: Rollout, cfg: GroupRolloutConfig) -> dict[str, float]:
    """``importance_sampling.mismatch_stats`` of the rollout engine's sampling log-probs against the
    policy's, when another engine sampled and the policy's are known (else no metrics)."""
    if r.sample_logprobs is None or r.logprobs is None:
        return {}
    return mismatch_stats(r.logprobs, r.sample_logprobs, r.mask, cap=cfg.tis_cap or 2.0)


def sample_groups_shared(policy, queries: list[list[int]], group_size: int, *, eos: int, pad: int, response_length: int, temperature: float, batch_size: int, engine=None, seed: int | None = None) -> tuple[QueryResponseBatch, torch.Tensor, torch.Tensor | None]:
    """G = ``group_size`` responses per query from ``engine`` (default hf: ``generation.generate_groups``,
    each prompt prefilled once; vllm: prefix caching, requests seeded from ``seed``), collated
    group-contiguously as ``[left-padded query | right-padded response]``. Returns (batch of
    len(queries) x G rows, has_eos (B,) bool, the engine's sampling log-probs (B, T) when it samples
    elsewhere than the policy, else None)."""
    engine = engine or HFEngine()
    responses, logps = engine.sample_groups(policy, queries, group_size, eos_token_id=eos, pad_token_id=pad, max_new_tokens=response_length, temperature=temperature, batch_size=batch_size, seed=seed)
    has_eos = torch.tensor([bool(x) and x[-1] == eos for x in responses])
    batch = collate_query_response([q for q in queries for _ in range(group_size)], responses, pad)
    return batch, has_eos, (padded_logprobs(logps, batch.responses.shape[1]) if samples_elsewhere(engine) else None)


def finish_group_rollout(policy, ref, batch: QueryResponseBatch, raw_scores: torch.Tensor, has_eos: torch.Tensor, cfg: GroupRolloutConfig, *, policy_logprobs: bool = True) -> Rollout:
    """``rollout.finish_rollout`` for group-contiguous rows with each prompt once per group
    (``group_logprobs``): policy log-probs and entropy (None without ``policy_logprobs``), reference
    log-probs at ``cfg.temperature``, scores with the no-EOS penalty (N+ detail 23)."""
    g, fb, t = cfg.group_size, cfg.forward_batch_size, cfg.temperature
    logprobs = entropy = None
    if policy_logprobs:
        logprobs, entropy = group_logprobs(policy, batch, g, temperature=t, batch_size=fb, with_entropy=True)
    ref_logprobs, _ = group_logprobs(ref, batch, g, temperature=t, batch_size=fb)
    return Rollout(batch=batch, logprobs=logprobs, ref_logprobs=ref_logprobs, entropy=entropy, scores=apply_no_eos_penalty(raw_scores, has_eos, cfg.no_eos_penalty), raw_scores=raw_scores, has_eos=has_eos)


def _group_chunks(rows: int, group_size: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of about ``batch_size`` rows made of whole groups (at least one)."""
    step = max(1, batch_size // group_size) * group_size
    return [(i, min(rows, i + step)) for i in range(0, rows, step)]


def _rows(batch: QueryResponseBatch, i: int, j: int) -> QueryResponseBatch:
    return QueryResponseBatch(batch.input_ids[i:j], batch.attention_mask[i:j], batch.response_mask[i:j], batch.query_width)


@torch.no_grad()
def group_logprobs(model, batch: QueryResponseBatch, group_size: int, *, temperature: float, batch_size: int = 16, with_entropy: bool = False, shared_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, T) float32 of the response tokens under ``model`` at ``temperature``,
    ``log softmax(logits / temperature)[token]`` (N+ detail 21), and with ``with_entropy`` the (B, T)
    entropy in nats of the tempered distribution (else None), on the CPU. Rows in chunks of whole
    groups (about ``batch_size`` rows), each distinct query run once
    (``lm_head.grouped_response_logits``): the numbers the training pass computes for the same rows
    in any micro-batch, so the first ratio is 1. Padded positions hold meaningless values: mask them."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logps, ents = [], []
    for i, j in _group_chunks(batch.input_ids.shape[0], group_size, batch_size):
        sub = _rows(batch, i, j).to(device)
        logits = grouped_response_logits(model, sub, shared_prompt=shared_prompt)
        logps.append(token_logprobs(logits, sub.responses, temperature).cpu())
        if with_entropy:
            ents.append(entropy_from_logits(logits.float() / temperature).cpu())
        del logits
    model.train(was_training)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


@torch.no_grad()
def score_groups(score_fn, batch: QueryResponseBatch, group_size: int, *, batch_size: int = 16) -> torch.Tensor:
    """Scores (B,) float32 of group-contiguous rows (row r answers query r // G) from ``score_fn``,
    in chunks of whole groups. A score function that says it ``shares_prompt``
    (``reward.specs.RLReward`` of reward models only) gets each chunk reordered to its shared-prompt layout (row k
    holds the query of row k % Q) with ``num_queries`` = Q and ``query_width`` = P, so every query
    runs once, and the scores are put back in row order; any other runs full rows
    (``rollout.score_batch``). Raises ValueError when ``score_fn`` does not return one score per row."""
    if not getattr(score_fn, "shares_prompt", False):
        return score_batch(score_fn, batch, batch_size=batch_size)
    out = torch.empty(batch.input_ids.shape[0], dtype=torch.float32)
    for i, j in _group_chunks(batch.input_ids.shape[0], group_size, batch_size):
        q = (j - i) // group_size
        perm = i + torch.arange(j - i).view(q, group_size).t().flatten()  # row k of the chunk <- row perm[k]: query k % q
        s = score_fn(batch.input_ids[perm], batch.attention_mask[perm], num_queries=q, query_width=batch.query_width)
        if s.shape != (j - i,):
            raise ValueError(f"score_fn must return shape ({j - i},), got {tuple(s.shape)}")
        out[perm] = s.float().cpu()
    return out


def sequence_abs_mean(adv: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over sequences of each sequence's mean |A_t| over its real tokens: (B, T) advantages and
    bool mask -> a float. Each row's mean is taken in float64, so a sequence-level advantage broadcast
    over its response (GRPO, RLOO) counts exactly as its one value |A_b|, whatever its length."""
    m = mask.double()
    per_seq = (adv.double().abs() * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return per_seq.to(adv.dtype).mean().item()


def update_fills_logprobs(cfg: GroupConfig, local_mini: int, local_rows: int) -> bool:
    """Whether the update's own forward can give the rollout's policy log-probs, so that the rollout
    skips the policy's scoring pass (one forward of the policy over every sequence): one pass over the
    rollout in one minibatch (``update_per_rollout`` 1, ``local_mini`` >= ``local_rows``) is one
    optimizer step, so every micro-batch's forward runs on the weights that sampled the rollout and
    the ratio is exactly 1. TRL's GRPO skips its old-policy pass the same way (``num_iterations`` 1).
    Only for a stage whose advantages do not read the policy's log-probs (GRPO: its KL is in the loss)."""
    return cfg.update_per_rollout == 1 and local_mini >= local_rows


def minibatch_step(model, r: Rollout, adv: torch.Tensor, rows: list[int], cfg: GroupConfig, accelerator, *, loss_fn: LossFn, prefix: str, token_metrics: bool = False, fill_logprobs: bool = False) -> dict[str, float]:
    """Step 3 on one minibatch (``rows`` of the local rollout): forward/backward in micro-batches, the
    loss normalized by the minibatch's real tokens and sequences (exact gradient accumulation); does
    not step the optimizer. Returns its metrics (``loss/policy``, ``{prefix}/...`` weighted by each
    micro-batch's share of the minibatch's real tokens with ``token_metrics`` (``loss_fn``'s metrics
    are means over its micro-batch's tokens: GRPO's clip fraction, KL), else of its sequences (RLOO's,
    one action per sequence): either way the minibatch's mean, whatever the micro-batch split).
    ``fill_logprobs`` (``update_fills_logprobs``): the rollout's ``logprobs`` and ``entropy`` are
    written here, from this forward, and the loss takes them as the old log-probs."""
    device = accelerator.device
    if cfg.shared_prompt:
        # the minibatch's rows in group order (rollout rows are group-contiguous): its micro-batches then
        # hold whole groups, or parts of one, and run each query once; the minibatch gradient is the same sum
        rows = sorted(rows)
    n_tokens, n_seqs = int(r.mask[rows].sum()), len(rows)
    sums: dict[str, float] = defaultdict(float)
    for idx, sync in accumulation_micro_batches(rows, cfg.micro_batch_size, accelerator, model):
        mb = r.select(idx).to(device)
        a = adv[idx].to(device)  # (b, T)
        with sync, accelerator.autocast():
            # each distinct query of the micro-batch once (a whole group or part of one), unless shared_prompt is off
            logits = grouped_response_logits(model, mb.batch, shared_prompt=cfg.shared_prompt)
            new_lp = token_logprobs(logits, mb.batch.responses, cfg.temperature)  # (b, T)
            if fill_logprobs:  # the rollout's policy log-probs: this forward runs on the weights that sampled it
                mb.logprobs = new_lp.detach()
                r.logprobs[idx] = mb.logprobs.float().cpu()
                r.entropy[idx] = entropy_from_logits(logits.detach().float() / cfg.temperature).cpu()
            loss, m = loss_fn(new_lp, mb, a, cfg, num_tokens=n_tokens, num_sequences=n_seqs)
            accelerator.backward(loss)
        sums["loss/policy"] += loss.item()
        share = float(mb.mask.sum()) / max(1, n_tokens) if token_metrics else len(idx) / n_seqs
        add_micro_metrics(sums, prefix, m, share, new_lp, mb)
    return dict(sums)


def train(cfg: GroupConfig, name: str, *, advantages: AdvantageFn, loss: LossFn, sample: SampleFn = group_rollout, token_metrics: bool = False, logprobs_from_update: bool = False) -> str:
    """Run a group RL stage called ``name`` (its metrics prefix, run label and log name) with the
    stage's ``sample`` (step 1), ``advantages`` (step 2) and micro-batch ``loss`` (step 3; its metrics
    per token with ``token_metrics``, see ``minibatch_step``); returns the path of the final policy
    (a Hugging Face checkpoint). ``logprobs_from_update``: the stage's ``advantages`` do not read the
    rollout's policy log-probs, so with one optimizer step per rollout the update computes them
    (``update_fills_logprobs``) and the rollout skips that pass.

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
    rl = open_rl_run(cfg, name, accelerator, batch=cfg.rollout_prompts, group=cfg.group_size, passes=cfg.update_per_rollout, num_updates=num_updates, plan=plan)
    start, model, optimizer, scheduler, score_fn = start_policy_updates(rl, world, unit="rollout")
    eos, pad = rl.tokenizer.eos_token_id, rl.tokenizer.pad_token_id
    # the sampler: the policy itself (hf) or a vLLM engine holding a copy of its (resumed) weights
    engine = open_engine(rl, accelerator.unwrap_model(model), cfg.response_length)
    fill = logprobs_from_update and update_fills_logprobs(cfg, local_mini, local_prompts * cfg.group_size)

    for update in range(start, rl.total):
        t0 = time.perf_counter()
        prompts = update_prompts(rl, update)
        # 1. G responses per prompt: B = len(prompts) x G rows, [q0] * G + [q1] * G + ...
        rs_gen = torch.Generator().manual_seed(cfg.run.seed * 7_919 + update)
        with accelerator.autocast():
            r, extra = sample(accelerator.unwrap_model(model), rl.ref, score_fn, [p.query_ids for p in prompts], cfg, eos=eos, pad=pad, generator=rs_gen, engine=engine, seed=cfg.run.seed * 1_000_033 + update, policy_logprobs=not fill)
        t_rollout = time.perf_counter() - t0
        engine.sleep()  # CUDA sleep mode: the engine's KV cache freed for the update, woken by the next sync (a no-op for hf and on CPU)
        # 2. the advantages, (B, T) per token
        adv, adv_metrics = advantages(r, cfg)
        if adv.shape != r.mask.shape:
            raise ValueError(f"{name}'s advantages must be per token, shape {tuple(r.mask.shape)}, got {tuple(adv.shape)}")
        if fill:  # the policy's log-probs and entropy, written by the update's forward
            r.logprobs, r.entropy = torch.zeros_like(r.ref_logprobs), torch.zeros_like(r.ref_logprobs)
        # 3. passes over the rollout, one optimizer step per minibatch
        stats = update_passes(
            model, optimizer, accelerator, lambda rows: minibatch_step(model, r, adv, rows, cfg, accelerator, loss_fn=loss, prefix=name, token_metrics=token_metrics, fill_logprobs=fill),
            passes=cfg.update_per_rollout, n_rows=local_prompts * cfg.group_size, mini=local_mini,
            generator=torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + update), max_grad_norm=cfg.optim.max_grad_norm, prefix=name, scheduler=scheduler,
        )
        sync_engine(rl, engine, accelerator.unwrap_model(model), update + 1, stats)  # the next rollout samples the new weights
        # 4. metrics, samples, checkpoint
        kl = (kl_estimate(r.logprobs, r.ref_logprobs, "k1") * r.mask).sum(-1)  # (B, T) -> (B,) nats per response
        stats.update(rollout_stats(r))
        stats.update(adv_metrics)
        stats.update(extra)
        stats.update(engine_mismatch(r, cfg) if fill else {})
        stats.update({"objective/kl": kl.mean().item(), f"{name}/advantage_abs_mean": sequence_abs_mean(adv, r.mask)})
        log_update(rl, update + 1, r, prompts, stats, lr=scheduler.get_last_lr()[0], t0=t0, t_rollout=t_rollout)
        checkpoint_update_if_due(rl, update + 1, model, optimizer, scheduler)
    engine.close()
    return finish_rl_run(rl, accelerator.unwrap_model(model))
