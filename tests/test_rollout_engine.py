"""The rollout-engine plumbing that runs without vLLM: the hf engine is ``generate_groups`` exactly and
leaves nothing for truncated importance sampling to correct (weights None: every loss unchanged); a
missing vllm package is one line naming the extra, before anything loads; bad engine flags are refused."""

import builtins
import importlib.util
import os
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from tldr_rlhf.config import GRPOConfig, RunArgs
from tldr_rlhf.errors import ConfigError
from tldr_rlhf.generation import generate_groups
from tldr_rlhf.importance_sampling import rollout_is_weights
from tldr_rlhf.rollout_engine import HFEngine, VLLMEngine, _default_group_kept, _external_launcher, check_engine_available, engine_for, import_vllm, make_engine, merged_weights
from tldr_rlhf.train import grpo
from tldr_rlhf.train.group_rl import sample_groups_shared
from tldr_rlhf.validation import validate_config

from conftest import EOS, make_tiny_qwen2

QUERIES = [[9707, 11, 1879, 0], [785, 3974, 13876]]


def test_hf_engine_is_generate_groups_and_gives_no_sampling_logprobs_to_correct():
    model = make_tiny_qwen2(hidden=16)
    kw = dict(eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=5, temperature=0.7)
    torch.manual_seed(3)
    want, want_lp = generate_groups(model, QUERIES, 3, **kw)
    torch.manual_seed(3)
    got, got_lp = HFEngine().sample_groups(model, QUERIES, 3, seed=123, **kw)
    assert got == want and got_lp == want_lp
    torch.manual_seed(3)
    batch, has_eos, sample_lp = sample_groups_shared(model, QUERIES, 3, eos=EOS, pad=EOS, response_length=5, temperature=0.7, batch_size=8, engine=HFEngine())
    assert sample_lp is None and batch.input_ids.shape[0] == 6
    assert [r[m].tolist() for r, m in zip(batch.responses, batch.response_mask)] == want
    # the hf engine: no sampling log-probs, so no correction (ratio 1, the loss untouched)
    assert rollout_is_weights(torch.zeros(2, 3), None, torch.ones(2, 3, dtype=torch.bool), cap=2.0, level="token") is None
    assert HFEngine().sync_weights(model) == 0.0


def test_merged_weights_are_the_state_dict_names_without_lora():
    from tldr_rlhf.modeling import apply_lora

    model = make_tiny_qwen2(hidden=16)
    plain = dict(merged_weights(model))
    assert set(plain) == {n for n, _ in model.named_parameters()}  # tied lm_head once, as embed_tokens
    lora = apply_lora(make_tiny_qwen2(hidden=16), r=2, alpha=4)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    merged = dict(merged_weights(lora))
    assert set(merged) == set(plain)
    name = next(n for n in merged if n.endswith("q_proj.weight"))
    layer = lora.get_base_model().get_submodule(name[: -len(".weight")])
    want = layer.base_layer.weight + layer.get_delta_weight("default")
    torch.testing.assert_close(merged[name], want, rtol=0, atol=0)
    assert not torch.equal(merged[name], plain[name])


def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    real_find, real_import = importlib.util.find_spec, builtins.__import__
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find(name, *a))
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError("no vllm")) if name == "vllm" else real_import(name, *a, **k))
    with pytest.raises(ConfigError, match=r"pip install 'tldr-rlhf\[vllm\]'") as e:
        check_engine_available("vllm")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"tldr-rlhf\[vllm\]"):
        import_vllm()
    check_engine_available("hf")  # nothing needed
    # a stage refuses before its run folder exists or a model loads
    out = tmp_path / "run"
    cfg = GRPOConfig(sft_path=str(tmp_path), rm_path=str(tmp_path), rollout_engine="vllm", run=RunArgs(output_dir=str(out)))
    with pytest.raises(ConfigError, match=r"tldr-rlhf\[vllm\]"):
        grpo.train(cfg)
    assert not out.exists()


def test_engine_flags_are_checked():
    with pytest.raises(ConfigError, match="--rollout-engine sglang"):
        make_engine("sglang", None)
    assert isinstance(engine_for(GRPOConfig(), None, max_tokens=10), HFEngine)
    with pytest.raises(ConfigError, match="--tis-cap -1.0"):
        validate_config(GRPOConfig(tis_cap=-1.0), check_paths=False)
    with pytest.raises(ConfigError, match="--vllm-gpu-memory-utilization 1.5"):
        validate_config(GRPOConfig(vllm_gpu_memory_utilization=1.5), check_paths=False)
    with pytest.raises(ConfigError, match="on 2 processes needs their torch.distributed process group"):
        _external_launcher(1, 2)  # vllm under 2 processes, but no process group of 2: one line, before vLLM starts


def test_request_seeds_interleave_the_processes():
    # (seed + i) x world + rank: one process keeps seed + i; two processes never share a seed at a call
    seed = VLLMEngine._request_seed
    assert [seed(SimpleNamespace(rank=0, world_size=1), 1000, i) for i in range(3)] == [1000, 1001, 1002]
    assert [seed(SimpleNamespace(rank=0, world_size=2), 1000, i) for i in range(3)] == [2000, 2002, 2004]
    assert [seed(SimpleNamespace(rank=1, world_size=2), 1000, i) for i in range(3)] == [2001, 2003, 2005]
    assert seed(SimpleNamespace(rank=1, world_size=2), None, 0) is None


def test_fsdp_weights_gathered_whole_and_the_process_group_outlives_the_engine(tmp_path):
    # a 1-process gloo group: merged_weights of an FSDP2 policy yields plain full tensors equal to the
    # policy's (DTensor.full_tensor; 2 processes: test_vllm_distributed.py); _external_launcher gives
    # vLLM the launcher's group; inside _default_group_kept vLLM's shutdown cannot destroy the default
    # group, while a group of its own is still destroyed
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from tldr_rlhf.train.fsdp import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make_tiny_qwen2(hidden=16)
        want = {n: p.detach().clone() for n, p in model.named_parameters()}
        shard_model(model, torch.device("cpu"))
        assert all(isinstance(p, DTensor) for p in model.parameters())
        got = dict(merged_weights(model))
        assert sorted(got) == sorted(want) and not any(isinstance(w, DTensor) for w in got.values())
        assert all(torch.equal(got[n], want[n]) for n in want)
        # RANK / LOCAL_RANK / WORLD_SIZE set for vLLM where the launcher did not: only inside this block, or
        # every later Accelerator of this test process would take itself for a distributed one
        with mock.patch.dict(os.environ, clear=True):
            assert _external_launcher(0, 1) == {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}
            assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
        own, destroyed, real = dist.new_group([0]), [], dist.destroy_process_group
        dist.destroy_process_group = lambda group=None: (destroyed.append(group), real(group))
        try:
            with _default_group_kept():
                dist.destroy_process_group()  # what vLLM's cleanup_dist_env_and_memory calls last
                dist.destroy_process_group(own)
        finally:
            dist.destroy_process_group = real
        assert destroyed == [own] and dist.is_initialized()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_stage_losses_apply_tis_only_when_another_engine_sampled():
    # GRPO's and RLOO's micro-batch losses read the rollout's sampling log-probs: None (hf) or equal to
    # the policy's gives the uncorrected loss bit for bit; an engine whose tokens were likelier under
    # it than under the policy (log ratio -0.5 per token) scales the policy-gradient term down
    from tldr_rlhf.config import RLOOConfig
    from tldr_rlhf.data.batching import QueryResponseBatch
    from tldr_rlhf.rollout import Rollout
    from tldr_rlhf.advantages import broadcast_over_response
    from tldr_rlhf.train import rloo

    mask = torch.tensor([[True, True, False], [True, True, True]])
    old = torch.tensor([[-1.7, -0.3, 0.0], [-2.2, -0.9, -1.1]])
    batch = QueryResponseBatch(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool), mask, 2)

    def rollout(sample):
        return Rollout(batch, old, old - 0.1, torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), torch.ones(2, dtype=torch.bool), sample_logprobs=sample)

    new = old + 0.05
    adv = broadcast_over_response(torch.tensor([1.3, -0.7]), mask)  # the (B, T) per-token contract of every estimator
    for loss_fn, cfg in ((grpo.token_loss, GRPOConfig()), (rloo.sequence_loss, RLOOConfig())):
        plain, _ = loss_fn(new, rollout(None), adv, cfg, num_tokens=5, num_sequences=2)
        same, _ = loss_fn(new, rollout(old.clone()), adv, cfg, num_tokens=5, num_sequences=2)
        off, _ = loss_fn(new, rollout(old + 0.5), adv, cfg, num_tokens=5, num_sequences=2)
        assert torch.equal(plain, same)
        assert not torch.allclose(plain, off)
    # RLOO at --tis-cap 0: no correction
    cfg = RLOOConfig(tis_cap=0.0)
    assert torch.equal(rloo.sequence_loss(new, rollout(old + 0.5), adv, cfg, num_tokens=5, num_sequences=2)[0], rloo.sequence_loss(new, rollout(None), adv, cfg, num_tokens=5, num_sequences=2)[0])
