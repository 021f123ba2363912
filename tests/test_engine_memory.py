"""The vLLM engine's memory (``engine_memory.py``) by hand: its KV cache bytes on a tiny and on the real
SmolLM2 shape, the floor, its part of a stage's plan on CPU and CUDA, the GPU share derived from it,
the engine's sizing from a policy's config when the flags are left at 0, and the pre-flight that
stops a run whose engine does not fit next to its training. No vLLM needed."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from tldr_rlhf import memory
from tldr_rlhf.config import GRPOConfig, OptimArgs, PPOConfig, RunArgs, TldrDataArgs
from tldr_rlhf.engine_memory import CUDA_MARGIN_BYTES, KV_FLOOR_BYTES, gpu_memory_utilization, kv_cache_bytes, planned_kv_cache_bytes
from tldr_rlhf.errors import ConfigError
from tldr_rlhf.memory import GIB, MemoryShape, estimate_stage
from tldr_rlhf.plan import PlanArgs, plan_table

# 3 layers, 1 key/value head of 2: 2 x 3 x 1 x 2 = 12 KV elements per token
TINY = MemoryShape(params=1000, vocab=50, hidden=4, layers=3, intermediate=8, heads=2, kv_heads=1, head_dim=2)
SMOL = memory.shape_from_config(memory.KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M"])


def grpo(**kw) -> GRPOConfig:
    base = dict(sft_path="toy", reward="rouge-l", dtype="float32", data=TldrDataArgs(max_query_length=7), response_length=3, rollout_prompts=2, group_size=4,
                micro_batch_size=2, optim=OptimArgs(optim_8bit="off"), rollout_engine="vllm")
    return GRPOConfig(**{**base, **kw})


def test_kv_cache_bytes_by_hand():
    # 2 prompts x G 4 = 8 sequences of 7 + 3 tokens, 3 layers x (key, value) x 1 head x 2 dims x 4 bytes
    assert kv_cache_bytes(8, 10, 3, 1, 2, 4) == 8 * 10 * 3 * 2 * 1 * 2 * 4 == 3840
    assert planned_kv_cache_bytes(8, 10, 3, 1, 2, 4) == KV_FLOOR_BYTES == 64 * 2**20  # floored
    # SmolLM2-135M (30 layers, 3 key/value heads of 64) in float32 at TL;DR shapes: 8 prompts x G 8 = 64
    # sequences of 512 + 53 tokens: 36,160 tokens x 46,080 bytes = 1.55 GiB
    assert (SMOL.layers, SMOL.kv_heads, SMOL.head_dim) == (30, 3, 64)
    assert kv_cache_bytes(64, 565, 30, 3, 64, 4) == planned_kv_cache_bytes(64, 565, 30, 3, 64, 4) == 36_160 * 46_080 == 1_666_252_800
    # bfloat16 halves it; the floor of two sequences of the context when one rollout is a single short one
    assert kv_cache_bytes(64, 565, 30, 3, 64, 2) == 833_126_400
    assert planned_kv_cache_bytes(1, 2000, 30, 3, 64, 4) == 2 * 2000 * 46_080 == 184_320_000
    # in whole KV blocks of 128 tokens (vLLM on the CPU): 565 -> 640 tokens a sequence; the real-SmolLM2
    # `generate` of 4 posts of at most 405 tokens (query + response) takes 4 blocks = 512 tokens each
    assert planned_kv_cache_bytes(64, 565, 30, 3, 64, 4, block=128) == 64 * 640 * 46_080 == 1_887_436_800
    assert planned_kv_cache_bytes(4, 405, 30, 3, 64, 4, block=128) == 4 * 512 * 46_080 == 94_371_840
    assert planned_kv_cache_bytes(4, 512, 30, 3, 64, 4, block=128) == 94_371_840  # already whole blocks


def test_gpu_share_rounds_up_to_a_hundredth():
    assert gpu_memory_utilization(int(10.5 * GIB), 80 * GIB) == 0.14  # 10.5 / 80 = 0.13125, up to 0.14
    assert gpu_memory_utilization(8 * GIB, 80 * GIB) == 0.1
    assert gpu_memory_utilization(100 * GIB, 80 * GIB) == 1.0
    with pytest.raises(ValueError, match="device_total"):
        gpu_memory_utilization(1, 0)


def test_plan_counts_the_engine_instead_of_the_policys_generation_cache():
    shapes = {"toy": TINY}
    hf = estimate_stage("grpo", grpo(rollout_engine="hf"), device="cpu", shapes=shapes)
    assert hf.engine == 0 and hf.kv_cache == 8 * 10 * 12 * 4
    cpu = estimate_stage("grpo", grpo(), device="cpu", shapes=shapes)
    assert cpu.kv_cache == 0  # the policy generates nothing
    assert cpu.engine == 1000 * 4 + KV_FLOOR_BYTES  # float32 weights + the floored KV cache
    assert cpu.total == hf.total - hf.kv_cache + cpu.engine
    set_kv = estimate_stage("grpo", grpo(vllm_kv_cache_gb=0.5), device="cpu", shapes=shapes)
    assert set_kv.engine == 1000 * 4 + GIB // 2
    cuda = estimate_stage("grpo", grpo(dtype="auto"), device="cuda", shapes=shapes)
    assert cuda.engine == 1000 * 2 + KV_FLOOR_BYTES + CUDA_MARGIN_BYTES  # bfloat16 weights and margin
    # PPO: one response per prompt, rollout_batch_size sequences; SmolLM2 in float32 at TL;DR shapes
    ppo = PPOConfig(sft_path="smol", reward="rouge-l", dtype="float32", data=TldrDataArgs(max_query_length=512), response_length=53,
                    rollout_batch_size=64, micro_batch_size=2, rollout_engine="vllm")
    # (512 + 53 tokens in five 128-token blocks: 640 a sequence)
    assert estimate_stage("ppo", ppo, device="cpu", shapes={"smol": SMOL}).engine == 134_515_008 * 4 + 1_887_436_800


def test_plan_counts_one_engine_per_process():
    # 2 processes (torchrun), FSDP or not: each runs its own engine with the whole weights (vLLM does
    # not shard them) and the KV cache of its share of the rollout: SmolLM2 in float32, 8 prompts x G 8
    # over 2 processes = 32 sequences of 512 + 53 tokens (640 in 128-token blocks) each
    cfg = grpo(sft_path="smol", data=TldrDataArgs(max_query_length=512), response_length=53, rollout_prompts=8, group_size=8, run=RunArgs(fsdp=True))
    one = estimate_stage("grpo", cfg, device="cpu", world=1, shapes={"smol": SMOL})
    two = estimate_stage("grpo", cfg, device="cpu", world=2, shapes={"smol": SMOL})
    assert one.engine == 134_515_008 * 4 + 64 * 640 * 46_080
    assert two.engine == 134_515_008 * 4 + 32 * 640 * 46_080 == 1_481_778_432
    assert any("one engine per process" in n for n in two.notes) and not any("one engine per process" in n for n in one.notes)


def test_plan_table_has_an_engine_column_only_with_vllm():
    args = PlanArgs(stages=("grpo",), device="cpu", gpu_memory_gb=8)
    header, rows = plan_table(args, {"grpo": grpo(sft_path="HuggingFaceTB/SmolLM2-135M")})
    assert header[8] == "engine" and rows[0][8] == "0.6"  # 538 MB of float32 weights + the 64 MiB floor
    header, _ = plan_table(args, {"grpo": grpo(sft_path="HuggingFaceTB/SmolLM2-135M", rollout_engine="hf")})
    assert "engine" not in header


def test_engine_size_from_the_policy_config(monkeypatch):
    from transformers import Qwen2Config

    from tldr_rlhf.rollout_engine import engine_size

    config = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    policy = SimpleNamespace(config=config)
    auto = SimpleNamespace(vllm_kv_cache_gb=0.0, vllm_gpu_memory_utilization=0.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # 300 sequences x 640 tokens (600 in five 128-token blocks) x 2 layers x 2 x 1 head x 32 dims x 4 bytes
    # = 98,304,000 bytes, above the floor
    kv_gb, share = engine_size(auto, policy, dtype="float32", sequences=300, max_tokens=600)
    assert kv_gb == 98_304_000 / GIB and share == 0.3  # the CPU: the share is not used
    assert engine_size(auto, policy, dtype="float32", sequences=300, max_tokens=640)[0] == kv_gb
    assert engine_size(auto, policy, dtype="float32", sequences=2, max_tokens=64)[0] == KV_FLOOR_BYTES / GIB
    assert engine_size(SimpleNamespace(vllm_kv_cache_gb=0.7, vllm_gpu_memory_utilization=0.0), policy, dtype="float32", sequences=2, max_tokens=64)[0] == 0.7
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=8 * GIB))
    # bfloat16, 600 sequences of 640 tokens (40 blocks of 16 on CUDA): 2 x 139,840 weights + 98,304,000
    # bytes of KV cache + 1 GiB margin = 1,172,325,504 bytes, 0.1365 of 8 GiB -> 0.14
    params = memory.shape_from_config(config.to_dict()).params
    assert params == 1024 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 64 + 2 * 32 + 3 * 64 * 128 + 2 * 64) + 64 == 139_840
    assert engine_size(auto, policy, dtype="bfloat16", sequences=600, max_tokens=640) == (98_304_000 / GIB, 0.14)
    assert engine_size(SimpleNamespace(vllm_kv_cache_gb=0.0, vllm_gpu_memory_utilization=0.45), policy, dtype="bfloat16", sequences=1, max_tokens=8)[1] == 0.45


def test_preflight_stops_a_run_whose_engine_does_not_fit(monkeypatch, tmp_path):
    """On CUDA: the same stage fits with the hf engine and not with vLLM's copy of the weights and its
    KV cache beside it: one line naming the engine's part, before anything loads."""
    cfg = grpo(sft_path="Qwen/Qwen2.5-0.5B", dtype="auto", rollout_prompts=16, group_size=8, data=TldrDataArgs(max_query_length=512), response_length=53,
               run=RunArgs(output_dir=str(tmp_path / "run")))
    est = estimate_stage("grpo", cfg, device="cuda")
    hf = estimate_stage("grpo", dataclasses.replace(cfg, rollout_engine="hf"), device="cuda")
    budget = int(est.total) - 1
    assert hf.total < budget and est.engine > 1 * GIB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=budget))
    with pytest.raises(ConfigError, match=r"^memory plan: grpo needs about .*engine \d+\.\d\) but the GPU has .*--run.no-memory-check runs it anyway$") as e:
        memory.preflight("grpo", cfg)
    assert "\n" not in str(e.value)
    assert memory.preflight("grpo", dataclasses.replace(cfg, rollout_engine="hf")) is not None
    # a share set by hand is what vLLM takes, whatever the plan says it needs
    est = memory.preflight("grpo", dataclasses.replace(cfg, vllm_gpu_memory_utilization=0.01, run=RunArgs(output_dir=str(tmp_path / "run"), memory_check=False)))
    assert est.engine == 0.01 * budget


def test_zero_means_from_the_plan_and_negative_sizes_are_refused():
    from tldr_rlhf.validation import validate_config

    validate_config(GRPOConfig(vllm_kv_cache_gb=0.0, vllm_gpu_memory_utilization=0.0), check_paths=False)  # the defaults: sized by the plan
    assert GRPOConfig().vllm_kv_cache_gb == 0.0 and GRPOConfig().vllm_gpu_memory_utilization == 0.0
    with pytest.raises(ConfigError, match=r"^--vllm-kv-cache-gb -0.5: must be >= 0"):
        validate_config(GRPOConfig(vllm_kv_cache_gb=-0.5), check_paths=False)
    with pytest.raises(ConfigError, match=r"--vllm-gpu-memory-utilization -0.1: must be in \[0, 1\] \(0: from the memory plan\)"):
        validate_config(GRPOConfig(vllm_gpu_memory_utilization=-0.1), check_paths=False)


def test_plan_command_plans_the_rl_stages_with_the_vllm_engine(capsys):
    from tldr_rlhf.cli import main

    assert main(["plan", "--preset", "cpu-smol", "--device", "cpu", "--stages", "grpo", "sft", "--rollout-engine", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "rollouts by vllm" in out and "| overhead | engine | total |" in out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| grpo") or line.startswith("| sft")}
    assert float(rows["grpo"][8]) > 0.5 and rows["sft"][8] == "0.0"  # SmolLM2's 538 MB of float32 weights in the engine; SFT samples nothing
