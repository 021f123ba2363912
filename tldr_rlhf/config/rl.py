"""The RL stages' configs (ppo, grpo, rloo, online-dpo): a policy trained on its own samples scored by a
reward, composed of the sections in ``parts.py``. Derived sizes are methods that raise ValueError on
inexact division.

This module knows nothing about the supervised stages, the evaluations or the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .parts import OptimArgs, RolloutEngineArgs, RunArgs, TldrDataArgs, TruncatedISArgs


@dataclass(frozen=True)
class _RLConfig(TruncatedISArgs, RolloutEngineArgs):
    """What every RL stage (PPO, GRPO, RLOO) shares: a policy and a frozen reference from the SFT
    checkpoint, a frozen reward model, prompts from the SFT posts, temperature sampling with the EOS
    trick. The stages add their own fields and defaults."""

    sft_path: str = ""
    """SFT checkpoint: the policy and the frozen reference start from it (run folder final/, hub id, .gguf)."""
    rm_path: str = ""
    """Reward model checkpoint (frozen; PPO's value model starts as a copy of it, N+ detail 18)."""
    reward: str = ""
    """The reward instead of `rm_path` (docs/rewards.md): a reward-model path, a built-in (rouge-l,
    rouge-1, rouge-2, length), a Python callable module:function, or a weighted sum TERM[:WEIGHT],...
    e.g. rouge-l:1.0,length:-0.01; empty = the reward model `rm_path`. PPO's value model starts from
    its first reward-model term, else from the SFT backbone with a fresh head."""
    tokenizer: str | None = None
    """Tokenizer path or hub id; defaults to `sft_path`."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights dtype: auto = float32 on CPU, bfloat16 mixed precision on CUDA."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the trained models (policy; PPO's value model too): same losses and
    gradients, less memory, about one more forward of compute per update pass."""
    lora_r: int = 0
    """LoRA rank of the policy (PPO's value model gets adapters of its own, its head trained in full);
    0 trains every weight. With LoRA the reference is the policy with its adapters disabled: no second copy."""
    lora_alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    load_in_4bit: bool = False
    """QLoRA: the policy's base weights in 4-bit NF4 (bitsandbytes) under LoRA adapters (needs lora_r > 0
    and a CUDA GPU; refused elsewhere)."""
    data: TldrDataArgs = field(default_factory=TldrDataArgs)
    """Prompts: the SFT training posts, reshuffled each time they run out (N+ detail 17)."""
    optim: OptimArgs = field(default_factory=OptimArgs)
    """AdamW. PPO anneals the learning rate linearly to 0 over the updates (warmup, min_lr and
    decay_steps unused; the presets set N+'s betas (0.9, 0.999), weight decay 0.01, no clipping);
    GRPO / RLOO use the cosine-with-warmup schedule, stepped per optimizer step."""
    run: RunArgs = field(default_factory=RunArgs)
    """Run folder and cadence; steps are updates (one rollout batch each)."""
    total_episodes: int = 1_000_000
    """Responses sampled over the whole run (N+ detail 16: 1M, ~8.56 passes over the SFT prompts)."""
    forward_batch_size: int = 32
    """Sequences per sampling / no-grad forward pass per process during the rollout."""
    temperature: float = 0.7
    """Sampling temperature; log-probs use the same temperature (N+ detail 21)."""
    no_eos_penalty: float | None = -1.0
    """Score of a response without EOS (the EOS trick, N+ detail 23); None = no EOS trick, such a
    response keeps its score (TRL's `missing_eos_penalty=None`)."""
    clip_range: float = 0.2
    """Policy ratio clip."""
    num_sample_posts: int = 4
    """Rollout responses written to samples.jsonl every `run.eval_every` updates."""


@dataclass(frozen=True)
class PPOConfig(_RLConfig):
    """PPO from an SFT policy against a frozen reward model (Stiennon et al. 2020; N+ details 16-23)."""

    rollout_batch_size: int = 512
    """Prompts per PPO update over all processes (one response each)."""
    num_mini_batches: int = 1
    """Minibatches (optimizer steps) per PPO epoch over the rollout batch."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass per process (gradient accumulation inside a minibatch)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch (N+ detail 16)."""
    response_length: int = 53
    """New tokens sampled per response; truncated after the first EOS (53 Pythia, 63 Qwen2.5)."""
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient in the reward, fixed (N+ detail 16)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 = log pi - log pi_ref (N+), k3 = exp(-d) + d - 1."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    vf_clip_range: float = 0.2
    """Value clip around the rollout values."""
    vf_coef: float = 0.1
    """Value-loss coefficient in the total loss."""
    dual_clip: float = 0.0
    """Dual-clip bound c (> 1) for negative advantages; 0 = off."""
    whiten_rewards: bool = False
    """Whiten the shaped rewards over real tokens before GAE (off in the released N+ runs, detail 22)."""

    def num_updates(self) -> int:
        """PPO updates in the whole run (``total_episodes // rollout_batch_size``); ValueError if 0."""
        n = self.total_episodes // self.rollout_batch_size
        if n < 1:
            raise ValueError(f"total_episodes {self.total_episodes} is less than one rollout batch of {self.rollout_batch_size}")
        return n

    def local_batch_size(self, world_size: int = 1) -> int:
        """Prompts per update per process; ValueError on inexact division."""
        return _exact_div(self.rollout_batch_size, world_size, "rollout_batch_size", "processes")

    def local_mini_batch_size(self, world_size: int = 1) -> int:
        """Sequences per minibatch per process; ValueError on inexact division."""
        return _exact_div(self.local_batch_size(world_size), self.num_mini_batches, "per-process rollout batch", "num_mini_batches")

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per minibatch per process; ValueError on inexact division."""
        return _exact_div(self.local_mini_batch_size(world_size), self.micro_batch_size, "per-process minibatch", "micro_batch_size")


def _exact_div(a: int, b: int, what: str, by: str) -> int:
    if b <= 0 or a % b:
        raise ValueError(f"{what} ({a}) must split exactly into {by} ({b})")
    return a // b


@dataclass(frozen=True)
class _GroupRLConfig(_RLConfig):
    """What GRPO and RLOO share: several sampled responses per prompt scored by a frozen reward
    model, no value model. The defaults and their help are GRPO's (N+ detail 24); RLOO redeclares the
    fields it changes, and each subclass adds its own fields."""

    rollout_prompts: int = 16
    """Prompts per rollout over all processes; each gets group_size responses."""
    group_size: int = 8
    """Responses per prompt, G (N+ detail 24)."""
    mini_batch_size: int = 64
    """Sequences per optimizer step over all processes."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass per process."""
    update_per_rollout: int = 4
    """Passes over each rollout batch (N+ detail 24)."""
    response_length: int = 63
    """New tokens sampled per response; truncated after the first EOS."""
    kl_coef: float = 0.05
    """Coefficient of the KL-to-reference term in the loss."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator in the loss (k3 = exp(ref - logp) - (ref - logp) - 1)."""
    shared_prompt: bool = True
    """Compute each prompt once per group in every pass: sampling (one prefill, its cache expanded to
    the G responses), the reward model, the policy and reference log-probs and the training forward /
    backward (same numbers as full rows up to float rounding, docs/shared_prompt.md); False = every
    row carries its whole query (the fallback for models whose cache cannot be expanded)."""

    def num_updates(self) -> int:
        """Rollouts in the whole run; ValueError when fewer than one."""
        n = self.total_episodes // (self.rollout_prompts * self.group_size)
        if n < 1:
            raise ValueError(f"total_episodes {self.total_episodes} is less than one rollout of {self.rollout_prompts} x {self.group_size}")
        return n

    def local_prompts(self, world_size: int = 1) -> int:
        """Prompts per rollout per process; ValueError on inexact division."""
        return _exact_div(self.rollout_prompts, world_size, "rollout_prompts", "processes")

    def local_mini_batch_size(self, world_size: int = 1) -> int:
        """Sequences per optimizer step per process; ValueError when it does not divide the rollout."""
        local = _exact_div(self.mini_batch_size, world_size, "mini_batch_size", "processes")
        _exact_div(self.local_prompts(world_size) * self.group_size, local, "per-process rollout sequences", "the per-process minibatch")
        _exact_div(local, self.micro_batch_size, "per-process minibatch", "micro_batch_size")
        return local

    def optimizer_steps(self, world_size: int = 1) -> int:
        """Optimizer steps in the whole run (the schedule's length)."""
        per_rollout = self.local_prompts(world_size) * self.group_size // self.local_mini_batch_size(world_size)
        return self.num_updates() * self.update_per_rollout * per_rollout


@dataclass(frozen=True)
class GRPOConfig(_GroupRLConfig):
    """GRPO from an SFT policy against a frozen reward model (Shao et al. 2024; N+ details 24-25)."""

    dual_clip: float = 3.0
    """Dual-clip bound c (> 1) for negative advantages; 0 = off."""
    loss_aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "seq-mean-token-mean"
    """How per-token losses reduce to one number."""
    scale_by_std: bool = True
    """Divide group advantages by the group's std; False = Dr. GRPO (mean removed only)."""
    global_normalize: bool = False
    """Normalize advantages over the whole rollout after the group normalization (seed GPT-2)."""
    rejection_sampling: bool = False
    """Statistical rejection sampling: sample rs_candidates per prompt at rs_temperature and keep group_size (N+ detail 25)."""
    rs_candidates: int = 64
    """Candidates sampled per prompt for rejection sampling."""
    rs_temperature: float = 1.0
    """Sampling temperature of the candidates (high, for diversity); log-probs still use `temperature`."""
    rs_beta: float = 0.5
    """Rejection-sampling temperature beta: small keeps the top scores, large keeps a uniform draw."""


@dataclass(frozen=True)
class RLOOConfig(_GroupRLConfig):
    """RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024) from an SFT policy against a reward model."""

    rollout_prompts: int = 64
    """Prompts per rollout over all processes; each gets k responses."""
    group_size: int = 4
    """Responses per prompt, k (>= 2; each one's baseline is the mean of the other k - 1)."""
    mini_batch_size: int = 256
    """Sequences per optimizer step over all processes."""
    update_per_rollout: int = 1
    """Passes over each rollout batch (1 = plain REINFORCE; more passes clip the sequence ratio)."""
    kl_coef: float = 0.05
    """KL penalty coefficient in the sequence reward: score - kl_coef * sum_t KL_t."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator summed into the reward."""
    clip_range: float = 0.2
    """Clip of the sequence ratio on passes after the first; 0 = unclipped."""


@dataclass(frozen=True)
class OnlineDPOConfig(_RLConfig):
    """Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback"): two
    responses per prompt sampled from the current policy, labelled chosen / rejected by the reward
    (`--reward` or the reward model `--rm-path`), one DPO step against the frozen SFT reference, repeat."""

    rollout_prompts: int = 64
    """Prompts per update over all processes; each gets two responses (one pair)."""
    mini_batch_size: int = 64
    """Pairs per optimizer step over all processes."""
    micro_batch_size: int = 8
    """Pairs per forward/backward pass per process (2x this many sequences)."""
    update_per_rollout: int = 1
    """Passes over each update's pairs (1 = every pair used once, on-policy; Guo et al.)."""
    response_length: int = 53
    """New tokens sampled per response; truncated after the first EOS (53 Pythia, 63 Qwen2.5)."""
    beta: float = 0.1
    """DPO beta (Guo et al. 2024: 0.1): the strength of the implicit KL to the reference."""
    label_smoothing: float = 0.0
    """Conservative DPO: labels flipped with this probability (0 = plain DPO)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid = DPO (Rafailov et al. 2023, eq. 7); ipo = IPO (Azar et al. 2023)."""

    @property
    def group_size(self) -> int:
        """Responses per prompt: always 2 (the pair)."""
        return 2

    @property
    def shared_prompt(self) -> bool:
        """Each prompt computed once for its pair (the group stages' field): always off, the rollout runs
        full rows unless another engine samples (``group_rl.group_rollout``); the loss does too."""
        return False

    def num_updates(self) -> int:
        """Updates in the whole run (``total_episodes // (2 * rollout_prompts)``); ValueError when fewer than one."""
        n = self.total_episodes // (self.rollout_prompts * 2)
        if n < 1:
            raise ValueError(f"total_episodes {self.total_episodes} is less than one update of {self.rollout_prompts} prompts x 2")
        return n

    def local_prompts(self, world_size: int = 1) -> int:
        """Prompts (pairs) per update per process; ValueError on inexact division."""
        return _exact_div(self.rollout_prompts, world_size, "rollout_prompts", "processes")

    def local_mini_batch_size(self, world_size: int = 1) -> int:
        """Pairs per optimizer step per process; ValueError when it does not divide the update's pairs
        or split into micro-batches."""
        local = _exact_div(self.mini_batch_size, world_size, "mini_batch_size", "processes")
        _exact_div(self.local_prompts(world_size), local, "per-process pairs of an update", "the per-process minibatch")
        _exact_div(local, self.micro_batch_size, "per-process minibatch", "micro_batch_size")
        return local

    def optimizer_steps(self, world_size: int = 1) -> int:
        """Optimizer steps in the whole run (the schedule's length)."""
        return self.num_updates() * self.update_per_rollout * (self.local_prompts(world_size) // self.local_mini_batch_size(world_size))


@dataclass(frozen=True)
class ReinforcePPConfig(_GroupRLConfig):
    """REINFORCE++ (Hu et al. 2025) from an SFT policy against a reward model: per-token KL-penalized
    rewards, their discounted return whitened over the batch (no critic, no group baseline), PPO's
    clipped loss."""

    rollout_prompts: int = 64
    """Prompts per rollout over all processes; each gets group_size responses."""
    group_size: int = 2
    """Responses per prompt (REINFORCE++ uses no group baseline: more responses are more samples)."""
    mini_batch_size: int = 64
    """Sequences per optimizer step over all processes."""
    update_per_rollout: int = 1
    """Passes over each rollout batch (PPO-style epochs; the ratio is clipped)."""
    kl_coef: float = 0.05
    """KL penalty coefficient in the per-token reward: r_t = -kl_coef * KL_t (+ the score at the EOS)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward."""
    gamma: float = 1.0
    """Discount of the per-token return (1 = the undiscounted return of the paper)."""
    clip_range: float = 0.2
    """PPO clip of the per-token ratio."""
