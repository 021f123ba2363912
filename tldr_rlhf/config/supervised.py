"""The supervised and preference stages' configs (sft, rm, dpo): a model trained on fixed targets or fixed
preference pairs, composed of the sections in ``parts.py``. Derived sizes are methods that raise
ValueError on inexact division.

This module knows nothing about sampling, rewards or the pipeline (``rl.py``, ``runs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from tyro.conf import arg

from .parts import ModelArgs, OptimArgs, PreferenceDataArgs, RewardNormArgs, RunArgs, TldrDataArgs, reward_model_data


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
    padding_free: bool = True
    """Train on packed micro-batches (data/packing.py): the rows' real tokens in one row, position ids
    restarting per row, causal attention inside each row; same losses and gradients as padded rows, no
    work on padding (1.30x less CPU time per SFT step on SmolLM2 at TL;DR shapes, docs/performance.md).
    Response-only loss without activation checkpointing (else rows stay padded); --no-padding-free
    keeps the padded path."""
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
    data: PreferenceDataArgs = field(default_factory=reward_model_data)
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
    padding_free: bool = True
    """Train on packed micro-batches (data/packing.py): the real tokens in one row, each query once and
    its chosen and rejected responses after it (the rejected one attending to the query only; with
    --no-shared-prompt the 2B full rows), rewards read at each response's EOS; same losses and
    gradients as padded rows, no work on padding. SDPA models without activation checkpointing (else
    rows stay padded); --no-padding-free keeps the padded path."""
    train_layers: int = 0
    """Train only the top N transformer blocks (+ final norm and head); 0 = every weight (the papers).
    A speed option for CPU demos."""

    def global_batch_size(self, world_size: int = 1) -> int:
        """Comparisons per optimizer step over all processes."""
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size


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
    padding_free: bool = True
    """Train on packed micro-batches (data/packing.py): the real tokens in one row, each query once and
    its chosen and rejected responses after it (the rejected one attending to the query only; with
    --no-shared-prompt the 2B full rows); same log-probs, losses and gradients as padded rows, no work
    on padding; the reference and held-out passes too (bf16's step-0 rewards stay exactly 0). SDPA
    models without activation checkpointing (else rows stay padded); --no-padding-free keeps the padded
    path."""
    num_sample_posts: int = 2
    """Held-out posts summarized (greedy) by the SFT policy before and the DPO policy after training."""
    sample_max_new_tokens: Annotated[int, arg(name="sample-response-length")] = 63
    """Length cap of the sample summaries in new tokens (flag --sample-response-length, like every
    command's --response-length; --sample-max-new-tokens is the old spelling)."""

    def global_batch_size(self, world_size: int = 1) -> int:
        """Comparisons per optimizer step over all processes."""
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size

    @property
    def model_args(self) -> ModelArgs:
        """The policy's ModelArgs: the SFT checkpoint with this run's dtype and LoRA settings."""
        return ModelArgs(path=self.sft_path, tokenizer=self.tokenizer, dtype=self.dtype, lora_r=self.lora_r, lora_alpha=self.lora_alpha, gradient_checkpointing=self.gradient_checkpointing, load_in_4bit=self.load_in_4bit)
