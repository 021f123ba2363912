"""Presets by name, one table per stage (``tldr-rlhf STAGE --preset NAME``; the first is the default).

Each preset is written once: a config literal, or one built from a named constant of this module with
``dataclasses.replace`` (the UltraFeedback presets from the TL;DR CPU ones, the pipeline's from the
stand-alone ones). Nothing here is changed after it is defined. The schema (fields, their defaults and
``--help`` text) is in ``config.py``.

Families: ``seed`` (Qwen2.5-0.5B policy, Qwen2.5-1.5B reward model, hub data), ``nplus`` (the N+ paper's
values), ``cpu-smol`` (the real SmolLM2-135M on the local TL;DR files, minutes on 2 CPU cores) and
``uf-cpu-smol`` (the same model on the local UltraFeedback sample); the pipeline's ``cpu-gold`` and the gold
experiment's ``cpu-smol`` (issue 17's gold-reward experiment, ``gold.py``).
"""

from __future__ import annotations

from dataclasses import replace

from .config.rl import ReinforcePPConfig
from .config import (
    SHARED, DPOConfig, EvaluateConfig, EvaluateRMConfig, GoldConfig, GRPOConfig, ModelArgs, OnlineDPOConfig, OptimArgs, PipelineConfig, PPOConfig,
    PreferenceDataArgs, RewardNormArgs, RLOOConfig, RMConfig, RunArgs, SFTConfig, TldrDataArgs,
)

SMOL_GGUF = str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
LOCAL_POSTS = str(SHARED / "data" / "tldr" / "posts" / "valid_sample.jsonl")
LOCAL_COMPARISONS = str(SHARED / "data" / "tldr" / "comparisons" / "batch13.json")

# The second task: UltraFeedback (instruction following), `--preset uf-cpu-smol` on every stage. Real
# SmolLM2-135M on the real trl-lib binarized sample (1,000 training rows; the 200-row eval file, no prompt
# in both, is the held-out side); chat template, prompts and responses capped at 256 tokens (over-long
# ones dropped and counted: about 270 training and 57 held-out pairs are left).
UF_DATA = SHARED / "data" / "ultrafeedback"
_UF_CAPS = dict(task="ultrafeedback", max_query_length=256, max_response_length=256)
_UF_POSTS = TldrDataArgs(train=str(UF_DATA / "binarized_train_1k.jsonl"), valid=str(UF_DATA / "binarized_eval_200.jsonl"), valid_limit=32, **_UF_CAPS)
_UF_PAIRS = dict(comparisons=_UF_POSTS.train, valid_comparisons=_UF_POSTS.valid, **_UF_CAPS)
_UF_RL = dict(sft_path="runs/sft-uf-cpu-smol/final", rm_path="runs/rm-uf-cpu-smol/final", data=replace(_UF_POSTS, valid_limit=0), response_length=128)


# ----------------------------------------------------------------------------------------------
# SFT

# Real pretrained SmolLM2-135M on the real local posts, sized for 2 CPU cores in a few minutes.
_SFT_CPU_SMOL = SFTConfig(
    model=ModelArgs(path=SMOL_GGUF, dtype="float32"),
    data=TldrDataArgs(train=LOCAL_POSTS, max_query_length=256, valid_fraction=0.1, limit=0, valid_limit=32),
    optim=OptimArgs(lr=1e-4, min_lr=1e-5, warmup_steps=5, decay_steps=0),
    run=RunArgs(output_dir="runs/sft-cpu-smol", eval_every=10, save_every=10, max_steps=40),
    micro_batch_size=8,
    gradient_accumulation_steps=1,
    num_sample_posts=2,
)

SFT_PRESETS: dict[str, SFTConfig] = {
    # The seed setup: Qwen2.5-0.5B, 1 epoch, 16 x 8, lr 3e-6 -> 3e-7, warmup 10, decay 800, clip 1.
    "seed": SFTConfig(),
    "cpu-smol": _SFT_CPU_SMOL,
    "uf-cpu-smol": replace(_SFT_CPU_SMOL, data=_UF_POSTS, run=replace(_SFT_CPU_SMOL.run, output_dir="runs/sft-uf-cpu-smol", max_steps=30)),
}


# ----------------------------------------------------------------------------------------------
# Reward model and its evaluation

_RM_SEED_OPTIM = OptimArgs(lr=5e-5, min_lr=5e-6, warmup_ratio=0.03, decay_steps=0, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=1.0, optim_8bit="auto")

# Real SmolLM2-135M on the real local comparisons (posts held out by id), sized for minutes on
# 2 CPU cores: 256-token queries, the top 6 of 30 blocks trained (~15 s per step of 8 pairs),
# 30 steps (240 pairs), 64 held-out pairs at the end of training (`evaluate-rm` scores them all),
# normalization on 64 local SFT references. lr 1e-4 (higher than the seed's 5e-5: few steps).
_RM_CPU_SMOL = RMConfig(
    model=ModelArgs(path=SMOL_GGUF, dtype="float32"),
    data=PreferenceDataArgs(comparisons=LOCAL_COMPARISONS, max_query_length=256, max_response_length=133, valid_limit=64),
    norm=RewardNormArgs(posts=LOCAL_POSTS, limit=64),
    optim=OptimArgs(lr=1e-4, min_lr=1e-5, warmup_ratio=0.1, decay_steps=0),
    run=RunArgs(output_dir="runs/rm-cpu-smol", eval_every=0, save_every=10, max_steps=30),
    micro_batch_size=8,
    gradient_accumulation_steps=1,
    eval_batch_size=8,
    train_layers=6,
)

RM_PRESETS: dict[str, RMConfig] = {
    # Seed setup: base Qwen2.5-1.5B (beat the 0.5B SFT model), 1 epoch, 8 x 16 pairs, lr 5e-5 with 3%
    # warmup and cosine decay, AdamW (0.9, 0.95), weight decay 0.1, clip 1, 8-bit AdamW on CUDA.
    "seed": RMConfig(
        model=ModelArgs(path="Qwen/Qwen2.5-1.5B"),
        optim=_RM_SEED_OPTIM,
        run=RunArgs(output_dir="runs/rm", eval_every=100, save_every=100),
    ),
    # The same from the 0.5B SFT checkpoint of `tldr-rlhf sft --preset seed`.
    "seed-from-sft": RMConfig(
        model=ModelArgs(path="runs/sft/final"),
        optim=_RM_SEED_OPTIM,
        run=RunArgs(output_dir="runs/rm-from-sft", eval_every=100, save_every=100),
    ),
    "cpu-smol": _RM_CPU_SMOL,
    # Starts from the UltraFeedback SFT model and trains every weight for 2 epochs at 3e-5: on this sample
    # that reached 0.58 held-out accuracy where the TL;DR CPU recipe (base model, top 6 blocks, 1e-4,
    # 30 steps) stayed at chance (0.49).
    "uf-cpu-smol": replace(
        _RM_CPU_SMOL, model=ModelArgs(path="runs/sft-uf-cpu-smol/final", dtype="float32"), data=PreferenceDataArgs(**_UF_PAIRS, valid_limit=0),
        optim=OptimArgs(lr=3e-5, min_lr=3e-6, warmup_ratio=0.1, decay_steps=0), epochs=2, train_layers=0,
        run=replace(_RM_CPU_SMOL.run, output_dir="runs/rm-uf-cpu-smol", max_steps=0, save_every=20),
    ),
}

EVALUATE_RM_PRESETS: dict[str, EvaluateRMConfig] = {
    "seed": EvaluateRMConfig(),
    "cpu-smol": EvaluateRMConfig(
        model="runs/rm-cpu-smol/final",
        cnndm=str(SHARED / "data" / "tldr" / "comparisons" / "cnndm0.json"),
        max_cnndm_query_length=512,
        cnndm_limit=128,
        judge_limit=256,
        batch_size=8,
    ),
    "uf-cpu-smol": EvaluateRMConfig(model="runs/rm-uf-cpu-smol/final", valid_limit=0, batch_size=8),
}


# ----------------------------------------------------------------------------------------------
# DPO

# Real SmolLM2-135M SFT checkpoint (tldr-rlhf sft --preset cpu-smol) on the real local comparisons,
# sized for a few minutes on CPU: short queries, 80 training pairs = a whole (tiny) schedule of 10
# steps (1 warmup step, cosine 5e-5 -> 5e-6), 64 held-out comparisons.
_DPO_CPU_SMOL = DPOConfig(
    sft_path="runs/sft-cpu-smol/final",
    dtype="float32",
    data=PreferenceDataArgs(comparisons=LOCAL_COMPARISONS, max_query_length=256, max_response_length=64, limit=80, valid_limit=64),
    optim=OptimArgs(lr=5e-5, min_lr=5e-6, warmup_ratio=0.1, decay_steps=0),
    run=RunArgs(output_dir="runs/dpo-cpu-smol", eval_every=0, save_every=5),
    micro_batch_size=4,
    gradient_accumulation_steps=2,
    eval_batch_size=8,
)

DPO_PRESETS: dict[str, DPOConfig] = {
    # Seed setup: beta 0.1, conservative DPO 0.1, lr 5e-5 (cosine to 5e-6), 8 x 16 pairs, warmup 3%.
    "seed": DPOConfig(
        optim=OptimArgs(lr=5e-5, min_lr=5e-6, warmup_ratio=0.03, decay_steps=0),
        run=RunArgs(output_dir="runs/dpo", eval_every=0),
    ),
    # N+ paper: beta 0.05, lr 3e-6, plain DPO (no label smoothing), plain torch AdamW (8-bit off);
    # the rest as the seed preset.
    "nplus": DPOConfig(
        beta=0.05,
        label_smoothing=0.0,
        optim=OptimArgs(lr=3e-6, min_lr=3e-7, warmup_ratio=0.03, decay_steps=0, optim_8bit="off"),
        run=RunArgs(output_dir="runs/dpo-nplus", eval_every=0),
    ),
    "cpu-smol": _DPO_CPU_SMOL,
    "uf-cpu-smol": replace(
        _DPO_CPU_SMOL, sft_path="runs/sft-uf-cpu-smol/final", data=PreferenceDataArgs(**_UF_PAIRS, limit=80, valid_limit=0),
        run=replace(_DPO_CPU_SMOL.run, output_dir="runs/dpo-uf-cpu-smol"), sample_max_new_tokens=128,
    ),
}


# ----------------------------------------------------------------------------------------------
# PPO

# N+ trained with plain torch AdamW: 8-bit AdamW off, also on CUDA with bitsandbytes installed.
_NPLUS_PPO_OPTIM = OptimArgs(lr=3e-6, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-5, max_grad_norm=0.0, optim_8bit="off")

# Real SmolLM2-135M SFT checkpoint (sft --preset cpu-smol) and reward model (rm --preset
# cpu-smol) on the real local posts, sized for 2 CPU cores: 8 prompts per update, 1 minibatch,
# 2 PPO epochs (N+: 4), N+'s 53-token responses (32 cut most SFT summaries before their EOS),
# a few updates (~3-5 minutes each on one core).
_PPO_CPU_SMOL = PPOConfig(
    sft_path="runs/sft-cpu-smol/final",
    rm_path="runs/rm-cpu-smol/final",
    dtype="float32",
    data=TldrDataArgs(train=LOCAL_POSTS, max_query_length=256, valid_fraction=0.1, valid_limit=0),
    optim=OptimArgs(lr=2e-5, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-5, max_grad_norm=0.0),
    run=RunArgs(output_dir="runs/ppo-cpu-smol", eval_every=1, save_every=2, max_steps=6),
    total_episodes=8 * 200,
    rollout_batch_size=8,
    num_mini_batches=1,
    micro_batch_size=4,
    forward_batch_size=8,
    ppo_epochs=2,
    response_length=53,
    num_sample_posts=2,
)

PPO_PRESETS: dict[str, PPOConfig] = {
    # N+ paper (Pythia 1B-6.9B): 1M episodes, batch 512, 1 minibatch, 4 epochs, lr 3e-6 annealed
    # linearly, AdamW eps 1e-5 (torch defaults otherwise), no gradient clipping, response length 53.
    "nplus": PPOConfig(optim=_NPLUS_PPO_OPTIM, run=RunArgs(output_dir="runs/ppo", eval_every=20, save_every=50)),
    # Qwen2.5 seed lengths: responses up to 63 tokens.
    "seed": PPOConfig(optim=_NPLUS_PPO_OPTIM, response_length=63, run=RunArgs(output_dir="runs/ppo-seed", eval_every=20, save_every=50)),
    "cpu-smol": _PPO_CPU_SMOL,
    "uf-cpu-smol": replace(_PPO_CPU_SMOL, **_UF_RL, run=replace(_PPO_CPU_SMOL.run, output_dir="runs/ppo-uf-cpu-smol")),
}


# ----------------------------------------------------------------------------------------------
# GRPO and RLOO

_GRPO_SEED_OPTIM = OptimArgs(lr=5e-5, min_lr=5e-6, warmup_ratio=0.03, decay_steps=0)


def _group_cpu_smol(cls: type[GRPOConfig] | type[RLOOConfig] | type[ReinforcePPConfig], name: str, **changes) -> GRPOConfig | RLOOConfig | ReinforcePPConfig:
    """GRPO / RLOO / REINFORCE++ from the real SmolLM2-135M SFT checkpoint and reward model (the cpu-smol presets of sft
    and rm) on the real local posts, for 2 CPU cores: 2 prompts x 4 responses per rollout, one 8-sequence
    optimizer step per pass, 53-token responses, a few rollouts; ``changes`` on top."""
    return cls(
        sft_path="runs/sft-cpu-smol/final",
        rm_path="runs/rm-cpu-smol/final",
        dtype="float32",
        data=TldrDataArgs(train=LOCAL_POSTS, max_query_length=256, valid_fraction=0.1, valid_limit=0),
        optim=OptimArgs(lr=2e-5, min_lr=2e-6, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=f"runs/{name}-cpu-smol", eval_every=1, save_every=2, max_steps=6),
        total_episodes=2 * 4 * 200,
        rollout_prompts=2,
        group_size=4,
        mini_batch_size=8,
        micro_batch_size=4,
        forward_batch_size=8,
        response_length=53,
        num_sample_posts=2,
        **changes,
    )


_GRPO_CPU_SMOL = _group_cpu_smol(GRPOConfig, "grpo", update_per_rollout=2)  # 2 passes over each rollout
_RLOO_CPU_SMOL = _group_cpu_smol(RLOOConfig, "rloo")
_REINFORCE_PP_CPU_SMOL = _group_cpu_smol(ReinforcePPConfig, "reinforce-pp")

GRPO_PRESETS: dict[str, GRPOConfig] = {
    # The seed's table: 16 prompts x G 8 per rollout, minibatch 64, micro-batch 8, 4 updates per
    # rollout, lr 5e-5 with 3% warmup, clip 0.2, dual clip 3, k3 KL 0.05 in the loss,
    # seq-mean-token-mean, temperature 0.7, response length 63, no-EOS penalty -1.
    "seed": GRPOConfig(optim=_GRPO_SEED_OPTIM, run=RunArgs(output_dir="runs/grpo", eval_every=20, save_every=50)),
    # Dr. GRPO: no std division, token-sum aggregation over sequences.
    "dr-grpo": GRPOConfig(
        optim=_GRPO_SEED_OPTIM, run=RunArgs(output_dir="runs/dr-grpo", eval_every=20, save_every=50),
        scale_by_std=False, loss_aggregation="seq-mean-token-sum",
    ),
    # Seed GPT-2 GRPO: statistical rejection sampling (64 candidates at temperature 1, keep 8),
    # global advantage normalization after the group normalization.
    "rejection-sampling": GRPOConfig(
        optim=_GRPO_SEED_OPTIM, run=RunArgs(output_dir="runs/grpo-rs", eval_every=20, save_every=50),
        rejection_sampling=True, global_normalize=True,
    ),
    "cpu-smol": _GRPO_CPU_SMOL,
    "uf-cpu-smol": replace(_GRPO_CPU_SMOL, **_UF_RL, run=replace(_GRPO_CPU_SMOL.run, output_dir="runs/grpo-uf-cpu-smol")),
}

RLOO_PRESETS: dict[str, RLOOConfig] = {
    # Ahmadian et al. 2024 style: k 4, one REINFORCE pass per rollout, KL 0.05 in the reward.
    "default": RLOOConfig(optim=_GRPO_SEED_OPTIM, run=RunArgs(output_dir="runs/rloo", eval_every=20, save_every=50)),
    "cpu-smol": _RLOO_CPU_SMOL,
    "uf-cpu-smol": replace(_RLOO_CPU_SMOL, **_UF_RL, run=replace(_RLOO_CPU_SMOL.run, output_dir="runs/rloo-uf-cpu-smol")),
}

REINFORCE_PP_PRESETS: dict[str, ReinforcePPConfig] = {
    # Hu et al. 2025 on TL;DR: k1 KL 0.05 in the per-token reward, undiscounted return whitened over the
    # batch, one PPO-clipped pass per rollout; the seed's GRPO optimizer.
    "default": ReinforcePPConfig(optim=_GRPO_SEED_OPTIM, run=RunArgs(output_dir="runs/reinforce-pp", eval_every=20, save_every=50)),
    "cpu-smol": _REINFORCE_PP_CPU_SMOL,
}


# Online DPO (Guo et al. 2024): beta 0.1, one pass over each update's fresh pairs; the learning rate of
# the seed's offline DPO. cpu-smol: from the SmolLM2-135M SFT checkpoint of `sft --preset cpu-smol`,
# 4 prompts x 2 responses per update, one 4-pair optimizer step, 53-token responses, a few updates;
# against its reward model (cpu-smol) or against ROUGE-L to the human reference (cpu-smol-gold, the
# known gold reward of issue 17: needs no reward model).
_ONLINE_DPO_CPU_SMOL = OnlineDPOConfig(
    sft_path="runs/sft-cpu-smol/final",
    rm_path="runs/rm-cpu-smol/final",
    dtype="float32",
    data=TldrDataArgs(train=LOCAL_POSTS, max_query_length=256, valid_fraction=0.1, valid_limit=0),
    optim=OptimArgs(lr=5e-6, min_lr=5e-7, warmup_steps=1, decay_steps=0),
    run=RunArgs(output_dir="runs/online-dpo-cpu-smol", eval_every=1, save_every=2, max_steps=6),
    total_episodes=4 * 2 * 200,
    rollout_prompts=4,
    mini_batch_size=4,
    micro_batch_size=2,
    forward_batch_size=8,
    num_sample_posts=2,
)

ONLINE_DPO_PRESETS: dict[str, OnlineDPOConfig] = {
    "default": OnlineDPOConfig(optim=_GRPO_SEED_OPTIM, run=RunArgs(output_dir="runs/online-dpo", eval_every=20, save_every=50)),
    "cpu-smol": _ONLINE_DPO_CPU_SMOL,
    "cpu-smol-gold": replace(_ONLINE_DPO_CPU_SMOL, rm_path="", reward="rouge-l", run=replace(_ONLINE_DPO_CPU_SMOL.run, output_dir="runs/online-dpo-gold-cpu-smol")),
}


# ----------------------------------------------------------------------------------------------
# Evaluation

# The stand-alone cpu-smol runs on 32 of the local posts held out from SFT.
_EVALUATE_CPU_SMOL = EvaluateConfig(
    policies=(f"base={SMOL_GGUF}", "sft=runs/sft-cpu-smol/final", "dpo=runs/dpo-cpu-smol/final", "ppo=runs/ppo-cpu-smol/final", "grpo=runs/grpo-cpu-smol/final"),
    sft_path="runs/sft-cpu-smol/final",
    rm_path="runs/rm-cpu-smol/final",
    data=TldrDataArgs(train=LOCAL_POSTS, max_query_length=256, valid_fraction=0.1),
    num_posts=32,
    output_dir="runs/evaluate-cpu-smol",
)

EVALUATE_PRESETS: dict[str, EvaluateConfig] = {
    # The stand-alone seed runs (tldr-rlhf sft/rm/dpo/ppo/grpo --preset seed), Qwen2.5-0.5B as the base.
    "seed": EvaluateConfig(
        policies=("base=Qwen/Qwen2.5-0.5B", "sft=runs/sft/final", "dpo=runs/dpo/final", "ppo=runs/ppo-seed/final", "grpo=runs/grpo/final"),
        sft_path="runs/sft/final",
        rm_path="runs/rm/final",
    ),
    "cpu-smol": _EVALUATE_CPU_SMOL,
    "uf-cpu-smol": replace(
        _EVALUATE_CPU_SMOL,
        policies=(f"base={SMOL_GGUF}", "sft=runs/sft-uf-cpu-smol/final", "dpo=runs/dpo-uf-cpu-smol/final"),
        sft_path="runs/sft-uf-cpu-smol/final", rm_path="runs/rm-uf-cpu-smol/final", data=_UF_POSTS, num_posts=16, response_length=192,
        output_dir="runs/evaluate-uf-cpu-smol",
    ),
}


# ----------------------------------------------------------------------------------------------
# The gold-reward experiment (gold.py, docs/gold.md)

# Real SmolLM2-135M on the real local posts, sized for 2 shared CPU cores (one thread): 160-token
# queries; SFT on the references of at most 31 tokens + EOS (640 posts, about 290 kept: 36 steps of 8),
# so that its summaries end within the RL stages' 32-token responses; every method 6 updates of 8
# responses (PPO 8 prompts x 2 epochs, GRPO 2 x 4 x 2 passes, RLOO 2 x 4, online DPO 4 pairs) at each
# stage's cpu-smol learning rate, measured on 32 held-out posts (one summary sampled at 0.7 per post,
# which also serves the KL estimate) after updates 3 and 6; the proxy reward model on the pairs of 160
# training posts, top 6 blocks of the SFT model, one epoch.
_GOLD_DATA = TldrDataArgs(train=LOCAL_POSTS, max_query_length=160, max_response_length=32, valid_fraction=0.1, limit=640, valid_limit=16)
_GOLD_SFT = replace(
    _SFT_CPU_SMOL, data=_GOLD_DATA, optim=replace(_SFT_CPU_SMOL.optim, warmup_steps=3),
    run=replace(_SFT_CPU_SMOL.run, output_dir="runs/sft-gold-cpu-smol", max_steps=0, eval_every=10, save_every=10, keep_checkpoints=5),
)
_GOLD_UPDATES, _GOLD_RL = 6, dict(rm_path="", reward="rouge-l", data=_GOLD_DATA, response_length=32)
_GOLD_CPU_SMOL = GoldConfig(
    sft_path="runs/sft-gold-cpu-smol/final",
    output_dir="runs/gold-cpu-smol",
    data=_GOLD_DATA,
    eval_every=3,
    seeds=(1, 2),
    sft_resample_seeds=(1, 2, 3, 4, 5),
    greedy_final=True,
    greedy_posts=0,
    proxy_pairs=160,
    best_of_n=(2, 4, 8),
    ppo=replace(_PPO_CPU_SMOL, **_GOLD_RL, total_episodes=_GOLD_UPDATES * 8, run=replace(_PPO_CPU_SMOL.run, eval_every=3, max_steps=0)),
    grpo=replace(_GRPO_CPU_SMOL, **_GOLD_RL, total_episodes=_GOLD_UPDATES * 8, run=replace(_GRPO_CPU_SMOL.run, eval_every=3, max_steps=0)),
    rloo=replace(_RLOO_CPU_SMOL, **_GOLD_RL, total_episodes=_GOLD_UPDATES * 8, run=replace(_RLOO_CPU_SMOL.run, eval_every=3, max_steps=0)),
    # online DPO at the other methods' peak learning rate: at its cpu-smol 5e-6, 6 steps left the policy at KL 0.03-0.05
    # to SFT and the loss at log 2 (docs/gold.md)
    online_dpo=replace(
        _ONLINE_DPO_CPU_SMOL, **_GOLD_RL, total_episodes=_GOLD_UPDATES * 8, optim=replace(_ONLINE_DPO_CPU_SMOL.optim, lr=2e-5, min_lr=2e-6),
        run=replace(_ONLINE_DPO_CPU_SMOL.run, eval_every=3, max_steps=0),
    ),
    proxy_rm=replace(
        _RM_CPU_SMOL, data=replace(_RM_CPU_SMOL.data, max_query_length=160, max_response_length=48, valid_limit=0),
        norm=replace(_RM_CPU_SMOL.norm, limit=32), run=replace(_RM_CPU_SMOL.run, max_steps=0, save_every=0),
    ),
    evaluate=replace(_EVALUATE_CPU_SMOL, policies=(), sft_path="", rm_path="", data=_GOLD_DATA, num_posts=32, response_length=32, greedy=False, batch_size=16, output_dir="runs/gold-cpu-smol/eval"),
)

# Issue 26 (docs/learning.md), fixed before any held-out result: 400 posts held out by id (valid_count), the
# other 1,200 for SFT (every reference within the 48-token cap, 1 epoch, 150 steps of 8) and RL prompts;
# 160-token queries, 48-token responses; RLOO k 4 and GRPO (2 passes) 4 prompts x 4 per update, PPO 16
# prompts x 2 epochs, online DPO 8 pairs: 64 updates = 1,024 episodes each, KL coef 0.02; RLOO and GRPO x 3
# seeds, PPO and online DPO x 1, RLOO without the EOS trick x 1, RLOO on ROUGE-1 against the post (the
# positive control) x 1; sampled held-out measurement (100 posts, with KL) every 16 updates, greedy paired
# measurement of SFT and every final policy on the 400. The proxy part is off (--gold.proxy-methods to run it:
# its labels then leave out the EOS penalty, its reward model is judged on the pairs of ~300 held-out posts).
_LEARN_DATA = TldrDataArgs(train=LOCAL_POSTS, max_query_length=160, max_response_length=48, valid_count=400, limit=0, valid_limit=32)
_LEARN_RL = dict(rm_path="", reward="rouge-l", data=_LEARN_DATA, response_length=48, kl_coef=0.02, total_episodes=1024)
_LEARN_RUN = dict(eval_every=16, max_steps=0)
_LEARN_GOLD = replace(
    _GOLD_CPU_SMOL, sft_path="runs/sft-learn-cpu-smol/final", output_dir="runs/learn-cpu-smol", data=_LEARN_DATA, eval_every=16,
    methods=("rloo", "grpo", "ppo", "online-dpo"), seeds=(1, 2, 3), single_seed_methods=("ppo", "online-dpo"),
    variants=("rloo-no-eos-penalty=rloo;no_eos_penalty=None", "rloo-rouge-1-post=rloo;reward=rouge-1-post"),
    proxy_methods=(), best_of_n=(), sft_resample_seeds=(), greedy_final=True, greedy_posts=0, proxy_pairs=1200, proxy_no_eos_penalty=False,
    rloo=replace(_RLOO_CPU_SMOL, **_LEARN_RL, rollout_prompts=4, mini_batch_size=16, run=replace(_RLOO_CPU_SMOL.run, **_LEARN_RUN)),
    grpo=replace(_GRPO_CPU_SMOL, **_LEARN_RL, rollout_prompts=4, mini_batch_size=16, run=replace(_GRPO_CPU_SMOL.run, **_LEARN_RUN)),
    ppo=replace(_PPO_CPU_SMOL, **_LEARN_RL, rollout_batch_size=16, forward_batch_size=16, run=replace(_PPO_CPU_SMOL.run, **_LEARN_RUN)),
    online_dpo=replace(_GOLD_CPU_SMOL.online_dpo, **{k: v for k, v in _LEARN_RL.items() if k != "kl_coef"}, rollout_prompts=8, mini_batch_size=8, run=replace(_GOLD_CPU_SMOL.online_dpo.run, **_LEARN_RUN)),
    proxy_rm=replace(_GOLD_CPU_SMOL.proxy_rm, data=replace(_GOLD_CPU_SMOL.proxy_rm.data, valid_fraction=0.25)),
    evaluate=replace(_GOLD_CPU_SMOL.evaluate, data=_LEARN_DATA, num_posts=100, response_length=48, output_dir="runs/learn-cpu-smol/eval"),
)

GOLD_PRESETS: dict[str, GoldConfig] = {
    # The N+ settings of each stage against ROUGE-L (a GPU-scale schedule: every default).
    "default": GoldConfig(output_dir="runs/gold", sft_path="runs/sft/final"),
    "cpu-smol": _GOLD_CPU_SMOL,
    "cpu-learn": _LEARN_GOLD,
}


# ----------------------------------------------------------------------------------------------
# The one-command pipeline

# Real SmolLM2-135M on the real local data, sized for 2 CPU cores in under 30 minutes. The stand-alone
# cpu-smol presets take over an hour together (on this shared machine: SFT ~50 s per step of 8,
# PPO 3-5 min per update), so each stage is cut to a small complete schedule: 192-token queries;
# SFT 80 posts (20 steps of 4); reward model 128 pairs (16 steps of 8, top 6 blocks), measured on
# 32 held-out + 16 CNN/DM + 32 judged pairs; DPO 32 pairs (4 steps of 8); PPO 3 updates of 8 prompts
# x 2 epochs; GRPO 4 rollouts of 2 prompts x 4; evaluation on 16 held-out posts, one summary of at
# most 53 tokens sampled at temperature 0.7 per post (it also serves the KL estimate).
_PIPELINE_CPU_SMOL = PipelineConfig(
    run_dir="runs/pipeline-cpu-smol",
    sft=replace(
        _SFT_CPU_SMOL, micro_batch_size=4, num_sample_posts=1,
        data=replace(_SFT_CPU_SMOL.data, max_query_length=192, limit=80, valid_limit=16),
        optim=replace(_SFT_CPU_SMOL.optim, warmup_steps=2),
        run=replace(_SFT_CPU_SMOL.run, max_steps=0, eval_every=0, save_every=4),
    ),
    rm=replace(
        _RM_CPU_SMOL,
        data=replace(_RM_CPU_SMOL.data, max_query_length=192, limit=128, valid_limit=32),
        norm=replace(_RM_CPU_SMOL.norm, limit=32),
        run=replace(_RM_CPU_SMOL.run, max_steps=0, save_every=4),
    ),
    evaluate_rm=replace(EVALUATE_RM_PRESETS["cpu-smol"], valid_limit=32, cnndm_limit=16, max_cnndm_query_length=384, judge_limit=32),
    dpo=replace(
        _DPO_CPU_SMOL, num_sample_posts=0,
        data=replace(_DPO_CPU_SMOL.data, max_query_length=192, limit=32, valid_limit=32),
        run=replace(_DPO_CPU_SMOL.run, save_every=2),
    ),
    ppo=replace(
        _PPO_CPU_SMOL, total_episodes=3 * 8, ppo_epochs=2,
        data=replace(_PPO_CPU_SMOL.data, max_query_length=192),
        run=replace(_PPO_CPU_SMOL.run, max_steps=0, save_every=2, eval_every=2),
    ),
    grpo=replace(
        _GRPO_CPU_SMOL, total_episodes=4 * 2 * 4,
        data=replace(_GRPO_CPU_SMOL.data, max_query_length=192),
        run=replace(_GRPO_CPU_SMOL.run, max_steps=0, save_every=2),
    ),
    rloo=replace(
        _RLOO_CPU_SMOL, total_episodes=4 * 2 * 4,
        data=replace(_RLOO_CPU_SMOL.data, max_query_length=192),
        run=replace(_RLOO_CPU_SMOL.run, max_steps=0, save_every=2),
    ),
    evaluate=replace(_EVALUATE_CPU_SMOL, num_posts=16, response_length=53, greedy=False),
)

PIPELINE_PRESETS: dict[str, PipelineConfig] = {
    # The seed setup: Qwen2.5-0.5B policy, Qwen2.5-1.5B reward model, hub data, each stage's seed preset.
    "seed": PipelineConfig(
        run_dir="runs/pipeline-seed",
        sft=SFT_PRESETS["seed"], rm=RM_PRESETS["seed"], evaluate_rm=EVALUATE_RM_PRESETS["seed"], dpo=DPO_PRESETS["seed"],
        ppo=PPO_PRESETS["seed"], grpo=GRPO_PRESETS["seed"], rloo=RLOO_PRESETS["default"], evaluate=EVALUATE_PRESETS["seed"],
    ),
    # Real SmolLM2-135M on the real local data in under 30 minutes on 2 CPU cores (see _PIPELINE_CPU_SMOL).
    "cpu-smol": _PIPELINE_CPU_SMOL,
    # The gold experiment in one command (issue 17, docs/gold.md): SFT (gold sizing) -> gold (direct:
    # PPO, GRPO, RLOO, online DPO on ROUGE-L; proxy: a reward model on gold-labelled SFT pairs, PPO and
    # GRPO against it, best-of-n) -> report, 2 seeds. The other sections are cpu-smol's (not run).
    "cpu-gold": replace(
        _PIPELINE_CPU_SMOL, run_dir="runs/pipeline-cpu-gold", stages=("sft", "gold", "report"),
        sft=replace(_GOLD_SFT, run=replace(_GOLD_SFT.run, output_dir="runs/sft")), gold=_GOLD_CPU_SMOL,
    ),
    # Issue 26 (docs/learning.md): SFT on the 1,200 training posts -> gold (_LEARN_GOLD's arms) -> report.
    "cpu-learn": replace(
        _PIPELINE_CPU_SMOL, run_dir="runs/pipeline-cpu-learn", stages=("sft", "gold", "report"), gold=_LEARN_GOLD,
        sft=replace(_GOLD_SFT, data=_LEARN_DATA, optim=replace(_GOLD_SFT.optim, warmup_steps=8), run=replace(_GOLD_SFT.run, output_dir="runs/sft", eval_every=50, save_every=25)),
    ),
    # The whole chain on UltraFeedback: each stage's uf-cpu-smol preset in one run folder (several CPU hours
    # on 2 cores with 256-token prompts and responses; the stand-alone stages are the quicker demonstration).
    "uf-cpu-smol": PipelineConfig(
        run_dir="runs/pipeline-uf-cpu-smol", rm_from_sft=True,
        sft=SFT_PRESETS["uf-cpu-smol"], rm=RM_PRESETS["uf-cpu-smol"], evaluate_rm=EVALUATE_RM_PRESETS["uf-cpu-smol"], dpo=DPO_PRESETS["uf-cpu-smol"],
        ppo=PPO_PRESETS["uf-cpu-smol"], grpo=GRPO_PRESETS["uf-cpu-smol"], rloo=RLOO_PRESETS["uf-cpu-smol"], evaluate=EVALUATE_PRESETS["uf-cpu-smol"],
    ),
}
