"""What the RL stages (PPO, GRPO, RLOO) share: frozen models, the reward model's score function, the
prompt order, the linear learning-rate anneal, sample records, collapse signals; and the parts of
every RL loop around a stage's own rollout and loss: set-up and resume (``RLRun``), the update
passes with their optimizer steps, the per-update logging and checkpoints, the end of the run. The
prompts themselves come from ``tasks.rl_prompts``.

Shapes: B sequences, P query width, T response width; b sequences of a micro-batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import ModelArgs
from ..data.tldr import Prompt
from ..errors import DataError
from ..flops import ModelShape, rl_update_flops
from ..generation import decode_response
from ..modeling import AdaptersDisabled, apply_lora, count_parameters, enable_gradient_checkpointing, load_causal_lm, load_frozen_reference, load_tokenizer_cached
from ..precision import frozen_weights_dtype
from ..rollout import Rollout, ScoreFn, plain_sampling_config
from ..rollout_engine import check_engine_available, engine_for
from ..tasks import rl_prompts
from .common import make_accelerator, prepare, shard_if_asked, weights_saver
from .loop import (
    Throughput,
    throughput_meter,
    build_optimizer,
    build_scheduler,
    checkpoint_if_due,
    due,
    global_batches,
    optimizer_step,
    peak_memory_mb,
    progress_bar,
    resume,
    seed_everything,
    shard,
)
from .lifecycle import finish_run, start_run
from .run_dir import RunDir
from ..reward.specs import load_rl_reward

log = logging.getLogger(__name__)
_MAX_METRICS = ("ratio_max", "ratio_max_abs_dev")  # metrics kept as a maximum over a minibatch and an update


def prompt_order(n: int, batch: int, seed: int, num_updates: int) -> list[list[int]]:
    """Prompt indices of every update's batch: passes over the prompts in a fresh random order each
    time they run out (N+ detail 17), the incomplete tail of each pass dropped. A pure function of
    its arguments, so a resumed run and every process agree. Raises DataError when there are fewer
    prompts than one batch."""
    if n < batch:
        raise DataError(f"{n} prompts are fewer than one rollout batch of {batch}")
    per_pass = n // batch
    return global_batches(n, batch, seed, math.ceil(num_updates / per_pass))[:num_updates]


def load_rl_models(
    sft_path: str, tokenizer, *, dtype: torch.dtype, device: torch.device, lora_r: int = 0, lora_alpha: int = 32, load_in_4bit: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """(policy, reference) of an RL stage: the trainable policy from the SFT checkpoint in float32
    master weights on the CPU (the accelerator moves it), sampling config reset to plain sampling with
    explicit EOS / pad (N+ detail 19); the frozen reference (same checkpoint) in ``dtype`` on ``device``,
    dropout off (N+ detail 7); the reward is ``reward.specs.load_rl_reward``'s. ``dtype`` is
    ``precision.frozen_weights_dtype``'s float32: the frozen models run under the
    policy's autocast, so under bf16 they compute in its precision regime and the first update has KL 0
    and ratio 1 exactly (tests/test_bf16.py). With ``lora_r`` > 0 the policy gets LoRA adapters (on 4-bit
    base weights with ``load_in_4bit``, CUDA only) and the reference is the policy itself with its
    adapters disabled (``modeling.AdaptersDisabled``): the SFT weights, no second copy in memory. Raises
    ModelLoadError for a path that does not load."""
    policy = load_causal_lm(sft_path, dtype=torch.float32, tokenizer=tokenizer, load_in_4bit=load_in_4bit)
    plain_sampling_config(policy, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if lora_r > 0:
        policy = apply_lora(policy, r=lora_r, alpha=lora_alpha)
        ref = AdaptersDisabled(policy)
    else:
        ref = load_frozen_reference(sft_path, tokenizer, dtype=dtype).to(device)
    return policy, ref


def linear_anneal(optimizer: torch.optim.Optimizer, num_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ``lr * (1 - u / num_updates)`` during update u = 0, 1, ... (N+ detail 16: linear
    anneal to 0); step it once per update, not per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / num_updates))


def sample_records(step: int, rollout: Rollout, prompts: list[Prompt], tokenizer, limit: int) -> list[dict]:
    """samples.jsonl records for the first ``limit`` rows of a rollout: query, response, reference,
    score (after the no-EOS penalty), raw score and whether the response ended with EOS."""
    out = []
    for i in range(min(limit, len(rollout))):
        n = int(rollout.lengths[i])
        ids = rollout.batch.responses[i, :n].tolist()
        out.append({
            "step": step,
            "id": prompts[i].id,
            "query": tokenizer.decode(prompts[i].query_ids),
            "response": decode_response(tokenizer, ids),
            "reference": prompts[i].reference,
            "score": float(rollout.scores[i]),
            "raw_score": float(rollout.raw_scores[i]),
            "has_eos": bool(rollout.has_eos[i]),
            "length": n,
        })
    return out




def collapse_signals(updates: list[dict], *, window: int = 5, min_eos_rate: float = 0.2, max_kl: float = 25.0, min_entropy: float = 0.05) -> list[str]:
    """Signs that an RL run collapsed, read off its per-update metrics (N+ detail 23: half of N+'s 1B
    PPO seeds collapsed to a win rate of about 0.2, so every seed's run gets this check).

    ``updates``: the metrics records that carry ``objective/scores`` (``metrics.jsonl`` of a PPO /
    GRPO / RLOO run), in step order. Over the last ``window`` updates (fewer if the run is shorter):

    * mean ``objective/eos_rate`` below ``min_eos_rate``: responses run to the length cap and all get
      the no-EOS score, the usual way a summarization policy degenerates;
    * mean ``objective/kl`` (nats per sequence) above ``max_kl``: the policy left the reference;
    * mean ``objective/entropy`` (nats per token) below ``min_entropy``: sampling became deterministic
      (repeated text);
    * the score falling while KL rises: the window's mean score below the first window's by more than
      the first window's score spread (max - min), with the window's KL above the first window's.

    Returns one readable line per sign; empty when none shows (which proves nothing on its own: the
    judge-based win rate of ``evaluate`` is the final word). Missing metrics skip their check.
    """
    if not updates:
        return []
    head, tail = updates[:window], updates[-window:]

    def mean(rows: list[dict], key: str) -> float | None:
        xs = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return sum(xs) / len(xs) if xs else None

    out = []
    eos, kl, ent = mean(tail, "objective/eos_rate"), mean(tail, "objective/kl"), mean(tail, "objective/entropy")
    n = len(tail)
    if eos is not None and eos < min_eos_rate:
        out.append(f"EOS rate {eos:.2f} over the last {n} updates (< {min_eos_rate}): responses run to the length cap")
    if kl is not None and kl > max_kl:
        out.append(f"KL to the reference {kl:.1f} nats over the last {n} updates (> {max_kl})")
    if ent is not None and ent < min_entropy:
        out.append(f"entropy {ent:.3f} nats/token over the last {n} updates (< {min_entropy}): degenerate sampling")
    first_scores = [r["objective/scores"] for r in head if isinstance(r.get("objective/scores"), (int, float))]
    score, kl0 = mean(tail, "objective/scores"), mean(head, "objective/kl")
    if len(updates) >= 2 * window and first_scores and score is not None and kl is not None and kl0 is not None:
        start, spread = sum(first_scores) / len(first_scores), max(first_scores) - min(first_scores)
        if score < start - spread and kl > kl0:
            out.append(f"score fell from {start:.3f} to {score:.3f} while KL rose from {kl0:.2f} to {kl:.2f}")
    return out


def check_collapse(run_path, *, name: str) -> list[str]:
    """``collapse_signals`` of the run folder's ``metrics.jsonl``, each logged as a warning."""
    path = Path(run_path) / "metrics.jsonl"
    updates = [r for r in map(json.loads, path.read_text().splitlines()) if "objective/scores" in r] if path.is_file() else []
    signals = collapse_signals(updates)
    for s in signals:
        log.warning("%s run may have collapsed (N+ detail 23: run several seeds): %s", name, s)
    return signals


# ----------------------------------------------------------------------------------------------
# What every RL loop does around its own rollout and loss: set-up, update passes, logging, the end


@dataclass
class RLRun:
    """An RL stage's run once set up (``open_rl_run``): its config and name, the accelerator, the
    tokenizer, the prompts and every update's prompt indices (``order``), the updates run now
    (``total``: ``run.max_steps`` caps the planned ones), ``batch`` prompts per update with ``group``
    responses each and ``passes`` training passes over them, the run folder and the checkpoint to resume from, the trainable policy (CPU, not
    yet prepared) and the frozen reference and reward model. ``start_updates`` adds the throughput
    meter and progress bar."""

    cfg: Any
    name: str
    accelerator: Any
    tokenizer: Any
    prompts: list[Prompt]
    order: list[list[int]]
    total: int
    batch: int
    group: int
    run: RunDir
    resume_from: Path | None
    policy: nn.Module
    ref: nn.Module
    reward_model: nn.Module
    reward: Any
    """The stage's ``reward.specs.RLReward`` (``--reward`` or ``--rm-path``): its score function."""
    meter: Throughput = field(default_factory=Throughput)
    bar: Any = None
    value: nn.Module | None = None
    """PPO's value model (its FLOPs are part of every update's); None for the other stages."""
    passes: int = 1
    """Training passes over each update's rollout (PPO's ``ppo_epochs``, the others' ``update_per_rollout``)."""

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def save_weights(self, folder: Path) -> None:
        """Write the policy (``self.policy``, the module being trained; PPO's value model is not part
        of it) as a Hugging Face folder, in the dtype ``weights_saver`` gives: final/ and each
        checkpoint's weights."""
        weights_saver(self.policy, self.tokenizer, self.cfg.dtype, self.cfg.run)(folder)


def rl_accelerator(cfg, name: str):
    """The stage's accelerator (``common.make_accelerator`` with its dtype and run arguments).
    Raises DataError, before anything loads, when ``sft_path`` is missing, or both ``reward`` and
    ``rm_path`` (the reward, ``reward/specs.py``)."""
    if not cfg.sft_path or not (cfg.rm_path or cfg.reward):
        raise DataError(f"{name.upper()} needs --sft-path (policy and reference) and --reward or --rm-path (the reward: reward/specs.py)")
    check_engine_available(cfg.rollout_engine)  # --rollout-engine vllm without vllm: the install line, before anything loads
    return make_accelerator(ModelArgs(path=cfg.sft_path, dtype=cfg.dtype), cfg.run)


def open_rl_run(cfg, name: str, accelerator, *, batch: int, group: int, passes: int, num_updates: int, plan: str) -> RLRun:
    """Set-up after the stage has checked its sizes: tokenizer, prompts (``tasks.rl_prompts``) and
    their order over ``num_updates`` batches of ``batch`` prompts (``group`` responses each, ``passes``
    training passes over them), the run folder, the seed, then the policy, reference and reward model
    (``load_rl_models``). ``plan`` describes the updates in the log line. Raises DataError for bad prompts (before any model loads), RunDirError for a finished
    run folder, ModelLoadError for a model path that does not load."""
    tokenizer = load_tokenizer_cached(cfg.tokenizer or cfg.sft_path)
    prompts, truncated = rl_prompts(cfg.data, tokenizer)
    order = prompt_order(len(prompts), batch, cfg.run.seed, num_updates)
    total = min(num_updates, cfg.run.max_steps) if cfg.run.max_steps else num_updates
    if accelerator.is_main_process:
        log.info("%s prompts: %d (%d queries over %d tokens: cut for TL;DR, dropped for UltraFeedback); %s (%d run now)", name.upper(), len(prompts), truncated, cfg.data.max_query_length, plan, total)
    run, resume_from = start_run(cfg, is_main=accelerator.is_main_process)
    seed_everything(cfg.run.seed)
    policy, ref, reward = load_rl_models_and_reward(cfg, tokenizer, prompts, accelerator)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)  # PPO's value model: ppo.train
    return RLRun(cfg, name, accelerator, tokenizer, prompts, order, total, batch, group, run, resume_from, policy, ref, reward.reward_model, reward=reward, passes=passes)


def load_rl_models_and_reward(cfg, tokenizer, prompts: list[Prompt], accelerator) -> tuple[nn.Module, nn.Module, Any]:
    """(policy, reference, ``reward.specs.RLReward``): ``load_rl_models`` without its reward model (with the
    stage's LoRA / 4-bit settings), and the stage's reward (``--reward``, else the reward model
    ``--rm-path``; ``reward.specs.load_rl_reward``)."""
    if cfg.reward and cfg.rm_path:
        log.warning("--reward %s is the reward; --rm-path %s is not used", cfg.reward, cfg.rm_path)
    dtype = frozen_weights_dtype(cfg.dtype)
    policy, ref = load_rl_models(
        cfg.sft_path, tokenizer, dtype=dtype, device=accelerator.device,
        lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, load_in_4bit=cfg.load_in_4bit,
    )
    reward = load_rl_reward(cfg, tokenizer, prompts, dtype=dtype, device=accelerator.device, autocast=accelerator.autocast)
    return policy, ref, reward


def start_updates(rl: RLRun, model: nn.Module, optimizer, scheduler, *, unit: str, describe: str, steps: str) -> tuple[int, nn.Module, Any, ScoreFn]:
    """The end of the set-up: restores the checkpoint ``start_run`` found into model, optimizer and
    scheduler (logs past it truncated), prepares model and optimizer for the accelerator, and starts
    the progress bar and throughput meter. ``unit`` names an update, ``describe`` the trainable model
    and ``steps`` its optimizer steps in the log lines. Returns (first update, prepared model, prepared optimizer, the reward
    model's score function)."""
    trainable, total_params = count_parameters(model)
    start = resume(rl.run, rl.resume_from, model, optimizer, scheduler, unit=unit)
    model, optimizer = prepare(rl.accelerator, model, optimizer)
    score_fn = rl.reward
    if rl.is_main:
        log.info("%s: %d / %d trainable parameters; %s", describe, trainable, total_params, steps)
    rl.meter = throughput_meter(rl.accelerator, rl.cfg.run)
    rl.run.total_steps = rl.total  # the per-step log line's /N and ETA
    rl.bar = progress_bar(rl.total, start, rl.name, rl.is_main and rl.cfg.run.progress)
    return start, model, optimizer, score_fn


def start_policy_updates(rl: RLRun, world: int, *, unit: str) -> tuple[int, nn.Module, Any, Any, ScoreFn]:
    """The set-up's end for the stages that train the policy alone (GRPO, RLOO, online DPO): the policy
    sharded under ``--run.fsdp`` (before the optimizer sees its weights), AdamW, the cosine schedule
    over ``cfg.optimizer_steps(world)``, then ``start_updates``. Returns (first update, prepared
    model, prepared optimizer, scheduler, the reward's score function)."""
    cfg = rl.cfg
    rl.policy = shard_if_asked(rl.policy, cfg.run, rl.accelerator)
    optimizer = build_optimizer(rl.policy.parameters(), cfg.optim, device_type=rl.device.type)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.optimizer_steps(world))
    steps = f"{cfg.optimizer_steps(world)} optimizer steps"
    start, model, optimizer, score_fn = start_updates(rl, rl.policy, optimizer, scheduler, unit=unit, describe="policy", steps=steps)
    return start, model, optimizer, scheduler, score_fn


def open_engine(rl: RLRun, policy: nn.Module, response_length: int):
    """The stage's rollout engine (``--rollout-engine``; ``rollout_engine.engine_for``) on the trainable
    ``policy`` as resumed, its context the longest prompt plus ``response_length``. Built after the
    thread count is set (``common.make_accelerator``): a CPU vLLM engine fixes it for the process.
    Under several processes each has its own engine, sized for its share of a rollout's prompts."""
    longest = max(len(p.query_ids) for p in rl.prompts)
    world = rl.accelerator.num_processes
    return engine_for(rl.cfg, policy, max_tokens=longest + response_length, sequences=-(-rl.batch // world) * rl.group, world_size=world)


def sync_engine(rl: RLRun, engine, policy: nn.Module, done: int, stats: dict[str, float]) -> None:
    """After update ``done`` (1-based): an engine that samples with its own copy of the weights (vllm)
    gets the policy's new ones, the seconds logged as ``perf/weight_sync_s`` in ``stats``; nothing for
    hf, or after the last update."""
    if engine.name != "hf" and done < rl.total:
        stats["perf/weight_sync_s"] = engine.sync_weights(policy)


def update_prompts(rl: RLRun, update: int) -> list[Prompt]:
    """This process's share of the prompts of update ``update`` (0-based)."""
    mine = shard(rl.order[update], rl.accelerator.process_index, rl.accelerator.num_processes)
    return [rl.prompts[i] for i in mine]


def accumulation_micro_batches(rows: list[int], size: int, accelerator, model: nn.Module) -> Iterator[tuple[list[int], Any]]:
    """A minibatch's rows in micro-batches of ``size``, each with the context its forward/backward
    runs in: ``no_sync`` (no gradient all-reduce) on all but the last, so that the accumulated
    gradient is reduced once per minibatch."""
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    for k, idx in enumerate(chunks):
        yield idx, (accelerator.no_sync(model) if k < len(chunks) - 1 else contextlib.nullcontext())


def add_micro_metrics(sums: dict[str, float], prefix: str, metrics: dict[str, torch.Tensor], weight: float, new_logprobs: torch.Tensor, mb: Rollout) -> None:
    """Adds one micro-batch's loss metrics to its minibatch's ``sums`` (in place) as
    ``{prefix}/{name}``: each weighted by the micro-batch's share of the minibatch (``weight``),
    ``ratio_max`` as a running maximum; and ``{prefix}/ratio_max_abs_dev``, the running maximum of
    ``|exp(new - old) - 1|`` over real tokens (exactly 0 before the first optimizer step: the update
    pass reproduces the rollout's log-probs). Shapes: new_logprobs (b, T) against ``mb.logprobs``."""
    for name, v in metrics.items():
        if name == "ratio_max":
            sums[f"{prefix}/ratio_max"] = max(sums[f"{prefix}/ratio_max"], v.item())
        else:
            sums[f"{prefix}/{name}"] += weight * v.item()
    dev = (torch.exp(new_logprobs.detach() - mb.logprobs) - 1).abs()[mb.mask].max().item()
    sums[f"{prefix}/ratio_max_abs_dev"] = max(sums[f"{prefix}/ratio_max_abs_dev"], dev)


def update_passes(
    model: nn.Module, optimizer, accelerator, minibatch_step: Callable[[list[int]], dict[str, float]], *,
    passes: int, n_rows: int, mini: int, generator: torch.Generator, max_grad_norm: float, prefix: str, scheduler=None,
) -> dict[str, float]:
    """The update step of every RL stage: ``passes`` passes over the rollout's ``n_rows`` local rows,
    each in a fresh order drawn from ``generator``, in minibatches of ``mini`` rows; each minibatch's
    gradient comes from ``minibatch_step(rows)`` (which returns its metrics), then one optimizer step
    with gradient clipping at ``max_grad_norm`` (0 = none) and, when given, one ``scheduler`` step;
    a minibatch whose step returns None (no signal on any process: online DPO's all-tied pairs)
    takes no optimizer or scheduler step and is counted in ``{prefix}/skipped_minibatches``.

    Returns the metrics averaged over the optimizer steps (``*ratio_max*``: the maximum), the mean
    ``grad_norm`` (when clipping) and ``{prefix}/first_minibatch_ratio_max_abs_dev`` (0 when the
    update pass reproduces the rollout's log-probs, N+ detail 16's check)."""
    model.train()
    totals: dict[str, float] = defaultdict(float)
    n_steps, first_dev, skipped = 0, None, 0
    for _ in range(passes):
        perm = torch.randperm(n_rows, generator=generator).tolist()
        for s in range(0, n_rows, mini):
            m = minibatch_step(perm[s : s + mini])
            if m is None:
                skipped += 1
                continue
            if first_dev is None:
                first_dev = m[f"{prefix}/ratio_max_abs_dev"]
            grad_norm = optimizer_step(model, optimizer, scheduler, accelerator, max_grad_norm)
            for k, v in m.items():
                totals[k] = max(totals[k], v) if k.endswith(_MAX_METRICS) else totals[k] + v
            if grad_norm is not None:
                totals["grad_norm"] += grad_norm
            n_steps += 1
    stats = {k: (v if k.endswith(_MAX_METRICS) else v / n_steps) for k, v in totals.items()}
    stats[f"{prefix}/first_minibatch_ratio_max_abs_dev"] = first_dev if first_dev is not None else 0.0
    if skipped:
        stats[f"{prefix}/skipped_minibatches"] = float(skipped)
    return stats


def log_update(rl: RLRun, done: int, r: Rollout, prompts: list[Prompt], stats: dict[str, float], *, lr: float, t0: float, t_rollout: float) -> None:
    """The logging step of every RL stage after update ``done`` (1-based) of rollout ``r`` made from
    this process's ``prompts``: ``stats`` averaged over the processes, the progress bar, and every
    ``log_every`` updates (and at the last) one metrics record: step, episodes, epoch, learning rate
    ``lr``, rollout and update seconds (since ``t0``), the stats and the throughput. The main process
    writes the first ``num_sample_posts`` rows to samples.jsonl at the first and last update and
    every ``eval_every``."""
    cfg = rl.cfg
    rl.meter.add(int(r.batch.attention_mask.sum()), len(r), flops=update_flops(rl, r))
    stats = {k: rl.accelerator.reduce(torch.tensor(v, device=rl.device), reduction="mean").item() for k, v in sorted(stats.items())}
    rl.bar.update(1)
    rl.bar.set_postfix(score=f"{stats['objective/scores']:.3f}", kl=f"{stats['objective/kl']:.3f}")
    if due(done, cfg.run.log_every, rl.total, last=True):
        rl.run.log_metrics({
            "step": done,
            "episodes": done * rl.batch * rl.group,
            "epoch": done * rl.batch / len(rl.prompts),
            "lr": lr,
            "perf/rollout_time_s": t_rollout,
            "perf/update_time_s": time.perf_counter() - t0,
            **stats,
            **rl.meter.rates(),
        })
    if rl.is_main and cfg.num_sample_posts and (done == 1 or done == rl.total or (cfg.run.eval_every and done % cfg.run.eval_every == 0)):
        rows = [p for p in prompts for _ in range(rl.group)]  # one per rollout row: [p0] * group + [p1] * group + ...
        rl.run.log_samples(sample_records(done, r, rows, rl.tokenizer, cfg.num_sample_posts))


def update_flops(rl: RLRun, r: Rollout) -> float:
    """Model FLOPs of one update on this process's rollout ``r`` (``flops.rl_update_flops``): generation,
    two no-grad log-prob passes (policy, reference), the reward model, the ``rl.passes`` training
    passes, PPO's value model; each group's prompt once per pass when the stage has groups
    (``rl.group`` > 1) and its config's ``shared_prompt`` is on."""
    group = rl.group if rl.group > 1 and rl.cfg.shared_prompt else 1
    reward = ModelShape.of(rl.reward_model) if rl.reward_model is not None else None
    value = ModelShape.of(rl.value) if rl.value is not None else None
    return rl_update_flops(ModelShape.of(rl.policy), r.batch.attention_mask, r.batch.query_width, group_size=group, passes=rl.passes, reward=reward, value=value)


def checkpoint_update_if_due(rl: RLRun, done: int, model: nn.Module, optimizer, scheduler) -> None:
    """A checkpoint after update ``done`` every ``save_every`` updates (not after the last: ``final/``
    follows), every process waiting for it."""
    checkpoint_if_due(rl.run, done, rl.total, rl.cfg.run, rl.accelerator.unwrap_model(model), optimizer, scheduler, rl.accelerator, rl.save_weights)


def finish_rl_run(rl: RLRun, final_model: nn.Module) -> str:
    """The end of every RL stage: a last metrics record (peak memory, ``collapse_signals``), then the
    main process writes ``final_model`` (the trained ``rl.policy``; gathered first when FSDP-sharded) and the tokenizer to ``final/``
    (``RLRun.save_weights``). Returns its path."""
    if final_model is not rl.policy:
        raise ValueError("finish_rl_run: final_model must be the policy the run trains (rl.policy)")
    rl.bar.close()
    name = rl.name.upper()
    rl.run.log_metrics({"step": rl.total, "perf/peak_memory_mb": peak_memory_mb(rl.device), "health/collapse_signals": check_collapse(rl.run.path, name=name) if rl.is_main else []})
    rl.accelerator.wait_for_everyone()
    finish_run(rl.run, rl.save_weights, step=rl.total, stage=rl.name)  # every process: FSDP gathers the weights
    if rl.is_main:
        log.info("%s done: %s", name, rl.run.final_dir)
    rl.accelerator.wait_for_everyone()
    return str(rl.run.final_dir)
