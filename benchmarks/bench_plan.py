"""The memory plan (``tldr-rlhf plan``) against the measured peak resident memory of each training stage
on this CPU: SFT, reward model, DPO, PPO, GRPO and RLOO, each in its own process, on a tiny random Qwen2
(real 151k vocabulary) and on the real SmolLM2-135M, with the stages' cpu-smol settings cut to two steps.
Each stage trains from the previous stages' outputs (RL: the SFT policy and the reward model just
trained). Prints the table: estimate, measured peak RSS, error.

    python benchmarks/bench_plan.py                    # both models, every stage (~20 min on 2 cores)
    python benchmarks/bench_plan.py --models tiny      # a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import RESULTS, SHARED, tiny_model, workdir

SMOL = str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "rloo")

_CHILD = """
import resource, sys
from tldr_rlhf.cli import main
rc = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(rc)
"""


def stage_config(stage: str, model: str, out: Path, runs: dict[str, str], threads: int):
    """The stage's cpu-smol preset pointed at ``model`` (or the SFT / reward model just trained),
    two optimizer steps (one RL update), written to ``out``."""
    from tldr_rlhf.presets import DPO_PRESETS, GRPO_PRESETS, PPO_PRESETS, RLOO_PRESETS, RM_PRESETS, SFT_PRESETS

    table = {"sft": SFT_PRESETS, "rm": RM_PRESETS, "dpo": DPO_PRESETS, "ppo": PPO_PRESETS, "grpo": GRPO_PRESETS, "rloo": RLOO_PRESETS}[stage]
    cfg = table["cpu-smol"]
    run = dataclasses.replace(cfg.run, output_dir=str(out / stage), overwrite=True, max_steps=1 if stage in ("ppo", "grpo", "rloo") else 2, num_threads=threads, progress=False, save_every=0, eval_every=0)
    changes = {"run": run}
    if stage in ("sft", "rm"):
        changes["model"] = dataclasses.replace(cfg.model, path=model)
    else:
        changes["sft_path"] = runs["sft"]
        if stage != "dpo":
            changes["rm_path"] = runs["rm"]
    return dataclasses.replace(cfg, **changes)


def data_lengths(stage: str, cfg, tokenizer) -> tuple[int, int]:
    """(longest query, longest response) of the stage's training data after the caps: the widest
    micro-batch the stage can see (the plan's own default is the caps themselves)."""
    from tldr_rlhf import tasks

    if stage == "sft":
        train = tasks.sft_examples(cfg.data, tokenizer)[0]
        return max(len(e.query_ids) for e in train), max(len(e.response_ids) for e in train)
    if stage in ("rm", "dpo"):
        train = (tasks.rm_pairs if stage == "rm" else tasks.dpo_pairs)(cfg.data, tokenizer)[0]
        return max(len(e.query_ids) for e in train), max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in train)
    prompts = tasks.rl_prompts(cfg.data, tokenizer)[0]
    return max(len(p.query_ids) for p in prompts), cfg.response_length


def measure(stage: str, cfg, work: Path, threads: int) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of ``tldr-rlhf STAGE --config`` in a fresh process."""
    from tldr_rlhf.config import save_config

    file = work / f"{stage}.json"
    save_config(cfg, file)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, stage, "--config", str(file)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"{stage} failed (exit {proc.returncode})")
    kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
    return kb / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smol"], choices=["tiny", "smol"])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--estimate-only", action="store_true", help="reuse the peak RSS measured by the last run (the estimator changed, not the stages)")
    args = ap.parse_args()
    from tldr_rlhf.evaluate import markdown_table
    from tldr_rlhf.modeling import load_tokenizer
    from tldr_rlhf.memory import estimate_stage

    root = workdir()
    rows, records = [], []
    for kind in args.models:
        work = root / f"plan-{kind}"
        work.mkdir(parents=True, exist_ok=True)
        model = tiny_model(work / "base", layers=4, hidden=256) if kind == "tiny" else SMOL
        runs: dict[str, str] = {}
        tokenizer = load_tokenizer(model)
        for stage in STAGES:
            if stage not in args.stages and stage not in ("sft", "rm"):
                continue
            cfg = stage_config(stage, model, work, runs, args.threads)
            if stage not in args.stages and (work / stage / "final").is_dir():  # an input already trained by an earlier run
                runs[stage] = str(work / stage / "final")
                continue
            if args.estimate_only and (work / stage / "final").is_dir():
                measured, seconds = json.loads((work / "measured.json").read_text())[stage]
            else:
                measured, seconds = measure(stage, cfg, work, args.threads)
                store = work / "measured.json"
                old = json.loads(store.read_text()) if store.is_file() else {}
                store.write_text(json.dumps({**old, stage: [measured, seconds]}))
            runs[stage] = str(work / stage / "final")
            if stage not in args.stages:
                continue
            lengths = data_lengths(stage, cfg, tokenizer)
            est = estimate_stage(stage, cfg, device="cpu", lengths=lengths).total / 2**20
            err = (est - measured) / measured
            rows.append([kind, stage, f"{lengths[0]} + {lengths[1]}", f"{est:,.0f}", f"{measured:,.0f}", f"{100 * err:+.0f}%", f"{seconds:.0f}"])
            records.append({"model": kind, "stage": stage, "lengths": lengths, "estimate_mb": est, "measured_mb": measured, "error": err, "seconds": seconds})
            print(f"{kind} {stage}: estimate {est:,.0f} MiB, measured {measured:,.0f} MiB ({100 * err:+.0f}%)", flush=True)
    print(markdown_table(["model", "stage", "longest query + response", "estimate MiB", "peak RSS MiB", "error", "s"], rows))
    worst = max(abs(r["error"]) for r in records)
    print(f"largest error {100 * worst:.0f}% (target: within 25%); load {os.getloadavg()[0]:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plan.json").write_text(json.dumps({"threads": args.threads, "rows": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
