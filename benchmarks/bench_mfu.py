"""Model FLOPs utilization of every stage on the real SmolLM2-135M at TL;DR shapes, fp32 against bf16.

Each stage (SFT, RM, DPO, PPO, GRPO, RLOO) runs its own ``train`` for a few steps in this process,
fp32 and ``--dtype bfloat16`` (fp32 master weights under bf16 autocast) interleaved stage by stage so
that both see the same machine load. The numbers come from the run's own metrics.jsonl
(``perf/model_tflops_per_s``, ``perf/mfu``: ``tldr_rlhf/flops.py``), medians over the steps after
the first (warm-up); the peak is the cached GEMM micro-benchmark in the run's precision
(``flops.cpu_peak_tflops``) or the GPU's published dense peak.

On a shared machine the wall clock also counts the time other processes held the cores: each run
also reports ``cpu_share`` (the process's CPU seconds / (wall seconds x threads), setup included)
and ``mfu_per_cpu_time`` = MFU / cpu_share, an estimate of the MFU the same code reaches with the
cores to itself (approximate: the share is measured over the whole run, not the timed steps).

Models: the dequantized float32 SmolLM2 folder and a ScalarRewardModel on its backbone
(``bench_grpo.smol_models``, made once from ../shared/models). Data: the real TL;DR posts and
comparisons of ../shared/data. Shapes (full): queries cut at 512 tokens, SFT responses the
references, RM/DPO the human comparisons' summaries, RL responses of 53 sampled tokens.

Precision check: the first step's loss of each stage in bf16 against fp32 (same data, same start:
for SFT and DPO a mean log-prob difference), and for the RL stages ``objective/kl`` of the first
rollout, which must be exactly 0 (the policy is its reference and both are computed by the same
code in the same precision).

A CPU without bf16 matrix instructions (no AVX512-BF16 / AMX: torch's CPU capability then reads
AVX2) runs bf16 GEMMs through a slow reference loop, hundreds of times slower than fp32; the bf16
runs are then skipped (``--force-bf16`` runs them anyway) and the GEMM peaks say why.

Padded against packed (padding-free) batches: ``packing_probe`` times one SFT forward + backward of
the same real micro-batch both ways (CPU seconds, alternated), ``pair_packing_probe`` the same for
RM and DPO on a micro-batch of real comparisons (shared prompt, the default: each query once); the
stage runs use each stage's default (packed for SFT, RM and DPO). ``--profile`` adds a torch.profiler table of one padded SFT step.

Run: ``python benchmarks/bench_mfu.py [--quick] [--stages sft rm ...] [--dtypes float32 bfloat16]``;
the table goes to stdout and benchmarks/results/mfu-smol[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grpo  # noqa: E402
import harness  # noqa: E402

STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "rloo")
FULL = {"steps": 3, "max_query_length": 512, "max_response_length": 53, "sft_batch": 4, "pair_batch": 2, "rl_prompts": 2, "group_size": 4, "ppo_rows": 4, "probe_pairs": 4, "pair_query_length": 512, "probe_reps": 2}
QUICK = {"steps": 2, "max_query_length": 64, "max_response_length": 16, "sft_batch": 2, "pair_batch": 1, "rl_prompts": 1, "group_size": 2, "ppo_rows": 2, "probe_pairs": 2, "pair_query_length": 96, "probe_reps": 1}
LOSS_KEY = {"sft": "loss/sft", "rm": "loss/rm", "dpo": "loss/dpo", "ppo": "loss/policy", "grpo": "loss/policy", "rloo": "loss/policy"}


def _run_args(out: Path, s: dict[str, Any]):
    from tldr_rlhf.config import RunArgs

    return RunArgs(output_dir=str(out), overwrite=True, eval_every=0, save_every=0, progress=False, num_threads=s["threads"], max_steps=s["steps"])


def _optim():
    from tldr_rlhf.config import OptimArgs

    return OptimArgs(lr=1e-6, min_lr=1e-6, warmup_steps=0, decay_steps=0)


def _pref_data(s: dict[str, Any]):
    from tldr_rlhf.config import PreferenceDataArgs

    n = 2 * s["steps"] * s["pair_batch"]
    # responses over the cap are dropped (133: TL;DR's); queries over pair_query_length (512; --quick 96) are cut (smart truncation)
    return PreferenceDataArgs(comparisons=harness.COMPARISONS, max_query_length=s["pair_query_length"], max_response_length=133, limit=n, valid_limit=2)


def _rl_data(s: dict[str, Any]):
    from tldr_rlhf.config import TldrDataArgs

    return TldrDataArgs(train=harness.POSTS, max_query_length=s["max_query_length"], limit=4 * s["steps"] * s["rl_prompts"], valid_fraction=0.05)


def stage_config(stage: str, dtype: str, out: Path, s: dict[str, Any], policy: str, rm: str):
    """The config of one measured run of ``stage`` in ``dtype`` writing to ``out``."""
    from tldr_rlhf import config as c

    run, optim = _run_args(out, s), _optim()
    if stage == "sft":
        data = c.TldrDataArgs(train=harness.POSTS, max_query_length=s["max_query_length"], limit=s["steps"] * s["sft_batch"] + 4, valid_limit=1, valid_fraction=0.05)
        return c.SFTConfig(model=c.ModelArgs(path=policy, dtype=dtype), data=data, optim=optim, run=run, micro_batch_size=s["sft_batch"], gradient_accumulation_steps=1, num_sample_posts=0)
    if stage == "rm":
        return c.RMConfig(
            model=c.ModelArgs(path=policy, dtype=dtype), data=_pref_data(s), norm=c.RewardNormArgs(enabled=False), optim=optim, run=run,
            micro_batch_size=s["pair_batch"], gradient_accumulation_steps=1, eval_batch_size=s["pair_batch"],
        )
    if stage == "dpo":
        return c.DPOConfig(sft_path=policy, dtype=dtype, data=_pref_data(s), optim=optim, run=run, micro_batch_size=s["pair_batch"], gradient_accumulation_steps=1, eval_batch_size=s["pair_batch"], num_sample_posts=0)
    if stage == "ppo":
        n = s["ppo_rows"]
        return c.PPOConfig(
            sft_path=policy, rm_path=rm, dtype=dtype, data=_rl_data(s), optim=optim, run=run, total_episodes=s["steps"] * n, rollout_batch_size=n,
            num_mini_batches=1, micro_batch_size=n, forward_batch_size=n, ppo_epochs=1, response_length=s["max_response_length"], temperature=0.7, num_sample_posts=0,
        )
    cls, extra = (c.GRPOConfig, {"dual_clip": 0.0}) if stage == "grpo" else (c.RLOOConfig, {})
    rows = s["rl_prompts"] * s["group_size"]
    return cls(
        sft_path=policy, rm_path=rm, dtype=dtype, data=_rl_data(s), optim=optim, run=run, total_episodes=s["steps"] * rows, rollout_prompts=s["rl_prompts"],
        group_size=s["group_size"], mini_batch_size=rows, micro_batch_size=rows, forward_batch_size=rows, update_per_rollout=1,
        response_length=s["max_response_length"], temperature=0.7, num_sample_posts=0, **extra,
    )


def run_stage(stage: str, dtype: str, s: dict[str, Any], policy: str, rm: str) -> dict[str, Any]:
    """Train ``stage`` for ``s["steps"]`` steps in ``dtype``; medians of its per-step perf metrics after
    the first step, the first step's loss and (RL) the first rollout's KL."""
    import importlib

    out = Path(s["workdir"]) / f"mfu-{stage}-{dtype}"
    train = importlib.import_module(f"tldr_rlhf.train.{stage}").train
    t0, c0 = time.perf_counter(), time.process_time()
    train(stage_config(stage, dtype, out, s, policy, rm))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # the share of the run's threads x wall time it got a core for (other processes take the rest)
    cpu_share = min(1.0, cpu / max(wall * s["threads"], 1e-9))
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "perf/model_tflops_per_s" in r]
    timed = steps[1:] or steps
    step_key = "perf/update_time_s" if stage in ("ppo", "grpo", "rloo") else "perf/step_time_s"

    def med(key: str) -> float | None:
        vals = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    mfu = med("perf/mfu")
    return {
        "mfu_per_cpu_time": mfu / cpu_share if mfu is not None else None,
        "stage": stage, "dtype": dtype, "steps": len(steps), "wall_s": wall, "cpu_share": cpu_share,
        "step_time_s": med(step_key), "tokens_per_s": med("perf/tokens_per_s"), "model_tflops_per_s": med("perf/model_tflops_per_s"), "mfu": med("perf/mfu"),
        "first_loss": steps[0].get(LOSS_KEY[stage]) if steps else None, "first_kl": steps[0].get("objective/kl") if steps else None,
        "split_s": {k: med(f"perf/{k}_time_s") for k in ("generation", "scoring", "rollout")} if stage in ("grpo", "rloo", "ppo") else None,
    }


def precision_probe(policy: str, tokens: int = 64) -> dict[str, Any]:
    """One forward of the real SmolLM2 on a real TL;DR query cut to ``tokens`` tokens, fp32 against bf16
    autocast: wall and CPU seconds of each (the CPU seconds do not count waiting for a core), the largest and mean |difference| of the next-token log-probs, and the
    KL of bf16 against a second bf16 pass (what a step-0 KL of policy against reference computes:
    0 exactly when the bf16 forward is deterministic)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tldr_rlhf.data.tldr import load_post_splits
    from tldr_rlhf.config import TldrDataArgs
    from tldr_rlhf.modeling import load_tokenizer

    tok = load_tokenizer(policy)
    posts, _ = load_post_splits(TldrDataArgs(train=harness.POSTS, limit=1, valid_fraction=0.05))
    ids = torch.tensor([tok(posts[0].post)["input_ids"][:tokens]])
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    out: dict[str, Any] = {"tokens": ids.shape[1]}
    logps = {}
    for name, ctx in (("float32", torch.autocast("cpu", enabled=False)), ("bfloat16", torch.autocast("cpu", dtype=torch.bfloat16)), ("bfloat16_again", torch.autocast("cpu", dtype=torch.bfloat16))):
        with torch.no_grad(), ctx:
            t0, c0 = time.perf_counter(), time.process_time()
            logits = model(input_ids=ids, use_cache=False).logits.float()
            out[f"{name}_forward_s"], out[f"{name}_forward_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        logps[name] = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)
    diff = (logps["bfloat16"] - logps["float32"]).abs()
    out.update(max_abs_logprob_diff=diff.max().item(), mean_abs_logprob_diff=diff.mean().item(), bf16_vs_bf16_kl=(logps["bfloat16"] - logps["bfloat16_again"]).sum().item())
    out["bf16_slowdown_cpu"] = out["bfloat16_forward_cpu_s"] / out["float32_forward_cpu_s"]
    return out


def packing_probe(policy: str, s: dict[str, Any], reps: int = 2) -> dict[str, Any]:
    """SFT forward + backward of one real micro-batch (``sft_batch`` TL;DR examples, queries cut at
    ``max_query_length``), padded against packed (``--padding-free``) against one row at a time (no
    padding, plain causal attention: what ``--micro-batch-size 1`` does), alternated ``reps`` times each.
    Times are the process's CPU seconds (contention-free on a shared machine; one thread) and wall
    seconds, medians; the loss of both must agree to 1e-5."""
    import torch
    from transformers import AutoModelForCausalLM

    from tldr_rlhf.config import TldrDataArgs
    from tldr_rlhf.data.tldr import build_sft_examples, load_post_splits
    from tldr_rlhf.flops import ModelShape, batch_forward_flops, train_flops
    from tldr_rlhf.losses import sft_loss
    from tldr_rlhf.modeling import load_tokenizer
    from tldr_rlhf.train.sft import collate, target_logprobs

    tok = load_tokenizer(policy)
    posts, _ = load_post_splits(TldrDataArgs(train=harness.POSTS, limit=4 * s["sft_batch"], valid_fraction=0.05))
    examples, _ = build_sft_examples(posts, tok, max_query_length=s["max_query_length"])
    batch = collate(examples[: s["sft_batch"]], tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    flops = train_flops(batch_forward_flops(ModelShape.of(model), batch.attention_mask, batch.query_width))
    times: dict[str, list[tuple[float, float]]] = {"padded": [], "packed": [], "row_by_row": []}
    losses = {}
    n_targets = int(batch.response_mask.sum())
    rows = [collate([e], tok.pad_token_id) for e in examples[: s["sft_batch"]]]
    for _ in range(reps):
        for name in times:
            c0, w0 = time.process_time(), time.perf_counter()
            total = 0.0
            # row_by_row: each row alone (no padding, plain causal attention), gradients accumulated
            for b in rows if name == "row_by_row" else [batch]:
                lp, mask = target_logprobs(model, b, False, padding_free=name == "packed")
                loss, _ = sft_loss(lp, mask, n_targets)
                loss.backward()
                total += loss.item()
            times[name].append((time.process_time() - c0, time.perf_counter() - w0))
            model.zero_grad(set_to_none=True)
            losses[name] = total
    out = {"rows": batch.input_ids.shape[0], "padded_width": batch.input_ids.shape[1], "real_tokens": int(batch.attention_mask.sum()),
           "padded_tokens": batch.input_ids.numel(), "model_gflop": flops / 1e9, "loss_diff": max(abs(losses["padded"] - v) for v in losses.values())}
    for name, ts in times.items():
        cpu, wall = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        out[name] = {"cpu_s": cpu, "wall_s": wall, "model_gflop_per_cpu_s": flops / 1e9 / cpu}
    out["packed_speedup_cpu"] = out["padded"]["cpu_s"] / out["packed"]["cpu_s"]
    out["row_by_row_speedup_cpu"] = out["padded"]["cpu_s"] / out["row_by_row"]["cpu_s"]
    return out


def pair_packing_probe(policy: str, rm: str, s: dict[str, Any], reps: int = 2) -> dict[str, Any]:
    """RM and DPO forward + backward of one real micro-batch of ``probe_pairs`` TL;DR comparisons
    (queries cut at ``pair_query_length``: 512, --quick 96; the human comparisons' summaries), padded against packed
    (``--padding-free``), both on the shared prompt (the default), alternated ``reps`` times per
    stage so that both see the same load. Times are the process's CPU seconds (one thread; they do
    not count waiting for a core) and wall seconds, medians; the losses of both must agree to 1e-5.
    Tokens: ``padded_tokens`` the shared-prompt padded pass (B x P + 2B x T), ``packed_tokens`` the
    real ones (each query once, every response)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tldr_rlhf.config import PreferenceDataArgs
    from tldr_rlhf.data.batching import collate_preferences
    from tldr_rlhf.data.packing import can_pack
    from tldr_rlhf.losses import dpo_loss, pairwise_loss
    from tldr_rlhf.modeling import load_tokenizer
    from tldr_rlhf.reward.reward_model import ScalarRewardModel
    from tldr_rlhf.reward.scoring import pair_rewards
    from tldr_rlhf.tasks import rm_pairs
    from tldr_rlhf.train.dpo import pair_logprobs

    tok = load_tokenizer(policy)
    n = s["probe_pairs"]
    data = PreferenceDataArgs(comparisons=harness.COMPARISONS, max_query_length=s["pair_query_length"], max_response_length=133, limit=4 * n, valid_limit=2)
    train_ex, _, _ = rm_pairs(data, tok)  # longer queries are cut (smart truncation)
    batch = collate_preferences(train_ex[:n], tok.pad_token_id)
    ref = torch.tensor([-31.7] * n + [-33.1] * n)
    models = {"rm": ScalarRewardModel.from_pretrained(rm, dtype=torch.float32).train(), "dpo": AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).train()}

    def step(stage: str, packed: bool) -> float:
        if stage == "rm":
            r = pair_rewards(models["rm"], batch, padding_free=packed)
            loss, _ = pairwise_loss(r[:n], r[n:])
        else:
            lp = pair_logprobs(models["dpo"], batch, padding_free=packed)
            loss, _ = dpo_loss(lp[:n], lp[n:], ref[:n], ref[n:], beta=0.1, label_smoothing=0.1)
        loss.backward()
        return loss.item()

    q, r = batch.attention_mask[:, : batch.query_width].sum(1), batch.response_mask.sum(1)
    out: dict[str, Any] = {
        "pairs": n, "query_width": batch.query_width, "response_width": batch.responses.shape[1], "mean_query": q[:n].float().mean().item(),
        "padded_tokens": n * batch.query_width + 2 * n * batch.responses.shape[1], "packed_tokens": int(q[:n].sum() + r.sum()), "load_before": os.getloadavg(),
    }
    for stage, model in models.items():
        out[stage] = {"can_pack": can_pack(model)}
        times: dict[str, list[tuple[float, float]]] = {"padded": [], "packed": []}
        losses = {}
        for _ in range(reps):
            for name in times:
                c0, w0 = time.process_time(), time.perf_counter()
                losses[name] = step(stage, name == "packed")
                times[name].append((time.process_time() - c0, time.perf_counter() - w0))
                model.zero_grad(set_to_none=True)
        for name, ts in times.items():
            out[stage][name] = {"cpu_s": statistics.median(t[0] for t in ts), "wall_s": statistics.median(t[1] for t in ts)}
        out[stage]["loss_diff"] = abs(losses["padded"] - losses["packed"])
        out[stage]["packed_speedup_cpu"] = out[stage]["padded"]["cpu_s"] / out[stage]["packed"]["cpu_s"]
        out[stage]["packed_speedup_wall"] = out[stage]["padded"]["wall_s"] / out[stage]["packed"]["wall_s"]
    out["load_after"] = os.getloadavg()
    return out


def profile_step(policy: str, s: dict[str, Any], rows: int = 10) -> list[dict[str, Any]]:
    """torch.profiler of one padded SFT forward + backward at the run's shapes: the ``rows`` ops
    with the most self CPU time (name, self CPU ms, share of the step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from tldr_rlhf.config import TldrDataArgs
    from tldr_rlhf.data.tldr import build_sft_examples, load_post_splits
    from tldr_rlhf.losses import sft_loss
    from tldr_rlhf.modeling import load_tokenizer
    from tldr_rlhf.train.sft import collate, target_logprobs

    tok = load_tokenizer(policy)
    posts, _ = load_post_splits(TldrDataArgs(train=harness.POSTS, limit=4 * s["sft_batch"], valid_fraction=0.05))
    examples, _ = build_sft_examples(posts, tok, max_query_length=s["max_query_length"])
    batch = collate(examples[: s["sft_batch"]], tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lp, mask = target_logprobs(model, batch, False)
        sft_loss(lp, mask)[0].backward()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total} for e in events[:rows]]


def machine() -> dict[str, Any]:
    """CPU model, torch's CPU capability, threads, load, and the GEMM peaks in fp32 and bf16 (cached)."""
    import torch

    from tldr_rlhf import flops

    return {
        "cpu": flops.cpu_model_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "mkldnn": torch.backends.mkldnn.is_available(), "load_before": os.getloadavg(), "python": platform.python_version(),
        "peak_tflops": {str(d).removeprefix("torch."): flops.cpu_peak_tflops(d) for d in (torch.float32, torch.bfloat16)},
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'stage':<6}{'dtype':<10}{'step s':>9}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU %':>7}{'CPU %':>7}{'MFU/CPU %':>10}{'1st loss':>11}{'1st KL':>9}")
    for r in results:
        if r.get("skipped"):
            print(f"{r['stage']:<6}{r['dtype']:<10}  skipped: {r['skipped']}")
            continue
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        print(f"{r['stage']:<6}{r['dtype']:<10}{f(r['step_time_s'], '9.2f')}{f(r['tokens_per_s'], '10.0f')}{f(r['model_tflops_per_s'], '9.4f')}"
              f"{f(r['mfu'] and 100 * r['mfu'], '7.1f')}{f(100 * r['cpu_share'], '7.0f')}{f(r['mfu_per_cpu_time'] and 100 * r['mfu_per_cpu_time'], '10.1f')}"
              f"{f(r['first_loss'], '11.5f')}{f(r['first_kl'], '9.2g')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short queries (64; pairs 96), small batches, 2 steps, one rep per probe (about 3 CPU minutes)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True, help="measure SFT, RM and DPO padded against packed (--padding-free)")
    ap.add_argument("--probe-pairs", type=int, default=None, help="comparisons in the RM / DPO packing probe's micro-batch (default 4; --quick 2)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of one padded SFT forward + backward")
    ap.add_argument("--probes-only", action="store_true", help="only the machine, precision, packing and profile probes; no stage runs")
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 even where its GEMM is far slower than fp32")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    s = dict(QUICK if args.quick else FULL, threads=args.threads, workdir=str(harness.workdir()))
    if args.probe_pairs:
        s["probe_pairs"] = args.probe_pairs
    t0 = time.perf_counter()
    policy, rm = bench_grpo.smol_models(harness.workdir())
    info = machine()
    peaks = info["peak_tflops"]
    print(f"{info['cpu']} ({info['cpu_capability']}), {info['threads']} threads, load {info['load_before']}; GEMM peak fp32 {1e3 * peaks['float32']:.1f} GFLOP/s, bf16 {1e3 * peaks['bfloat16']:.1f} GFLOP/s")
    if "bfloat16" in args.dtypes and not torch.cuda.is_available():
        info["precision_probe"] = precision_probe(policy)
        print("precision probe (one forward, fp32 vs bf16 autocast):", json.dumps(info["precision_probe"]), flush=True)
    if args.packing and "sft" in args.stages:
        info["packing_probe"] = packing_probe(policy, s, reps=s["probe_reps"])
        print("packing probe (SFT forward + backward, padded vs packed):", json.dumps(info["packing_probe"]), flush=True)
    if args.packing and {"rm", "dpo"} & set(args.stages):
        info["pair_packing_probe"] = pair_packing_probe(policy, rm, s, reps=s["probe_reps"])
        print("pair packing probe (RM / DPO forward + backward, padded vs packed, shared prompt):", json.dumps(info["pair_packing_probe"]), flush=True)
    if args.profile:
        info["profile_sft_step"] = profile_step(policy, s)
        print("profile of one padded SFT forward + backward:", json.dumps(info["profile_sft_step"]), flush=True)
    slow_bf16 = not torch.cuda.is_available() and peaks["bfloat16"] < peaks["float32"] / 4 and not args.force_bf16
    results = []
    for stage in [] if args.probes_only else args.stages:
        for dtype in args.dtypes:
            if dtype == "bfloat16" and slow_bf16:
                results.append({"stage": stage, "dtype": dtype, "skipped": f"bf16 GEMM {1e3 * peaks['bfloat16']:.2f} GFLOP/s against fp32 {1e3 * peaks['float32']:.1f} on this CPU ({info['cpu_capability']}); --force-bf16 runs it"})
                continue
            results.append(run_stage(stage, dtype, s, policy, rm))
            print(json.dumps(results[-1]), flush=True)
    info["load_after"] = os.getloadavg()
    print_table(results)
    out = {"benchmark": "mfu-smol" + ("-quick" if args.quick else ""), "settings": s, "machine": info, "packing": "stage runs on each stage's default (packed for SFT, RM and DPO); padded against packed: packing_probe and pair_packing_probe in machine", "results": results, "wall_s": time.perf_counter() - t0}
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    path = harness.RESULTS / f"{out['benchmark']}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
