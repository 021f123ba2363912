"""Model FLOPs and MFU (flops.py): the count of a tiny Qwen2 worked out by hand and checked against
torch's own FLOP counter, the peak table, the cached CPU micro-benchmark, the override, the metrics."""

from __future__ import annotations

import json

import pytest
import torch

from tldr_rlhf import flops
from tldr_rlhf.data.batching import collate_query_response
from tldr_rlhf.flops import ModelShape, batch_forward_flops, causal_pairs, forward_flops, rl_update_flops, sequence_forward_flops, train_flops
from tldr_rlhf.train.loop import Throughput

# tiny_qwen2(): hidden 64, 2 layers, 4 heads of 16, 2 key/value heads, MLP 128.
# Per layer: q 64x64 = 4096, k 64x32 = 2048, v 2048, o 4096, gate/up/down 3 x 64x128 = 24576 -> 36864;
# two layers: N_body = 73728. LM head (tied): 64 x 1000 = 64000. Attention width A = 4 x 16 = 64.
N_BODY, N_HEAD, L, A = 73_728, 64_000, 2, 64


def tiny_qwen2(attn_implementation: str = "sdpa"):
    """conftest's tiny Qwen2 shape with a 1000-token vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=None,
    )
    config._attn_implementation = attn_implementation
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="module")
def shape():
    return ModelShape.of(tiny_qwen2())


def test_model_shape_of_tiny_qwen2_by_hand(shape):
    assert shape == ModelShape(body_params=N_BODY, lm_head_params=N_HEAD, num_layers=L, attention_width=A, hidden_size=64)


def test_one_row_forward_by_hand(shape):
    # query 5 + response 3 tokens: 8 tokens, causal pairs 8 * 9 / 2 = 36, LM head on the 3 response rows:
    # 2 * 73728 * 8 + 4 * 2 * 64 * 36 + 2 * 64000 * 3 = 1,179,648 + 18,432 + 384,000 = 1,582,080
    assert causal_pairs([8]) == 36
    assert sequence_forward_flops(shape, torch.tensor([5]), torch.tensor([3])) == 1_582_080
    assert train_flops(1_582_080) == 4_746_240  # 6N per trained token: 3x the forward
    # every position's logits (loss on the query too): 8 head rows -> 1,179,648 + 18,432 + 1,024,000
    assert sequence_forward_flops(shape, torch.tensor([5]), torch.tensor([3]), head="all") == 2_222_080
    # a scalar head (reward model) on the last token: 2 * 64 * 1 instead of the LM head
    assert sequence_forward_flops(shape, torch.tensor([5]), torch.tensor([3]), head="scalar") == 1_179_648 + 18_432 + 128


def test_padding_is_not_counted_and_a_shared_query_runs_once(shape):
    # Two rows of the same 5-token query, responses of 3 and 2 tokens, padded to width 5 + 3.
    q, chosen, rejected = [1, 2, 3, 4, 5], [6, 7, 2], [8, 2]
    batch = collate_query_response([q, q], [chosen, rejected], 2)
    each_row = sequence_forward_flops(shape, torch.tensor([5]), torch.tensor([3])) + sequence_forward_flops(shape, torch.tensor([5]), torch.tensor([2]))
    assert batch_forward_flops(shape, batch.attention_mask, batch.query_width) == each_row
    # Shared: tokens 5 + 3 + 2 = 10; pairs 15 (query) + 5 * 3 + 6 (chosen) + 5 * 2 + 3 (rejected) = 49;
    # 5 head rows: 2 * 73728 * 10 + 4 * 2 * 64 * 49 + 2 * 64000 * 5 = 1,474,560 + 25,088 + 640,000
    assert batch_forward_flops(shape, batch.attention_mask, batch.query_width, num_queries=1) == 2_139_648
    assert batch_forward_flops(shape, batch.attention_mask, batch.query_width, group_size=2) == 2_139_648
    with pytest.raises(ValueError, match="groups of 3"):
        batch_forward_flops(shape, batch.attention_mask, batch.query_width, group_size=3)


def test_matmul_count_agrees_with_torch_flop_counter(shape):
    """torch's FlopCounterMode counts every matmul the model runs (eager attention: two batched
    matmuls over the full T x T square, the mask is applied after): ours with T^2 in place of the
    causal T(T+1)/2 pairs must equal it."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_qwen2("eager")
    t = 7
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.arange(1, t + 1)[None], use_cache=False)
    ours_full_square = forward_flops(shape, tokens=t, pairs=t * t, head_rows=t)
    assert counter.get_total_flops() == ours_full_square


def test_rl_update_flops_by_parts(shape):
    batch = collate_query_response([[1, 2, 3, 4, 5]] * 2, [[6, 7, 2], [8, 2]], 2)
    lm = batch_forward_flops(shape, batch.attention_mask, batch.query_width, group_size=2)
    # generation + 2 no-grad log-prob passes + 4 training passes of 3 forwards each
    assert rl_update_flops(shape, batch.attention_mask, batch.query_width, group_size=2, passes=4) == lm * 3 + 4 * 3 * lm
    rm = batch_forward_flops(shape, batch.attention_mask, batch.query_width, head="scalar")
    assert rl_update_flops(shape, batch.attention_mask, batch.query_width, passes=1, reward=shape) == pytest.approx(
        6 * batch_forward_flops(shape, batch.attention_mask, batch.query_width) + rm
    )


def test_gpu_peak_table():
    assert flops.gpu_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert flops.gpu_peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert flops.gpu_peak_tflops("NVIDIA H200", torch.bfloat16) == 989.4
    assert flops.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32) == 19.5
    assert flops.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True) == 156.0
    assert flops.gpu_peak_tflops("Some Future GPU", torch.bfloat16) is None


def test_cpu_peak_is_measured_once_and_cached_by_cpu_threads_and_dtype(tmp_path, monkeypatch):
    cache = tmp_path / "peak.json"
    calls = []
    monkeypatch.setattr(flops, "measure_gemm_tflops", lambda dtype, **kw: calls.append(dtype) or 0.1234)
    assert flops.cpu_peak_tflops(torch.float32, cache=cache) == 0.1234
    assert flops.cpu_peak_tflops(torch.float32, cache=cache) == 0.1234
    assert calls == [torch.float32]  # the second call read the file
    (key,) = json.loads(cache.read_text())
    assert flops.cpu_model_name() in key and f"threads={torch.get_num_threads()}" in key and "float32" in key
    assert flops.cpu_peak_tflops(torch.bfloat16, cache=cache) == 0.1234
    assert calls == [torch.float32, torch.bfloat16]  # another dtype: measured
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        flops.cpu_peak_tflops(torch.float32, cache=cache)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3 and len(json.loads(cache.read_text())) == 3  # another thread count: measured
    cache.write_text("{not json")
    assert flops.cpu_peak_tflops(torch.float32, cache=cache) == 0.1234 and len(calls) == 4  # unreadable: measured again
    assert len(json.loads(cache.read_text())) == 1


def test_override_wins_and_nothing_is_measured(monkeypatch):
    monkeypatch.setattr(flops, "measure_gemm_tflops", lambda *a, **k: pytest.fail("measured despite the override"))
    assert flops.peak_tflops(torch.device("cpu"), torch.float32, override=1.7) == 1.7


def test_measured_gemm_peak_is_positive():
    assert 0 < flops.measure_gemm_tflops(torch.float32, size=128, seconds=0.01) < 1000


def test_throughput_reports_model_tflops_and_mfu(monkeypatch):
    monkeypatch.setattr("tldr_rlhf.train.loop.time.perf_counter", lambda: 102.0)
    meter = Throughput(start=100.0, peak_tflops=1.7)
    meter.add(10, 2, flops=3.4e12)
    rates = meter.rates()
    assert rates["perf/model_tflops_per_s"] == pytest.approx(1.7)  # 3.4e12 FLOPs in 2 s
    assert rates["perf/mfu"] == pytest.approx(1.0)
    assert rates["perf/tokens_per_s"] == pytest.approx(5.0)


def test_peak_tflops_flag_parses():
    from tldr_rlhf.cli import parse

    _, cfg = parse(["sft", "--run.peak-tflops", "1.7", "--run.num-threads", "1"])
    assert cfg.run.peak_tflops == 1.7


def test_sft_run_logs_model_tflops_and_mfu_against_the_override(tiny_model_dir, tmp_path, monkeypatch):
    """Every SFT metrics record of a step carries perf/model_tflops_per_s and perf/mfu, the MFU against
    --run.peak-tflops (nothing measured)."""
    from conftest import POSTS

    from tldr_rlhf.config import ModelArgs, OptimArgs, RunArgs, SFTConfig, TldrDataArgs
    from tldr_rlhf.train import sft

    monkeypatch.setattr(flops, "measure_gemm_tflops", lambda *a, **k: pytest.fail("measured despite the override"))
    cfg = SFTConfig(
        model=ModelArgs(path=str(tiny_model_dir)),
        data=TldrDataArgs(train=str(POSTS), max_query_length=96, limit=8, valid_limit=2, valid_fraction=0.01),
        optim=OptimArgs(lr=1e-3, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=str(tmp_path / "run"), progress=False, eval_every=0, save_every=0, max_steps=2, peak_tflops=1.7),
        micro_batch_size=2, gradient_accumulation_steps=1, num_sample_posts=0,
    )
    sft.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/sft" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["perf/model_tflops_per_s"] > 0
        assert r["perf/mfu"] == pytest.approx(r["perf/model_tflops_per_s"] / 1.7)


def test_rl_update_flops_of_each_stage_from_its_run(shape):
    """``rl_common.update_flops``: GRPO with shared prompt counts each group's query once and its
    training passes; PPO (no groups, whatever a ``shared_prompt`` says) counts its passes and its value model."""
    from types import SimpleNamespace

    from tldr_rlhf.train.rl_common import update_flops

    model = tiny_qwen2()
    batch = collate_query_response([[1, 2, 3, 4, 5]] * 2, [[6, 7, 2], [8, 2]], 2)
    r = SimpleNamespace(batch=batch)
    lm_shared = batch_forward_flops(shape, batch.attention_mask, batch.query_width, group_size=2)
    grpo = SimpleNamespace(cfg=SimpleNamespace(shared_prompt=True), group=2, passes=4, policy=model, reward_model=None, value=None)
    assert update_flops(grpo, r) == 3 * lm_shared + 4 * 3 * lm_shared
    lm = batch_forward_flops(shape, batch.attention_mask, batch.query_width)
    values = batch_forward_flops(shape, batch.attention_mask, batch.query_width, head="values")
    ppo = SimpleNamespace(cfg=SimpleNamespace(shared_prompt=True), group=1, passes=2, policy=model, reward_model=None, value=model)
    assert update_flops(ppo, r) == pytest.approx(3 * lm + 2 * 3 * lm + values + 2 * 3 * values)
    # online DPO: pairs (group 2) of full rows, its config's shared_prompt always off
    from tldr_rlhf.config.rl import OnlineDPOConfig

    online = SimpleNamespace(cfg=OnlineDPOConfig(), group=2, passes=1, policy=model, reward_model=None, value=None)
    assert update_flops(online, r) == 3 * lm + 3 * lm


def test_reinforce_pp_update_flops_from_its_config(shape):
    """REINFORCE++ goes through the group loop's ``log_update``: with its own config (shared prompt on,
    no value model) an update counts each group's query once, generation + policy and reference
    log-probs + ``update_per_rollout`` training passes of 3 forwards each."""
    from types import SimpleNamespace

    from tldr_rlhf.config.rl import ReinforcePPConfig
    from tldr_rlhf.train.rl_common import update_flops

    model = tiny_qwen2()
    batch = collate_query_response([[1, 2, 3, 4, 5]] * 2, [[6, 7, 2], [8, 2]], 2)
    cfg = ReinforcePPConfig(update_per_rollout=3)
    assert cfg.shared_prompt
    rl = SimpleNamespace(cfg=cfg, group=2, passes=cfg.update_per_rollout, policy=model, reward_model=None, value=None)
    lm_shared = batch_forward_flops(shape, batch.attention_mask, batch.query_width, group_size=2)
    assert update_flops(rl, SimpleNamespace(batch=batch)) == 3 * lm_shared + 3 * 3 * lm_shared
