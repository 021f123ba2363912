"""Shared RL set-up: prompt order (reshuffled every pass), linear anneal, prompt loading errors."""

import pytest
import torch

from tldr_rlhf.config import TldrDataArgs
from tldr_rlhf.errors import DataError
from tldr_rlhf.tasks import rl_prompts as load_prompts
from tldr_rlhf.train.rl_common import linear_anneal, prompt_order

from rl_fixtures import POSTS


def test_nplus_17_prompts_reshuffled_each_time_they_run_out():
    # 5 prompts, batches of 2: each pass holds 2 batches (the 5th prompt of the pass is dropped), then
    # a fresh permutation starts; 5 updates = 2 full passes + 1 batch of the third.
    order = prompt_order(5, 2, seed=0, num_updates=5)
    assert len(order) == 5 and all(len(b) == 2 for b in order)
    passes = [order[0] + order[1], order[2] + order[3]]
    assert all(len(set(p)) == 4 for p in passes)  # no prompt twice within a pass
    assert passes[0] != passes[1]  # reshuffled
    assert prompt_order(5, 2, seed=0, num_updates=5) == order  # a pure function: resume and all processes agree
    with pytest.raises(DataError, match="fewer than one rollout batch"):
        prompt_order(3, 4, seed=0, num_updates=1)


def test_nplus_16_linear_anneal_per_update():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-6)
    sched = linear_anneal(opt, num_updates=4)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # N+: lr * (1 - (update - 1) / num_updates) for updates 1..4
    assert lrs == pytest.approx([3e-6, 2.25e-6, 1.5e-6, 0.75e-6])


def test_load_prompts_reports_bad_records(tmp_path, qwen_tokenizer):
    bad = tmp_path / "posts.jsonl"
    bad.write_text('{"id": "a", "subreddit": "x", "title": "t", "post": "p", "summary": "s"}\n{"id": "b", "subreddit": "x", "title": "t"}\n')
    with pytest.raises(DataError, match=r"posts.jsonl:2.*'post'"):
        load_prompts(TldrDataArgs(train=str(bad), valid_fraction=0.0), qwen_tokenizer)
    prompts, truncated = load_prompts(TldrDataArgs(train=POSTS, limit=3, max_query_length=64, valid_fraction=0.0), qwen_tokenizer)
    assert len(prompts) == 3 and all(len(p.query_ids) <= 64 for p in prompts) and truncated >= 1
    assert qwen_tokenizer.decode(prompts[0].query_ids).startswith("SUBREDDIT: r/")


def _updates(scores, kls, eos=1.0, entropy=1.0):
    return [{"step": i + 1, "objective/scores": s, "objective/kl": k, "objective/eos_rate": eos, "objective/entropy": entropy} for i, (s, k) in enumerate(zip(scores, kls))]


def test_nplus_23_collapse_signals_on_hand_made_runs():
    from tldr_rlhf.train.rl_common import collapse_signals

    healthy = _updates([0.0, 0.1, 0.2, 0.1, 0.3, 0.4, 0.5, 0.4, 0.6, 0.7], [0, 1, 1, 2, 2, 3, 3, 3, 4, 4])
    assert collapse_signals(healthy) == []
    # score falls below the first window's mean by more than its spread (0.4) while KL rises
    fell = _updates([0.0, 0.4, 0.2, 0.1, 0.3, -0.3, -0.4, -0.2, -0.3, -0.5], [0, 1, 1, 2, 2, 5, 6, 6, 7, 8])
    assert collapse_signals(fell) == ["score fell from 0.200 to -0.340 while KL rose from 1.20 to 6.40"]
    # runaway length: last 5 EOS rates average 0.1; KL over the limit; deterministic sampling
    bad = _updates([0.0] * 6, [30.0] * 6, eos=0.1, entropy=0.01)
    assert collapse_signals(bad) == [
        "EOS rate 0.10 over the last 5 updates (< 0.2): responses run to the length cap",
        "KL to the reference 30.0 nats over the last 5 updates (> 25.0)",
        "entropy 0.010 nats/token over the last 5 updates (< 0.05): degenerate sampling",
    ]
    assert collapse_signals([]) == [] and collapse_signals([{"objective/scores": 1.0}]) == []
