"""SFT throughput and peak memory: tldr-rlhf `sft` vs TRL's SFTTrainer on identical settings.

Same tiny Qwen2 model built from a config (real Qwen2.5 vocabulary of 151,665 tokens), the same
real TL;DR posts formatted once by our pipeline (TRL gets the decoded query as `prompt` and the
summary as `completion`, and appends EOS itself), response-only loss on both sides, same micro-batch,
accumulation, steps, optimizer settings and threads. Run: ``python benchmarks/bench_sft.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SETTINGS = {
    "steps": 6,
    "micro_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_query_length": 256,
    "lr": 1e-4,
    "threads": 1,
}


def _examples(settings):
    from tldr_rlhf.config import TldrDataArgs
    from tldr_rlhf.data.tldr import build_sft_examples
    from tldr_rlhf.modeling import load_tokenizer
    from tldr_rlhf.data.tldr import load_post_splits

    n = settings["steps"] * settings["micro_batch_size"] * settings["gradient_accumulation_steps"]
    data = TldrDataArgs(train=harness.POSTS, max_query_length=settings["max_query_length"], limit=n, valid_limit=8, valid_fraction=0.05)
    tok = load_tokenizer(settings["model"])
    train_posts, _ = load_post_splits(data)
    ex, _ = build_sft_examples(train_posts, tok, max_query_length=data.max_query_length)
    return data, tok, ex[:n]


def ours(settings):
    from tldr_rlhf.config import ModelArgs, OptimArgs, RunArgs, SFTConfig
    from tldr_rlhf.train.sft import train

    data, _, ex = _examples(settings)
    out = Path(settings["workdir"]) / "ours-sft"
    cfg = SFTConfig(
        model=ModelArgs(path=settings["model"], dtype="float32"),
        data=data,
        optim=OptimArgs(lr=settings["lr"], min_lr=settings["lr"] / 10, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=str(out), overwrite=True, eval_every=0, save_every=0, progress=False, num_threads=settings["threads"]),
        micro_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        num_sample_posts=0,
    )
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/sft" in r]
    tokens = sum(len(e.query_ids) + len(e.response_ids) for e in ex)
    return {"steps": len(steps), "items": len(ex), "tokens": tokens, "step_times": [r["perf/step_time_s"] for r in steps], "final_loss": steps[-1]["loss/sft"]}


def trl(settings):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    _, tok, ex = _examples(settings)
    rows = [{"prompt": tok.decode(e.query_ids), "completion": tok.decode(e.response_ids[:-1])} for e in ex]
    timer = harness.StepTimer()

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.start()

        def on_step_end(self, *a, **k):
            timer.stop()

    args = SFTConfig(
        output_dir=str(Path(settings["workdir"]) / "trl-sft"),
        per_device_train_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        max_steps=settings["steps"],
        learning_rate=settings["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=1,
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
        max_length=None,
        completion_only_loss=True,
        seed=42,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(settings["model"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(len(e.query_ids) + len(e.response_ids) for e in ex)
    return {"steps": len(timer.times), "items": len(ex), "tokens": tokens, "step_times": timer.times, "final_loss": losses[-1] if losses else None}


def main():
    if harness.side_main({"ours": ours, "trl": trl}):
        return
    settings = dict(SETTINGS, workdir=str(harness.workdir()))
    settings["model"] = harness.tiny_model(harness.workdir() / "tiny-qwen2")
    results = {side: harness.run_side(__file__, side, settings) for side in ("ours", "trl")}
    harness.summarize("sft", results, item="sequences")
    for side, r in results.items():
        print(f"{side}: final loss {r['final_loss']}")


if __name__ == "__main__":
    main()
