"""tldr-rlhf: "Learning to summarize from human feedback" end to end on one machine.

Stages: SFT -> reward model -> PPO / GRPO / RLOO / DPO -> evaluation -> report, following the
N+ implementation details (Huang et al. 2024).
"""

__version__ = "0.1.0"
