"""Reward model on human comparisons, normalized on SFT references, measured against humans and a judge
(Stiennon et al. 2020 sec. 3.4, eq. 1; N+ details 10-15).

Model (``reward_model.ScalarRewardModel``): the backbone of a base or SFT causal LM plus a scalar head
N(0, 1/sqrt(d_model + 1)) (detail 11), read at the response's EOS, the last real token of the row,
found from the attention mask (detail 12; with Qwen pad = EOS). Dropout off (detail 7).

Objective (``losses.pairwise_loss``): ``-log sigmoid(r_chosen - r_rejected)``, mean over the global
batch of pairs. Chosen and rejected responses of a micro-batch go through the model in one forward
pass (``collate_pairs``: rows [0, B) chosen, [B, 2B) rejected); with ``shared_prompt`` (default) the B
queries run once and the 2B responses continue from their key/value cache, which gives the same
scores and gradients as 2B full rows (tested) with the query computed once per pair.

Normalization (detail 15): after training, the (query, reference summary) pairs of the SFT posts are
scored and the head bias is shifted so that their mean reward is 0; the shift is stored in the
checkpoint config (``reward_offset``, ``normalization``).

Evaluation (``evaluate``, ``tldr-rlhf evaluate-rm``): accuracy on held-out TL;DR comparisons, accuracy
by annotator confidence and the model's own calibration, accuracy on OpenAI's CNN/DM comparisons (out
of distribution, detail 6 and 15), and agreement with gpt-3.5-turbo judgements of OpenAI's 1.3B PPO
summary against the human reference. Results to JSON and a table.

Departures: batches are padded to their own longest query and response, not to fixed lengths;
``train_layers`` can freeze the lower blocks (a CPU-demo speed option; the papers train every weight).
Bad records (identical or empty summaries, a ``choice`` outside {0, 1}, responses over the cap, a
query that does not fit) are dropped and counted; truncated queries are counted; nothing is relabeled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..config import EvaluateRMConfig, RMConfig, RMDataArgs, from_dict
from ..data.batching import QueryResponseBatch, collate_preferences, collate_query_response
from ..data.comparisons import Comparison, PreferenceExample, build_preference_examples, describe_drops, load_comparisons, load_judged_samples
from ..data.tldr import DropCounts, SFTExample
from ..errors import DataError
from ..losses import pairwise_loss
from ..metrics import comparison_metrics, judge_agreement, pair_lengths
from ..modeling import bf16_autocast, count_parameters, init_reward_model, load_reward_checkpoint, load_tokenizer, master_weights_dtype, save_reward_model
from ..reward_model import ScalarRewardModel, train_top_layers, uses_sliding_window
from .. import tasks
from .common import make_accelerator, tokenizer_for
from .loop import (
    RunDir,
    Throughput,
    build_optimizer,
    build_scheduler,
    global_batches,
    load_checkpoint,
    micro_batches,
    peak_memory_mb,
    progress_bar,
    save_checkpoint,
    seed_everything,
    shard,
    score_preference_pairs,
    sharded_scores,
)

log = logging.getLogger(__name__)
EVAL_FILE = "eval_rm.json"


# ----------------------------------------------------------------------------------------------
# Data (from ``tasks``: rm_pairs, normalization_references)


# (query, reference summary) pairs to score once for normalization: the SFT example format.
ScoredText = SFTExample


collate = collate_preferences  # 2B rows: chosen in [0, B), rejected in [B, 2B)


# ----------------------------------------------------------------------------------------------
# Scoring


def pair_rewards(model: nn.Module, batch: QueryResponseBatch, *, shared_prompt: bool = True) -> torch.Tensor:
    """Rewards of a ``collate_pairs`` batch (2B rows) in one forward pass -> (2B,) float32:
    [0, B) chosen, [B, 2B) rejected. ``shared_prompt`` runs each query once (same scores)."""
    b = batch.input_ids.shape[0] // 2
    inner = model.module if hasattr(model, "module") else model
    share = shared_prompt and isinstance(inner, ScalarRewardModel) and not uses_sliding_window(inner)
    kwargs = dict(num_queries=b, query_width=batch.query_width) if share else {}
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).rewards


@torch.no_grad()
def score_comparisons(
    model: nn.Module,
    examples: Sequence[PreferenceExample],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    shared_prompt: bool = True,
    accelerator=None,
    desc: str = "scoring pairs",
    progress: bool = False,
) -> torch.Tensor:
    """Rewards of every example's chosen and rejected response: (N, 2) float32 on CPU. Eval mode
    (restored after), no gradients; several processes each score a share and gather."""
    return score_preference_pairs(model, examples, pair_rewards, pad_token_id=pad_token_id, batch_size=batch_size, shared_prompt=shared_prompt, accelerator=accelerator, desc=desc, progress=progress)


@torch.no_grad()
def score_texts(model: nn.Module, items: Sequence[ScoredText], *, pad_token_id: int, batch_size: int = 16, accelerator=None, desc: str = "scoring", progress: bool = False) -> torch.Tensor:
    """Reward of each (query, response): (N,) float32 on CPU (``[left-padded query | right-padded
    response]`` rows, read at each response's EOS)."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()

    def chunk_scores(chunk: list[int]) -> torch.Tensor:
        batch = collate_query_response([items[i].query_ids for i in chunk], [items[i].response_ids for i in chunk], pad_token_id).to(device)
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).rewards.float().cpu()[:, None]

    lengths = [len(x.query_ids) + len(x.response_ids) for x in items]
    try:
        return sharded_scores(len(items), lengths, 1, chunk_scores, batch_size=batch_size, accelerator=accelerator, desc=desc, progress=progress)[:, 0]
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# Normalization


@torch.no_grad()
def normalize_rewards(model: ScalarRewardModel, references: Sequence[ScoredText], *, pad_token_id: int, batch_size: int = 16, accelerator=None, progress: bool = False, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Shift the head bias so that the mean reward of ``references`` is 0 (N+ detail 15).

    The mean raw reward m is subtracted from ``score.bias`` and added to ``config.reward_offset``;
    ``config.normalization`` records {n, mean_before, std_before, source}. Returns that record plus
    ``mean_after`` (the references scored again: 0 up to float rounding). In place."""
    inner = model.module if hasattr(model, "module") else model
    before = score_texts(model, references, pad_token_id=pad_token_id, batch_size=batch_size, accelerator=accelerator, desc="normalization (references)", progress=progress).double()
    mean, std = before.mean().item(), (before.std().item() if len(before) > 1 else 0.0)
    inner.score.bias.sub_(torch.tensor([mean], dtype=inner.score.bias.dtype, device=inner.score.bias.device))
    inner.config.reward_offset = float(inner.config.reward_offset or 0.0) + mean
    after = score_texts(model, references, pad_token_id=pad_token_id, batch_size=batch_size, accelerator=accelerator, desc="normalization (check)", progress=progress).double()
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

    # Data first: every bad record is reported before a model is loaded or a folder touched.
    train_ex, valid_ex, report = tasks.rm_pairs(cfg.data, tokenizer)
    references, ref_report = tasks.normalization_references(cfg.norm, cfg.data, tokenizer) if cfg.norm.enabled else ([], {})
    report["normalization"] = ref_report
    if is_main:
        log.info(
            "RM data: %d train / %d held-out comparisons; train dropped %s, %d queries truncated; held-out dropped %s; %d normalization references",
            len(train_ex), len(valid_ex), report["train"]["dropped"] or "none", report["train"]["query_truncated"], report["valid"]["dropped"] or "none", len(references),
        )
    batch = cfg.global_batch_size(world)
    if len(train_ex) < batch:
        raise DataError(f"{len(train_ex)} training comparisons are fewer than one global batch of {batch} (dropped: {describe_drops(report['train']['dropped'])})", path=cfg.data.comparisons)
    steps = global_batches(len(train_ex), batch, cfg.run.seed, cfg.epochs)
    total_steps = min(len(steps), cfg.run.max_steps) if cfg.run.max_steps else len(steps)

    run, resume_from = RunDir.open(cfg, is_main=is_main)
    if is_main:
        (run.path / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")

    seed_everything(cfg.run.seed)
    model = init_reward_model(cfg.model, tokenizer)
    train_top_layers(model, cfg.train_layers)
    model.to(accelerator.device)
    trainable, total = count_parameters(model)
    optimizer = build_optimizer(model.parameters(), cfg.optim, device_type=accelerator.device.type)
    scheduler = build_scheduler(optimizer, cfg.optim, len(steps))
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        start, resume_from = state["step"], state["path"]
        run.truncate_logs(start)
        if is_main:
            log.info("resumed from %s (step %d)", resume_from, start)
    model, optimizer = accelerator.prepare(model, optimizer)
    if is_main:
        log.info("reward model on %s: %d / %d trainable parameters; %d optimizer steps of %d pairs", cfg.model.path, trainable, total, total_steps, batch)

    def evaluate() -> dict[str, Any]:
        rewards = score_comparisons(
            model, valid_ex, pad_token_id=pad, batch_size=cfg.eval_batch_size, shared_prompt=cfg.shared_prompt,
            accelerator=accelerator, desc="held-out pairs", progress=cfg.run.progress and is_main,
        )
        m = comparison_metrics(rewards, [e.confidence for e in valid_ex])
        return {f"valid/{k}": v for k, v in m.items() if not isinstance(v, dict)}

    if start == 0 and cfg.run.eval_every:
        run.log_metrics({"step": 0, **evaluate()})
    model.train()
    meter = Throughput()
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
            sync = k == len(chunks) - 1
            ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                rewards = pair_rewards(model, mb, shared_prompt=cfg.shared_prompt)
                # Mean over the global batch; DDP averages gradients over processes, hence / world.
                loss, _ = pairwise_loss(rewards[:b], rewards[b:], num_pairs=len(global_idx) / world)
                accelerator.backward(loss)
            chosen.append(rewards[:b].detach().float())
            rejected.append(rewards[b:].detach().float())
            meter.add(int(mb.attention_mask.sum()), b)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm) if cfg.optim.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        all_chosen = accelerator.gather(torch.cat(chosen))
        all_rejected = accelerator.gather(torch.cat(rejected))
        loss_value, m = pairwise_loss(all_chosen, all_rejected)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value.item():.4f}", acc=f"{m['accuracy'].item():.2f}")
        if done % cfg.run.log_every == 0 or done == total_steps:
            rates = meter.rates()
            record = {
                "step": done,
                "loss/rm": loss_value.item(),
                "rm/accuracy": m["accuracy"].item(),
                "rm/margin": m["margin"].item(),
                "rm/chosen_reward": m["chosen"].item(),
                "rm/rejected_reward": m["rejected"].item(),
                "lr": scheduler.get_last_lr()[0],
                "epoch": done * batch / len(train_ex),
                "perf/step_time_s": (time.perf_counter() - step_start) / cfg.run.log_every,
                "perf/pairs_per_s": rates["perf/sequences_per_s"],
                "perf/tokens_per_s": rates["perf/tokens_per_s"],
            }
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done != total_steps:
                record.update(evaluate())
            run.log_metrics(record)
            step_start = time.perf_counter()
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done != total_steps:
            save_checkpoint(run, done, accelerator.unwrap_model(model), optimizer, scheduler, keep=cfg.run.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()

    final = evaluate()
    inner = accelerator.unwrap_model(model)
    record: dict[str, Any] = {"step": total_steps, **final}
    if references:
        norm = normalize_rewards(
            model, references, pad_token_id=pad, batch_size=cfg.eval_batch_size, accelerator=accelerator,
            progress=cfg.run.progress and is_main, source={"source": cfg.norm.posts, "split": cfg.norm.split},
        )
        record.update({"norm/mean_before": norm["mean_before"], "norm/std_before": norm["std_before"], "norm/mean_after": norm["mean_after"], "norm/n": norm["n"]})
        if is_main:
            log.info("normalized on %d references: mean reward %.4f -> %.2e (std %.4f)", norm["n"], norm["mean_before"], norm["mean_after"], norm["std_before"])
    record["perf/peak_memory_mb"] = peak_memory_mb(accelerator.device)
    run.log_metrics(record)
    accelerator.wait_for_everyone()
    if is_main:
        run.write_final(lambda tmp: save_reward_model(inner, tokenizer, tmp), step=total_steps, stage="rm")
        log.info("RM done: %s (held-out accuracy %.4f on %d pairs)", run.final_dir, final["valid/accuracy"], final["valid/n"])
    accelerator.wait_for_everyone()
    return str(run.final_dir)


# ----------------------------------------------------------------------------------------------
# Evaluation


def _run_data(cfg: EvaluateRMConfig) -> tuple[RMDataArgs, str]:
    """The held-out data settings: the training run's own (config.json next to final/) or cfg.data."""
    run_cfg = Path(cfg.model).parent / "config.json"
    if cfg.from_run and run_cfg.is_file():
        try:
            saved = from_dict(RMConfig, json.loads(run_cfg.read_text()))
            return dataclasses.replace(saved.data, valid_limit=cfg.valid_limit), str(run_cfg)
        except TypeError:
            log.warning("%s is not a reward-model run config; using --data", run_cfg)
    return dataclasses.replace(cfg.data, valid_limit=cfg.valid_limit), "--data"


def evaluate(cfg: EvaluateRMConfig) -> dict[str, Any]:
    """Measure a reward model; writes the JSON results and prints a table. Returns the results.

    Sections (each with its example count and drop counts): ``heldout`` (TL;DR comparisons held out
    from training, with accuracy by annotator confidence and calibration), ``cnndm`` (CNN/DM
    comparisons, out of distribution), ``judge`` (agreement with the GPT-3.5 judge on OpenAI PPO
    summary vs reference). A set asked for that yields no example (every record dropped) is kept
    with n 0, its drop counts and a ``note``, printed too; a TL;DR-only set asked for with another
    task is listed under ``skipped``. Raises DataError / ModelLoadError before scoring anything.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg.model)
    pad = tokenizer.pad_token_id
    data, data_from = _run_data(cfg)

    # Data first: every source is read and checked before the model is loaded.
    _, heldout, report = tasks.rm_pairs(data, tokenizer, need_train=False)
    cnndm: list[PreferenceExample] = []
    cnndm_report: dict[str, Any] = {}
    ood = tasks.ood_sets(data)  # the out-of-distribution sets that exist for the task
    if cfg.cnndm and "cnndm" in ood:
        comps, drops = load_comparisons(cfg.cnndm, "validation")
        not_cnndm = sum(not c.is_cnndm for c in comps)  # TL;DR rows of the hub's validation split: not drops
        comps = [c for c in comps if c.is_cnndm]
        if cfg.cnndm_limit:
            comps = comps[: cfg.cnndm_limit]
        notes = DropCounts()
        cnndm, drops = build_preference_examples(comps, tokenizer, max_response_length=data.max_response_length, max_cnndm_query_length=cfg.max_cnndm_query_length, drops=drops, notes=notes)
        cnndm_report = {"dropped": dict(drops.counts), "query_truncated": notes.counts.get("query_truncated", 0)}
        if not cnndm:
            cnndm_report["not_cnndm"] = not_cnndm
            cnndm_report["note"] = _nothing_left("CNN/DM comparison", {**cnndm_report["dropped"], "not_cnndm": not_cnndm})
    judged: list[PreferenceExample] = []
    judge_first: list[bool] = []
    judge_report: dict[str, Any] = {}
    if cfg.policy_samples and "judge" in ood:
        samples, drops = load_judged_samples(cfg.policy_samples)
        if cfg.judge_limit:
            samples = samples[: cfg.judge_limit]
        notes = DropCounts()
        pairs = [Comparison(s.id, s.query_fields, s.response, s.reference) for s in samples]
        judged, drops = build_preference_examples(pairs, tokenizer, max_query_length=data.max_query_length, max_response_length=data.max_response_length, drops=drops, notes=notes)
        verdict = {s.id: s.judge_preferred for s in samples}
        judge_first = [verdict[e.post_id] == "policy" for e in judged]
        judge_report = {"dropped": dict(drops.counts), "query_truncated": notes.counts.get("query_truncated", 0), "judge": samples[0].judge if samples else ""}
        if not judged:
            judge_report["note"] = _nothing_left("judged (policy summary, reference) pair", judge_report["dropped"])
    skipped = {name: f"a TL;DR set; the task is {data.task}" for name, asked in (("cnndm", cfg.cnndm), ("judge", cfg.policy_samples)) if asked and name not in ood}

    model = load_reward_checkpoint(cfg.model, dtype=master_weights_dtype(cfg.dtype), tokenizer=tokenizer).to(device)
    autocast = bf16_autocast(device, cfg.dtype)
    kw = dict(pad_token_id=pad, batch_size=cfg.batch_size, progress=cfg.progress)
    results: dict[str, Any] = {"model": cfg.model, "data_from": data_from, "normalization": model.config.normalization, "reward_offset": model.config.reward_offset}
    if skipped:
        results["skipped"] = skipped
    t0 = time.perf_counter()
    scores: list[dict[str, Any]] = []

    def keep(name: str, examples: Sequence[PreferenceExample], r: torch.Tensor) -> None:
        scores.extend({"set": name, "id": e.post_id, "confidence": e.confidence, "first": a, "second": b} for e, (a, b) in zip(examples, r.tolist()))

    with autocast:
        r = score_comparisons(model, heldout, desc=f"held-out {data.task} pairs", **kw)
        results["heldout"] = {**comparison_metrics(r, [e.confidence for e in heldout], lengths=pair_lengths(heldout)), **report["valid"], "source": data.valid_comparisons or data.comparisons, "task": data.task}
        keep("heldout", heldout, r)
        if cnndm:
            r = score_comparisons(model, cnndm, desc="CNN/DM pairs", **kw)
            results["cnndm"] = {**comparison_metrics(r, [e.confidence for e in cnndm], lengths=pair_lengths(cnndm)), **cnndm_report, "source": cfg.cnndm}
            keep("cnndm", cnndm, r)
        elif cnndm_report:  # asked for, nothing left: said, not left out
            results["cnndm"] = {"n": 0, **cnndm_report, "source": cfg.cnndm}
        if judged:
            r = score_comparisons(model, judged, desc="judged PPO vs reference", **kw)
            results["judge"] = {**judge_agreement(r, judge_first, lengths=pair_lengths(judged)), **judge_report, "source": cfg.policy_samples}
            keep("judge", judged, r)
        elif judge_report:
            results["judge"] = {"n": 0, **judge_report, "source": cfg.policy_samples}
    results["seconds"] = time.perf_counter() - t0
    out = Path(cfg.output) if cfg.output else Path(cfg.model).parent / EVAL_FILE
    out.write_text(json.dumps(results, indent=2) + "\n")
    # Per-pair rewards (first = chosen / PPO summary, second = rejected / reference) for further analysis.
    out.with_suffix(".scores.jsonl").write_text("".join(json.dumps(x) + "\n" for x in scores))
    print(format_table(results))
    print(f"\nresults: {out}")
    return results


def _nothing_left(what: str, counts: dict[str, int]) -> str:
    """The note of an asked-for evaluation set that yields no example: why, with the counts."""
    total = sum(counts.values())
    if not total:
        return f"no {what} to score: the source has no records"
    return f"no {what} left to score: all {total} records were dropped ({describe_drops(counts)})"


def format_table(results: dict[str, Any]) -> str:
    """A readable table of ``evaluate`` results."""
    lines = [f"reward model: {results['model']}", "", f"{'set':<31}{'n':>6}{'accuracy':>10}{'longer wins':>13}{'margin':>9}  dropped"]

    def row(name: str, m: dict[str, Any], key: str = "accuracy", baseline: str = "longer_wins_accuracy") -> None:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(m.get("dropped", {}).items())) or "none"
        margin = f"{m['margin']:>9.3f}" if "margin" in m else " " * 9
        base = f"{m[baseline]:>13.4f}" if baseline in m else " " * 13
        value = f"{m[key]:>10.4f}" if key in m else f"{'-':>10}"
        lines.append(f"{name:<31}{m['n']:>6}{value}{base}{margin}  {dropped}")

    row("held-out TL;DR comparisons" if results["heldout"].get("task", "tldr") == "tldr" else "held-out preference pairs", results["heldout"])
    if "cnndm" in results:
        row("CNN/DM comparisons (OOD)", results["cnndm"])
    if "judge" in results:
        row("agreement with GPT-3.5 judge", results["judge"], "agreement", "longer_agreement")
    lines.append("(longer wins: the baseline that always prefers the longer response, on the same pairs)")
    for key, label in (("cnndm", "CNN/DM comparisons"), ("judge", "agreement with GPT-3.5 judge")):
        if key in results and results[key].get("note"):
            lines.append(f"{label}: {results[key]['note']}")
        if key in results.get("skipped", {}):
            lines.append(f"{label}: skipped ({results['skipped'][key]})")
    h = results["heldout"]
    if h.get("accuracy_by_confidence"):
        lines += ["", "held-out accuracy by annotator confidence:", "  " + "  ".join(f"{c}: {v['accuracy']:.2f} (n={v['n']})" for c, v in h["accuracy_by_confidence"].items())]
    if h.get("calibration"):
        lines += ["", f"calibration (model probability of its preferred summary; ECE {h['calibration']['ece']:.3f}):"]
        lines += [f"  p in [{b['p_low']:.1f}, {b['p_high']:.1f}]: mean p {b['p_mean']:.3f}, accuracy {b['accuracy']:.3f} (n={b['n']})" for b in h["calibration"]["bins"]]
    if results.get("judge", {}).get("n"):
        j = results["judge"]
        lines += ["", f"judge set: RM prefers the PPO summary {j['rm_policy_win_rate']:.3f}, judge {j['judge_policy_win_rate']:.3f}; kappa {j['cohen_kappa']:.3f}; "
                  f"mean reward PPO {j['policy_reward']:.3f}, reference {j['reference_reward']:.3f}"]
        if "rm_prefers_longer" in j:
            lines.append(f"  prefers the longer summary: RM {j['rm_prefers_longer']:.3f}, judge {j['judge_prefers_longer']:.3f}")
    if "rm_prefers_longer" in h:
        lines.append(f"held-out: RM prefers the longer summary in {h['rm_prefers_longer']:.3f} of pairs of unequal length")
    return "\n".join(lines)
