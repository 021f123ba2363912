"""PPO throughput and peak memory: tldr-rlhf `ppo` vs TRL's PPOTrainer on identical settings.

The set-up is bench_grpo.py's: the same tiny Qwen2 policy built from a config (real Qwen2.5
vocabulary), the same tiny ScalarRewardModel as reward model and as the value model's initial weights
(TRL gets a second copy loaded from the same folder as ``value_model``), the same real TL;DR queries
(TRL gets the same token ids as ``input_ids``). Both sides: 4 prompts per rollout, one response each
of 32 tokens at temperature 0.7 (top_k 0, top_p 1), truncated after EOS; KL 0.05 (k1) in the reward;
GAE gamma 1, lambda 0.95; whitened advantages, raw rewards; 4 PPO epochs of one minibatch, micro-batches
of 2 (one optimizer step per epoch); clip 0.2, value clip 0.2, vf_coef 0.1; AdamW lr 3e-6, eps 1e-5,
no weight decay, no gradient clipping (TRL's PPO loop has none), linear anneal to 0; float32, no
gradient checkpointing, dropout off, 2 threads. A step is rollout + PPO update on both sides; the
first is warmup. Tokens are counted as episodes x (mean query + response length) on both sides, so
the tokens/s ratio is the episodes/s ratio.

Not identical: a response without EOS scores -1 with us (N+ detail 23: the score is replaced) and the
reward model's score minus 1 with TRL (``missing_eos_penalty=1``, which subtracts); TRL reads the
score one token before the EOS (pad = EOS with Qwen) where we read it at the EOS; prompt order
(both sides see the same prompts once over the run, TRL in its DataLoader's shuffled order). Random
tiny models almost never sample EOS, so the first two do not change the work done.

TRL 1.13+ has no PPO trainer; TRL 1.12.0 (the last with ``trl.experimental.ppo``) runs with the
installed torch and transformers. It lives in its own virtualenv so the system TRL stays as it is:

    python3 -m venv --system-site-packages /tmp/trlppo-venv
    /tmp/trlppo-venv/bin/pip install trl==1.12.0

Run: ``python benchmarks/bench_ppo.py [--trl-python /tmp/trlppo-venv/bin/python]`` (or set
``TLDR_RLHF_TRL_PPO_PYTHON``); our side runs with this interpreter, TRL's with that one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grpo  # noqa: E402
import harness  # noqa: E402

SETTINGS = {
    "steps": 5,
    "prompts": 4,
    "group_size": 1,  # one response per prompt (bench_grpo's _prompts / _tokens count prompts x group_size)
    "ppo_epochs": 4,
    "micro_batch_size": 2,
    "response_length": 32,
    "max_query_length": 128,
    "lr": 3e-6,
    "threads": 2,
}
TRL_VERSION = "1.12.0"
TRL_PYTHON_ENV = "TLDR_RLHF_TRL_PPO_PYTHON"
DEFAULT_TRL_PYTHON = "/tmp/trlppo-venv/bin/python"



def tiny_reward_model(workdir: Path, policy: str) -> str:
    """A tiny ScalarRewardModel with the policy's backbone config, saved once."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel

    path = workdir / "tiny-rm"
    if not (path / "config.json").exists():
        torch.manual_seed(1)
        ScalarRewardModel(RewardModelConfig(text_config=AutoConfig.from_pretrained(policy))).save_pretrained(path)
        AutoTokenizer.from_pretrained(policy).save_pretrained(path)
    return str(path)


def _tokens(prompts, settings) -> int:
    """Episodes x (mean query + response length): the same count on both sides."""
    q = sum(len(p.query_ids) for p in prompts) / len(prompts)
    return int(settings["steps"] * settings["prompts"] * settings.get("group_size", 1) * (q + settings["response_length"]))

def ours(settings):
    from tldr_rlhf.config import OptimArgs, PPOConfig, RunArgs
    from tldr_rlhf.train.ppo import train

    data, _, _prompts = bench_grpo._prompts(settings)
    out = Path(settings["workdir"]) / "ours-ppo"
    n = settings["prompts"]
    cfg = PPOConfig(
        sft_path=settings["model"], rm_path=settings["rm"], dtype="float32", data=data,
        optim=OptimArgs(lr=settings["lr"], min_lr=0.0, warmup_steps=0, decay_steps=0, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-5, max_grad_norm=0.0),
        run=RunArgs(output_dir=str(out), overwrite=True, eval_every=0, save_every=0, log_every=1, progress=False, num_threads=settings["threads"]),
        total_episodes=settings["steps"] * n, rollout_batch_size=n, num_mini_batches=1, micro_batch_size=settings["micro_batch_size"],
        forward_batch_size=n, ppo_epochs=settings["ppo_epochs"], response_length=settings["response_length"], temperature=0.7,
        no_eos_penalty=-1.0, kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, clip_range=0.2, vf_clip_range=0.2, vf_coef=0.1,
        whiten_rewards=False, num_sample_posts=0,
    )
    train(cfg)
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "perf/update_time_s" in l]
    return {"steps": len(steps), "items": len(steps) * n, "tokens": _tokens(_prompts, settings), "step_times": [r["perf/update_time_s"] for r in steps],
            "final_policy_loss": steps[-1]["loss/policy"], "final_score": steps[-1]["objective/scores"], "final_kl": steps[-1]["objective/kl"]}


def trl(settings):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    importlib.import_module("tldr_rlhf.reward.reward_model")  # registers the reward model class with the Auto classes

    _, tok, prompts = bench_grpo._prompts(settings)
    tok.padding_side = "left"
    timer = harness.StepTimer()

    class Timer(TrainerCallback):  # TRL's PPO loop calls on_step_end only: a step runs from one end to the next
        def on_train_begin(self, *a, **k):
            timer.start()

        def on_step_end(self, *a, **k):
            timer.stop()
            timer.start()

    n = settings["prompts"]
    args = PPOConfig(
        output_dir=str(Path(settings["workdir"]) / "trl-ppo"),
        per_device_train_batch_size=settings["micro_batch_size"], gradient_accumulation_steps=n // settings["micro_batch_size"],
        num_mini_batches=1, total_episodes=settings["steps"] * n, local_rollout_forward_batch_size=n, num_ppo_epochs=settings["ppo_epochs"],
        response_length=settings["response_length"], temperature=0.7, stop_token="eos", missing_eos_penalty=1.0,
        kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, whiten_rewards=False,
        learning_rate=settings["lr"], lr_scheduler_type="linear", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-5, weight_decay=0.0,
        gradient_checkpointing=False, bf16=False, use_cpu=True, num_sample_generations=0, logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=42, disable_tqdm=True,
    )
    policy = AutoModelForCausalLM.from_pretrained(settings["model"])
    ref = AutoModelForCausalLM.from_pretrained(settings["model"])
    rm = AutoModelForSequenceClassification.from_pretrained(settings["rm"], trust_remote_code=False)
    value = AutoModelForSequenceClassification.from_pretrained(settings["rm"], trust_remote_code=False)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm, value_model=value,
                         train_dataset=Dataset.from_list([{"input_ids": p.query_ids} for p in prompts]), callbacks=[Timer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss/policy_avg" in h]
    import trl as trl_pkg

    return {"steps": len(timer.times), "items": len(timer.times) * n, "tokens": _tokens(prompts, settings), "step_times": timer.times,
            "final_policy_loss": logs[-1]["loss/policy_avg"], "final_score": logs[-1]["objective/scores"], "final_kl": logs[-1]["objective/kl"],
            "trl_version": trl_pkg.__version__}


def trl_python(path: str | None) -> str:
    """The interpreter of the virtualenv holding TRL's PPO trainer; SystemExit with the set-up commands if it has none."""
    python = path or os.environ.get(TRL_PYTHON_ENV) or DEFAULT_TRL_PYTHON
    setup = (f"create it with:\n  python3 -m venv --system-site-packages /tmp/trlppo-venv\n  /tmp/trlppo-venv/bin/pip install trl=={TRL_VERSION}\n"
             f"then pass --trl-python /tmp/trlppo-venv/bin/python or set {TRL_PYTHON_ENV} (TRL {TRL_VERSION} is the last release with a PPO trainer)")
    try:
        check = subprocess.run([python, "-c", "from trl.experimental.ppo import PPOTrainer"], capture_output=True, text=True, env=dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1"))
    except OSError as e:
        raise SystemExit(f"no Python for TRL's PPO side at {python} ({e.strerror}); {setup}")
    if check.returncode != 0:
        raise SystemExit(f"{python} cannot import trl.experimental.ppo.PPOTrainer:\n{check.stderr.strip()[-600:]}\n{setup}")
    return python


def main():
    if harness.side_main({"ours": ours, "trl": trl}):
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trl-python", help=f"Python of the virtualenv with trl=={TRL_VERSION} (default ${TRL_PYTHON_ENV} or {DEFAULT_TRL_PYTHON})")
    python = trl_python(ap.parse_args().trl_python)
    work = harness.workdir()
    settings = dict(SETTINGS, workdir=str(work))
    settings["model"] = harness.tiny_model(work / "tiny-qwen2")
    settings["rm"] = tiny_reward_model(work, settings["model"])
    results = {"ours": harness.run_side(__file__, "ours", settings), "trl": harness.run_side(__file__, "trl", dict(settings), python=python)}
    out = harness.summarize("ppo", results, item="episodes")
    out["trl_version"] = results["trl"]["trl_version"]
    (harness.RESULTS / "ppo.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"TRL {out['trl_version']}")
    for side, r in results.items():
        print(f"{side}: final policy loss {r['final_policy_loss']:.4f}, score {r['final_score']:.3f}, kl {r['final_kl']:.4f}")


if __name__ == "__main__":
    main()
