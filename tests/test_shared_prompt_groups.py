"""Each prompt computed once per group (GRPO / RLOO, issue 15): sampling, scoring and training on the
shared prompt give the numbers of full rows, for Qwen2, Llama (SmolLM2's architecture) and GPT-2
(absolute positions), tiny models built from a config.

Tolerances. The exact numbers are the full rows in float64. A float32 path (full rows, or the query
once and the responses on its cache) adds the same terms in another order, so it agrees with them up
to float32 rounding only: every value sums contributions of the n positions it depends on, rounding
errors of n terms add up like a random walk, eps32 * sqrt(n) times the magnitude, and 4x that is the
bound: ``4 * eps32 * sqrt(n) * max|x|`` (the bound of test_dpo's shared-prompt test). Two float32
paths compared with each other (no float64 reference) get twice it. n is the row length P + T for a
log-prob (it depends on its own row only) and rows x (P + T) for a gradient entry (every weight sees
every position of the batch).
"""

import copy
import math

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tldr_rlhf.config import GRPOConfig
from tldr_rlhf.data.batching import QueryResponseBatch, collate_query_response
from tldr_rlhf.generation import generate, generate_groups
from tldr_rlhf.lm_head import expand_cache, grouped_response_logits, query_groups
from tldr_rlhf.modeling import kv_cache_kwargs, response_logits
from tldr_rlhf.ops import position_ids_from_mask, token_logprobs
from tldr_rlhf.rollout import response_logprobs, score_batch
from tldr_rlhf.train import group_rl

from conftest import EOS, make_tiny_qwen2
from rl_fixtures import model_reward, one_thread

EPS32 = torch.finfo(torch.float32).eps
SMALL_EOS = 299  # EOS of the 300-token Llama and GPT-2


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=SMALL_EOS, pad_token_id=SMALL_EOS)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, bos_token_id=SMALL_EOS, eos_token_id=SMALL_EOS)).eval()


FAMILIES = {"qwen2": (lambda: make_tiny_qwen2(hidden=32).eval(), EOS), "llama": (tiny_llama, SMALL_EOS), "gpt2": (tiny_gpt2, SMALL_EOS)}
QUERIES = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28]]  # P = 9: 3 and 6 pad columns on the left


def bound(n: int, magnitude: float, paths: int = 1) -> float:
    return paths * 4 * EPS32 * math.sqrt(n) * magnitude


def shifted_response_logprobs(model, batch: QueryResponseBatch, temperature: float) -> torch.Tensor:
    """Full-row log-probs with the response positions one too far: the bug the tolerance must catch."""
    pos = position_ids_from_mask(batch.attention_mask)
    pos[:, batch.query_width:] += 1
    t = batch.input_ids.shape[1] - batch.query_width
    keep = torch.arange(batch.query_width - 1, batch.query_width - 1 + t)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), position_ids=pos, logits_to_keep=keep).logits
    return token_logprobs(logits, batch.responses, temperature)


# ------------------------------------------------------------------------------------------------
# 1. generation


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_groups_samples_like_generate_and_its_logprobs_equal_an_unshared_recompute(family):
    make, eos = FAMILIES[family]
    model, g = make(), 3
    # batch_size 6 = 2 prompts a chunk: the first chunk expands a 2-row cache (copy), the second a
    # 1-row cache (a stride-0 view)
    torch.manual_seed(1)
    first, _ = generate_groups(model, QUERIES, g, eos_token_id=eos, pad_token_id=eos, max_new_tokens=8, batch_size=6)
    eos = first[0][2]  # a token the model does sample: row 0 ends at its 3rd token, the EOS trick runs
    torch.manual_seed(1)
    responses, logps = generate_groups(model, QUERIES, g, eos_token_id=eos, pad_token_id=eos, max_new_tokens=8, batch_size=6)
    torch.manual_seed(1)
    plain = generate(model, [q for q in QUERIES for _ in range(g)], eos_token_id=eos, pad_token_id=eos, max_new_tokens=8, batch_size=6)
    # the same sampler on the same distribution draws the same tokens from the same seed; rows are
    # group-contiguous (row r answers query r // G) and end at their first EOS
    assert responses == plain and len(responses) == 9 and len(responses[0]) == 3 and responses[0][-1] == eos
    assert all(len(r) == 8 or r[-1] == eos for r in responses) and any(len(r) == 8 for r in responses)
    batch = collate_query_response([q for q in QUERIES for _ in range(g)], responses, eos)
    full, _ = response_logprobs(model, batch, temperature=0.7)
    sampled = torch.zeros_like(full)
    for r, lp in enumerate(logps):
        sampled[r, : len(lp)] = torch.tensor(lp)
    m = batch.response_mask
    # two float32 paths (decode steps on the cache vs full rows), n = P + T = 17 positions per row
    tol = bound(batch.input_ids.shape[1], full[m].abs().max().item(), paths=2)
    assert (sampled - full)[m].abs().max().item() <= tol
    # the tolerance catches responses placed one position too far
    assert (shifted_response_logprobs(model, batch, 0.7) - full)[m].abs().max().item() > tol


def test_generate_groups_without_sharing_is_generate_on_repeated_queries():
    model = make_tiny_qwen2(hidden=32).eval()
    torch.manual_seed(3)
    out, logps = generate_groups(model, QUERIES[:2], 2, eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=4, shared_prompt=False)
    torch.manual_seed(3)
    assert logps is None and out == generate(model, [QUERIES[0]] * 2 + [QUERIES[1]] * 2, eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        generate_groups(model, QUERIES, 2, eos_token_id=EOS, pad_token_id=EOS, temperature=0.0)


# ------------------------------------------------------------------------------------------------
# the pieces: which rows share a query, the expanded cache


def test_query_groups_by_hand():
    # queries A = [1, 2], B = [3], A, A, B; row 5 has the ids of B with one more real column: the
    # id 0 on its left is a real token (pad = EOS may be a real token too), so it is not B
    a, b = [1, 2], [3]
    batch = collate_query_response([a, b, a, a, b, [0, 3]], [[7]] * 6, 0)
    first, index = query_groups(batch)
    assert first.tolist() == [0, 1, 5] and index.tolist() == [0, 1, 0, 0, 1, 2]
    # a shuffled part of two groups: first rows in order of appearance
    sub = QueryResponseBatch(batch.input_ids[[1, 0, 4]], batch.attention_mask[[1, 0, 4]], batch.response_mask[[1, 0, 4]], batch.query_width)
    first, index = query_groups(sub)
    assert first.tolist() == [0, 1] and index.tolist() == [0, 1, 0]


def test_expand_cache_is_a_view_for_one_query_and_a_selection_otherwise():
    model = tiny_llama()
    for q, index in ((1, [0, 0, 0, 0]), (2, [0, 0, 1, 1, 1])):
        cache = DynamicCache()
        model(input_ids=torch.tensor(QUERIES[0][:4]).repeat(q, 1) + torch.arange(q)[:, None], use_cache=True, **kv_cache_kwargs(model, cache))
        before = [layer.keys for layer in cache.layers]
        expand_cache(cache, torch.tensor(index))
        for k0, layer in zip(before, cache.layers):
            assert layer.keys.shape[0] == len(index) and torch.equal(layer.keys, k0[index])
            if q == 1:  # no memory: the same storage, stride 0 along the rows
                assert layer.keys.data_ptr() == k0.data_ptr() and layer.keys.stride(0) == 0 and layer.values.stride(0) == 0
            else:
                assert layer.keys.data_ptr() != k0.data_ptr()


# ------------------------------------------------------------------------------------------------
# 3. training: values and gradients, whole groups and split groups


def group_batch(eos):
    """2 prompts x G = 3, queries 5 and 8 tokens (P = 8), responses 1 to 5 tokens (T = 5), rows
    group-contiguous."""
    queries = [QUERIES[0][:5], QUERIES[2][:8]]
    responses = [[30, 31, eos], [32, 33, 34, 35, 36], [37], [40, 41, 42, eos], [43, eos], [44, 45, 46, 47, 48]]
    return collate_query_response([q for q in queries for _ in range(3)], responses, eos)


def _loss(logits, batch, weights):
    lp = token_logprobs(logits, batch.responses, 0.7) * batch.response_mask
    return lp, (lp.sum(1) * weights).sum()


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_logits_losses_and_gradients_equal_full_rows(family):
    make, eos = FAMILIES[family]
    model = make()
    batch = group_batch(eos)
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0])  # advantages of a sequence loss

    def run(m, fn, micro):
        m.zero_grad()
        lps, total = torch.zeros(batch.response_mask.shape, dtype=torch.float64), 0.0
        for rows in micro:
            sub = QueryResponseBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.response_mask[rows], batch.query_width)
            lp, loss = _loss(fn(m, sub), sub, weights[rows].to(next(m.parameters()).dtype))
            loss.backward()
            lps[rows], total = lp.detach().double(), total + loss.item()
        return lps, total, [p.grad.double() for p in m.parameters()]

    full_rows = lambda m, b: response_logits(m, b.input_ids, b.attention_mask, b.query_width)
    exact_lp, exact_loss, exact_grads = run(copy.deepcopy(model).double(), full_rows, [list(range(6))])
    m = batch.response_mask
    lp_tol = bound(batch.input_ids.shape[1], exact_lp[m].abs().max().item())
    n_batch = batch.input_ids.numel()  # 6 rows x 13 positions = 78: 35 eps32 * max|x|
    splits = {
        "one pass": [list(range(6))],
        "whole groups": [[0, 1, 2], [3, 4, 5]],  # one query each: the expanded cache is a view
        "split groups": [[5, 0, 3], [2, 4, 1]],  # shuffled rows, parts of both groups in each micro-batch
    }
    for name, micro in splits.items():
        for fn in (full_rows, grouped_response_logits):
            lp, loss, grads = run(model, fn, micro)
            assert (lp - exact_lp)[m].abs().max().item() <= lp_tol, (name, fn)
            assert abs(loss - exact_loss) <= bound(n_batch, abs(exact_loss) + weights.abs().sum().item() * exact_lp.abs().max().item())
            for a, r in zip(grads, exact_grads):
                assert (a - r).abs().max().item() <= bound(n_batch, r.abs().max().item()), (name, fn)
    # the gradient reaches the shared query from every response: the embedding of a token that is
    # only in query 0 has a gradient, and it differs from the one of response 0 alone
    emb = model.get_input_embeddings().weight
    model.zero_grad()
    _loss(grouped_response_logits(model, batch), batch, weights)[1].backward()
    g_all = emb.grad[QUERIES[0][0]].clone()
    model.zero_grad()
    one = QueryResponseBatch(batch.input_ids[:1], batch.attention_mask[:1], batch.response_mask[:1], batch.query_width)
    _loss(grouped_response_logits(model, one), one, weights[:1])[1].backward()
    assert g_all.abs().max() > 0 and not torch.allclose(g_all, emb.grad[QUERIES[0][0]])
    # the tolerance catches responses one position too far
    shifted = shifted_response_logprobs(model, batch, 0.7)
    assert (shifted.double() - exact_lp)[m].abs().max().item() > lp_tol


# ------------------------------------------------------------------------------------------------
# 2. scoring passes: reward model, policy / reference log-probs


def test_score_groups_with_the_shared_prompt_equal_full_rows():
    from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel

    torch.manual_seed(1)
    rm = ScalarRewardModel(RewardModelConfig(text_config=make_tiny_qwen2(hidden=32).config)).eval()
    score_fn = model_reward(rm)
    batch = group_batch(EOS)
    full = score_batch(score_fn, batch, batch_size=6)
    calls = []
    spy = lambda ids, att, **kw: calls.append(kw) or score_fn(ids, att, **kw)
    spy.shares_prompt = True
    for batch_size in (6, 4):  # one chunk of 2 groups; chunks of 1 group (4 // 3 = 1 prompt)
        calls.clear()
        shared = group_rl.score_groups(spy, batch, 3, batch_size=batch_size)
        assert [c["num_queries"] for c in calls] == ([2] if batch_size == 6 else [1, 1]) and calls[0]["query_width"] == 8
        # the reward is read at the EOS after n = 13 positions; two float32 paths
        assert (shared - full).abs().max().item() <= bound(batch.input_ids.shape[1], full.abs().max().item(), paths=2)
    # scores land on their own rows: scores of distinct responses differ and follow them
    assert len(set(full.tolist())) == 6
    perm = [3, 4, 5, 0, 1, 2]  # the groups swapped
    swapped = QueryResponseBatch(batch.input_ids[perm], batch.attention_mask[perm], batch.response_mask[perm], batch.query_width)
    assert torch.allclose(group_rl.score_groups(score_fn, swapped, 3, batch_size=6), full[perm], atol=1e-6)


def test_the_stages_reward_spec_shares_the_prompt_when_every_term_is_a_reward_model(qwen_tokenizer):
    """The RL stages score with ``reward.specs.RLReward`` (``rl_common``), also for ``--rm-path``: with
    only reward-model terms it takes the shared-prompt layout, so each query runs once per group (a
    spec that did not say so scored every query G times: RLOO's scoring pass took 2-2.7x longer on the
    real SmolLM2); with a text term it keeps full rows."""
    from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel
    from tldr_rlhf.reward.specs import RLReward, Term

    torch.manual_seed(1)
    rm = ScalarRewardModel(RewardModelConfig(text_config=make_tiny_qwen2(hidden=32).config)).eval()
    reward = RLReward([Term("rm", 1.7, "model", model=rm)], qwen_tokenizer, [], device=torch.device("cpu"))
    assert reward.shares_prompt
    seen = []
    rm.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((kwargs["input_ids"].shape[0], kwargs.get("num_queries"))), with_kwargs=True)
    batch = group_batch(EOS)
    full = 1.7 * score_batch(model_reward(rm), batch, batch_size=6)
    seen.clear()
    shared = group_rl.score_groups(reward, batch, 3, batch_size=6)
    assert seen == [(6, 2)]  # one forward of the 6 rows of 2 groups, each query computed once
    assert (shared - full).abs().max().item() <= bound(batch.input_ids.shape[1], full.abs().max().item(), paths=2)
    mixed = RLReward([Term("rm", 1.0, "model", model=rm), Term("length", 0.1, "builtin")], qwen_tokenizer, [], device=torch.device("cpu"))
    assert not mixed.shares_prompt


def test_shared_group_rollout_equals_the_unshared_one(qwen_tokenizer):
    from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel

    policy, ref = make_tiny_qwen2(hidden=32).eval(), make_tiny_qwen2(seed=5, hidden=32).eval()
    torch.manual_seed(1)
    score_fn = model_reward(ScalarRewardModel(RewardModelConfig(text_config=policy.config)).eval())
    out = {}
    for shared in (False, True):
        # 6 rows a pass on both sides (2 prompts, then 1): the sampler draws in the same shapes
        cfg = GRPOConfig(group_size=3, forward_batch_size=6, response_length=5, shared_prompt=shared)
        torch.manual_seed(7)
        out[shared] = group_rl.group_rollout(policy, ref, score_fn, QUERIES, cfg, eos=EOS, pad=EOS)
    (a, extra_a), (b, extra_b) = out[False], out[True]
    assert extra_a == {} and set(extra_b) == {"perf/generation_time_s", "perf/scoring_time_s"}
    assert torch.equal(a.batch.input_ids, b.batch.input_ids) and torch.equal(a.mask, b.mask) and torch.equal(a.has_eos, b.has_eos)
    m, n = a.mask, a.batch.input_ids.shape[1]
    for name in ("logprobs", "ref_logprobs", "entropy"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x - y)[m].abs().max().item() <= bound(n, x[m].abs().max().item(), paths=2), name
    assert (a.scores - b.scores).abs().max().item() <= bound(n, a.scores.abs().max().item(), paths=2)
