"""GRPO (and RLOO) throughput and peak memory at TL;DR shapes on the real SmolLM2-135M: TRL's
GRPOTrainer / RLOOTrainer, tldr-rlhf without the shared prompt, and tldr-rlhf with it (issue 15).

Model: ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf (Llama architecture, 134.5M parameters,
vocabulary 49,152), dequantized once to a float32 Hugging Face folder that every side loads, with
its own tokenizer (EOS = pad = <|im_end|>). Reward model: this project's ScalarRewardModel on the
same SmolLM2 backbone (its head untrained: the cost, not the scores, is measured), which TRL loads
as an AutoModelForSequenceClassification reward function. Data: real TL;DR posts
(../shared/data/tldr/posts/valid_sample.jsonl) formatted as this project's queries, cut at 512
tokens (TRL gets them decoded as ``prompt``); responses up to 53 tokens at temperature 0.7 (top_k 0,
top_p 1); G = 8 responses for each of 2 prompts per step, one optimizer step per rollout in
micro-batches of 8 (one group); clip 0.2, KL 0.05 (k3 in the GRPO loss, in the reward for RLOO),
"grpo" loss aggregation, float32, the same threads per side; each side in its own process.

A step is the whole rollout (sampling, the reward model, the reference and, when needed, old-policy
log-probs) plus the update. Throughput uses the median step time after the first (warm-up) step;
peak memory is the process's peak resident set (the models included). For our sides the step is
split into generation, scoring (reward model + log-probs) and training (medians).

Run: ``python benchmarks/bench_grpo.py [steps]`` (``bench_rloo.py`` for RLOO); the table goes to
stdout and benchmarks/results/{grpo,rloo}-smol.json. ``BENCH_SIDES`` picks the sides (default
``ours,trl,ours_plain``); ``ours_vllm`` is ours with ``--rollout-engine vllm`` and ``trl_vllm`` TRL's ``use_vllm`` colocate mode, run from the vLLM venv
(``BENCH_SIDES=ours,ours_vllm .venv-vllm/bin/python benchmarks/bench_grpo.py``; the table then goes to
{grpo,rloo}-smol-vllm.json, its ratios to the first side when TRL is not among them). Slow on a CPU: one TRL step at these shapes is
minutes on one thread.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

GGUF = harness.SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {
    "steps": 4,  # the first is warm-up
    "prompts": 2,
    "group_size": 8,
    "micro_batch_size": 8,
    "response_length": 53,
    "max_query_length": 512,
    "lr": 1e-6,
    "threads": 1,
}


def smol_models(workdir: Path) -> tuple[str, str]:
    """(policy folder, reward-model folder) made from the GGUF file once: the dequantized float32
    SmolLM2 with its tokenizer, and a ScalarRewardModel on the same backbone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tldr_rlhf.modeling import _strip_gguf_quantizer
    from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel

    policy, rm = workdir / "smol-policy", workdir / "smol-rm"
    if not (policy / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
        model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
        _strip_gguf_quantizer(model)
        model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(policy)
        tok.save_pretrained(policy)
    if not (rm / "config.json").exists():
        lm = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
        torch.manual_seed(1)
        ScalarRewardModel(RewardModelConfig(text_config=lm.config), backbone=lm.model).save_pretrained(rm)
        AutoTokenizer.from_pretrained(policy).save_pretrained(rm)
    return str(policy), str(rm)


def _prompts(settings):
    from tldr_rlhf.config import TldrDataArgs
    from tldr_rlhf.modeling import load_tokenizer
    from tldr_rlhf.tasks import rl_prompts

    n = settings["steps"] * settings["prompts"]
    data = TldrDataArgs(train=harness.POSTS, max_query_length=settings["max_query_length"], limit=n, valid_fraction=0.05)
    tok = load_tokenizer(settings["model"])
    prompts, _ = rl_prompts(data, tok)
    return data, tok, prompts[:n]


def ours(settings, shared_prompt: bool = True, engine: str = "hf"):
    from tldr_rlhf.config import GRPOConfig, OptimArgs, RLOOConfig, RunArgs
    from tldr_rlhf.train.grpo import train
    from tldr_rlhf.train.rloo import train as train_rloo

    algo = settings["algo"]
    config_cls, train_fn, extra = (GRPOConfig, train, {"dual_clip": 0.0}) if algo == "grpo" else (RLOOConfig, train_rloo, {})
    data, _, prompts = _prompts(settings)
    out = Path(settings["workdir"]) / f"ours-{algo}-{'shared' if shared_prompt else 'plain'}-{engine}"
    seqs = settings["prompts"] * settings["group_size"]
    cfg = config_cls(
        sft_path=settings["model"], rm_path=settings["rm"], dtype="float32", data=data,
        optim=OptimArgs(lr=settings["lr"], min_lr=settings["lr"], warmup_steps=0, decay_steps=0, betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), overwrite=True, eval_every=0, save_every=0, progress=False, num_threads=settings["threads"]),
        total_episodes=settings["steps"] * seqs, rollout_prompts=settings["prompts"], group_size=settings["group_size"],
        mini_batch_size=seqs, micro_batch_size=settings["micro_batch_size"], forward_batch_size=seqs, update_per_rollout=1,
        response_length=settings["response_length"], temperature=0.7, kl_coef=0.05, num_sample_posts=0, shared_prompt=shared_prompt, rollout_engine=engine, **extra,
    )
    train_fn(cfg)
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in l]
    split = {
        "generation_s": [r.get("perf/generation_time_s") for r in steps],
        "scoring_s": [r["perf/rollout_time_s"] - r["perf/generation_time_s"] if "perf/generation_time_s" in r else None for r in steps],
        "rollout_s": [r["perf/rollout_time_s"] for r in steps],
        "training_s": [r["perf/update_time_s"] - r["perf/rollout_time_s"] - r.get("perf/weight_sync_s", 0.0) for r in steps],
        "sync_s": [r.get("perf/weight_sync_s") for r in steps],
    }
    return {"steps": len(steps), "items": len(steps) * seqs, "step_times": [r["perf/update_time_s"] for r in steps], "split": split,
            "mean_query_length": sum(len(p.query_ids) for p in prompts) / len(prompts),
            "mean_response_length": sum(r["objective/response_length"] for r in steps) / len(steps)}


def ours_plain(settings):
    return ours(settings, shared_prompt=False)


def ours_vllm(settings):
    """Ours with ``--rollout-engine vllm`` (float32, eager, prefix caching; the weights synced after every
    update, inside the step time): run from the vLLM venv (``make test-vllm`` builds .venv-vllm)."""
    return ours(settings, engine="vllm")


def trl(settings, vllm: bool = False):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    import trl

    import tldr_rlhf.reward.reward_model  # noqa: F401  (import registers the reward model class with the Auto classes)

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
        disable_dropout=True, shuffle_dataset=False, **_trl_vllm_args(settings, vllm),
    )
    model = AutoModelForCausalLM.from_pretrained(settings["model"])
    rm = AutoModelForSequenceClassification.from_pretrained(settings["rm"], trust_remote_code=False)
    trainer = trainer_cls(model=model, reward_funcs=[rm], args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          reward_processing_classes=[tok], callbacks=[Timer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    lengths = [h.get("completions/mean_length") for h in logs if h.get("completions/mean_length") is not None]
    return {"steps": len(timer.times), "items": len(timer.times) * settings["prompts"] * g, "step_times": timer.times,
            "mean_query_length": sum(len(p.query_ids) for p in prompts) / len(prompts),
            "mean_response_length": sum(lengths) / len(lengths) if lengths else None}


def _trl_vllm_args(settings, vllm: bool) -> dict:
    """TRL's own vLLM rollouts (``use_vllm``, colocated in the trainer's process, as ours); on the CPU the
    KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB of RAM."""
    if not vllm:
        return {}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": settings["max_query_length"] + settings["response_length"]}


def trl_vllm(settings):
    """TRL with ``use_vllm=True, vllm_mode="colocate"``: run from the vLLM venv."""
    return trl(settings, vllm=True)


SIDES = {"trl": trl, "trl_vllm": trl_vllm, "ours_plain": ours_plain, "ours": ours, "ours_vllm": ours_vllm}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(name: str, results: dict, settings: dict, load: dict) -> dict:
    """Print and save the table: median step time after warm-up, sequences/s, peak memory, ratios to
    TRL, and our step split."""
    rows = {}
    for side, r in results.items():
        times = r["step_times"][1:] or r["step_times"]
        step = statistics.median(times)
        row = {"median_step_s": step, "sequences_per_s": r["items"] / r["steps"] / step, "peak_rss_mb": r["peak_rss_mb"], "timed_steps": len(times),
               "mean_query_length": r["mean_query_length"], "mean_response_length": r["mean_response_length"]}
        if "split" in r:
            row.update({k: _median(v[1:] or v) for k, v in r["split"].items()})
        rows[side] = row
    peer = rows.get("trl") or next(iter(rows.values()))  # ratios to TRL (to the first side when TRL did not run)
    print(f"\n{name}  (load before: {load['before']}; after: {load.get('after')})")
    print(f"{'side':<12}{'step s':>9}{'seq/s':>9}{'x TRL':>7}{'peak MB':>9}{'x TRL':>7}{'gen s':>8}{'score s':>9}{'train s':>9}{'sync s':>8}")
    for side, r in rows.items():
        r["speed_vs_trl"], r["memory_vs_trl"] = r["sequences_per_s"] / peer["sequences_per_s"], r["peak_rss_mb"] / peer["peak_rss_mb"]
        split = "".join(f"{r[k]:>{w}.1f}" if r.get(k) is not None else f"{'-':>{w}}" for k, w in (("generation_s", 8), ("scoring_s", 9), ("training_s", 9), ("sync_s", 8)))
        print(f"{side:<12}{r['median_step_s']:>9.1f}{r['sequences_per_s']:>9.3f}{r['speed_vs_trl']:>7.2f}{r['peak_rss_mb']:>9.0f}{r['memory_vs_trl']:>7.2f}{split}")
    out = {"benchmark": name, "settings": {k: v for k, v in settings.items() if k not in ("workdir",)}, "load": load, "sides": rows}
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    (harness.RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(algo: str = "grpo"):
    if harness.side_main(SIDES):
        return
    work = harness.workdir()
    settings = dict(SETTINGS, workdir=str(work), algo=algo)
    if len(sys.argv) > 1:
        settings["steps"] = int(sys.argv[1])
    sides = os.environ.get("BENCH_SIDES", "ours,trl,ours_plain").split(",")
    settings["model"], settings["rm"] = smol_models(work)
    load = {"before": os.getloadavg()}
    results = {}
    name, failed = f"{algo}-smol" + ("-vllm" if {"ours_vllm", "trl_vllm"} & set(sides) else ""), {}
    for side in sides:
        try:
            results[side] = harness.run_side(__file__, side, settings)
        except SystemExit as e:  # one side that cannot run here (TRL's vLLM sync on vLLM-CPU): the others still count
            failed[side] = str(e)
            print(f"{side}: {e}", file=sys.stderr)
        load[f"after_{side}"] = os.getloadavg()
        harness.RESULTS.mkdir(parents=True, exist_ok=True)  # what has run so far, in case the rest cannot
        (harness.RESULTS / f"{name}.partial.json").write_text(json.dumps({"settings": settings, "load": load, "results": results, "failed": failed}, indent=2) + "\n")
    load["after"] = os.getloadavg()
    out = summarize(name, results, settings, load)
    if failed:
        out["failed"] = failed
        (harness.RESULTS / f"{out['benchmark']}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
