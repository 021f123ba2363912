"""Best-of-n in evaluate (best_of_n.py): the analytic KL and the pick by hand, and an evaluation of a
tiny policy whose best-of-3 is scored by a reward function from tests/reward_fns.py."""

import json

import pytest
import torch

from tldr_rlhf.best_of_n import analytic_kl, best_of_n_names, best_of_n_spec, pick_best
from tldr_rlhf.config import EvaluateConfig, TldrDataArgs
from tldr_rlhf.errors import DataError

from rl_fixtures import POSTS, make_checkpoints, one_thread


def test_analytic_kl_by_hand():
    # log n - (n - 1) / n: n = 1 -> 0; n = 4 -> 1.386294 - 0.75 = 0.636294; n = 16 -> 2.772589 - 0.9375 = 1.835089
    assert analytic_kl(1) == 0.0
    assert analytic_kl(4) == pytest.approx(0.636294, abs=1e-6)
    assert analytic_kl(16) == pytest.approx(1.835089, abs=1e-6)
    with pytest.raises(ValueError):
        analytic_kl(0)


def test_pick_best_prefers_eos_then_reward_then_the_first():
    rewards = torch.tensor([[0.2, 1.7, 0.5], [3.0, 1.0, 2.0], [0.1, 0.1, -2.0], [1.7, 1.7, 0.3]])
    has_eos = torch.tensor([[True, True, True], [False, True, True], [False, False, False], [True, True, False]])
    # post 0: highest reward 1.7; post 1: 3.0 has no EOS, so 2.0 of those with EOS; post 2: none has EOS,
    # so the reward alone, first of the tied 0.1s; post 3: a tie at 1.7, the first
    assert pick_best(rewards, has_eos).tolist() == [1, 2, 0, 0]


def test_best_of_n_reward_and_policies_defaults():
    assert best_of_n_spec(EvaluateConfig(rm_path="r", judge_rm_path="j")) == ("j", "--judge-rm-path")
    assert best_of_n_spec(EvaluateConfig(rm_path="r", reward="rouge-l")) == ("rouge-l", "--reward")
    assert best_of_n_spec(EvaluateConfig(rm_path="r", reward="rouge-l", best_of_n_reward="length:-1")) == ("length:-1", "--best-of-n-reward")
    with pytest.raises(DataError, match="--best-of-n needs a reward"):
        best_of_n_spec(EvaluateConfig())
    assert best_of_n_names({"sft": "a", "ppo": "b"}, ()) == ["sft", "ppo"]
    with pytest.raises(DataError, match="'dpo' is not one of the policies"):
        best_of_n_names({"sft": "a"}, ("dpo",))


def test_evaluate_best_of_n_of_sft(qwen_tokenizer, tmp_path):
    from tldr_rlhf.evaluate import evaluate, metrics_rows

    sft, _ = make_checkpoints(qwen_tokenizer)
    cfg = EvaluateConfig(
        policies=(f"sft={sft}",), sft_path=sft, reward="reward_fns:chars", best_of_n=3,
        data=TldrDataArgs(train=str(POSTS), valid_fraction=0.1, max_query_length=64),
        num_posts=4, response_length=5, batch_size=4, greedy=False, kl=False, num_threads=1, output_dir=str(tmp_path / "ev"),
    )
    with one_thread():
        results = evaluate(cfg)
    bo = results["policies"]["sft-bo3"]
    assert bo["best_of_n"]["n"] == 3 and bo["best_of_n"]["base"] == "sft" and bo["best_of_n"]["reward"] == "reward_fns:chars"
    # log 3 - 2/3 = 1.098612 - 0.666667 = 0.431946, the KL to SFT since the base is the SFT policy
    assert bo["kl_best_of_n"] == pytest.approx(0.431946, abs=1e-6) and bo["kl_to_sft"] == bo["kl_best_of_n"]
    # the kept summaries are the ones the best-of-n reward scored: --reward (the same function) agrees
    assert bo["reward"] == pytest.approx(bo["best_of_n"]["best_reward_mean"], abs=1e-5)
    assert bo["best_of_n"]["best_reward_mean"] >= bo["best_of_n"]["candidate_reward_mean"]
    recs = [json.loads(l) for l in (tmp_path / "ev" / "summaries.jsonl").read_text().splitlines()]
    assert all(r["summaries"]["sft-bo3"]["reward"] == len(r["summaries"]["sft-bo3"]["text"]) for r in recs)
    header, rows = metrics_rows(results)
    kl_col = header.index("KL to SFT")
    assert [row[0] for row in rows] == ["sft", "sft-bo3", "reference"] and rows[1][kl_col] == "0.43 (analytic)"
