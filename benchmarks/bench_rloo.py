"""RLOO throughput and peak memory: tldr-rlhf `rloo` vs TRL's RLOOTrainer on identical settings.

The set-up is bench_grpo.py's (same tiny policy and reward model, real queries, k = 4, temperature,
response length, KL 0.05 in the reward on both sides, one pass per rollout). Run:
``python benchmarks/bench_rloo.py``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grpo  # noqa: E402

if __name__ == "__main__":
    bench_grpo.main("rloo")
