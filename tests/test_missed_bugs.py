"""Tests for four bugs the suite once missed (issue 27): each was injected into the code and the suite
stayed green. Every test here fails with its bug put back.

1. LoRA reference: the grouped (shared-prompt) reference log-probs are the base model's, with
   non-zero adapters (the reference must not run the policy's backbone with its adapters on).
2. Online DPO: tied pairs (both without EOS, or equal scores) are left out of the minibatch's loss,
   and a minibatch of tied pairs only takes no optimizer step.
3. GRPO / RLOO: the loss is normalized by the minibatch's counts, not each micro-batch's: two
   micro-batches of different token counts give the gradient of one; the clip fraction and KL
   metrics are the minibatch's token means, whatever the split.
4. Best-of-n: the analytic KL log n - (n - 1) / n is the KL to SFT only for best-of-n of the SFT
   policy; best-of-n of another policy has no KL to SFT.
(PPO: the same split-independence, a guard on what was right already. The FSDP clipping check, 2
processes against 1 with a gradient norm far above the limit:
``test_fsdp_clipping.py``.)
"""

import copy
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from tldr_rlhf.config import GRPOConfig, OnlineDPOConfig, RLOOConfig
from tldr_rlhf.data.batching import collate_query_response
from tldr_rlhf.modeling import AdaptersDisabled, apply_lora, response_logits
from tldr_rlhf.ops import token_logprobs
from tldr_rlhf.rollout import Rollout

from rl_fixtures import EOS, make_tiny_qwen2

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# 2 distinct queries, each answered twice (a GRPO group of 2 / an online DPO pair), rows [q0, q0, q1, q1];
# response lengths 1, 3, 5, 6 tokens (EOS included where given; row 0 has none)
QUERIES = [[9707, 11, 1879], [785, 3974, 13876, 6, 7]]
RESPONSES = [[40, EOS], [1349, 1075, EOS], [311, 40, 1075, 1349, 13], [13876, 11, 9707, 785, 3974, EOS]]


def _batch():
    return collate_query_response([QUERIES[0], QUERIES[0], QUERIES[1], QUERIES[1]], [r[:-1] if i == 0 else r for i, r in enumerate(RESPONSES)], EOS)


def _accelerator():
    """The accelerator calls a minibatch step makes, for one process."""
    return SimpleNamespace(
        device=torch.device("cpu"), num_processes=1, no_sync=lambda model: nullcontext(), autocast=nullcontext,
        backward=lambda loss: loss.backward(), reduce=lambda t, reduction="mean": t, clip_grad_norm_=torch.nn.utils.clip_grad_norm_,
    )


# ----------------------------------------------------------------------------------------------
# 1. LoRA reference on the shared prompt


def test_lora_reference_on_the_shared_prompt_is_the_base_model(monkeypatch):
    from tldr_rlhf import lm_head
    from tldr_rlhf.train.group_rl import group_logprobs

    base = make_tiny_qwen2(hidden=32)
    policy = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    with torch.no_grad():
        for n, p in policy.named_parameters():  # trained adapters: B moved off its zero init
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ref = AdaptersDisabled(policy)
    b = _batch()
    m = b.response_mask
    shared_calls = []
    real = lm_head._grouped_response_hidden
    monkeypatch.setattr(lm_head, "_grouped_response_hidden", lambda *a, **k: shared_calls.append(1) or real(*a, **k))
    with torch.no_grad():
        want = token_logprobs(response_logits(base, b.input_ids, b.attention_mask, b.query_width), b.responses, 0.7)  # full rows
        moved = token_logprobs(response_logits(policy, b.input_ids, b.attention_mask, b.query_width), b.responses, 0.7)
        assert (moved - want)[m].abs().max() > 1e-2  # the adapters change the policy
        # DPO / online DPO's summed log-probs (rows [q0, q0, q1, q1]: query of row r is row r // 2's; as pairs, r % Q)
        pairs = collate_query_response(QUERIES + QUERIES, [RESPONSES[1], RESPONSES[3], RESPONSES[0], RESPONSES[2]], EOS)
        got_pairs = lm_head.response_token_logprobs(ref, pairs, num_queries=2, temperature=0.7)
        want_pairs = token_logprobs(response_logits(base, pairs.input_ids, pairs.attention_mask, pairs.query_width), pairs.responses, 0.7)
        torch.testing.assert_close(got_pairs[pairs.response_mask], want_pairs[pairs.response_mask], atol=2e-5, rtol=0)
        # GRPO / RLOO's reference pass: each query once per group
        got, _ = group_logprobs(ref, b, 2, temperature=0.7)
        torch.testing.assert_close(got[m], want[m], atol=2e-5, rtol=0)
        torch.testing.assert_close(token_logprobs(lm_head.grouped_response_logits(ref, b), b.responses, 0.7)[m], want[m], atol=2e-5, rtol=0)
    assert len(shared_calls) >= 2  # the shared-prompt path ran for the reference (not a full-row fall-back)
    with torch.no_grad():  # the adapters are on again after the reference's passes
        again = token_logprobs(response_logits(policy, b.input_ids, b.attention_mask, b.query_width), b.responses, 0.7)
    assert torch.equal(again, moved)


# ----------------------------------------------------------------------------------------------
# 2. Online DPO: ties left out; an all-tied minibatch takes no step


def _pair_rollout(model, scores):
    """A rollout of the 4 rows [q0, q0, q1, q1] (pairs (0, 1) and (2, 3)) with ``scores``, its log-probs
    the model's own at temperature 0.7 and the reference's 0.3 nats lower per token."""
    b = _batch()
    with torch.no_grad():
        lp = token_logprobs(response_logits(model, b.input_ids, b.attention_mask, b.query_width), b.responses, 0.7)
    s = torch.tensor(scores)
    return Rollout(b, lp, lp - 0.3, torch.zeros_like(lp), s, s, torch.ones(4, dtype=torch.bool))


def _dpo_step(model, r, pairs, cfg):
    from tldr_rlhf.train.online_dpo import label_pairs, minibatch_step

    chosen, rejected, tied = label_pairs(r.scores)
    model.zero_grad(set_to_none=True)
    m = minibatch_step(model, r, chosen, rejected, tied, pairs, cfg, _accelerator())
    return m, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [(-1.0, -1.0), (1.7, 1.7)])  # both without EOS (the EOS trick's -1), or equal scores
def test_online_dpo_leaves_tied_pairs_out_of_the_minibatch_loss(tie):
    model = make_tiny_qwen2(hidden=16)
    cfg = OnlineDPOConfig(micro_batch_size=2, beta=0.1)
    # pair 0 tied, pair 1: row 3 (score 0.4) beats row 2 (-0.25)
    m, grads = _dpo_step(model, _pair_rollout(model, [*tie, -0.25, 0.4]), [0, 1], cfg)
    m_alone, grads_alone = _dpo_step(model, _pair_rollout(model, [*tie, -0.25, 0.4]), [1], cfg)
    assert grads and sorted(grads) == sorted(grads_alone)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_alone[n], atol=1e-9, rtol=1e-6)
    assert m["loss/policy"] == pytest.approx(m_alone["loss/policy"], rel=1e-6)
    # the untied pair alone, as micro-batches of one pair: the same loss (exact gradient accumulation)
    m_one, _ = _dpo_step(model, _pair_rollout(model, [*tie, -0.25, 0.4]), [0, 1], OnlineDPOConfig(micro_batch_size=1, beta=0.1))
    assert m_one["loss/policy"] == pytest.approx(m_alone["loss/policy"], rel=1e-6)


def test_online_dpo_minibatch_of_tied_pairs_takes_no_optimizer_step():
    from tldr_rlhf.train.online_dpo import label_pairs, minibatch_step
    from tldr_rlhf.train.rl_common import update_passes

    model = make_tiny_qwen2(hidden=16)
    cfg = OnlineDPOConfig(micro_batch_size=2, beta=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # one earlier step with a real preference: AdamW now has moments and a step count, so any
    # further step would move the weights even with zero gradients
    acc = _accelerator()
    for scores in ([0.3, 1.7, -0.25, 0.4], [-1.0, -1.0, 1.7, 1.7]):
        r = _pair_rollout(model, scores)
        chosen, rejected, tied = label_pairs(r.scores)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = copy.deepcopy(opt.state_dict())
        stats = update_passes(
            model, opt, acc, lambda pairs: minibatch_step(model, r, chosen, rejected, tied, pairs, cfg, acc),
            passes=1, n_rows=2, mini=2, generator=torch.Generator().manual_seed(0), max_grad_norm=1.0, prefix="online_dpo",
        )
        moved = any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        if not bool(tied.all()):
            assert moved and "online_dpo/skipped_minibatches" not in stats
            continue
        assert not moved  # all tied: the weights and AdamW's state stay as they were
        after = opt.state_dict()
        assert after["state"].keys() == state["state"].keys()
        for k, s in state["state"].items():
            assert all(torch.equal(s[x], after["state"][k][x]) for x in s)
        assert stats["online_dpo/skipped_minibatches"] == 1.0
        assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# 3. GRPO / RLOO: per-minibatch normalization; token-weighted metrics


def _group_rollout(model):
    """4 rows of 2 groups with response lengths 1, 3, 5, 6; old log-probs moved off the policy's by a
    fixed pattern (ratios on both sides of the clip range), reference 0.4 nats lower."""
    b = _batch()
    with torch.no_grad():
        lp = token_logprobs(response_logits(model, b.input_ids, b.attention_mask, b.query_width), b.responses, 0.7)
    t = lp.shape[1]
    shift = torch.tensor([0.35, -0.05, -0.3, 0.1, 0.25, -0.15])[:t].expand_as(lp) * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    return Rollout(b, lp + shift, lp - 0.4, torch.zeros_like(lp), torch.zeros(4), torch.zeros(4), torch.ones(4, dtype=torch.bool))


def _group_step(model, r, cfg, loss_fn, prefix, token_metrics, per_token=False):
    from tldr_rlhf.train.group_rl import minibatch_step

    model.zero_grad(set_to_none=True)
    adv = torch.tensor([1.7, -0.3, 0.9, -1.2])[:, None] * r.mask  # (B, T): one per sequence (GRPO, RLOO), 0 on padding
    if per_token:  # varying along the response (REINFORCE++)
        adv = adv * torch.linspace(1.3, 0.2, r.logprobs.shape[1])
    m = minibatch_step(model, r, adv, [0, 1, 2, 3], cfg, _accelerator(), loss_fn=loss_fn, prefix=prefix, token_metrics=token_metrics)
    return m, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage,aggregation", [("grpo", "token-mean"), ("grpo", "seq-mean-token-mean"), ("grpo", "seq-mean-token-sum"), ("rloo", None), ("reinforce_pp", None)])
def test_group_loss_is_normalized_per_minibatch_whatever_the_micro_batch_split(stage, aggregation):
    from tldr_rlhf.config.rl import ReinforcePPConfig
    from tldr_rlhf.train import grpo, reinforce_pp, rloo

    model = make_tiny_qwen2(hidden=16)
    r = _group_rollout(model)
    if stage == "grpo":
        make = lambda micro: GRPOConfig(group_size=2, micro_batch_size=micro, mini_batch_size=4, loss_aggregation=aggregation, temperature=0.7)
        loss_fn, token_metrics = grpo.token_loss, True
    elif stage == "reinforce_pp":  # per-token advantages, PPO's clipped loss: its metrics are token means too
        make = lambda micro: ReinforcePPConfig(group_size=2, micro_batch_size=micro, mini_batch_size=4, temperature=0.7)
        loss_fn, token_metrics = reinforce_pp.clipped_loss, True
    else:
        make = lambda micro: RLOOConfig(group_size=2, micro_batch_size=micro, mini_batch_size=4, temperature=0.7)
        loss_fn, token_metrics = rloo.sequence_loss, False
    per_token = stage == "reinforce_pp"
    one, g_one = _group_step(model, r, make(4), loss_fn, stage, token_metrics, per_token)
    two, g_two = _group_step(model, r, make(2), loss_fn, stage, token_metrics, per_token)  # micro-batches of 4 and 11 real tokens
    assert sorted(g_one) == sorted(g_two)
    for n in g_one:
        torch.testing.assert_close(g_two[n], g_one[n], atol=1e-8, rtol=1e-5)
    assert max(g.abs().max().item() for g in g_one.values()) > 1e-4
    # the minibatch's metrics, not the micro-batches' (clip fraction and KL: token means for GRPO)
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    if stage == "grpo":
        assert 0.0 < one["grpo/clipfrac"] < 1.0 and one["grpo/kl"] > 0.0


def test_grpo_clip_fraction_is_the_share_of_the_minibatch_tokens_by_hand():
    # tokens 4 (rows 0, 1) + 11 (rows 2, 3); the clipped tokens counted once over all 15
    from tldr_rlhf.losses import clipped_surrogate
    from tldr_rlhf.train import grpo

    model = make_tiny_qwen2(hidden=16)
    r = _group_rollout(model)
    two, _ = _group_step(model, r, GRPOConfig(group_size=2, micro_batch_size=2, mini_batch_size=4, temperature=0.7), grpo.token_loss, "grpo", True)
    with torch.no_grad():
        new = token_logprobs(response_logits(model, r.batch.input_ids, r.batch.attention_mask, r.batch.query_width), r.batch.responses, 0.7)
    _, m = clipped_surrogate(new, r.logprobs, torch.tensor([1.7, -0.3, 0.9, -1.2]), clip_range=0.2, dual_clip=3.0)
    mask = r.mask
    assert mask.sum(-1).tolist() == [1, 3, 5, 6]
    assert two["grpo/clipfrac"] == pytest.approx(m["clipped"][mask].float().sum().item() / 15, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# 4. Best-of-n: "KL to SFT" only when the base is the SFT policy


def test_best_of_n_analytic_kl_is_the_kl_to_sft_only_for_a_base_that_is_sft(qwen_tokenizer, tmp_path):
    import shutil

    from tldr_rlhf.config import EvaluateConfig, TldrDataArgs
    from tldr_rlhf.evaluate import evaluate, metrics_rows

    from rl_fixtures import POSTS, make_checkpoints, one_thread

    sft, _ = make_checkpoints(qwen_tokenizer)
    other = tmp_path / "other"  # another policy (here the same weights at another path: not the SFT policy)
    shutil.copytree(sft, other)
    cfg = EvaluateConfig(
        policies=(f"sft={sft}", f"other={other}"), sft_path=sft, reward="reward_fns:chars", best_of_n=2,
        data=TldrDataArgs(train=str(POSTS), valid_fraction=0.1, max_query_length=64),
        num_posts=2, response_length=4, batch_size=4, greedy=False, kl=False, num_threads=1, output_dir=str(tmp_path / "ev"),
    )
    with one_thread():
        results = evaluate(cfg)
    p = results["policies"]
    # log 2 - 1/2 = 0.693147 - 0.5 = 0.193147 nats, to each one's own base policy
    assert p["sft-bo2"]["kl_best_of_n"] == pytest.approx(0.193147, abs=1e-6) == p["other-bo2"]["kl_best_of_n"]
    assert p["sft-bo2"]["kl_to_sft"] == p["sft-bo2"]["kl_best_of_n"]
    assert p["other-bo2"].get("kl_to_sft") is None
    header, rows = metrics_rows(results)
    kl = {row[0]: row[header.index("KL to SFT")] for row in rows}
    assert kl["sft-bo2"] == "0.19 (analytic)" and kl["other-bo2"] == "-"


def test_ppo_metrics_and_gradient_do_not_depend_on_the_micro_batch_split():
    # PPO's clip fractions, approx KL and losses were token-weighted already: a guard that they stay so
    from tldr_rlhf.config import PPOConfig
    from tldr_rlhf.train.ppo import ppo_minibatch_step
    from tldr_rlhf.value_model import PolicyAndValue, ValueModel

    policy = make_tiny_qwen2(hidden=16)
    model = PolicyAndValue(policy, ValueModel.from_causal_lm(make_tiny_qwen2(hidden=16, seed=1)))
    r = _group_rollout(policy)
    t = r.mask.shape[1]
    g = torch.Generator().manual_seed(0)
    values, advantages, returns = (torch.randn(4, t, generator=g) * s for s in (0.3, 1.0, 0.5))
    out = []
    for micro in (4, 2):
        model.zero_grad(set_to_none=True)
        cfg = PPOConfig(micro_batch_size=micro, temperature=0.7)
        m = ppo_minibatch_step(model, r, values, advantages, returns, [0, 1, 2, 3], cfg, _accelerator())
        out.append((m, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (one, g_one), (two, g_two) = out
    assert 0.0 < one["ppo/clipfrac"] < 1.0
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    for n in g_one:
        torch.testing.assert_close(g_two[n], g_one[n], atol=1e-8, rtol=1e-5)
