"""Reward-model throughput and peak memory: tldr-rlhf `rm` vs TRL's RewardTrainer on identical settings.

Same tiny Qwen2 model built from a config (real Qwen2.5 vocabulary of 151,665 tokens), the same real
TL;DR comparisons (OpenAI's batch13) tokenized once by our pipeline (TRL gets the token ids as
``chosen_ids`` = query + chosen and ``rejected_ids`` = query + rejected, so it tokenizes nothing), the
same pairs in the same order and micro-batches (TRL with sequential sampling, in our run's order),
the same micro-batch, accumulation, steps, optimizer settings and threads, fp32, dropout off.

Both sides start from the same weights: the backbone of the tiny causal LM plus one scalar head,
drawn once N(0, 1/sqrt(d + 1)) and saved as a reward-model checkpoint; ours continues from that
checkpoint, TRL's ``Qwen2ForSequenceClassification`` gets the same head weights copied in (its head
has no bias; ours starts at bias 0, and the pairwise loss gives the bias no gradient).

TRL reads the score at the last token that is not the pad id. With Qwen's pad = EOS that is the
token *before* the response's EOS (N+ detail 3); so that both sides score the same token, TRL's
tokenizer gets a distinct pad token (``<|fim_pad|>``). With that, the per-step losses printed at the
end agree up to float rounding: a correctness check of the whole stage against the peer.

Same optimizer on both sides (AdamW, betas 0.9/0.95, eps 1e-5, weight decay 0.1, clipping 1.0, cosine
from the peak lr at step 1 to 0 at max_steps). Ours skips reward normalization here (it runs after
training and is not part of a training step).

A third side, ``ours_full_rows``, is our stage with ``--no-shared-prompt`` (chosen and rejected as two
full rows, as TRL does), to show what running each query once buys.

Throughput: median optimizer-step time over all steps but each run's first, with the sides run in
alternation (3 rounds) so that load from other processes falls on every side alike; on an idle
machine one round is enough (``REPEATS``). Model loading is outside the step times on both sides.

Run: ``python benchmarks/bench_rm.py``; results (with every step time) go to benchmarks/results/rm.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SETTINGS = {
    "steps": 10,
    "micro_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_query_length": 256,
    "max_response_length": 133,
    "lr": 5e-5,
    "threads": 1,
}
REPEATS = 3


def _data(settings):
    from tldr_rlhf.config import PreferenceDataArgs

    return PreferenceDataArgs(
        comparisons=harness.COMPARISONS,
        max_query_length=settings["max_query_length"],
        max_response_length=settings["max_response_length"],
        limit=2 * settings["steps"] * settings["micro_batch_size"] * settings["gradient_accumulation_steps"],
        valid_limit=4,
    )


def _pairs(settings):
    """The training pairs our run uses, in the order and micro-batches it uses them."""
    from tldr_rlhf.tasks import rm_pairs

    return harness.pairs_in_training_order(settings, _data(settings), rm_pairs)


_tokens = harness.pair_tokens


def init_checkpoint(model_dir: str, path: Path) -> str:
    """The shared starting point: tiny LM backbone + head N(0, 1/sqrt(d + 1)), saved as a reward model."""
    import torch

    from tldr_rlhf.modeling import load_tokenizer
    from tldr_rlhf.reward.loading import build_reward_model, save_reward_model

    if (path / "config.json").exists():
        return str(path)
    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    save_reward_model(build_reward_model(model_dir, tokenizer=tok), tok, path)
    return str(path)


def _ours(settings, shared_prompt: bool):
    from tldr_rlhf.config import ModelArgs, OptimArgs, RewardNormArgs, RMConfig, RunArgs
    from tldr_rlhf.train.rm import train

    _, pairs = _pairs(settings)
    out = Path(settings["workdir"]) / ("ours-rm" if shared_prompt else "ours-rm-full-rows")
    cfg = RMConfig(
        model=ModelArgs(path=settings["rm_init"], tokenizer=settings["model"], dtype="float32"),
        data=_data(settings),
        norm=RewardNormArgs(enabled=False),
        # the same schedule as TRL's "cosine" with no warmup over max_steps: peak at step 1, cosine to 0
        optim=OptimArgs(lr=settings["lr"], min_lr=0.0, warmup_steps=0, decay_steps=settings["steps"], betas=(0.9, 0.95), weight_decay=0.1, eps=1e-5, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), overwrite=True, eval_every=0, save_every=0, progress=False, num_threads=settings["threads"], max_steps=settings["steps"]),
        micro_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        eval_batch_size=settings["micro_batch_size"],
        shared_prompt=shared_prompt,
    )
    t0 = time.perf_counter()
    train(cfg)
    total = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/rm" in r]
    times = [r["perf/step_time_s"] for r in steps]
    return {
        "steps": len(steps), "items": len(pairs), "tokens": _tokens(pairs), "step_times": times, "setup_s": total - sum(times),
        "losses": [r["loss/rm"] for r in steps], "accuracies": [r["rm/accuracy"] for r in steps],
    }


def ours(settings):
    return _ours(settings, shared_prompt=True)


def ours_full_rows(settings):
    return _ours(settings, shared_prompt=False)


def trl(settings):
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    tok, pairs = _pairs(settings)
    tok.pad_token = "<|fim_pad|>"  # not EOS: else TRL scores the token before the EOS (see module docstring)
    rows = [{"chosen_ids": e.query_ids + e.chosen_ids, "rejected_ids": e.query_ids + e.rejected_ids} for e in pairs]
    timer = harness.StepTimer()

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.start()

        def on_step_end(self, *a, **k):
            timer.stop()

    args = RewardConfig(
        output_dir=str(Path(settings["workdir"]) / "trl-rm"),
        per_device_train_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        max_steps=settings["steps"],
        learning_rate=settings["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-5,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        max_length=None,
        disable_dropout=True,
        seed=42,
        disable_tqdm=True,
    )
    model = AutoModelForSequenceClassification.from_pretrained(settings["model"], num_labels=1)
    head = load_file(str(Path(settings["rm_init"]) / "model.safetensors"))["score.weight"]
    with torch.no_grad():
        model.score.weight.copy_(head)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    hist = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": len(timer.times), "items": len(pairs), "tokens": _tokens(pairs), "step_times": timer.times, "setup_s": total - sum(timer.times),
        "losses": [h["loss"] for h in hist], "accuracies": [h.get("accuracy") for h in hist],
    }


def main():
    if harness.side_main({"ours": ours, "trl": trl, "ours_full_rows": ours_full_rows}):
        return
    settings = dict(SETTINGS, workdir=str(harness.workdir()))
    settings["model"] = harness.tiny_model(harness.workdir() / "tiny-qwen2")
    settings["rm_init"] = init_checkpoint(settings["model"], harness.workdir() / "tiny-qwen2-rm-init")
    print(f"settings: {json.dumps({k: v for k, v in settings.items() if k != 'workdir'})}")
    # Sides alternate, REPEATS rounds, so that load from other processes on a shared machine falls on
    # every side alike; each run's first step (allocations) is dropped, the rest pooled.
    sides = ("ours", "trl", "ours_full_rows")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(REPEATS):
        for side in sides:
            runs[side].append(harness.run_side(__file__, side, settings))
    results = {}
    for side, rs in runs.items():
        results[side] = dict(rs[0], step_times=[t for r in rs for t in r["step_times"][1:]], peak_rss_mb=max(r["peak_rss_mb"] for r in rs))
    out = harness.summarize("rm", results, item="pairs", warmup=0)
    for side, rs in runs.items():
        print(f"{side}: losses per step {[round(x, 4) for x in rs[0]['losses']]}; accuracy per step {rs[0]['accuracies']}")
        assert all(r["losses"] == rs[0]["losses"] for r in rs), f"{side}: losses differ between repeats"
    out["step_times_s"] = {side: [r["step_times"] for r in rs] for side, rs in runs.items()}
    out["settings"] = {k: v for k, v in settings.items() if k != "workdir"}
    out["losses"] = {side: rs[0]["losses"] for side, rs in runs.items()}
    (harness.RESULTS / "rm.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
