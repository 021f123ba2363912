"""Issue 26's "what must hold": ``tldr-rlhf evaluate`` on a posts file and several final/ folders reports
each policy's reward paired with the policy named "sft" on the same posts (mean difference, SE, t), in
eval.json and eval_table.md; the paired statistics worked out by hand."""

import json

import pytest

from tldr_rlhf.paired import format_paired, paired_differences

from rl_fixtures import POSTS, one_thread


def test_paired_differences_by_hand():
    got = paired_differences({"sft": [0.2, 0.3, 0.1], "rl": [0.27, 0.2, 0.2], "reference": [1.0, 1.0, 1.0]})
    # diffs [0.07, -0.1, 0.1]: mean 0.07 / 3 = 0.023333; sd sqrt(((0.046667)^2 + (0.123333)^2 + (0.076667)^2) / 2)
    # = sqrt(0.011633) = 0.107858, SE 0.107858 / sqrt(3) = 0.062272, t 0.023333 / 0.062272 = 0.374701
    assert set(got) == {"rl"}
    r = got["rl"]
    assert (r["n"], r["mean"], r["mean_diff"], r["se"], r["t"]) == pytest.approx((3, 0.67 / 3, 0.07 / 3, 0.0622718, 0.374701), abs=1e-6)
    assert paired_differences({"rl": [0.1]}) == {}
    with pytest.raises(ValueError, match="'rl' has 1 scores, 'sft' 2: not paired"):
        paired_differences({"sft": [0.1, 0.2], "rl": [0.1]})
    assert "| rl | 3 | 0.2233 | 0.0233 | 0.0623 | 0.37 |" in format_paired(got)


def test_evaluate_pairs_every_final_folder_with_sft_on_a_posts_file(ckpts, tmp_path):
    from tldr_rlhf.config import EvaluateConfig, TldrDataArgs
    from tldr_rlhf.evaluate import evaluate

    sft, _ = ckpts
    # the command: tldr-rlhf evaluate --policies sft=SFT/final rloo-s1=.../final grpo-s1=.../final --sft-path SFT/final
    #   --reward rouge-l --greedy --data.train POSTS.jsonl --data.valid POSTS.jsonl --num-posts 0
    cfg = EvaluateConfig(
        policies=(f"sft={sft}", f"rloo-s1={sft}", f"grpo-s1={sft}"), sft_path=sft, reward="rouge-l", greedy=True,
        data=TldrDataArgs(train=str(POSTS), valid=str(POSTS), max_query_length=64), num_posts=4, response_length=5, batch_size=2,
        kl=False, num_threads=1, output_dir=str(tmp_path / "ev"),
    )
    with one_thread():
        results = evaluate(cfg)
    recs = [json.loads(l) for l in (tmp_path / "ev" / "summaries.jsonl").read_text().splitlines()]
    assert len(recs) == 4
    paired = results["paired_vs_sft"]
    assert set(paired) == {"rloo-s1", "grpo-s1"}
    # the same checkpoint under three names: identical greedy summaries, every difference 0, SE 0, t undefined
    for name in paired:
        assert (paired[name]["n"], paired[name]["mean_diff"], paired[name]["se"], paired[name]["t"]) == (4, 0.0, 0.0, None)
        assert paired[name]["mean"] == pytest.approx(sum(r["summaries"]["sft"]["reward"] for r in recs) / 4, abs=1e-9)
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["paired_vs_sft"] == paired
    assert "Paired with sft on the same posts" in (tmp_path / "ev" / "eval_table.md").read_text()
