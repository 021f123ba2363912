"""RLOO throughput and peak memory at TL;DR shapes on the real SmolLM2-135M: TRL's RLOOTrainer,
tldr-rlhf `rloo` without and with the shared prompt.

The set-up is bench_grpo.py's (same model, reward model, real queries up to 512 tokens, k = G = 8,
2 prompts per step, temperature 0.7, responses up to 53 tokens, KL 0.05 in the reward on both sides,
one pass and one optimizer step per rollout). Run: ``python benchmarks/bench_rloo.py [steps]``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grpo  # noqa: E402

if __name__ == "__main__":
    bench_grpo.main("rloo")
