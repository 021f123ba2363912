"""Supervised fine-tuning on reference TL;DRs (or UltraFeedback demonstrations, ``data.task``) (Stiennon et al. 2020 sec. 3.4; N+ sec. 4, details 1-5, 7-8).

Objective: token-level cross-entropy of the reference response ``" " + summary + EOS`` given the
query, averaged over the response tokens of the whole global batch (so gradient accumulation and
data parallelism do not change the loss). ``loss_on_query`` also trains on the query tokens, as the
N+ code did (all non-pad tokens, detail 5); the default is response-only, as the seeds and modern
trainers do.

``train`` in four steps (numbered in its comments): (1) tokenized examples, checked before anything
loads; (2) the run folder, the model, AdamW and the cosine schedule, a resumed checkpoint; (3) the
optimizer steps over the global batches, with metrics, evaluations and checkpoints when due; (4) the
final evaluation and ``final/``.

Departure from the reference code, on purpose: batches are padded to their own longest query and
response, not to the fixed 512 / 53 tokens, and only response positions go through the LM head;
both change speed, not the loss.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from ..config import SFTConfig
from ..data.batching import QueryResponseBatch, collate_query_response
from ..data.tldr import SFTExample
from ..errors import DataError
from ..generation import decode_response, generate
from ..losses import sft_loss
from ..modeling import count_parameters, response_logits
from ..ops import position_ids_from_mask, token_logprobs
from ..tasks import sft_examples
from .common import load_policy, make_accelerator, prepare, shard_if_asked, tokenizer_for, weights_saver
from .fsdp import is_sharded
from .loop import (
    Throughput,
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
from .lifecycle import finish_run, start_run
from .run_dir import RunDir

log = logging.getLogger(__name__)


def target_logprobs(model, batch: QueryResponseBatch, loss_on_query: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the training targets and their mask.

    Response-only: (B, T) log pi(response_t | query, response_<t) and the response mask.
    With ``loss_on_query``: (B, L - 1) log-probs of every token after the first real one.
    """
    if not loss_on_query:
        logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.query_width)
        return token_logprobs(logits, batch.responses), batch.response_mask
    mask = batch.attention_mask
    logits = model(
        input_ids=batch.input_ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask), use_cache=False
    ).logits[:, :-1]
    return token_logprobs(logits, batch.input_ids[:, 1:]), mask[:, 1:] & mask[:, :-1]


def num_targets(examples: list[SFTExample], loss_on_query: bool) -> int:
    """Target tokens of a set of examples (the loss normalizer)."""
    if loss_on_query:
        return sum(len(e.query_ids) + len(e.response_ids) - 1 for e in examples)
    return sum(len(e.response_ids) for e in examples)


def collate(examples: list[SFTExample], pad_token_id: int) -> QueryResponseBatch:
    return collate_query_response([e.query_ids for e in examples], [e.response_ids for e in examples], pad_token_id)


@torch.no_grad()
def validation_loss(model, examples: list[SFTExample], pad_token_id: int, batch_size: int, loss_on_query: bool, accelerator) -> float:
    """Mean per-token NLL of ``examples`` (nats), summed over all processes' shards."""
    model.eval()
    device = accelerator.device
    mine = shard(list(range(len(examples)))[: len(examples) - len(examples) % accelerator.num_processes], accelerator.process_index, accelerator.num_processes)
    totals = torch.zeros(2, device=device)
    for idx in micro_batches(mine, batch_size):
        batch = collate([examples[i] for i in idx], pad_token_id).to(device)
        with accelerator.autocast():
            logprobs, mask = target_logprobs(model, batch, loss_on_query)
        _, m = sft_loss(logprobs, mask)
        totals += torch.stack([m["nll_sum"].float(), m["tokens"].float()])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def evaluate_and_sample(model, run: RunDir, step: int, valid_ex: list[SFTExample], sample_ex: list[SFTExample], tokenizer, cfg: SFTConfig, accelerator) -> dict[str, float]:
    """``{"valid/loss": ...}`` over ``valid_ex`` (empty without held-out examples), and greedy summaries
    of ``sample_ex`` with their references appended to samples.jsonl (main process)."""
    pad = tokenizer.pad_token_id
    out = {"valid/loss": validation_loss(model, valid_ex, pad, cfg.micro_batch_size, cfg.loss_on_query, accelerator)} if valid_ex else {}
    policy = accelerator.unwrap_model(model)
    if sample_ex and (accelerator.is_main_process or is_sharded(policy)):  # a sharded model generates on every process
        responses = generate(policy, [e.query_ids for e in sample_ex], eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, max_new_tokens=cfg.data.max_response_length, greedy=True)
        run.log_samples([
            {"step": step, "id": e.id, "query": tokenizer.decode(e.query_ids), "response": decode_response(tokenizer, r), "reference": decode_response(tokenizer, e.response_ids)}
            for e, r in zip(sample_ex, responses)
        ])
    return out


def accumulate_gradients(model, train_ex: list[SFTExample], global_idx: list[int], cfg: SFTConfig, accelerator, meter: Throughput, pad: int) -> torch.Tensor:
    """Step 3's forward and backward passes for one optimizer step: this process's share of the global
    batch ``global_idx`` in micro-batches, gradients accumulated (synchronized on the last micro-batch),
    each micro-batch's loss normalized by the global batch's target-token count times the
    world size (DDP averages gradients over processes). Returns the summed loss () on the device
    (scaled by the world size)."""
    n_targets = num_targets([train_ex[i] for i in global_idx], cfg.loss_on_query)
    mine = shard(global_idx, accelerator.process_index, accelerator.num_processes)
    loss_sum = torch.zeros((), device=accelerator.device)
    chunks = list(micro_batches(mine, cfg.micro_batch_size))
    for k, idx in enumerate(chunks):
        mb = collate([train_ex[i] for i in idx], pad).to(accelerator.device)
        sync = k == len(chunks) - 1
        ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
        with ctx, accelerator.autocast():
            logprobs, mask = target_logprobs(model, mb, cfg.loss_on_query)
            # DDP averages gradients over processes, hence the world-size factor.
            loss, _ = sft_loss(logprobs, mask, n_targets / accelerator.num_processes)
            accelerator.backward(loss)
        loss_sum += loss.detach()
        meter.add(int(mb.attention_mask.sum()), len(idx))
    return loss_sum


def train(cfg: SFTConfig) -> str:
    """Run SFT; returns the path of the final Hugging Face checkpoint.

    Raises DataError for bad data (before any model is loaded), ModelLoadError for a bad model path,
    RunDirError for a finished run folder without ``--run.overwrite``.
    """
    accelerator = make_accelerator(cfg.model, cfg.run)
    is_main = accelerator.is_main_process
    tokenizer = tokenizer_for(cfg.model)

    # 1. Data first: every bad record is reported before a model is loaded or a folder touched.
    train_ex, valid_ex, drops, vdrops = sft_examples(cfg.data, tokenizer)
    if is_main:
        log.info("SFT data: %d train / %d valid examples; dropped train: %s; valid: %s", len(train_ex), len(valid_ex), drops, vdrops)
    batch = cfg.global_batch_size(accelerator.num_processes)
    if len(train_ex) < batch:
        raise DataError(f"{len(train_ex)} training examples are fewer than one global batch of {batch}", path=cfg.data.train)
    steps = global_batches(len(train_ex), batch, cfg.run.seed, cfg.epochs)
    total_steps = min(len(steps), cfg.run.max_steps) if cfg.run.max_steps else len(steps)

    # 2. The run folder (config checked, a checkpoint to resume), the model, optimizer and schedule.
    run, resume_from = start_run(cfg, is_main=is_main)
    seed_everything(cfg.run.seed)
    model = shard_if_asked(load_policy(cfg.model, tokenizer), cfg.run, accelerator)
    trainable, total = count_parameters(model)
    optimizer = build_optimizer(model.parameters(), cfg.optim, device_type=accelerator.device.type)
    scheduler = build_scheduler(optimizer, cfg.optim, len(steps))
    start = resume(run, resume_from, model, optimizer, scheduler)
    run.total_steps = total_steps  # the per-step log line's /N and ETA
    save_weights = weights_saver(model, tokenizer, cfg.model.dtype, cfg.run)  # final/ and each checkpoint's weights
    model, optimizer = prepare(accelerator, model, optimizer)
    if is_main:
        log.info("model %s: %d / %d trainable parameters; %d optimizer steps of %d sequences", cfg.model.path, trainable, total, total_steps, batch)

    pad = tokenizer.pad_token_id
    sample_ex = valid_ex[: cfg.num_sample_posts]

    def evaluate(step: int) -> dict[str, float]:
        return evaluate_and_sample(model, run, step, valid_ex, sample_ex, tokenizer, cfg, accelerator)

    if start == 0 and cfg.run.eval_every:
        run.log_metrics({"step": 0, **evaluate(0)})
    model.train()
    meter = Throughput()
    bar = progress_bar(total_steps, start, "sft", is_main and cfg.run.progress)
    step_start = time.perf_counter()
    # 3. Optimizer steps: this process's share of the global batch in micro-batches, gradients
    #    accumulated (synchronized on the last), one step; metrics, evaluations and checkpoints when due.
    for step in range(start, total_steps):
        loss_sum = accumulate_gradients(model, train_ex, steps[step], cfg, accelerator, meter, pad)
        grad_norm = optimizer_step(model, optimizer, scheduler, accelerator, cfg.optim.max_grad_norm)
        done = step + 1
        # each process's loss is scaled by the world size for DDP's gradient mean; undo it here
        loss_value = accelerator.reduce(loss_sum, reduction="sum").item() / accelerator.num_processes
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if due(done, cfg.run.log_every, total_steps, last=True):
            record = {
                "step": done,
                "loss/sft": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "epoch": done * batch / len(train_ex),
                "perf/step_time_s": (time.perf_counter() - step_start) / cfg.run.log_every,
                **meter.rates(),
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if due(done, cfg.run.eval_every, total_steps, last=False):
                record.update(evaluate(done))
            run.log_metrics(record)
            step_start = time.perf_counter()
        checkpoint_if_due(run, done, total_steps, cfg.run, accelerator.unwrap_model(model), optimizer, scheduler, accelerator, save_weights)
    bar.close()

    # 4. The final evaluation, a check that every process holds the same weights, final/.
    final_metrics = evaluate(total_steps)
    in_sync = params_in_sync(model, accelerator)
    run.log_metrics({"step": total_steps, **final_metrics, "perf/peak_memory_mb": peak_memory_mb(accelerator.device), "dist/params_in_sync": in_sync})
    if not in_sync:
        raise RuntimeError("data-parallel processes ended with different weights")
    accelerator.wait_for_everyone()
    finish_run(run, save_weights, step=total_steps, stage="sft")
    if is_main:
        log.info("SFT done: %s (valid loss %s)", run.final_dir, final_metrics.get("valid/loss"))
    accelerator.wait_for_everyone()
    return str(run.final_dir)
