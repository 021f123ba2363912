"""Direct preference optimization from the SFT policy (Rafailov et al. 2023, eq. 7; N+ detail 26).

Objective (``losses.dpo_loss``): ``-log sigmoid(beta * ((log pi(y_c|x) - log pi_ref(y_c|x)) -
(log pi(y_r|x) - log pi_ref(y_r|x))))`` over summed response-token log-probs, with conservative DPO
(label smoothing, the seed's 0.1) and IPO as options. Presets: ``seed`` (beta 0.1, label smoothing
0.1, lr 5e-5, 8 x 16 pairs, warmup 3%) and ``nplus`` (beta 0.05, lr 3e-6).

The reference is the SFT checkpoint the policy starts from. Its log-probs are computed once, by the
freshly loaded policy before any update (with LoRA: adapters disabled), for the training pairs the run
will use and the held-out pairs, and cached in ``reference_logprobs.pt`` in the run folder under a
key of the SFT weights' contents (a checkpoint retrained at the same path is not mistaken for the
old one), the tokenizer, the dtype and the pairs' token ids; no second model is ever loaded or held
during training. A resumed run reads the cache (or recomputes it before loading the checkpoint
weights, which gives the same numbers).

Chosen and rejected responses of a micro-batch go through the policy as one batch of 2B rows
(``collate_pairs``: rows [0, B) chosen, [B, 2B) rejected). By default (``shared_prompt``) the B
queries run first and the 2B responses continue from their key/value cache; this gives the same
log-probs and gradients as 2B full rows (tested) while computing each query once. Only real response
tokens go through the LM head, in blocks (``lm_head.chunked_target_logprobs``). With ``padding_free``
(default) the training micro-batches are packed into one row of their real tokens, each query once and
its two responses after it (``pair_logprobs``, ``data.packing``): the same log-probs and gradients
without the padding's work; the reference and held-out passes take the same path, so that in bf16 the
step-0 policy reproduces its cached reference exactly (implicit rewards 0).

Steps of ``train`` (its step comments carry these numbers):

1. data: the tokenized comparisons (``tasks.dpo_pairs``), every bad record reported before a model is
   loaded or a folder touched;
2. the policy from the SFT checkpoint (LoRA optional), and the reference log-probs, once, while it
   still is the SFT model;
3. optimizer, scheduler and a resumed checkpoint; a fresh run logs the SFT policy's samples;
4. optimizer steps: each micro-batch's pairs through the policy and the DPO loss; the step's metrics
   are summed by name over the micro-batches and reduced over processes in one call;
5. held-out implicit-reward accuracy, the DPO policy's samples, eval.json and final/.

Evaluation: implicit-reward accuracy on held-out comparisons, reward ``beta * (log pi - log
pi_ref)`` (``implicit_reward_accuracy``, the ``metrics.comparison_metrics`` of these rewards, reusable
by the evaluate stage; seeds report 0.61-0.62 for GPT-2, N+ 0.62-0.67 for Pythia 1B-6.9B), and
greedy summaries of held-out posts by the SFT policy (before training) and the DPO policy (after) in
samples.jsonl.

Departures from the reference code: batches are padded to their own longest query and response, not
to fixed lengths; a step's loss is the mean over its global batch of pairs, whatever the split into
micro-batches and processes. Pairs with identical summaries, empty summaries or responses over the
cap are dropped and counted (data.comparisons).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..config import DPOConfig
from ..data.batching import QueryResponseBatch, collate_preferences
from ..data.comparisons import PreferenceExample
from ..errors import DataError
from ..flops import ModelShape, batch_forward_flops, mfu_metrics, train_flops
from ..generation import decode_response, generate
from ..lm_head import response_token_logprobs
from ..losses import dpo_loss
from ..metrics import comparison_metrics
from ..modeling import count_parameters
from ..checkpoints import checkpoint_fingerprint
from .. import tasks
from .common import load_policy, make_accelerator, prepare, shard_if_asked, tokenizer_for, weights_saver
from .fsdp import is_sharded
from .loop import (
    run_peak_tflops,
    build_optimizer,
    build_scheduler,
    checkpoint_if_due,
    due,
    global_batches,
    micro_batches,
    optimizer_step,
    params_in_sync,
    peak_memory_mb,
    progress_bar,
    resume,
    seed_everything,
    shard,
)
from ..scoring import score_preference_pairs
from ..stages import DPO_EVAL_FILE
from .checkpointing import write_torch
from .lifecycle import finish_run, start_run
from .run_dir import RunDir

log = logging.getLogger(__name__)
REFERENCE_CACHE = "reference_logprobs.pt"
EVAL_FILE = DPO_EVAL_FILE


# ----------------------------------------------------------------------------------------------
# Data (pairs from ``tasks.dpo_pairs``)


collate = collate_preferences  # 2B rows: chosen in [0, B), rejected in [B, 2B)


# ----------------------------------------------------------------------------------------------
# Scoring


def pair_logprobs(model: nn.Module, batch: QueryResponseBatch, *, shared_prompt: bool = True, padding_free: bool = False) -> torch.Tensor:
    """Summed response log-probs of a ``collate`` batch: (2B,) float32, chosen then rejected (nats).

    ``shared_prompt`` runs each query once and both responses on its cache (``lm_head``); the result
    equals two full rows up to float rounding. ``padding_free`` packs the batch into one row of its
    real tokens (``data.packing``): with ``shared_prompt`` each query once followed by its chosen
    and rejected responses (the rejected one a branch that sees the query only), else the 2B full
    rows end to end; the same sums without the padding's work.
    """
    b = batch.input_ids.shape[0] // 2
    return response_token_logprobs(model, batch, num_queries=b if shared_prompt else None, padding_free=padding_free).sum(1)


class PairScorer(nn.Module):
    """Wraps the policy so that one call scores a pair batch; this is what DDP wraps, so the two
    passes of the shared prompt are one DDP forward."""

    def __init__(self, model: nn.Module, shared_prompt: bool = True, padding_free: bool = False):
        super().__init__()
        self.model = model
        self.shared_prompt = shared_prompt
        self.padding_free = padding_free

    def forward(self, input_ids, attention_mask, response_mask, query_width: int) -> torch.Tensor:
        batch = QueryResponseBatch(input_ids, attention_mask, response_mask, query_width)
        return pair_logprobs(self.model, batch, shared_prompt=self.shared_prompt, padding_free=self.padding_free)


def reference_logprobs(model: nn.Module, examples: Sequence[PreferenceExample], *, padding_free: bool = False, **kwargs) -> torch.Tensor:
    """Summed log-probs (N, 2) float32 (chosen, rejected) of every example under the reference
    (``scoring.score_preference_pairs`` with ``pair_logprobs``, packed with ``padding_free`` as the
    training passes are; ``kwargs`` are its keywords): the model itself, or with LoRA the model with its
    adapters disabled (the SFT weights)."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") else contextlib.nullcontext()
    with ctx:
        return score_preference_pairs(model, examples, functools.partial(pair_logprobs, padding_free=padding_free), **kwargs)


def implicit_reward_metrics(policy: torch.Tensor, reference: torch.Tensor, *, beta: float, confidences: Sequence[int | None] | None = None) -> dict[str, Any]:
    """Implicit-reward evaluation of comparisons (Rafailov et al. 2023 sec. 5; N+ detail 26).

    Shapes: policy and reference (N, 2) summed log-probs (chosen, rejected). Reward ``r = beta *
    (log pi - log pi_ref)``; a comparison is right when r_chosen > r_rejected (ties, e.g. policy ==
    reference, count as wrong and are counted in ``ties``). Returns {accuracy, n, ties, reward_margin,
    chosen_reward, rejected_reward, accuracy_by_confidence {confidence: {accuracy, n}}}: the
    ``metrics.comparison_metrics`` of these rewards under DPO's names.
    """
    rewards = beta * (policy - reference).double()
    m = comparison_metrics(rewards, confidences)
    nan = float("nan")
    out: dict[str, Any] = {
        "accuracy": m["accuracy"],
        "n": m["n"],
        "ties": m.get("ties", 0),
        "reward_margin": m.get("margin", nan),
        "chosen_reward": m.get("chosen_reward", nan),
        "rejected_reward": m.get("rejected_reward", nan),
    }
    if confidences is not None:
        out["accuracy_by_confidence"] = m.get("accuracy_by_confidence", {})
    return out


def implicit_reward_accuracy(
    policy: nn.Module,
    examples: Sequence[PreferenceExample],
    reference: torch.Tensor,
    *,
    beta: float,
    pad_token_id: int,
    batch_size: int = 16,
    shared_prompt: bool = True,
    padding_free: bool = False,
    accelerator=None,
    progress: bool = False,
) -> dict[str, Any]:
    """Implicit-reward accuracy of ``policy`` on held-out comparisons (see ``implicit_reward_metrics``).

    ``reference`` (N, 2) are the reference model's summed log-probs of the same examples, from
    ``reference_logprobs(ref_model, examples, ...)`` or a DPO run's ``reference_logprobs.pt``.
    Raises ValueError when its shape does not match the examples.
    """
    if tuple(reference.shape) != (len(examples), 2):
        raise ValueError(f"reference log-probs have shape {tuple(reference.shape)}, expected ({len(examples)}, 2)")
    scores = score_preference_pairs(policy, examples, functools.partial(pair_logprobs, padding_free=padding_free), pad_token_id=pad_token_id, batch_size=batch_size, shared_prompt=shared_prompt, accelerator=accelerator, desc="held-out pairs", progress=progress)
    return implicit_reward_metrics(scores, reference, beta=beta, confidences=[e.confidence for e in examples])


def _reference_key(cfg: DPOConfig, train_ex: Sequence[PreferenceExample], used: Sequence[int], valid_ex: Sequence[PreferenceExample]) -> str:
    """Cache key of the reference log-probs: the SFT weights (``checkpoint_fingerprint``: contents,
    so a checkpoint retrained at the same path gives a new key), the tokenizer when it is loaded
    from elsewhere, the dtype, and the token ids of the scored pairs."""
    h = hashlib.sha256()
    sft = Path(cfg.sft_path)
    tokenizer = cfg.tokenizer if cfg.tokenizer and cfg.tokenizer != cfg.sft_path else None  # the SFT folder's is in its fingerprint
    fingerprints = [checkpoint_fingerprint(cfg.sft_path), checkpoint_fingerprint(tokenizer) if tokenizer else None]
    h.update(json.dumps([str(sft.resolve()) if sft.exists() else cfg.sft_path, fingerprints, cfg.dtype, list(used)]).encode())
    for e in [train_ex[i] for i in used] + list(valid_ex):
        h.update(json.dumps([e.query_ids, e.chosen_ids, e.rejected_ids]).encode())
    return h.hexdigest()


def cached_reference_logprobs(run: RunDir, cfg: DPOConfig, model, train_ex, used: list[int], valid_ex, *, pad_token_id: int, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of the training pairs this run uses (rows of the others are NaN) and of the
    held-out pairs, read from ``reference_logprobs.pt`` when its key (SFT weights and tokenizer
    fingerprints, dtype, token ids; ``_reference_key``) matches, else computed with ``model`` (which
    must still hold the SFT weights) and saved."""
    key = _reference_key(cfg, train_ex, used, valid_ex)
    path = run.path / REFERENCE_CACHE
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            log.info("reference log-probs read from %s", path)
            return saved["train"], saved["valid"]
    kw = dict(pad_token_id=pad_token_id, batch_size=cfg.eval_batch_size, shared_prompt=cfg.shared_prompt, padding_free=cfg.padding_free, accelerator=accelerator, progress=cfg.run.progress)
    train_ref = torch.full((len(train_ex), 2), float("nan"))
    train_ref[used] = reference_logprobs(model, [train_ex[i] for i in used], desc="reference log-probs (train)", **kw)
    valid_ref = reference_logprobs(model, valid_ex, desc="reference log-probs (held-out)", **kw)
    if run.is_main:
        tmp = path.with_name(path.name + ".tmp")  # renamed into place: a torn write never looks like a cache
        write_torch({"key": key, "train": train_ref, "valid": valid_ref}, tmp)
        os.replace(tmp, path)
    return train_ref, valid_ref


# ----------------------------------------------------------------------------------------------
# Training


def _check(cfg: DPOConfig) -> None:
    if not cfg.sft_path:
        raise DataError("give the SFT checkpoint to start from: --sft-path runs/sft-.../final (or a hub id / .gguf file)", field="sft_path")
    if cfg.beta <= 0:
        raise DataError(f"beta must be > 0, got {cfg.beta}", field="beta")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise DataError(f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}", field="label_smoothing")
    if cfg.loss_type == "ipo" and cfg.label_smoothing:
        raise DataError("label_smoothing is for the sigmoid (DPO) loss; set --label-smoothing 0 with --loss-type ipo", field="label_smoothing")


def _load_data(cfg: DPOConfig, tokenizer, *, batch: int, is_main: bool) -> tuple[list[PreferenceExample], list[PreferenceExample], dict[str, str]]:
    """Step 1: (train, held-out) pairs and their drops as text (``tasks.dpo_pairs``), logged on the
    main process. Raises DataError for bad data or fewer training pairs than one global ``batch``."""
    train_ex, valid_ex, drops = tasks.dpo_pairs(cfg.data, tokenizer)
    if is_main:
        log.info("DPO data: %d train / %d held-out comparisons; dropped train: %s; held-out: %s", len(train_ex), len(valid_ex), drops["train"], drops["valid"])
    if len(train_ex) < batch:
        raise DataError(f"{len(train_ex)} training comparisons are fewer than one global batch of {batch} (dropped: {drops['train']})", path=cfg.data.comparisons)
    return train_ex, valid_ex, drops


def _optimizer_and_start(cfg: DPOConfig, run: RunDir, model: nn.Module, resume_from, *, num_steps: int, device_type: str):
    """Step 3: (optimizer, scheduler, first step): fresh ones at step 0, or the state of the checkpoint
    ``resume_from`` (the logs past its step cut off)."""
    optimizer = build_optimizer(model.parameters(), cfg.optim, device_type=device_type)
    scheduler = build_scheduler(optimizer, cfg.optim, num_steps)
    return optimizer, scheduler, resume(run, resume_from, model, optimizer, scheduler)


def _sample_examples(valid_ex: Sequence[PreferenceExample], n: int) -> list[PreferenceExample]:
    """The first ``n`` held-out posts, one comparison each: the queries samples.jsonl shows."""
    out: list[PreferenceExample] = []
    for e in valid_ex:
        if len(out) < n and e.post_id not in {s.post_id for s in out}:
            out.append(e)
    return out


def _log_samples(run: RunDir, policy: nn.Module, sample_ex: Sequence[PreferenceExample], tokenizer, cfg: DPOConfig, *, step: int, name: str) -> None:
    """Greedy responses of ``policy`` (the SFT model before training, the DPO one after) to the
    sample queries, to samples.jsonl with the chosen summary (main process only; an FSDP-sharded
    policy generates on every process, whose forwards gather its weights together)."""
    if not sample_ex or not (run.is_main or is_sharded(policy)):
        return
    responses = generate(policy, [e.query_ids for e in sample_ex], eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=cfg.sample_max_new_tokens, greedy=True)
    run.log_samples([
        {"step": step, "model": name, "id": e.post_id, "query": tokenizer.decode(e.query_ids), "response": decode_response(tokenizer, r), "chosen": decode_response(tokenizer, e.chosen_ids)}
        for e, r in zip(sample_ex, responses)
    ])


def _held_out(scorer: nn.Module, valid_ex: Sequence[PreferenceExample], ref_valid: torch.Tensor, cfg: DPOConfig, accelerator, *, pad_token_id: int) -> dict[str, Any]:
    """``implicit_reward_accuracy`` of the policy inside the (prepared) ``scorer`` on the held-out pairs."""
    return implicit_reward_accuracy(
        accelerator.unwrap_model(scorer).model, valid_ex, ref_valid, beta=cfg.beta, pad_token_id=pad_token_id, batch_size=cfg.eval_batch_size,
        shared_prompt=cfg.shared_prompt, padding_free=cfg.padding_free, accelerator=accelerator, progress=cfg.run.progress and accelerator.is_main_process,
    )


def _eval_record(result: dict[str, Any]) -> dict[str, float]:
    """The scalar held-out metrics as ``valid/*`` record fields (accuracy as ``valid/implicit_reward_accuracy``)."""
    return {f"valid/implicit_reward_{k}" if k == "accuracy" else f"valid/{k}": v for k, v in result.items() if not isinstance(v, dict)}


def _global_means(sums: dict[str, torch.Tensor], pairs: int, accelerator) -> dict[str, float]:
    """Means over the global batch of pair-weighted metric sums: ``sums`` {name: () tensor, the sum
    over this process's micro-batches of metric * pairs}, ``pairs`` this process's pair count (every
    process has the same names: each has micro-batches). One all-reduce of the values stacked in
    sorted name order with the pair count last, then each sum divided by the global count."""
    names = sorted(sums)
    count = torch.tensor(float(pairs), device=accelerator.device)
    total = accelerator.reduce(torch.stack([sums[k] for k in names] + [count]), reduction="sum")
    return dict(zip(names, (total[:-1] / total[-1]).tolist()))


# metrics.jsonl names of the per-step means, in record order
_RECORD_NAMES = {
    "loss": "loss/dpo",
    "chosen_reward": "rewards/chosen",
    "rejected_reward": "rewards/rejected",
    "reward_margin": "rewards/margin",
    "reward_accuracy": "rewards/accuracy",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}


def _step_record(done: int, means: dict[str, float], *, lr: float, epoch: float, step_time_s: float, pairs: int, tokens: int, grad_norm) -> dict[str, Any]:
    """The metrics.jsonl record of optimizer step ``done``: the global batch's ``means``, learning
    rate, epoch, throughput (``pairs`` and ``tokens`` of the global batch per ``step_time_s``) and the
    gradient norm."""
    record = {
        "step": done,
        **{key: means[name] for name, key in _RECORD_NAMES.items()},
        "lr": lr,
        "epoch": epoch,
        "perf/step_time_s": step_time_s,
        "perf/pairs_per_s": pairs / step_time_s,
        "perf/tokens_per_s": tokens / step_time_s,
    }
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record


def _finish(cfg: DPOConfig, run: RunDir, scorer: nn.Module, tokenizer, accelerator, *, valid_ex, ref_valid: torch.Tensor, sample_ex, drops: dict[str, str], total_steps: int) -> None:
    """Step 5: held-out implicit-reward accuracy and the weights' agreement across processes logged
    (RuntimeError when processes ended with different weights), the DPO policy's samples, and on the
    main process eval.json and final/."""
    result = _held_out(scorer, valid_ex, ref_valid, cfg, accelerator, pad_token_id=tokenizer.pad_token_id)
    in_sync = params_in_sync(scorer, accelerator)
    run.log_metrics({"step": total_steps, **_eval_record(result), "perf/peak_memory_mb": peak_memory_mb(accelerator.device), "dist/params_in_sync": in_sync})
    if not in_sync:
        raise RuntimeError("data-parallel processes ended with different weights")
    policy = accelerator.unwrap_model(scorer).model
    _log_samples(run, policy, sample_ex, tokenizer, cfg, step=total_steps, name="dpo")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        summary = {"step": total_steps, "beta": cfg.beta, "loss_type": cfg.loss_type, "label_smoothing": cfg.label_smoothing, "held_out": result, "dropped": drops}
        (run.path / EVAL_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    finish_run(run, weights_saver(policy, tokenizer, cfg.dtype, cfg.run), step=total_steps, stage="dpo")
    if accelerator.is_main_process:
        log.info("DPO done: %s (held-out implicit-reward accuracy %.4f over %d comparisons)", run.final_dir, result["accuracy"], result["n"])
    accelerator.wait_for_everyone()


def train(cfg: DPOConfig) -> str:
    """Run DPO; returns the path of the final Hugging Face checkpoint.

    Writes config.json, metrics.jsonl (one record per step: loss/dpo, rewards/{chosen, rejected,
    margin, accuracy}, logps/{chosen, rejected}, lr, grad_norm, perf/*), samples.jsonl (SFT and DPO
    summaries of held-out posts), eval.json (held-out implicit-reward accuracy), checkpoints/, final/.
    Raises DataError for a missing --sft-path, bad loss settings or bad data (before any model is
    loaded), ModelLoadError for a bad model path, RunDirError for a finished run folder without
    ``--run.overwrite``.
    """
    _check(cfg)
    accelerator = make_accelerator(cfg.model_args, cfg.run)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    tokenizer = tokenizer_for(cfg.model_args)
    pad = tokenizer.pad_token_id

    # 1. Data first: every bad record is reported before a model is loaded or a folder touched.
    batch = cfg.global_batch_size(world)
    train_ex, valid_ex, drops = _load_data(cfg, tokenizer, batch=batch, is_main=is_main)
    steps = global_batches(len(train_ex), batch, cfg.run.seed, cfg.epochs)
    total_steps = min(len(steps), cfg.run.max_steps) if cfg.run.max_steps else len(steps)
    run, resume_from = start_run(cfg, is_main=is_main)

    # 2. The policy, and the reference log-probs once, while it still is the SFT model (before any checkpoint loads).
    seed_everything(cfg.run.seed)
    model = load_policy(cfg.model_args, tokenizer).to(accelerator.device)
    trainable, total = count_parameters(model)
    used = sorted({i for s in steps[:total_steps] for i in s})
    t0 = time.perf_counter()
    ref_train, ref_valid = cached_reference_logprobs(run, cfg, model, train_ex, used, valid_ex, pad_token_id=pad, accelerator=accelerator)
    ref_time = time.perf_counter() - t0
    model = shard_if_asked(model, cfg.run, accelerator)  # after the reference pass, before the optimizer

    # 3. Optimizer and a resumed checkpoint; a fresh run logs the SFT policy's samples first.
    sample_ex = _sample_examples(valid_ex, cfg.num_sample_posts)
    optimizer, scheduler, start = _optimizer_and_start(cfg, run, model, resume_from, num_steps=len(steps), device_type=accelerator.device.type)
    if resume_from is None:
        _log_samples(run, model, sample_ex, tokenizer, cfg, step=0, name="sft")
    save_weights = weights_saver(model, tokenizer, cfg.dtype, cfg.run)  # each checkpoint's weights
    scorer, optimizer = prepare(accelerator, PairScorer(model, cfg.shared_prompt, cfg.padding_free), optimizer)
    if is_main:
        log.info("policy %s: %d / %d trainable parameters; %d optimizer steps of %d pairs; reference log-probs in %.1f s", cfg.sft_path, trainable, total, total_steps, batch, ref_time)

    # 4. Optimizer steps: the DPO loss over micro-batches of the global batch of pairs.
    ipo_lengths = cfg.loss_type == "ipo" and cfg.ipo_length_normalized
    model.train()
    run.total_steps = total_steps  # the per-step log line's /N and ETA
    bar = progress_bar(total_steps, start, "dpo", is_main and cfg.run.progress)
    shape, peak = ModelShape.of(model), run_peak_tflops(accelerator, cfg.run)
    step_start = time.perf_counter()
    for step in range(start, total_steps):
        global_idx = steps[step]
        mine = shard(global_idx, accelerator.process_index, world)
        sums: dict[str, torch.Tensor] = {}  # metric name -> sum over this process's pairs of metric * pairs
        tokens, flops = 0, 0.0  # flops: this process's model FLOPs (flops.py)
        chunks = list(micro_batches(mine, cfg.micro_batch_size))
        for k, idx in enumerate(chunks):
            mb = collate([train_ex[i] for i in idx], pad).to(accelerator.device)
            ref = ref_train[idx].to(accelerator.device)
            b = len(idx)
            ctx = accelerator.no_sync(scorer) if k < len(chunks) - 1 else contextlib.nullcontext()  # sync on the last
            with ctx, accelerator.autocast():
                lp = scorer(mb.input_ids, mb.attention_mask, mb.response_mask, mb.query_width)
                lengths = mb.response_mask.sum(1) if ipo_lengths else None
                loss, m = dpo_loss(
                    lp[:b], lp[b:], ref[:, 0], ref[:, 1], beta=cfg.beta, label_smoothing=cfg.label_smoothing, loss_type=cfg.loss_type,
                    chosen_lengths=lengths[:b] if lengths is not None else None, rejected_lengths=lengths[b:] if lengths is not None else None,
                )
                # Mean over the global batch; DDP averages gradients over processes, hence the world factor.
                accelerator.backward(loss * b * world / len(global_idx))
            for name, value in {"loss": loss.detach(), **m}.items():
                sums[name] = sums.get(name, 0) + value.float() * b
            tokens += int(mb.attention_mask.sum())
            flops += train_flops(batch_forward_flops(shape, mb.attention_mask, mb.query_width, num_queries=b if cfg.shared_prompt else None))
        grad_norm = optimizer_step(scorer, optimizer, scheduler, accelerator, cfg.optim.max_grad_norm)
        done = step + 1
        means = _global_means(sums, len(mine), accelerator)
        bar.update(1)
        bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['reward_accuracy']:.2f}")
        if due(done, cfg.run.log_every, total_steps, last=True):
            dt = (time.perf_counter() - step_start) / (cfg.run.log_every if done % cfg.run.log_every == 0 else 1)
            record = _step_record(done, means, lr=scheduler.get_last_lr()[0], epoch=done * batch / len(train_ex), step_time_s=dt, pairs=len(global_idx), tokens=tokens * world, grad_norm=grad_norm)
            record.update(mfu_metrics(flops, dt, peak))
            if due(done, cfg.run.eval_every, total_steps, last=False):
                record.update(_eval_record(_held_out(scorer, valid_ex, ref_valid, cfg, accelerator, pad_token_id=pad)))
            run.log_metrics(record)
            step_start = time.perf_counter()
        checkpoint_if_due(run, done, total_steps, cfg.run, accelerator.unwrap_model(scorer).model, optimizer, scheduler, accelerator, save_weights)
    bar.close()

    # 5. Held-out implicit-reward accuracy, the DPO policy's samples, eval.json and final/.
    _finish(cfg, run, scorer, tokenizer, accelerator, valid_ex=valid_ex, ref_valid=ref_valid, sample_ex=sample_ex, drops=drops, total_steps=total_steps)
    return str(run.final_dir)
