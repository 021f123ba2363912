"""DPO throughput and peak memory: tldr-rlhf `dpo` vs TRL's DPOTrainer on identical settings.

Same tiny Qwen2 model built from a config (real Qwen2.5 vocabulary of 151,665 tokens), the same real
TL;DR comparisons (OpenAI's batch13) tokenized once by our pipeline (TRL gets the decoded query as
``prompt`` and the decoded summaries as ``chosen`` / ``rejected`` and appends EOS itself), the same
pairs in the same order and micro-batches (TRL with sequential sampling, in our run's order), the same
micro-batch, accumulation, steps, optimizer settings and threads. Both sides precompute the reference
log-probs before training (TRL: ``precompute_ref_log_probs=True``), so neither holds a reference
model while training. Loss: plain sigmoid DPO, beta 0.1 (TRL 1.16's sigmoid loss has no label
smoothing, so conservative DPO is off on both sides).

A third side, ``ours_full_rows``, is our stage with ``--no-shared-prompt`` (chosen and rejected as two
full rows, as TRL does), to show what running each query once buys.

Same optimizer on both sides (AdamW, betas 0.9/0.95, eps 1e-5, weight decay 0.1 on matrices only,
clipping 1.0, cosine from the peak lr at step 1 to 0 at max_steps), so the per-step losses printed at
the end should agree up to float rounding and TRL's own tokenization of the decoded text: a
correctness check of the whole stage against the peer.

Throughput: median optimizer-step time after the first step; the reference precompute and model
loading are outside the step times on both sides and reported as ``setup_s`` (whole run minus steps).

Run: ``python benchmarks/bench_dpo.py``; results also go to benchmarks/results/dpo.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SETTINGS = {
    "steps": 4,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_query_length": 256,
    "max_response_length": 64,
    "lr": 5e-5,
    "beta": 0.1,
    "threads": 1,
}


def _data(settings):
    from tldr_rlhf.config import PreferenceDataArgs

    return PreferenceDataArgs(
        comparisons=harness.COMPARISONS,
        max_query_length=settings["max_query_length"],
        max_response_length=settings["max_response_length"],
        limit=4 * settings["steps"] * settings["micro_batch_size"] * settings["gradient_accumulation_steps"],
        valid_limit=4,
    )


def _pairs(settings):
    """The training pairs our run uses, in the order and micro-batches it uses them."""
    from tldr_rlhf.tasks import dpo_pairs

    return harness.pairs_in_training_order(settings, _data(settings), dpo_pairs)


_tokens = harness.pair_tokens


def _ours(settings, shared_prompt: bool):
    from tldr_rlhf.config import DPOConfig, OptimArgs, RunArgs
    from tldr_rlhf.train.dpo import train

    _, pairs = _pairs(settings)
    out = Path(settings["workdir"]) / ("ours-dpo" if shared_prompt else "ours-dpo-full-rows")
    cfg = DPOConfig(
        sft_path=settings["model"],
        dtype="float32",
        data=_data(settings),
        # the same schedule as TRL's "cosine" with no warmup over max_steps: peak at step 1, cosine to 0
        optim=OptimArgs(lr=settings["lr"], min_lr=0.0, warmup_steps=0, decay_steps=settings["steps"]),
        run=RunArgs(output_dir=str(out), overwrite=True, eval_every=0, save_every=0, progress=False, num_threads=settings["threads"], max_steps=settings["steps"]),
        beta=settings["beta"],
        label_smoothing=0.0,
        micro_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        eval_batch_size=settings["micro_batch_size"],
        shared_prompt=shared_prompt,
        num_sample_posts=0,
    )
    t0 = time.perf_counter()
    train(cfg)
    total = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/dpo" in r]
    times = [r["perf/step_time_s"] for r in steps]
    return {
        "steps": len(steps), "items": len(pairs), "tokens": _tokens(pairs), "step_times": times, "setup_s": total - sum(times),
        "losses": [r["loss/dpo"] for r in steps],
    }


def ours(settings):
    return _ours(settings, shared_prompt=True)


def ours_full_rows(settings):
    return _ours(settings, shared_prompt=False)


def trl(settings):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tldr_rlhf.generation import decode_response

    tok, pairs = _pairs(settings)
    rows = [
        {"prompt": tok.decode(e.query_ids), "chosen": " " + decode_response(tok, e.chosen_ids), "rejected": " " + decode_response(tok, e.rejected_ids)}
        for e in pairs
    ]
    timer = harness.StepTimer()

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.start()

        def on_step_end(self, *a, **k):
            timer.stop()

    args = DPOConfig(
        output_dir=str(Path(settings["workdir"]) / "trl-dpo"),
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
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        max_length=None,
        beta=settings["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=settings["micro_batch_size"],
        seed=42,
        disable_tqdm=True,
    )
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(settings["model"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Timer()])
    trainer.train()
    total = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": len(timer.times), "items": len(pairs), "tokens": _tokens(pairs), "step_times": timer.times, "setup_s": total - sum(timer.times), "losses": losses}


def main():
    if harness.side_main({"ours": ours, "trl": trl, "ours_full_rows": ours_full_rows}):
        return
    settings = dict(SETTINGS, workdir=str(harness.workdir()))
    settings["model"] = harness.tiny_model(harness.workdir() / "tiny-qwen2")
    print(f"settings: {json.dumps({k: v for k, v in settings.items() if k != 'workdir'})}")
    results = {side: harness.run_side(__file__, side, settings) for side in ("ours", "trl", "ours_full_rows")}
    harness.summarize("dpo", results, item="pairs")
    for side, r in results.items():
        print(f"{side}: setup (load + reference precompute) {r['setup_s']:.1f} s; losses per step {[round(x, 4) for x in r['losses']]}")


if __name__ == "__main__":
    main()
