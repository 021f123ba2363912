"""Rollout engines side by side on the real SmolLM2-135M at TL;DR shapes (issue 25): our own sampler
(``--rollout-engine hf``: ``generate_groups``, each prompt prefilled once) against an in-process vLLM
engine (``--rollout-engine vllm``: prefix caching, float32, eager on CPU).

Model: ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf dequantized once to a float32 Hugging Face
folder (vLLM loads safetensors folders, not this GGUF), and a ScalarRewardModel on the same backbone
(``bench_grpo.smol_models``). Data: real TL;DR posts formatted as this project's queries, cut at 512
tokens. Rollouts: G = 8 responses for each of 8 prompts (64 rows), up to 53 tokens, temperature 0.7
(top_k 0, top_p 1), float32, one thread.

Four sides, each in its own process:

* ``hf_rollout`` / ``vllm_rollout``: sampling alone, in response tokens per second (median of the
  timed repetitions after one warm-up on other prompts); the vLLM side also times weight syncs
  (``VLLMEngine.sync_weights``, median of 3 after perturbing the weights) and the largest and mean
  |vLLM sampling log-prob - policy log-prob| over the sampled tokens, and its engine start-up;
* ``hf_grpo`` / ``vllm_grpo``: the GRPO stage end to end (2 prompts x 8 per step, one optimizer step
  per rollout, as ``bench_grpo``), median step time after the first, with its split into generation,
  scoring and training; the vLLM side's step includes the weight sync.

Run with the vllm venv (``make test-vllm`` builds .venv-vllm): ``.venv-vllm/bin/python
benchmarks/bench_rollout.py [SIDE ...]``; each side's result is merged into
benchmarks/results/rollout-smol.json as soon as it ends (with its settings and the load average before
and after: the machine's cores may be shared), and the table of every saved side is printed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grpo  # noqa: E402
import harness  # noqa: E402

SETTINGS = {"prompts": 8, "group_size": 8, "response_length": 53, "max_query_length": 512, "threads": 1, "reps": 2,
            "grpo_steps": 3, "grpo_prompts": 2, "lr": 1e-6}
"""Overridable by the environment as BENCH_<NAME> (e.g. BENCH_REPS=1 BENCH_GRPO_STEPS=2 on a busy machine)."""


def _setup(settings):
    import torch

    from tldr_rlhf.modeling import load_causal_lm, load_tokenizer
    from tldr_rlhf.rollout import plain_sampling_config

    torch.set_num_threads(settings["threads"])  # before any vLLM engine: it fixes the thread count for the process
    tok = load_tokenizer(settings["model"])
    policy = load_causal_lm(settings["model"], dtype=torch.float32, tokenizer=tok).eval()
    plain_sampling_config(policy, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    n = (settings["reps"] + 1) * settings["prompts"]
    _, _, prompts = bench_grpo._prompts({**settings, "steps": n, "prompts": 1})
    return tok, policy, [p.query_ids for p in prompts]


def _sample(engine, policy, tok, queries, settings, seed):
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=settings["response_length"], temperature=0.7, batch_size=64)
    t0 = time.perf_counter()
    responses, logps = engine.sample_groups(policy, queries, settings["group_size"], seed=seed, **kw)
    return time.perf_counter() - t0, responses, logps


def _rollout_side(settings, make):
    tok, policy, queries = _setup(settings)
    t0 = time.perf_counter()
    engine = make(policy)
    startup = time.perf_counter() - t0
    p = settings["prompts"]
    _sample(engine, policy, tok, queries[:p], settings, 0)  # warm-up on other prompts
    times, tokens, extra = [], [], {}
    for rep in range(settings["reps"]):
        dt, responses, logps = _sample(engine, policy, tok, queries[(rep + 1) * p : (rep + 2) * p], settings, rep + 1)
        times.append(dt)
        tokens.append(sum(map(len, responses)))
    extra.update(_vllm_extras(engine, policy, tok, queries[p : 2 * p], responses, logps, settings) if engine.name == "vllm" else {})
    return {"steps": len(times), "items": sum(tokens), "step_times": times, "tokens_per_s": [n / t for n, t in zip(tokens, times)],
            "mean_response_length": sum(tokens) / (len(tokens) * p * settings["group_size"]), "startup_s": startup, **extra}


def _vllm_extras(engine, policy, tok, queries, responses, logps, settings):
    """Log-prob mismatch of the last timed rollout against the policy, and the weight-sync time."""
    import torch

    from tldr_rlhf.data.batching import collate_query_response
    from tldr_rlhf.importance_sampling import mismatch_stats, padded_logprobs
    from tldr_rlhf.rollout import response_logprobs

    batch = collate_query_response([q for q in queries for _ in range(settings["group_size"])], responses, tok.pad_token_id)
    train_lp, _ = response_logprobs(policy, batch, temperature=0.7, batch_size=16)
    stats = mismatch_stats(train_lp, padded_logprobs(logps, batch.responses.shape[1]), batch.response_mask)
    syncs = []
    for i in range(3):
        with torch.no_grad():
            for w in policy.parameters():
                w.add_(1e-4 * torch.randn_like(w))
        syncs.append(engine.sync_weights(policy))
    return {"sync_s": syncs, "mismatch": stats, "mismatch_tokens": int(batch.response_mask.sum())}


def hf_rollout(settings):
    from tldr_rlhf.rollout_engine import HFEngine

    return _rollout_side(settings, lambda policy: HFEngine())


def vllm_rollout(settings):
    from tldr_rlhf.rollout_engine import VLLMEngine

    return _rollout_side(settings, lambda policy: VLLMEngine(policy, dtype="float32", max_model_len=640, kv_cache_gb=2.0, seed=0))


def _grpo_side(settings, engine):
    from tldr_rlhf.config import GRPOConfig, OptimArgs, RunArgs
    from tldr_rlhf.train.grpo import train

    s = {**settings, "steps": settings["grpo_steps"], "prompts": settings["grpo_prompts"]}
    data, _, _ = bench_grpo._prompts(s)
    out = Path(settings["workdir"]) / f"grpo-{engine}"
    seqs = s["prompts"] * s["group_size"]
    cfg = GRPOConfig(
        sft_path=settings["model"], rm_path=settings["rm"], dtype="float32", data=data, rollout_engine=engine, vllm_kv_cache_gb=2.0,
        optim=OptimArgs(lr=s["lr"], min_lr=s["lr"], warmup_steps=0, decay_steps=0, betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), overwrite=True, eval_every=0, save_every=0, progress=False, num_threads=s["threads"]),
        total_episodes=s["steps"] * seqs, rollout_prompts=s["prompts"], group_size=s["group_size"], mini_batch_size=seqs, micro_batch_size=8,
        forward_batch_size=seqs, update_per_rollout=1, response_length=s["response_length"], temperature=0.7, kl_coef=0.05, num_sample_posts=0, dual_clip=0.0,
    )
    train(cfg)
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in l]
    split = {
        "generation_s": [r.get("perf/generation_time_s") for r in steps],
        "scoring_s": [r["perf/rollout_time_s"] - r["perf/generation_time_s"] for r in steps],
        "training_s": [r["perf/update_time_s"] - r["perf/rollout_time_s"] for r in steps],
        "weight_sync_s": [r.get("perf/weight_sync_s") for r in steps],
    }
    return {"steps": len(steps), "items": len(steps) * seqs, "step_times": [r["perf/update_time_s"] for r in steps], "split": split,
            "mean_response_length": sum(r["objective/response_length"] for r in steps) / len(steps),
            "mismatch_max": [r.get("mismatch/logprob_abs_diff_max") for r in steps]}


def hf_grpo(settings):
    return _grpo_side(settings, "hf")


def vllm_grpo(settings):
    return _grpo_side(settings, "vllm")


SIDES = {"hf_rollout": hf_rollout, "vllm_rollout": vllm_rollout, "hf_grpo": hf_grpo, "vllm_grpo": vllm_grpo}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main(sides: list[str]):
    if harness.side_main(SIDES):
        return
    workdir = Path(os.environ.get("BENCH_WORKDIR", "/tmp/tldr-bench-rollout"))
    workdir.mkdir(parents=True, exist_ok=True)
    policy, rm = bench_grpo.smol_models(workdir)
    overrides = {k: type(v)(os.environ[f"BENCH_{k.upper()}"]) for k, v in SETTINGS.items() if f"BENCH_{k.upper()}" in os.environ}
    settings = {**SETTINGS, **overrides, "model": policy, "rm": rm, "workdir": str(workdir)}
    file = harness.RESULTS / "rollout-smol.json"
    saved = json.loads(file.read_text()) if file.exists() else {"benchmark": "rollout-smol", "sides": {}}
    for side in sides:  # each side saved as soon as it ends, with its own settings and load (a long run may be cut short)
        before = os.getloadavg()
        r = harness.run_side(__file__, side, settings)
        r["settings"] = {k: v for k, v in settings.items() if k != "workdir"}
        r["load"] = {"before": before, "after": os.getloadavg()}
        saved["sides"][side] = r
        harness.RESULTS.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(saved, indent=2) + "\n")
    print("\nrollout engines, SmolLM2-135M fp32, 1 thread")
    for side, r in saved["sides"].items():
        if "tokens_per_s" in r:
            line = f"{side:<14} {statistics.median(r['tokens_per_s']):7.1f} tokens/s  (mean response {r['mean_response_length']:.1f} tokens, start-up {r['startup_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB)"
            if "sync_s" in r:
                line += f"  sync {statistics.median(r['sync_s']):.2f} s; log-prob |diff| max {r['mismatch']['mismatch/logprob_abs_diff_max']:.2e} mean {r['mismatch']['mismatch/logprob_abs_diff_mean']:.2e} over {r['mismatch_tokens']} tokens"
        else:
            times = r["step_times"][1:] or r["step_times"]
            split = ", ".join(f"{k} {_median(v[1:] or v):.1f}" for k, v in r["split"].items() if _median(v[1:] or v) is not None)
            line = f"{side:<14} GRPO step {statistics.median(times):6.1f} s  ({split}; peak {r['peak_rss_mb']:.0f} MB)"
        print(line + f"  [load {r['load']['before'][0]:.1f} -> {r['load']['after'][0]:.1f}]")


if __name__ == "__main__":
    main(sys.argv[1:] or list(SIDES))
