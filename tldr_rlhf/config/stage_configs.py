"""One frozen dataclass per stage, composed of the sections in ``parts.py``. Derived sizes are methods
that raise ValueError on inexact division."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tyro.conf import Positional

from ..stages import DEFAULT_PIPELINE_STAGES
from .parts import SHARED, JudgeArgs, ModelArgs, OptimArgs, PreferenceDataArgs, RewardNormArgs, RolloutEngineArgs, RunArgs, TldrDataArgs, TruncatedISArgs, _rm_data

# ----------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on reference TL;DRs (N+ section 4)."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: TldrDataArgs = field(default_factory=TldrDataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)
    epochs: int = 1
    """Passes over the training posts."""
    micro_batch_size: int = 16
    """Sequences per forward pass per process."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimizer step."""
    loss_on_query: bool = False
    """Also train on query tokens (N+ trained on all non-pad tokens, detail 5); default: response only."""
    num_sample_posts: int = 4
    """Fixed validation posts summarized (greedy) at every evaluation into samples.jsonl."""

    def global_batch_size(self, world_size: int = 1) -> int:
        """Sequences per optimizer step over all processes."""
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size


@dataclass(frozen=True)
class RMConfig:
    """Reward model on human comparisons (Stiennon et al. 2020 sec. 3.4; N+ details 10-15)."""

    model: ModelArgs = field(default_factory=ModelArgs)
    """Backbone: a base or SFT causal LM (hub id, folder, .gguf) or a reward-model checkpoint to continue."""
    data: PreferenceDataArgs = field(default_factory=_rm_data)
    """Human comparisons the reward model trains on, and the held-out ones it is scored on."""
    norm: RewardNormArgs = field(default_factory=RewardNormArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)
    epochs: int = 1
    """Passes over the training comparisons (N+: 1; more overfits)."""
    micro_batch_size: int = 8
    """Comparisons (pairs) per forward pass per process; each pass scores 2x this many responses."""
    gradient_accumulation_steps: int = 16
    """Micro-batches per optimizer step."""
    eval_batch_size: int = 16
    """Comparisons per forward pass when scoring held-out pairs and normalization references."""
    shared_prompt: bool = True
    """Run each query once and both responses on its key/value cache (same scores, about half the
    compute); False = chosen and rejected as two full rows of one forward pass."""
    train_layers: int = 0
    """Train only the top N transformer blocks (+ final norm and head); 0 = every weight (the papers).
    A speed option for CPU demos."""

    def global_batch_size(self, world_size: int = 1) -> int:
        """Comparisons per optimizer step over all processes."""
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size


@dataclass(frozen=True)
class EvaluateRMConfig:
    """Measure a reward model against humans and a judge: held-out accuracy, accuracy by annotator
    confidence (calibration), CNN/DM accuracy (out of distribution), agreement with GPT-3.5."""

    model: str = "runs/rm/final"
    """Reward-model checkpoint (a run's final/)."""
    data: PreferenceDataArgs = field(default_factory=_rm_data)
    """Held-out comparisons; replaced by the training run's own data settings (same split) when the
    model sits in a run folder with a config.json and `from_run` is set."""
    from_run: bool = True
    """Take `data` from the run folder's config.json so the held-out set is exactly the training run's."""
    cnndm: str = "openai/summarize_from_feedback"
    """CNN/DM comparisons: OpenAI JSON-lines file, or the hub dataset (its validation CNN/DM rows); empty = skip."""
    max_cnndm_query_length: int = 1919
    """CNN/DM query cap (N+ detail 6)."""
    policy_samples: str = str(SHARED / "data" / "tldr" / "policy_samples" / "openai_ppo_1.3b.jsonl")
    """JSON-lines of (query, policy response, reference, judge_preferred): does the reward model prefer
    the same summary as the judge? Empty = skip."""
    valid_limit: int = 0
    """Held-out TL;DR comparisons scored (0 = all)."""
    cnndm_limit: int = 0
    """CNN/DM comparisons scored (0 = all)."""
    judge_limit: int = 0
    """Judged policy samples scored (0 = all)."""
    batch_size: int = 16
    """Pairs per forward pass."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = float32 on CPU, bfloat16 autocast on CUDA."""
    output: str = ""
    """Results JSON; empty = eval_rm.json in the run folder (or next to the model)."""
    num_threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    progress: bool = True
    """Progress bars."""


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimization from an SFT policy (Rafailov et al. 2023; N+ detail 26)."""

    sft_path: str = ""
    """SFT checkpoint the policy starts from; its log-probs are the (cached) reference. A run folder's
    final/, a hub id, or a .gguf file."""
    tokenizer: str | None = None
    """Tokenizer path or hub id; defaults to `sft_path`."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights dtype: auto = float32 on CPU, bfloat16 mixed precision on CUDA."""
    lora_r: int = 0
    """LoRA rank; 0 trains every weight. With LoRA the reference is the SFT model with adapters disabled."""
    lora_alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the policy (same losses and gradients, less memory, about one more
    forward of compute); the shared prompt then runs full rows in training passes."""
    load_in_4bit: bool = False
    """QLoRA: the policy's base weights in 4-bit NF4 (bitsandbytes) under LoRA adapters (needs lora_r > 0
    and a CUDA GPU; refused elsewhere)."""
    data: PreferenceDataArgs = field(default_factory=PreferenceDataArgs)
    """Human comparisons for DPO and the held-out comparisons its implicit rewards are scored on."""
    optim: OptimArgs = field(default_factory=OptimArgs)
    """Optimizer and schedule (the presets set the DPO values: seed lr 5e-5, N+ 3e-6)."""
    run: RunArgs = field(default_factory=RunArgs)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid = DPO / conservative DPO (with label_smoothing); ipo = IPO (Azar et al. 2023)."""
    beta: float = 0.1
    """KL strength: implicit reward = beta * (log pi - log pi_ref); for IPO, tau (seed 0.1, N+ 0.05)."""
    label_smoothing: float = 0.1
    """Conservative DPO: probability that a label is flipped, in [0, 0.5) (seed 0.1; 0 = plain DPO)."""
    ipo_length_normalized: bool = False
    """IPO on per-token mean log ratios (TRL's form) instead of the paper's summed ones."""
    epochs: int = 1
    """Passes over the training comparisons."""
    micro_batch_size: int = 8
    """Comparisons (pairs) per forward pass per process; each pass scores 2x this many responses."""
    gradient_accumulation_steps: int = 16
    """Micro-batches per optimizer step."""
    eval_batch_size: int = 16
    """Comparisons per forward pass when computing reference log-probs and held-out accuracy."""
    shared_prompt: bool = True
    """Run each query once and both responses on its key/value cache (same result, ~half the query
    compute); False = chosen and rejected as two full rows of one concatenated forward pass."""
    num_sample_posts: int = 2
    """Held-out posts summarized (greedy) by the SFT policy before and the DPO policy after training."""
    sample_max_new_tokens: int = 63
    """Length cap of the sample summaries."""

    def global_batch_size(self, world_size: int = 1) -> int:
        """Comparisons per optimizer step over all processes."""
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size

    @property
    def model_args(self) -> ModelArgs:
        """The policy's ModelArgs: the SFT checkpoint with this run's dtype and LoRA settings."""
        return ModelArgs(path=self.sft_path, tokenizer=self.tokenizer, dtype=self.dtype, lora_r=self.lora_r, lora_alpha=self.lora_alpha, gradient_checkpointing=self.gradient_checkpointing, load_in_4bit=self.load_in_4bit)


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
class EvaluateConfig(RolloutEngineArgs):
    """Evaluate policies on held-out posts: ROUGE, reward-model score, win rate against the human
    reference (reward-model judge, optional LLM judge), length-controlled win rate, KL to SFT, length,
    EOS rate (N+ details 27-28)."""

    policies: tuple[str, ...] = ()
    """Policies as NAME=PATH (run folder final/, hub id or .gguf file), e.g. sft=runs/sft/final."""
    sft_path: str = ""
    """SFT policy the KL is measured against; empty = no KL."""
    rm_path: str = ""
    """Training reward model (scores and its own win rate); empty = no reward-model metrics."""
    judge_rm_path: str = ""
    """A different, stronger reward model judging win rates (exposes over-optimization of the training
    reward model); empty = the training reward model judges."""
    reward: str = ""
    """A reward scored on every summary and the reference (docs/rewards.md): a reward-model path, a
    built-in (rouge-l, rouge-1, rouge-2, length), a Python callable module:function, or a weighted sum
    TERM[:WEIGHT],... (e.g. rouge-l as the gold reward); empty = none."""
    best_of_n: int = 0
    """Best-of-n: sample this many summaries per post at `temperature` from each policy of
    `best_of_n_policies`, keep the one `best_of_n_reward` scores highest, and evaluate it as the policy
    NAME-boN, with its analytic KL log n - (n-1)/n to the policy it samples from; 0 = off."""
    best_of_n_reward: str = ""
    """The reward spec that picks the best of n (as `reward`); empty = `reward`, else `judge_rm_path`,
    else `rm_path`."""
    best_of_n_policies: tuple[str, ...] = ()
    """Names (from `policies`) that best-of-n samples from; empty = every policy."""
    data: TldrDataArgs = field(default_factory=TldrDataArgs)
    """Where the held-out posts come from: `valid`, else the posts of a local `train` file held out by
    id (the SFT split), else the hub dataset's validation split."""
    num_posts: int = 256
    """Held-out posts evaluated (0 = all)."""
    response_length: int = 63
    """Maximum new tokens per summary (53 Pythia / 63 Qwen2.5)."""
    greedy: bool = True
    """Greedy summaries; False = sampled at `temperature` (then the KL uses those samples)."""
    temperature: float = 0.7
    """Sampling temperature of the KL sample (and of the summaries when not greedy); the KL's log-probs
    use it too (N+ detail 21)."""
    kl: bool = True
    """Estimate KL(policy || SFT) from one extra sample per post (needs `sft_path`)."""
    batch_size: int = 16
    """Sequences per generation / forward pass."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = float32 on CPU, bfloat16 autocast on CUDA."""
    judge: JudgeArgs = field(default_factory=JudgeArgs)
    output_dir: str = "runs/evaluate"
    """Folder for eval.json, summaries.jsonl, eval_table.md and policies/NAME.jsonl (each policy's
    summaries, written as soon as they exist; a rerun with the same checkpoint, posts and settings
    reuses them instead of generating again)."""
    seed: int = 42
    """Sampling seed (the same for every policy)."""
    num_threads: int = 0
    """torch CPU threads (0 = torch's default)."""


@dataclass(frozen=True)
class GoldConfig:
    """The gold-reward experiment (docs/gold.md): a known reward, ROUGE-L against the human reference,
    stands in for human judgement so that what each method does to it can be measured exactly.

    direct: from the SFT checkpoint, each of `methods` optimizes the gold reward on training posts for
    every seed of `seeds`; each run's policy is evaluated on held-out posts every `eval_every` updates
    (gold reward, KL to SFT, length, EOS rate).

    proxy (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"): pairs of summaries sampled
    from the SFT policy on `proxy_pairs` training posts, labelled by the gold reward, train a proxy reward
    model (`tldr-rlhf rm`); each of `proxy_methods` optimizes the proxy, and best-of-n of SFT picks by it;
    held-out proxy and gold reward are measured against KL to SFT."""

    sft_path: str = ""
    """SFT checkpoint every run starts from and the KL is measured to (the pipeline sets it)."""
    output_dir: str = "runs/gold"
    """Folder of the experiment: direct/ and proxy/ run folders, eval/ (one evaluation folder per run),
    proxy/pairs.jsonl, and gold.json (every held-out measurement, the report's input)."""
    data: TldrDataArgs = field(default_factory=TldrDataArgs)
    """Posts: the training side (RL prompts, proxy pairs) and the held-out side (every evaluation),
    split by post id as in SFT; the pipeline passes the SFT stage's data."""
    gold_reward: str = "rouge-l"
    """The gold reward spec (docs/rewards.md) the direct runs optimize, that labels the proxy pairs and
    that every evaluation measures."""
    methods: tuple[Literal["ppo", "grpo", "rloo", "online-dpo"], ...] = ("ppo", "grpo", "rloo", "online-dpo")
    """Methods of the direct experiment."""
    proxy_methods: tuple[Literal["ppo", "grpo", "rloo", "online-dpo"], ...] = ("ppo", "grpo")
    """Methods that optimize the proxy reward model."""
    seeds: tuple[int, ...] = (1, 2)
    """Seeds of every run (run order: all methods at the first seed, direct then proxy, then the next seed)."""
    eval_every: int = 3
    """Updates between held-out evaluations of a run (its checkpoint cadence); the final policy is
    always evaluated (0 = only the final one)."""
    proxy_pairs: int = 128
    """Training posts the proxy pairs are sampled on (one pair each; tied pairs are left out)."""
    sft_resample_seeds: tuple[int, ...] = ()
    """Sampling seeds at which the SFT policy is measured again besides `evaluate.seed`: the spread of
    these measurements is what a policy identical to SFT shows on the held-out posts (the measurement's
    resolution), shown beside each gain in the report."""
    greedy_final: bool = False
    """Also measure the SFT policy and every direct run's final policy with greedy summaries (no sampling
    noise) on `greedy_posts` held-out posts, without KL, in one evaluation folder (eval/direct-greedy/);
    the report pairs each policy with SFT post by post (mean difference and its standard error)."""
    greedy_posts: int = 0
    """Held-out posts of the greedy measurement (0 = all of them)."""
    best_of_n: tuple[int, ...] = (2, 4, 8)
    """n of best-of-n of SFT picked by the proxy reward model (KL log n - (n-1)/n); () = none."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO's settings; reward, seed, paths, data and checkpoint cadence are set by the experiment."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO's settings (as ppo)."""
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    """RLOO's settings (as ppo)."""
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    """Online DPO's settings (as ppo)."""
    proxy_rm: RMConfig = field(default_factory=RMConfig)
    """The proxy reward model's training; its comparisons and output folder are set by the experiment."""
    proxy_rm_from_sft: bool = True
    """Start the proxy reward model from the SFT checkpoint instead of `proxy_rm.model.path`."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Held-out evaluation settings (num_posts, response_length, temperature, greedy, batch_size); its
    policies, paths, rewards, data and output folder are set by the experiment."""
    num_threads: int = 0
    """torch CPU threads for every run (0 = each run's own setting)."""


@dataclass(frozen=True)
class ReportConfig:
    """Markdown + HTML report of a pipeline run folder: training curves, reward vs KL, win rate and
    ROUGE per stage, length distributions, and the side-by-side table of summaries."""

    run_dir: Positional[str]
    """Pipeline run folder (holds sft/, rm/, dpo/, ppo/, grpo/, evaluate/, pipeline.json)."""
    output_dir: str = ""
    """Where report.md, report.html and the PNGs go; empty = RUN_DIR/report."""
    table_posts: int = 4
    """Held-out posts in the side-by-side table of summaries."""


@dataclass(frozen=True)
class PipelineConfig:
    """SFT -> reward model -> {DPO, PPO, GRPO} -> evaluation -> report in one run folder. A stage whose
    output exists (final/, eval.json) is skipped, so re-running the command resumes after a crash; a
    stage stopped half-way resumes from its newest checkpoint. Each stage's flags are under its name
    (--sft.optim.lr 1e-4, --ppo.run.max-steps 5); output folders and the SFT / reward-model paths of
    later stages are set by the pipeline."""

    run_dir: str = "runs/pipeline"
    """Run folder: one subfolder per stage, pipeline.json (stage status and seconds), report/."""
    stages: tuple[str, ...] = DEFAULT_PIPELINE_STAGES
    """Stages to run, in pipeline order (also available: rloo, online-dpo, gold)."""
    rerun: tuple[str, ...] = ()
    """Stages to run again from scratch although their output exists (later stages are not redone)."""
    base_model: str = ""
    """The untrained policy evaluated as `base`; empty = the SFT stage's starting model."""
    rm_from_sft: bool = False
    """Start the reward model from the SFT checkpoint instead of `rm.model.path`."""
    num_threads: int = 0
    """torch CPU threads for every stage (0 = each stage's own setting)."""
    report_to: tuple[Literal["none", "tensorboard", "wandb", "trackio", "mlflow"], ...] = ()
    """Trackers for every training stage (each stage's own --STAGE.run.report-to when empty); each stage
    is one tracker run named after its folder."""
    table_posts: int = 4
    """Held-out posts in the report's side-by-side table."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    evaluate_rm: EvaluateRMConfig = field(default_factory=EvaluateRMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    """Online DPO (the optional stage online-dpo): against the reward model, or against its own
    `reward` when set (then it needs no rm stage)."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluation settings; its policies, paths, data (the SFT stage's held-out split) and output
    folder are set by the pipeline."""
    gold: GoldConfig = field(default_factory=GoldConfig)
    """The gold-reward experiment (the optional stage gold, docs/gold.md); its SFT checkpoint, data and
    output folder are set by the pipeline."""
