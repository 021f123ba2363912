"""Peak memory and time of one training forward + backward with and without activation checkpointing
(``--model.gradient-checkpointing`` / ``--gradient-checkpointing``, issue 14 item 2), for the three
kinds of trained model: the policy (SFT / DPO / PPO / GRPO / RLOO: response log-probs through the
chunked LM head), the reward model (pairwise loss) and PPO's value model (per-token values).

Each measurement runs in its own Python process: the model is built from a config (Qwen2, real
Qwen2.5 vocabulary; default 8 layers, hidden 256) on real TL;DR shapes (queries of 512 tokens,
responses of 53), the resident set is read before the step (VmRSS) and its peak after it (VmHWM);
the difference is the step's own peak (activations, gradients, recomputation). Medians of --repeats
fresh processes. Full rows on both sides (checkpointing never shares the prompt in training passes).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_gradient_checkpointing.py
    ... --layers 12 --hidden 384 --rows 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def one(kind: str, checkpointing: bool, layers: int, hidden: int, rows: int, query: int, response: int) -> dict:
    """One measurement in this process: build, one warm-up-free step, report."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tldr_rlhf.data.batching import collate_query_response
    from tldr_rlhf.lm_head import response_token_logprobs
    from tldr_rlhf.modeling import enable_gradient_checkpointing
    from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel
    from tldr_rlhf.value_model import ValueModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=151665, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=151643, eos_token_id=151643,
    )
    g = torch.Generator().manual_seed(1)
    queries = [torch.randint(0, 150000, (query,), generator=g).tolist() for _ in range(rows)]
    responses = [torch.randint(0, 150000, (response,), generator=g).tolist() for _ in range(rows)]
    batch = collate_query_response(queries, responses, 151643)
    if kind == "policy":
        model = Qwen2ForCausalLM(cfg)
    elif kind == "reward":
        model = ScalarRewardModel(RewardModelConfig(text_config=cfg))
    else:
        model = ValueModel.from_scalar_model(ScalarRewardModel(RewardModelConfig(text_config=cfg)))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if kind == "policy":
        loss = -response_token_logprobs(model, batch, temperature=0.7).sum()
    elif kind == "reward":
        r = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).rewards
        half = rows // 2
        loss = -torch.nn.functional.logsigmoid(r[:half] - r[half:]).mean()
    else:
        loss = (model(batch.input_ids, batch.attention_mask, batch.query_width) * batch.response_mask).square().sum()
    loss.backward()
    dt = time.perf_counter() - t0
    return {"step_peak_mb": _status("VmHWM") - before, "time_s": dt, "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--query", type=int, default=512)
    ap.add_argument("--response", type=int, default=53)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        kind, ck = a.one.split(":")
        print(json.dumps(one(kind, ck == "1", a.layers, a.hidden, a.rows, a.query, a.response)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    print(f"load average before: {os.getloadavg()}  (cores: {os.cpu_count()})")
    print(f"Qwen2 {a.layers} layers, hidden {a.hidden}, vocab 151665; {a.rows} rows of {a.query} query + {a.response} response tokens; median of {a.repeats} processes")
    print("| model | step peak MiB, off | on | saved | time s, off | on | loss equal |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("policy", "reward", "value"):
        res = {}
        for ck in ("0", "1"):
            runs = []
            for _ in range(a.repeats):
                argv = [sys.executable, __file__, "--one", f"{kind}:{ck}", "--layers", str(a.layers), "--hidden", str(a.hidden), "--rows", str(a.rows), "--query", str(a.query), "--response", str(a.response)]
                out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                runs.append(json.loads(out))
            res[ck] = {k: statistics.median(r[k] for r in runs) for k in ("step_peak_mb", "time_s")} | {"loss": runs[0]["loss"]}
        off, on = res["0"], res["1"]
        saved = 1 - on["step_peak_mb"] / off["step_peak_mb"]
        print(f"| {kind} | {off['step_peak_mb']:.0f} | {on['step_peak_mb']:.0f} | {saved:.0%} | {off['time_s']:.2f} | {on['time_s']:.2f} | {off['loss'] == on['loss']} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
