"""Side-by-side benchmark harness: our stage vs the TRL trainer a user would pick instead.

Each side runs in its own Python process (so peak memory is its own), on the same tiny model built
from a config, the same real TL;DR data, batch, lengths, steps and threads. A side prints one JSON
line ``{"time_s": ..., "steps": ..., "tokens": ..., "items": ..., "step_times": [...]}``; the harness
adds the process's peak resident memory and prints a table with the ratio.

    python benchmarks/bench_sft.py            # runs both sides and prints the table
    python benchmarks/bench_sft.py --side ours --settings '{...}'   # one side (used internally)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = str(SHARED / "tokenizers" / "qwen2.5")
POSTS = str(SHARED / "data" / "tldr" / "posts" / "valid_sample.jsonl")
COMPARISONS = str(SHARED / "data" / "tldr" / "comparisons" / "batch13.json")
RESULTS = ROOT / "benchmarks" / "results"


def tiny_model(path: str | Path, *, layers: int = 4, hidden: int = 256, heads: int = 4, seed: int = 0) -> str:
    """Save a randomly initialised Qwen2 causal LM (real Qwen2.5 vocabulary) with the real tokenizer
    to ``path``; both sides load it from there. Returns the path."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(script: str, side: str, settings: dict[str, Any], python: str | None = None) -> dict[str, Any]:
    """Run one side in a fresh process (``python``, default this interpreter); returns its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(settings.get("threads", 2)), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([python or sys.executable, script, "--side", side, "--settings", json.dumps(settings)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def side_main(sides: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> bool:
    """If invoked as one side, run it, print its JSON result and return True."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--side")
    ap.add_argument("--settings")
    args, _ = ap.parse_known_args()
    if not args.side:
        return False
    settings = json.loads(args.settings)
    import torch

    torch.set_num_threads(settings.get("threads", 2))
    torch.manual_seed(0)
    result = sides[args.side](settings)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))
    return True


def summarize(name: str, results: dict[str, dict[str, Any]], *, item: str, warmup: int = 1) -> dict[str, Any]:
    """Print and return the comparison table; throughput uses the median step time after ``warmup``
    steps (model loading and the first step's allocations excluded)."""
    rows = {}
    for side, r in results.items():
        times = r["step_times"][warmup:] or r["step_times"]
        step = statistics.median(times)
        rows[side] = {
            "median_step_s": step,
            f"{item}_per_s": r["items"] / r["steps"] / step,
            "tokens_per_s": r["tokens"] / r["steps"] / step,
            "peak_rss_mb": r["peak_rss_mb"],
        }
    ours, peer = rows["ours"], next(v for k, v in rows.items() if k != "ours")
    ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
    mem_ratio = ours["peak_rss_mb"] / peer["peak_rss_mb"]
    print(f"\n{name}")
    print(f"{'side':<10}{'step s':>10}{item + '/s':>14}{'tokens/s':>12}{'peak MB':>10}")
    for side, r in rows.items():
        print(f"{side:<10}{r['median_step_s']:>10.3f}{r[item + '_per_s']:>14.2f}{r['tokens_per_s']:>12.0f}{r['peak_rss_mb']:>10.0f}")
    print(f"throughput ratio ours/peer: {ratio:.2f}x   peak memory ratio ours/peer: {mem_ratio:.2f}")
    out = {"benchmark": name, "sides": rows, "throughput_ratio": ratio, "memory_ratio": mem_ratio}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def workdir() -> Path:
    d = Path(tempfile.gettempdir()) / "tldr-rlhf-bench"
    d.mkdir(exist_ok=True)
    return d


class StepTimer:
    """Collect wall time per optimizer step (used inside a side)."""

    def __init__(self):
        self.times: list[float] = []
        self._t = time.perf_counter()

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self) -> None:
        self.times.append(time.perf_counter() - self._t)


def pairs_in_training_order(settings: dict[str, Any], data_args, load) -> tuple[Any, list]:
    """(tokenizer, the training pairs our run uses, in the order and micro-batches it uses them) for
    the preference benchmarks: ``load(data_args, tokenizer) -> (train, valid, report)`` is the stage's
    loader (``tasks.rm_pairs``, ``tasks.dpo_pairs``); seed 42, one epoch, ``settings["steps"]`` batches."""
    from tldr_rlhf.modeling import load_tokenizer
    from tldr_rlhf.train.loop import global_batches

    tok = load_tokenizer(settings["model"])
    train_ex, _, _ = load(data_args, tok)
    batch = settings["micro_batch_size"] * settings["gradient_accumulation_steps"]
    order = [i for step in global_batches(len(train_ex), batch, 42, 1)[: settings["steps"]] for i in step]
    return tok, [train_ex[i] for i in order]


def pair_tokens(pairs) -> int:
    """Tokens of the full rows (query + chosen, query + rejected), the same count for every side."""
    return sum(2 * len(e.query_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in pairs)
