"""Rollouts on tiny models built from a config with the real Qwen2.5 tokenizer (pad == EOS)."""

import math

import pytest
import torch
from torch import nn

from tldr_rlhf.data.tldr import format_query, load_posts
from tldr_rlhf.generation import generate
from tldr_rlhf.modeling import response_logits
from tldr_rlhf.ops import token_logprobs
from tldr_rlhf.rollout import apply_no_eos_penalty, rollout, rollout_stats

from rl_fixtures import POSTS, make_tiny_qwen2


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok(qwen_tokenizer):
    return qwen_tokenizer


@pytest.fixture(scope="module")
def queries(tok):
    posts = load_posts(POSTS, limit=4)
    return [format_query(tok, p.subreddit, p.title, p.post, max_query_length=80)[1] for p in posts]


def tiny_lm(tok, seed=0):
    return make_tiny_qwen2(seed=seed).eval()


def two_token_lm(tok, other_id, eos_bias=0.0):
    """A model whose next-token logits are a constant bias: EOS (``eos_bias``) and ``other_id`` (0)
    are the only tokens with non-negligible probability; every other token has logit -1e4."""
    m = tiny_lm(tok)
    head = nn.Linear(64, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        head.bias[other_id] = 0.0
        head.bias[tok.eos_token_id] = eos_bias
    m.lm_head = head
    return m


def length_score(input_ids, attention_mask):
    """Score = real tokens in query + response (a hand-checkable stand-in for the reward model)."""
    return attention_mask.sum(-1).float()


def test_nplus_23_no_eos_penalty():
    s = apply_no_eos_penalty(torch.tensor([0.3, 2.0, -4.0]), torch.tensor([True, False, True]), -1.0)
    assert s.tolist() == pytest.approx([0.3, -1.0, -4.0])


def test_no_eos_penalty_none_keeps_every_score():
    # None = no EOS trick (TRL's missing_eos_penalty=None): the response without EOS keeps its 1.7
    scores, has_eos = torch.tensor([0.3, 1.7, -4.1]), torch.tensor([True, False, True])
    assert torch.equal(apply_no_eos_penalty(scores, has_eos, None), scores)
    assert apply_no_eos_penalty(scores, has_eos, -1.3).tolist() == pytest.approx([0.3, -1.3, -4.1])
    from tldr_rlhf.gold import gold_with_penalty

    assert gold_with_penalty([0.3, 1.7], [True, False], None) == pytest.approx([0.3, 1.7])
    assert gold_with_penalty([0.3, 1.7], [True, False], -1.0) == pytest.approx([0.3, -1.0])


def test_nplus_19_eos_truncation_pad_after_eos_and_penalty(tok, queries):
    other = tok.encode(" the")[0]
    # EOS logit 0.7 ln(1/4): at temperature 0.7, P(EOS) = (1/4) / (1/4 + 1) = 0.2 per step
    pol = two_token_lm(tok, other, eos_bias=0.7 * math.log(0.25))
    torch.manual_seed(1)  # a seed whose 8 rows hold both kinds (any seed: P(mix) = 0.91)
    r = rollout(pol, pol, length_score, queries * 2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, response_length=6, batch_size=8)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    q_lens = [len(q) for q in queries * 2]
    assert r.has_eos.any() and not r.has_eos.all()  # P(no EOS in 6 steps) = 0.8^6 = 0.26
    for b in range(len(r)):
        resp = r.batch.responses[b].tolist()
        n = int(r.lengths[b])
        real = resp[:n]
        if r.has_eos[b]:
            # " the" ... " the" EOS, then pad (== EOS id here, so the mask, not the ids, marks the end)
            assert real == [other] * (n - 1) + [eos]
            assert r.raw_scores[b].item() == q_lens[b] + n and r.scores[b].item() == q_lens[b] + n
        else:
            assert real == [other] * 6 and n == 6
            assert r.scores[b].item() == -1.0  # the EOS trick
        assert all(t == pad for t in resp[n:])
        assert r.mask[b].tolist() == [True] * n + [False] * (r.mask.shape[1] - n)
    # log-probs at the sampling temperature: log 0.2 on EOS, log 0.8 on " the" (at temperature 1 they
    # would be log 0.2749 and log 0.7251)
    is_eos = r.batch.responses == eos
    torch.testing.assert_close(r.logprobs[r.mask & is_eos], torch.full_like(r.logprobs[r.mask & is_eos], math.log(0.2)))
    torch.testing.assert_close(r.logprobs[r.mask & ~is_eos], torch.full_like(r.logprobs[r.mask & ~is_eos], math.log(0.8)))
    stats = rollout_stats(r)
    assert stats["objective/eos_rate"] == pytest.approx(r.has_eos.float().mean().item())
    # entropy -(0.2 ln 0.2 + 0.8 ln 0.8) = 0.500402 nats per token
    assert stats["objective/entropy"] == pytest.approx(0.500402, abs=1e-5)


def test_nplus_19_response_without_eos_is_full_length_and_penalized(tok, queries):
    pol = two_token_lm(tok, tok.encode(" the")[0], eos_bias=-1e4)  # EOS never sampled
    r = rollout(pol, pol, length_score, queries, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, response_length=5, no_eos_penalty=-1.5)
    assert r.lengths.tolist() == [5] * len(queries) and not r.has_eos.any()
    assert r.scores.tolist() == [-1.5] * len(queries)


def test_nplus_19_min_new_tokens_is_refused(tok, queries):
    # with EOS set, min_new_tokens masks EOS out entirely: the seeds' pitfall
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate(tiny_lm(tok), queries[:1], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, min_new_tokens=3)


def test_nplus_21_logprobs_at_temperature_equal_between_rollout_and_training_pass(tok, queries):
    pol, ref = tiny_lm(tok, seed=0), tiny_lm(tok, seed=1)
    torch.manual_seed(3)
    r = rollout(pol, ref, length_score, queries * 2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, response_length=7, temperature=0.7, batch_size=3)
    # training pass: other rows per forward (a shuffled minibatch of 3), train mode, with grad
    pol.train()
    rows = torch.tensor([5, 0, 2])
    sub = r.select(rows)
    logits = response_logits(pol, sub.batch.input_ids, sub.batch.attention_mask, sub.batch.query_width)
    train_lp = token_logprobs(logits, sub.batch.responses, 0.7)
    assert train_lp.requires_grad
    assert torch.equal(train_lp.detach(), r.logprobs[rows])  # same tokens, same weights -> same numbers
    # and they are the tempered distribution's log-probs, not temperature 1's
    assert not torch.allclose(token_logprobs(logits, sub.batch.responses, 1.0).detach()[sub.mask], r.logprobs[rows][sub.mask])
    # the reference model's log-probs come from the reference model
    with torch.no_grad():
        ref_lp = token_logprobs(response_logits(ref, sub.batch.input_ids, sub.batch.attention_mask, sub.batch.query_width), sub.batch.responses, 0.7)
    assert torch.equal(ref_lp, r.ref_logprobs[rows])
