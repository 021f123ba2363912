"""Reward model on human comparisons, normalized on SFT references, measured against humans and a judge
(Stiennon et al. 2020 sec. 3.4, eq. 1; N+ details 10-15).

Model (``reward.reward_model.ScalarRewardModel``): the backbone of a base or SFT causal LM plus a scalar head
N(0, 1/sqrt(d_model + 1)) (detail 10), read at the response's EOS, the last real token of the row,
found from the attention mask (detail 12; with Qwen pad = EOS). Dropout off (detail 7).

Objective (``losses.pairwise_loss``): ``-log sigmoid(r_chosen - r_rejected)``, mean over the global
batch of pairs. Chosen and rejected responses of a micro-batch go through the model in one forward
pass (``collate_pairs``: rows [0, B) chosen, [B, 2B) rejected); with ``shared_prompt`` (default) the B
queries run once and the 2B responses continue from their key/value cache, which gives the same
scores and gradients as 2B full rows (tested) with the query computed once per pair. With
``padding_free`` (default) the micro-batch is packed into one row of its real tokens, each query once
and its two responses after it (``reward.scoring.pair_rewards``, ``data.packing``): the same scores
and gradients without the padding's work, each reward read at its response's EOS.

Normalization (detail 14): after training, the (query, reference summary) pairs of the SFT posts are
scored and the head bias is shifted so that their mean reward is 0; the shift is stored in the
checkpoint config (``reward_offset``, ``normalization``).

Steps of ``train``: (1) data: tokenized pairs and normalization references from ``tasks``, every
bad record reported before a model loads; (2) the model (``modeling.init_reward_model``), optimizer
and a resumed checkpoint; (3) optimizer steps over the global batches of pairs; (4) held-out
accuracy, normalization and ``final/``.

Evaluation (``tldr-rlhf evaluate-rm``) is its own command: ``evaluate_rm.py``. Scoring passes are in
``reward/scoring.py``, model construction and saving in ``modeling.py``, data from ``tasks``.

Departures: batches are padded to their own longest query and response, not to fixed lengths;
``train_layers`` can freeze the lower blocks (a CPU-demo speed option; the papers train every weight).
Bad records (identical or empty summaries, a ``choice`` outside {0, 1}, responses over the cap, a
query that does not fit) are dropped and counted; truncated queries are counted; nothing is relabeled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import tasks
from ..config import RMConfig
from ..data.batching import collate_preferences
from ..data.comparisons import describe_drops
from ..errors import DataError
from ..flops import ModelShape, batch_forward_flops, train_flops
from ..losses import pairwise_loss
from ..metrics import comparison_metrics
from ..modeling import count_parameters
from ..reward.loading import init_reward_model, save_reward_model
from ..reward.reward_model import ScalarRewardModel, train_top_layers
from ..reward.scoring import ScoredText, pair_rewards, score_responses
from ..scoring import score_preference_pairs
from .common import make_accelerator, prepare, shard_if_asked, tokenizer_for, weights_saver
from .loop import (
    throughput_meter,
    build_optimizer,
    build_scheduler,
    checkpoint_if_due,
    due,
    global_batches,
    micro_batches,
    optimizer_step,
    peak_memory_mb,
    progress_bar,
    resume,
    seed_everything,
    shard,
)
from .lifecycle import finish_run, start_run
from .run_dir import RunDir

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Data (from ``tasks``: rm_pairs, normalization_references)


collate = collate_preferences  # 2B rows: chosen in [0, B), rejected in [B, 2B)


# ----------------------------------------------------------------------------------------------
# Normalization


@torch.no_grad()
def normalize_rewards(model: ScalarRewardModel, references: Sequence[ScoredText], *, pad_token_id: int, batch_size: int = 16, accelerator=None, progress: bool = False, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Shift the head bias so that the mean reward of ``references`` is 0 (N+ detail 14).

    The mean raw reward m is subtracted from ``score.bias`` and added to ``config.reward_offset``;
    ``config.normalization`` records {n, mean_before, std_before, source}. Returns that record plus
    ``mean_after`` (the references scored again: 0 up to float rounding). In place."""
    inner = model.module if hasattr(model, "module") else model
    before = score_responses(model, references, pad_token_id=pad_token_id, batch_size=batch_size, accelerator=accelerator, desc="normalization (references)", progress=progress).double()
    mean, std = before.mean().item(), (before.std().item() if len(before) > 1 else 0.0)
    if hasattr(inner, "reshard"):  # FSDP keeps the root's gathered weights after a forward: back to the shards, which are the weights
        inner.reshard()
    bias = inner.score.bias
    local = bias.to_local() if hasattr(bias, "to_local") else bias  # FSDP: the process holding the bias shifts it
    with torch.no_grad():
        local.sub_(torch.tensor([mean], dtype=local.dtype, device=local.device).expand_as(local))
    inner.config.reward_offset = float(inner.config.reward_offset or 0.0) + mean
    after = score_responses(model, references, pad_token_id=pad_token_id, batch_size=batch_size, accelerator=accelerator, desc="normalization (check)", progress=progress).double()
    record = {"n": len(references), "mean_before": mean, "std_before": std, "mean_after": after.mean().item(), "offset": inner.config.reward_offset, **(source or {})}
    inner.config.normalization = {k: v for k, v in record.items() if k != "mean_after"}
    return record


# ----------------------------------------------------------------------------------------------
# Training


def _check(cfg: RMConfig) -> None:
    if cfg.micro_batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise DataError("micro_batch_size and gradient_accumulation_steps must be >= 1", field="micro_batch_size")
    if not 0.0 < cfg.data.valid_fraction < 1.0 and not cfg.data.valid_comparisons and Path(cfg.data.comparisons).exists():
        raise DataError(f"valid_fraction must be in (0, 1) to hold out posts of a local file, got {cfg.data.valid_fraction}", field="data.valid_fraction")


def _load_data(cfg: RMConfig, tokenizer, *, is_main: bool) -> tuple[list, list, list[ScoredText], dict[str, Any]]:
    """Step 1: (train, held-out) pairs, normalization references (none with normalization off) and
    the data report (drops and truncations of each), logged on the main process."""
    train_ex, valid_ex, report = tasks.rm_pairs(cfg.data, tokenizer)
    references, ref_report = tasks.normalization_references(cfg.norm, cfg.data, tokenizer) if cfg.norm.enabled else ([], {})
    report["normalization"] = ref_report
    if is_main:
        log.info(
            "RM data: %d train / %d held-out comparisons; train dropped %s, %d queries truncated; held-out dropped %s; %d normalization references",
            len(train_ex), len(valid_ex), report["train"]["dropped"] or "none", report["train"]["query_truncated"], report["valid"]["dropped"] or "none", len(references),
        )
    return train_ex, valid_ex, references, report


def _held_out_record(model, valid_ex, cfg: RMConfig, accelerator, *, pad_token_id: int) -> dict[str, Any]:
    """Held-out accuracy and the other scalar ``comparison_metrics`` as ``valid/*`` record fields."""
    rewards = score_preference_pairs(
        model, valid_ex, pair_rewards, pad_token_id=pad_token_id, batch_size=cfg.eval_batch_size, shared_prompt=cfg.shared_prompt,
        accelerator=accelerator, desc="held-out pairs", progress=cfg.run.progress and accelerator.is_main_process,
    )
    m = comparison_metrics(rewards, [e.confidence for e in valid_ex])
    return {f"valid/{k}": v for k, v in m.items() if not isinstance(v, dict)}


def _step_record(done: int, loss: torch.Tensor, m: dict[str, torch.Tensor], *, lr: float, epoch: float, step_time_s: float, rates: dict[str, float], grad_norm) -> dict[str, Any]:
    """The metrics.jsonl record of optimizer step ``done``: ``pairwise_loss`` of the global batch
    (loss ``loss``, metrics ``m``), learning rate, epoch, throughput and the gradient norm."""
    record = {
        "step": done,
        "loss/rm": loss.item(),
        "rm/accuracy": m["accuracy"].item(),
        "rm/margin": m["margin"].item(),
        "rm/chosen_reward": m["chosen"].item(),
        "rm/rejected_reward": m["rejected"].item(),
        "lr": lr,
        "epoch": epoch,
        "perf/step_time_s": step_time_s,
        "perf/pairs_per_s": rates["perf/sequences_per_s"],
        "perf/tokens_per_s": rates["perf/tokens_per_s"],
        **{k: v for k, v in rates.items() if k in ("perf/model_tflops_per_s", "perf/mfu")},
    }
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record


def _normalize_and_save(cfg: RMConfig, run: RunDir, model, tokenizer, references: list[ScoredText], accelerator, *, final: dict[str, Any], total_steps: int) -> None:
    """Step 4: normalize the rewards on ``references`` (when there are any), log the last record
    (``final`` held-out metrics, norm/*, peak memory) and write final/ on the main process."""
    is_main = accelerator.is_main_process
    inner = accelerator.unwrap_model(model)
    record: dict[str, Any] = {"step": total_steps, **final}
    if references:
        norm = normalize_rewards(
            model, references, pad_token_id=tokenizer.pad_token_id, batch_size=cfg.eval_batch_size, accelerator=accelerator,
            progress=cfg.run.progress and is_main, source={"source": cfg.norm.posts, "split": cfg.norm.split},
        )
        record.update({"norm/mean_before": norm["mean_before"], "norm/std_before": norm["std_before"], "norm/mean_after": norm["mean_after"], "norm/n": norm["n"]})
        if is_main:
            log.info("normalized on %d references: mean reward %.4f -> %.2e (std %.4f)", norm["n"], norm["mean_before"], norm["mean_after"], norm["std_before"])
    record["perf/peak_memory_mb"] = peak_memory_mb(accelerator.device)
    run.log_metrics(record)
    accelerator.wait_for_everyone()
    finish_run(run, weights_saver(inner, tokenizer, cfg.model.dtype, cfg.run, save=save_reward_model), step=total_steps, stage="rm")
    if is_main:
        log.info("RM done: %s (held-out accuracy %.4f on %d pairs)", run.final_dir, final["valid/accuracy"], final["valid/n"])
    accelerator.wait_for_everyone()


def train(cfg: RMConfig) -> str:
    """Train a reward model; returns the path of the final (normalized) Hugging Face checkpoint.

    Writes config.json, metrics.jsonl (per step: loss/rm, rm/{accuracy, margin, chosen_reward,
    rejected_reward}, lr, grad_norm, perf/*; valid/* at evaluations), data_report.json (counts of
    dropped and truncated records), checkpoints/, final/ (reward model + tokenizer, normalized).
    Raises DataError for bad settings or data (before any model is loaded), ModelLoadError for a bad
    model path, RunDirError for a finished run folder without ``--run.overwrite``.
    """
    _check(cfg)
    accelerator = make_accelerator(cfg.model, cfg.run)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    tokenizer = tokenizer_for(cfg.model)
    pad = tokenizer.pad_token_id

    # 1. Data first: every bad record is reported before a model is loaded or a folder touched.
    train_ex, valid_ex, references, report = _load_data(cfg, tokenizer, is_main=is_main)
    batch = cfg.global_batch_size(world)
    if len(train_ex) < batch:
        raise DataError(f"{len(train_ex)} training comparisons are fewer than one global batch of {batch} (dropped: {describe_drops(report['train']['dropped'])})", path=cfg.data.comparisons)
    steps = global_batches(len(train_ex), batch, cfg.run.seed, cfg.epochs)
    total_steps = min(len(steps), cfg.run.max_steps) if cfg.run.max_steps else len(steps)
    run, resume_from = start_run(cfg, is_main=is_main)
    if is_main:
        (run.path / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")

    # 2. The model (a new head on the backbone, or a checkpoint to continue), optimizer, resume.
    seed_everything(cfg.run.seed)
    model = init_reward_model(cfg.model, tokenizer)
    train_top_layers(model, cfg.train_layers)
    model = shard_if_asked(model.to(accelerator.device), cfg.run, accelerator)
    trainable, total = count_parameters(model)
    optimizer = build_optimizer(model.parameters(), cfg.optim, device_type=accelerator.device.type)
    scheduler = build_scheduler(optimizer, cfg.optim, len(steps))
    start = resume(run, resume_from, model, optimizer, scheduler)
    run.total_steps = total_steps  # the per-step log line's /N and ETA
    save_weights = weights_saver(model, tokenizer, cfg.model.dtype, cfg.run, save=save_reward_model)  # each checkpoint's weights (not normalized)
    model, optimizer = prepare(accelerator, model, optimizer)
    if is_main:
        log.info("reward model on %s: %d / %d trainable parameters; %d optimizer steps of %d pairs", cfg.model.path, trainable, total, total_steps, batch)
    if start == 0 and cfg.run.eval_every:
        run.log_metrics({"step": 0, **_held_out_record(model, valid_ex, cfg, accelerator, pad_token_id=pad)})

    # 3. Optimizer steps: the pairwise loss over micro-batches of the global batch of pairs.
    model.train()
    meter, shape = throughput_meter(accelerator, cfg.run), ModelShape.of(model)
    bar = progress_bar(total_steps, start, "rm", is_main and cfg.run.progress)
    step_start = time.perf_counter()
    for step in range(start, total_steps):
        global_idx = steps[step]
        mine = shard(global_idx, accelerator.process_index, world)
        chosen, rejected = [], []
        chunks = list(micro_batches(mine, cfg.micro_batch_size))
        for k, idx in enumerate(chunks):
            mb = collate([train_ex[i] for i in idx], pad).to(accelerator.device)
            b = len(idx)
            ctx = accelerator.no_sync(model) if k < len(chunks) - 1 else contextlib.nullcontext()  # sync on the last
            with ctx, accelerator.autocast():
                rewards = pair_rewards(model, mb, shared_prompt=cfg.shared_prompt, padding_free=cfg.padding_free)
                # Mean over the global batch; DDP averages gradients over processes, hence / world.
                loss, _ = pairwise_loss(rewards[:b], rewards[b:], num_pairs=len(global_idx) / world)
                accelerator.backward(loss)
            chosen.append(rewards[:b].detach().float())
            rejected.append(rewards[b:].detach().float())
            fwd = batch_forward_flops(shape, mb.attention_mask, mb.query_width, head="scalar", num_queries=b if cfg.shared_prompt else None)
            meter.add(int(mb.attention_mask.sum()), b, flops=train_flops(fwd))
        grad_norm = optimizer_step(model, optimizer, scheduler, accelerator, cfg.optim.max_grad_norm)
        done = step + 1
        # The global batch's loss and accuracy, gathered from every process.
        loss_value, m = pairwise_loss(accelerator.gather(torch.cat(chosen)), accelerator.gather(torch.cat(rejected)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value.item():.4f}", acc=f"{m['accuracy'].item():.2f}")
        if due(done, cfg.run.log_every, total_steps, last=True):
            rates = meter.rates()
            record = _step_record(
                done, loss_value, m, lr=scheduler.get_last_lr()[0], epoch=done * batch / len(train_ex),
                step_time_s=(time.perf_counter() - step_start) / cfg.run.log_every, rates=rates, grad_norm=grad_norm,
            )
            if due(done, cfg.run.eval_every, total_steps, last=False):
                record.update(_held_out_record(model, valid_ex, cfg, accelerator, pad_token_id=pad))
            run.log_metrics(record)
            step_start = time.perf_counter()
        checkpoint_if_due(run, done, total_steps, cfg.run, accelerator.unwrap_model(model), optimizer, scheduler, accelerator, save_weights)
    bar.close()

    # 4. Held-out accuracy, normalization (N+ detail 14), final/.
    final = _held_out_record(model, valid_ex, cfg, accelerator, pad_token_id=pad)
    _normalize_and_save(cfg, run, model, tokenizer, references, accelerator, final=final, total_steps=total_steps)
    return str(run.final_dir)
