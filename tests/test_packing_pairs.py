"""Padding-free preference pairs (data/packing.py with ``num_queries``): the shared-prompt packed layout
by hand, reward-model rewards and DPO log-probs, losses and gradients equal to the padded paths (shared
prompt and full rows), the reward read at each response's EOS, the flags and the training loops'
default."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import COMPARISONS, EOS, make_tiny_qwen2

from tldr_rlhf.data.batching import QueryResponseBatch, collate_pairs
from tldr_rlhf.data.packing import pack_query_response, packed_hidden_states
from tldr_rlhf.losses import dpo_loss, pairwise_loss
from tldr_rlhf.reward.loading import build_reward_model
from tldr_rlhf.reward.scoring import pair_rewards
from tldr_rlhf.train.dpo import pair_logprobs

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# 3 pairs: queries of 5, 2 and 7 tokens; chosen responses of 3, 2, 5; rejected of 2, 4, 2 (EOS = pad)
QUERIES = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33, 34, 35, 36, 37]]
CHOSEN = [[101, 102, EOS], [201, EOS], [301, 302, 303, 304, EOS]]
REJECTED = [[111, EOS], [211, 212, 213, EOS], [311, EOS]]


def _pairs() -> QueryResponseBatch:
    return collate_pairs(QUERIES, CHOSEN, REJECTED, EOS)  # 6 rows: 7 query + 5 response columns


def test_shared_prompt_packed_layout_by_hand():
    """Each query once, its chosen response continuing it, its rejected response a branch whose
    positions restart at the query length; a branch's first token is predicted by the query's last."""
    p = pack_query_response(_pairs(), num_queries=3)
    assert p.input_ids.tolist() == [[
        11, 12, 13, 14, 15, 101, 102, EOS, 111, EOS,
        21, 22, 201, EOS, 211, 212, 213, EOS,
        31, 32, 33, 34, 35, 36, 37, 301, 302, 303, 304, EOS, 311, EOS,
    ]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 0, 1, 2, 3, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 7, 8]]
    # rows 0-2 chosen, 3-5 rejected, in the padded response layout (row-major)
    assert p.rows.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 4, 5, 5]
    assert p.predict_at.tolist() == [4, 5, 6, 11, 12, 24, 25, 26, 27, 28, 4, 8, 11, 14, 15, 16, 24, 30]
    assert p.targets.tolist() == [101, 102, EOS, 201, EOS, 301, 302, 303, 304, EOS, 111, EOS, 211, 212, 213, EOS, 311, EOS]
    # where the reward is read: each response's EOS (chosen rows 0-2, then rejected rows 3-5)
    assert p.last_at.tolist() == [7, 13, 29, 9, 17, 31]
    assert (p.input_ids[0, p.last_at] == EOS).all()
    assert p.shape == (6, 5)


def test_full_rows_packed_layout_by_hand():
    """Without ``num_queries`` (--no-shared-prompt) the 6 full rows go end to end, each query twice."""
    p = pack_query_response(_pairs())
    assert p.input_ids.shape == (1, 2 * (5 + 2 + 7) + 3 + 2 + 5 + 2 + 4 + 2)
    assert p.position_ids[0, :18].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert p.last_at.tolist() == [7, 11, 23, 30, 36, 45]  # rows of 8, 4, 12, 7, 6, 9 tokens
    assert (p.input_ids[0, p.last_at] == EOS).all()


def test_shared_prompt_packing_refuses_rows_that_do_not_split_into_queries():
    with pytest.raises(ValueError, match="do not continue 4 queries"):
        pack_query_response(_pairs(), num_queries=4)


@pytest.fixture
def reward_model(reward_backbone_dir, qwen_tokenizer):
    torch.manual_seed(0)
    return build_reward_model(reward_backbone_dir, tokenizer=qwen_tokenizer).train()


def _rm_step(model, shared: bool, padding_free: bool):
    model.zero_grad(set_to_none=True)
    r = pair_rewards(model, _pairs(), shared_prompt=shared, padding_free=padding_free)
    loss, _ = pairwise_loss(r[:3] * 1.7, r[3:])  # a weight not exact in float32
    loss.backward()
    return r.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared", [True, False])
def test_packed_rewards_loss_and_gradients_equal_the_padded_path(reward_model, shared):
    """Rows of different lengths: attention leaking from the chosen response into the rejected
    branch, or across pairs, or positions not restarting, would change the rewards of rows 1-5."""
    padded, packed = _rm_step(reward_model, shared, False), _rm_step(reward_model, shared, True)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=0)
    assert packed[1] == pytest.approx(padded[1], abs=1e-5)
    assert packed[2].keys() == padded[2].keys() and len(packed[2]) > 10
    for name in padded[2]:
        torch.testing.assert_close(packed[2][name], padded[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_reward_is_read_at_each_response_eos(reward_model, monkeypatch):
    """The packed forward reads the head at the packed positions of the 6 responses' EOS tokens, and
    each reward is the reward of its (query, response) scored alone."""
    from tldr_rlhf.reward import reward_model as rm_module

    seen = []
    real = rm_module.ScalarRewardModel.apply_head
    monkeypatch.setattr(rm_module.ScalarRewardModel, "apply_head", lambda self, h: seen.append(h) or real(self, h))
    reward_model.eval()
    with torch.no_grad():
        packed = pair_rewards(reward_model, _pairs(), padding_free=True)
        hidden = packed_hidden_states(reward_model.backbone, pack_query_response(_pairs(), num_queries=3))
        alone = [reward_model(input_ids=torch.tensor([q + r])).rewards[0] for q, r in zip(QUERIES + QUERIES, CHOSEN + REJECTED)]
    assert seen[0].shape == (6, 64)  # the packed call's head input: 6 EOS positions, hidden 64
    torch.testing.assert_close(seen[0], hidden[[7, 13, 29, 9, 17, 31]], atol=1e-6, rtol=0)
    torch.testing.assert_close(packed, torch.stack(alone), atol=1e-5, rtol=0)


def _dpo_step(model, shared: bool, padding_free: bool):
    model.zero_grad(set_to_none=True)
    lp = pair_logprobs(model, _pairs(), shared_prompt=shared, padding_free=padding_free)
    ref = torch.tensor([-12.7, -9.3, -20.1, -11.9, -17.3, -10.7])
    loss, _ = dpo_loss(lp[:3], lp[3:], ref[:3], ref[3:], beta=0.1, label_smoothing=0.1)
    loss.backward()
    return lp.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared", [True, False])
def test_packed_dpo_logprobs_loss_and_gradients_equal_the_padded_path(shared):
    model = make_tiny_qwen2(seed=5).train()
    padded, packed = _dpo_step(model, shared, False), _dpo_step(model, shared, True)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=0)
    assert packed[1] == pytest.approx(padded[1], abs=1e-5)
    assert packed[2].keys() == padded[2].keys() and len(packed[2]) > 10
    for name in padded[2]:
        torch.testing.assert_close(packed[2][name], padded[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_free_flags_and_defaults():
    from tldr_rlhf.cli import parse
    from tldr_rlhf.config import DPOConfig, RMConfig

    assert RMConfig().padding_free and DPOConfig().padding_free
    assert parse(["rm", "--no-padding-free"])[1].padding_free is False
    assert parse(["dpo", "--sft-path", "x", "--no-padding-free"])[1].padding_free is False
    assert parse(["dpo", "--sft-path", "x", "--padding-free"])[1].padding_free is True


def _spy_packing(monkeypatch, module):
    calls = []
    real = module.pack_query_response
    monkeypatch.setattr(module, "pack_query_response", lambda batch, **kw: calls.append(kw) or real(batch, **kw))
    return calls


@pytest.mark.parametrize("padding_free", [True, False])
def test_rm_training_packs_by_default_and_not_under_no_padding_free(reward_backbone_dir, tmp_path, monkeypatch, padding_free):
    """``rm.train``'s optimizer steps reach the packed forward once per micro-batch (2 steps x 1), each
    query shared; --no-padding-free never packs."""
    from tldr_rlhf.reward import scoring as reward_scoring
    from tldr_rlhf.config import ModelArgs, OptimArgs, PreferenceDataArgs, RewardNormArgs, RMConfig, RunArgs
    from tldr_rlhf.train import rm

    calls = _spy_packing(monkeypatch, reward_scoring)
    cfg = RMConfig(
        model=ModelArgs(path=reward_backbone_dir), data=PreferenceDataArgs(comparisons=str(COMPARISONS), max_query_length=96, limit=8, valid_limit=2),
        norm=RewardNormArgs(enabled=False), optim=OptimArgs(lr=1e-3, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=str(tmp_path / "rm"), progress=False, eval_every=0, save_every=0, max_steps=2, peak_tflops=1.7),
        micro_batch_size=2, gradient_accumulation_steps=1, eval_batch_size=2, padding_free=padding_free,
    )
    rm.train(cfg)
    assert calls == ([{"num_queries": 2}] * 2 if padding_free else [])


@pytest.mark.parametrize("padding_free", [True, False])
def test_dpo_training_packs_by_default_and_not_under_no_padding_free(reward_backbone_dir, tmp_path, monkeypatch, padding_free):
    """``dpo.train``'s optimizer steps (gradients on) run ``pair_logprobs`` packed once per micro-batch
    (2 steps x 1), and the reference and held-out passes (no gradients) take the same path, so that
    the step-0 policy reproduces its cached reference; --no-padding-free never packs."""
    from tldr_rlhf import lm_head
    from tldr_rlhf.config import DPOConfig, OptimArgs, PreferenceDataArgs, RunArgs
    from tldr_rlhf.train import dpo

    packs = _spy_packing(monkeypatch, lm_head)
    calls = []
    real = dpo.pair_logprobs
    monkeypatch.setattr(dpo, "pair_logprobs", lambda m, b, **kw: calls.append((torch.is_grad_enabled(), kw["padding_free"])) or real(m, b, **kw))
    cfg = DPOConfig(
        sft_path=reward_backbone_dir, data=PreferenceDataArgs(comparisons=str(COMPARISONS), max_query_length=96, limit=8, valid_limit=2),
        optim=OptimArgs(lr=1e-3, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=str(tmp_path / "dpo"), progress=False, eval_every=0, save_every=0, max_steps=2, peak_tflops=1.7),
        micro_batch_size=2, gradient_accumulation_steps=1, eval_batch_size=2, num_sample_posts=0, padding_free=padding_free,
    )
    dpo.train(cfg)
    assert [c for c in calls if c[0]] == [(True, padding_free)] * 2
    assert len(calls) > 2 and {c[1] for c in calls} == {padding_free}  # reference and held-out passes too
    assert len(packs) == (len(calls) if padding_free else 0) and all(k.get("num_queries") for k in packs)
    step1 = [json.loads(l) for l in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines() if "loss/dpo" in l][0]
    assert step1["rewards/margin"] == 0.0  # the step-0 policy is its cached reference
