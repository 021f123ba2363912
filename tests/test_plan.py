"""The memory plan: parameter counts against the published ones, each part of the estimate by hand, the
advice, the plan command offline, and the pre-flight that stops a stage before anything loads."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from tldr_rlhf import memory
from tldr_rlhf.cli import main
from tldr_rlhf.config import ModelArgs, OptimArgs, RunArgs, SFTConfig, TldrDataArgs
from tldr_rlhf.errors import ConfigError
from tldr_rlhf.memory import GIB, MemoryShape, activation_bytes, estimate_stage, precision, shape_from_config

SMOL_GGUF = memory.Path(__file__).resolve().parents[2] / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_parameter_counts_equal_the_published_ones():
    # Qwen2.5 model cards: 0.49B and 1.54B; the exact counts of their safetensors
    assert shape_from_config(memory.KNOWN_CONFIGS["Qwen/Qwen2.5-0.5B"]).params == 494_032_768
    assert shape_from_config(memory.KNOWN_CONFIGS["Qwen/Qwen2.5-1.5B"]).params == 1_543_714_304
    # SmolLM2-135M: what the SFT stage counts when it loads the GGUF (134,515,008 trainable parameters)
    assert shape_from_config(memory.KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M"]).params == 134_515_008


def test_gguf_metadata_gives_the_same_shape():
    shape = memory.model_shape(str(SMOL_GGUF))
    assert shape == shape_from_config(memory.KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M"])


def test_reward_model_config_reads_its_text_config():
    rm = {"model_type": "tldr_rlhf_reward", "text_config": dict(memory.KNOWN_CONFIGS["Qwen/Qwen2.5-1.5B"])}
    assert shape_from_config(rm).params == 1_543_714_304
    with pytest.raises(ConfigError, match="config has no hidden_size"):
        shape_from_config({"model_type": "bert"})


def test_precision_rules():
    # bf16 autocast over float32 weights, frozen models included (KL exactly 0 at step 0), 8-bit AdamW on CUDA
    assert precision("cuda", "auto") == memory.Precision(master=4, frozen=4, compute=2, optimizer=2)
    assert precision("cuda", "auto", "off") == memory.Precision(master=4, frozen=4, compute=2, optimizer=8)
    assert precision("cpu", "auto") == memory.Precision(master=4, frozen=4, compute=4, optimizer=8)
    assert precision("cpu", "bfloat16") == memory.Precision(master=4, frozen=4, compute=2, optimizer=8)


TOY = MemoryShape(params=1000, vocab=50, hidden=4, layers=3, intermediate=8, heads=2, kv_heads=1, head_dim=2, tied=True)


def test_activations_by_hand():
    # per token and layer 10*4 + 4*8 + 4*2 = 80 elements; 5 tokens, 3 layers, 4 bytes
    assert activation_bytes(TOY, 5, 4) == 5 * 4 * 3 * 80 == 4800
    # checkpointing keeps each layer's input (3 x 4) plus one layer's 80 while it is recomputed
    assert activation_bytes(TOY, 5, 4, checkpointing=True) == 5 * 4 * (3 * 4 + 80) == 1840


def _sft(**changes):
    cfg = SFTConfig(model=ModelArgs(path="toy", dtype="float32"), data=TldrDataArgs(max_query_length=7, max_response_length=3), optim=OptimArgs(optim_8bit="off"), micro_batch_size=2)
    return dataclasses.replace(cfg, **changes)


def test_sft_estimate_by_hand():
    est = estimate_stage("sft", _sft(), device="cpu", shapes={"toy": TOY})
    assert (est.weights, est.gradients, est.optimizer) == (4000, 4000, 8000)  # 1000 params x 4, 4, 8 bytes
    # 2 x (7 + 3) tokens of activations + the response logits twice (2 x 3 x 50 x 4 bytes)
    assert est.activations == activation_bytes(TOY, 20, 4) + 2 * 2 * 3 * 50 * 4 == 19200 + 2400
    assert est.kv_cache == est.frozen == 0 and est.overhead == memory.OVERHEAD["cpu"]
    assert est.total == 4000 + 4000 + 8000 + 21600 + memory.OVERHEAD["cpu"]
    # on CUDA under bf16 autocast: 2-byte activations, float32 logits, 8-bit AdamW when asked
    cuda = estimate_stage("sft", _sft(model=ModelArgs(path="toy", dtype="auto"), optim=OptimArgs(optim_8bit="on")), device="cuda", shapes={"toy": TOY})
    assert (cuda.optimizer, cuda.activations) == (2000, activation_bytes(TOY, 20, 2) + 2400)


def test_lora_counts_the_adapters_only():
    # rank 2 on q (4->4), k, v (4->2), o (4->4), gate, up (4->8), down (8->4): 2 x (8 + 6 + 6 + 8 + 12 + 12 + 12) per layer
    assert memory.lora_params(TOY, 2) == 3 * 2 * 64 == 384
    est = estimate_stage("sft", _sft(model=ModelArgs(path="toy", dtype="float32", lora_r=2)), device="cpu", shapes={"toy": TOY})
    assert (est.weights, est.gradients, est.optimizer) == (1000 * 4 + 384 * 4, 384 * 4, 384 * 8)


def test_rl_frozen_models_and_lora_reference():
    from tldr_rlhf.config import GRPOConfig

    rm = dataclasses.replace(TOY, params=3000)
    cfg = GRPOConfig(sft_path="toy", rm_path="rm", dtype="float32", data=TldrDataArgs(max_query_length=7), response_length=3, rollout_prompts=2, group_size=2, micro_batch_size=2, optim=OptimArgs(optim_8bit="off"), shared_prompt=False)
    shapes = {"toy": TOY, "rm": rm}
    est = estimate_stage("grpo", cfg, device="cpu", shapes=shapes)
    assert est.frozen == (1000 + 3000) * 4  # reference copy + reward model, float32
    # KV cache of 4 sequences of 7 + 3 tokens: 2 (k, v) x 3 layers x kv_dim 2 x 10 x 4 rows x 4 bytes
    assert est.kv_cache == 2 * 3 * 2 * 10 * 4 * 4 == 1920
    # the scoring pass (4 rows x 3 response tokens x 50 vocabulary, logits and log-softmax in float32) is
    # smaller than the update's activations here
    assert est.activations == max(activation_bytes(TOY, 2 * 10, 4), 2 * 4 * 3 * 50 * 4)
    # the shared prompt (each query once per group): a micro-batch of 2 rows of one group is 7 + 2 x 3 tokens
    shared = estimate_stage("grpo", dataclasses.replace(cfg, shared_prompt=True), device="cpu", shapes=shapes)
    assert shared.activations == max(activation_bytes(TOY, 7 + 2 * 3, 4), 2400)
    lora = estimate_stage("grpo", dataclasses.replace(cfg, lora_r=2), device="cpu", shapes=shapes)
    assert lora.frozen == 3000 * 4  # the reference is the policy with its adapters off
    assert estimate_stage("grpo", dataclasses.replace(cfg, gradient_checkpointing=True), device="cpu", shapes=shapes).activations == max(activation_bytes(TOY, 20, 4, checkpointing=True), 2400)


def test_suggestion_is_the_cheapest_change_that_fits():
    cfg = _sft(micro_batch_size=8)
    shapes = {"toy": TOY}
    est = estimate_stage("sft", cfg, device="cpu", shapes=shapes)
    small = estimate_stage("sft", _sft(micro_batch_size=2), device="cpu", shapes=shapes)
    budget = (small.total + estimate_stage("sft", _sft(micro_batch_size=4), device="cpu", shapes=shapes).total) / 2
    assert memory.suggestion("sft", cfg, est, budget=budget, device="cpu", world=1, shapes=shapes).startswith("--micro-batch-size 2 ")
    assert memory.suggestion("sft", cfg, est, budget=est.total, device="cpu", world=1, shapes=shapes) == ""
    assert memory.suggestion("sft", cfg, est, budget=1.0, device="cpu", world=1, shapes=shapes).startswith("does not fit")
    # between micro-batch 1 and micro-batch 1 with checkpointing: checkpointing is the change
    one = estimate_stage("sft", _sft(micro_batch_size=1), device="cpu", shapes=shapes).total
    ckpt = estimate_stage("sft", _sft(micro_batch_size=1, model=ModelArgs(path="toy", dtype="float32", gradient_checkpointing=True)), device="cpu", shapes=shapes).total
    assert ckpt < one
    assert memory.suggestion("sft", cfg, est, budget=(one + ckpt) / 2, device="cpu", world=1, shapes=shapes) == "--micro-batch-size 1 --model.gradient-checkpointing (activation checkpointing)"


def test_plan_command_for_the_seed_setup_offline(capsys):
    assert main(["plan", "--preset", "seed", "--gpus", "1", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| stage | weights | gradients | optimizer | activations | kv_cache | frozen | overhead | total | fits |")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[1:]}
    # every training row of the stage table, online DPO included (wired to the pipeline's SFT and RM like the others)
    assert set(rows) == {"sft", "rm", "dpo", "ppo", "grpo", "rloo", "online-dpo", "reinforce-pp"}
    # PPO with N+'s plain AdamW: policy 0.494B + value 1.544B params, float32 master weights: 7.6 GiB
    assert rows["ppo"][1] == f"{(494_032_768 + 1_543_714_304) * 4 / GIB:.1f}" == "7.6"
    assert main(["plan", "--preset", "seed", "--gpu-memory-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "| NO | --micro-batch-size" in out


def test_preflight_stops_a_stage_that_cannot_fit_before_its_folder_exists(tmp_path, monkeypatch):
    from tldr_rlhf.train.lifecycle import start_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=8 * GIB))
    cfg = SFTConfig(model=ModelArgs(path="Qwen/Qwen2.5-1.5B"), data=TldrDataArgs(train=str(tmp_path)), run=RunArgs(output_dir=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match=r"^memory plan: sft needs about \d+\.\d GiB per GPU \(weights 5\.8, .*\) but the GPU has 8\.0 GiB; try .*; --run.no-memory-check runs it anyway$"):
        start_run(cfg)
    assert not (tmp_path / "run").exists()
    est = memory.preflight("sft", dataclasses.replace(cfg, run=RunArgs(output_dir=str(tmp_path / "run"), memory_check=False)))
    assert est is not None and est.total > 8 * GIB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.preflight("sft", cfg) is None  # the CPU: no pre-flight


def test_rl_with_a_text_reward_has_no_reward_model_and_online_dpo_samples_pairs():
    from tldr_rlhf.config import OnlineDPOConfig, PPOConfig

    shapes = {"toy": TOY}
    ppo = PPOConfig(sft_path="toy", rm_path="", reward="rouge-l", dtype="float32", data=TldrDataArgs(max_query_length=7), response_length=3,
                    rollout_batch_size=4, micro_batch_size=2, forward_batch_size=4, optim=OptimArgs(optim_8bit="off"))
    est = estimate_stage("ppo", ppo, device="cpu", shapes=shapes)
    assert est.frozen == 1000 * 4  # the reference only
    assert (est.weights, est.gradients, est.optimizer) == (2 * 4000, 2 * 4000, 2 * 8000)  # policy + a value model of its shape
    odpo = OnlineDPOConfig(sft_path="toy", reward="rouge-l", dtype="float32", data=TldrDataArgs(max_query_length=7), response_length=3, rollout_prompts=4, mini_batch_size=4, micro_batch_size=2, optim=OptimArgs(optim_8bit="off"))
    # 4 prompts x 2 responses of 7 + 3 tokens in the KV cache
    assert estimate_stage("online-dpo", odpo, device="cpu", shapes=shapes).kv_cache == 2 * 3 * 2 * 10 * 8 * 4


def test_a_reward_spec_with_a_reward_model_term_keeps_that_model():
    from tldr_rlhf.config import GRPOConfig

    shapes = {"toy": TOY, "runs/rm/final": dataclasses.replace(TOY, params=3000)}
    cfg = GRPOConfig(sft_path="toy", reward="runs/rm/final,length:-0.01", dtype="float32", data=TldrDataArgs(max_query_length=7), response_length=3, rollout_prompts=2, group_size=2, micro_batch_size=2)
    assert estimate_stage("grpo", cfg, device="cpu", shapes=shapes).frozen == (1000 + 3000) * 4


def test_fsdp_shards_the_trained_state_and_is_proposed_on_several_gpus():
    """--run.fsdp over 4 devices: a quarter of the weights, gradients and AdamW states per device,
    plus what FSDP gathers at a time (the root unit: the tied 50 x 4 embedding, and one block of
    (1000 - 200 - 4) // 3 = 265 weights) for the other three quarters."""
    sharded = _sft(run=RunArgs(fsdp=True))
    est = estimate_stage("sft", sharded, device="cpu", world=4, shapes={"toy": TOY})
    assert (est.weights, est.gradients, est.optimizer) == (1000 * 4 / 4 + (200 + 265) * 4 * 3 / 4, 1000 * 4 / 4, 1000 * 8 / 4) == (2395, 1000, 2000)
    # one process: nothing to shard
    assert estimate_stage("sft", sharded, device="cpu", world=1, shapes={"toy": TOY}).weights == 4000
    # on 4 devices, when micro-batch 1 with checkpointing is not enough, FSDP is the next change
    cfg = _sft(micro_batch_size=8, model=ModelArgs(path="toy", dtype="float32"))
    shapes = {"toy": TOY}
    ckpt_cfg = _sft(micro_batch_size=1, model=ModelArgs(path="toy", dtype="float32", gradient_checkpointing=True))
    ckpt = estimate_stage("sft", ckpt_cfg, device="cpu", world=4, shapes=shapes).total
    with_fsdp = estimate_stage("sft", dataclasses.replace(ckpt_cfg, run=RunArgs(fsdp=True)), device="cpu", world=4, shapes=shapes).total
    assert with_fsdp == ckpt - (4000 + 4000 + 8000) + (2395 + 1000 + 2000)
    est = estimate_stage("sft", cfg, device="cpu", world=4, shapes=shapes)
    assert memory.suggestion("sft", cfg, est, budget=(ckpt + with_fsdp) / 2, device="cpu", world=4, shapes=shapes) == (
        "--micro-batch-size 1 --model.gradient-checkpointing --run.fsdp (FSDP: weights, gradients and AdamW states sharded over 4 devices)"
    )
    # on one device FSDP is never proposed
    assert "--run.fsdp" not in memory.suggestion("sft", cfg, estimate_stage("sft", cfg, device="cpu", shapes=shapes), budget=(ckpt + with_fsdp) / 2, device="cpu", world=1, shapes=shapes)


def test_group_rl_activation_tokens_by_hand():
    # GRPO with the shared prompt: a micro-batch of 6 responses of groups of 4 spans 2 groups, so its
    # forward holds 2 queries of 7 tokens and 6 responses of 3: 2 x 7 + 6 x 3 = 32 tokens; without the
    # shared prompt 6 full rows of 7 + 3 = 60 tokens
    from tldr_rlhf.config import GRPOConfig, TldrDataArgs as Data

    cfg = GRPOConfig(sft_path="toy", reward="rouge-l", dtype="float32", data=Data(max_query_length=7), response_length=3, micro_batch_size=6, group_size=4, rollout_prompts=2, optim=OptimArgs(optim_8bit="off"))
    # (the rollout's scoring pass, 2 x 8 rows x 3 tokens x 50 x 4 bytes = 9600, is smaller: the update's activations count)
    shared = estimate_stage("grpo", cfg, device="cpu", shapes={"toy": TOY})
    assert shared.activations == activation_bytes(TOY, 32, 4) == 32 * 4 * 3 * 80 == 30720
    unshared = estimate_stage("grpo", dataclasses.replace(cfg, shared_prompt=False), device="cpu", shapes={"toy": TOY})
    assert unshared.activations == activation_bytes(TOY, 60, 4) == 57600
    assert shared.frozen == 1000 * 4  # the reference policy in float32; a text reward has no reward model
