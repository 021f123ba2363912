"""GRPO (and RLOO) throughput and peak memory: tldr-rlhf `grpo` / `rloo` vs TRL's GRPOTrainer /
RLOOTrainer on identical settings.

Same tiny Qwen2 policy built from a config (real Qwen2.5 vocabulary of 151,665 tokens) and the same
tiny reward model (this project's ScalarRewardModel, which TRL loads as an
AutoModelForSequenceClassification reward function), the same real TL;DR queries (TRL gets them
decoded as `prompt`), the same G, sampling temperature, response length, clip, KL coefficient (k3
in the loss) and "grpo" loss aggregation (seq-mean-token-mean), one optimizer step per generation
batch of 2 prompts x G 4 in micro-batches of 4, threads. A step is rollout + update on both sides.

Random tiny models almost never sample EOS, so responses run to the full length on both sides;
tokens are counted as sequences x (mean query + response length) on both sides, so the tokens/s
ratio is the sequences/s ratio. RLOO runs the same set-up with k = G, KL 0.05 in the reward on both
sides and one pass per rollout. Run: ``python benchmarks/bench_grpo.py`` (``bench_rloo.py`` for RLOO).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SETTINGS = {
    "steps": 5,
    "prompts": 2,
    "group_size": 4,
    "micro_batch_size": 4,
    "response_length": 32,
    "max_query_length": 128,
    "lr": 1e-5,
    "threads": 2,
}


def reward_model(workdir: Path, policy: str) -> str:
    """A tiny ScalarRewardModel with the policy's backbone config, saved once."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from tldr_rlhf.reward_model import RewardModelConfig, ScalarRewardModel

    path = workdir / "tiny-rm"
    if not (path / "config.json").exists():
        torch.manual_seed(1)
        ScalarRewardModel(RewardModelConfig(text_config=AutoConfig.from_pretrained(policy))).save_pretrained(path)
        AutoTokenizer.from_pretrained(policy).save_pretrained(path)
    return str(path)


def _prompts(settings):
    from tldr_rlhf.config import TldrDataArgs
    from tldr_rlhf.modeling import load_tokenizer
    from tldr_rlhf.tasks import rl_prompts

    n = settings["steps"] * settings["prompts"]
    data = TldrDataArgs(train=harness.POSTS, max_query_length=settings["max_query_length"], limit=n, valid_fraction=0.05)
    tok = load_tokenizer(settings["model"])
    prompts, _ = rl_prompts(data, tok)
    return data, tok, prompts[:n]


def _tokens(prompts, settings) -> int:
    q = sum(len(p.query_ids) for p in prompts) / len(prompts)
    return int(settings["steps"] * settings["prompts"] * settings["group_size"] * (q + settings["response_length"]))


def ours(settings):
    from tldr_rlhf.config import GRPOConfig, OptimArgs, RLOOConfig, RunArgs
    from tldr_rlhf.train.grpo import train
    from tldr_rlhf.train.rloo import train as train_rloo

    algo = settings["algo"]
    config_cls, train_fn, extra = (GRPOConfig, train, {"dual_clip": 0.0}) if algo == "grpo" else (RLOOConfig, train_rloo, {})
    data, _, prompts = _prompts(settings)
    out = Path(settings["workdir"]) / f"ours-{algo}"
    seqs = settings["prompts"] * settings["group_size"]
    cfg = config_cls(
        sft_path=settings["model"], rm_path=settings["rm"], dtype="float32", data=data,
        optim=OptimArgs(lr=settings["lr"], min_lr=settings["lr"], warmup_steps=0, decay_steps=0, betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), overwrite=True, eval_every=0, save_every=0, progress=False, num_threads=settings["threads"]),
        total_episodes=settings["steps"] * seqs, rollout_prompts=settings["prompts"], group_size=settings["group_size"],
        mini_batch_size=seqs, micro_batch_size=settings["micro_batch_size"], forward_batch_size=seqs, update_per_rollout=1,
        response_length=settings["response_length"], temperature=0.7, kl_coef=0.05, num_sample_posts=0, **extra,
    )
    train_fn(cfg)
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in l]
    return {"steps": len(steps), "items": len(steps) * seqs, "tokens": _tokens(prompts, settings), "step_times": [r["perf/update_time_s"] for r in steps],
            "final_loss": steps[-1]["loss/policy"], "mean_response_length": sum(r["objective/response_length"] for r in steps) / len(steps)}


def trl(settings):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    import trl

    import tldr_rlhf.reward_model  # noqa: F401  (import registers the reward model class with the Auto classes)

    _, tok, prompts = _prompts(settings)
    rows = [{"prompt": tok.decode(p.query_ids)} for p in prompts]
    timer = harness.StepTimer()

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.start()

        def on_step_end(self, *a, **k):
            timer.stop()

    algo = settings["algo"]
    config_cls, trainer_cls = (trl.GRPOConfig, trl.GRPOTrainer) if algo == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
    extra = {"epsilon": 0.2, "loss_type": "grpo"} if algo == "grpo" else {}
    g = settings["group_size"]
    accumulation = settings["prompts"] * g // settings["micro_batch_size"]
    args = config_cls(
        output_dir=str(Path(settings["workdir"]) / f"trl-{algo}"),
        per_device_train_batch_size=settings["micro_batch_size"], gradient_accumulation_steps=accumulation,
        num_generations=g, max_completion_length=settings["response_length"], temperature=0.7, top_k=0, top_p=1.0,
        beta=0.05, num_iterations=1, max_steps=settings["steps"], **extra,
        learning_rate=settings["lr"], lr_scheduler_type="constant", adam_epsilon=1e-5, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0, seed=42, disable_tqdm=True,
        disable_dropout=True, shuffle_dataset=False,
    )
    model = AutoModelForCausalLM.from_pretrained(settings["model"])
    rm = AutoModelForSequenceClassification.from_pretrained(settings["rm"], trust_remote_code=False)
    trainer = trainer_cls(model=model, reward_funcs=[rm], args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          reward_processing_classes=[tok], callbacks=[Timer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    lengths = [h.get("completions/mean_length") for h in logs if h.get("completions/mean_length") is not None]
    return {"steps": len(timer.times), "items": len(timer.times) * settings["prompts"] * g, "tokens": _tokens(prompts, settings), "step_times": timer.times,
            "final_loss": logs[-1]["loss"] if logs else None, "mean_response_length": sum(lengths) / len(lengths) if lengths else None}


def main(algo: str = "grpo"):
    if harness.side_main({"ours": ours, "trl": trl}):
        return
    work = harness.workdir()
    settings = dict(SETTINGS, workdir=str(work), algo=algo)
    settings["model"] = harness.tiny_model(work / "tiny-qwen2")
    settings["rm"] = reward_model(work, settings["model"])
    results = {side: harness.run_side(__file__, side, settings) for side in ("ours", "trl")}
    harness.summarize(algo, results, item="sequences")
    for side, r in results.items():
        print(f"{side}: final loss {r['final_loss']}, mean response length {r['mean_response_length']}")


if __name__ == "__main__":
    main()
