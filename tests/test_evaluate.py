"""Evaluation metrics worked out by hand: ROUGE (checked against rouge-score itself), win rate and
length-controlled win rate on a fixed table of judged pairs, KL from log-probs; held-out post
selection; the metrics table (N+ details 27-28)."""

import json
import math

import pytest
import torch

from tldr_rlhf.config import EvaluateConfig, TldrDataArgs
from tldr_rlhf.errors import DataError
from tldr_rlhf.evaluate import format_table, held_out_posts, metrics_rows, parse_policies
from tldr_rlhf.metrics import kl_from_logprobs, length_controlled_win_rate, outcomes_from_scores, rouge_scores, win_rate

from conftest import POSTS


def test_nplus_28_rouge_by_hand_and_against_rouge_score():
    from rouge_score import rouge_scorer

    # pred "the cat sat on the mat" vs ref "the cat is on the mat": 6 tokens each
    #   unigrams in common: the x2, cat, on, mat = 5 -> P = R = F1 = 5/6
    #   bigrams: pred {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat is, is on, on the, the mat}: 3 shared -> 3/5
    #   LCS "the cat on the mat" = 5 -> 5/6
    # pred "i cheated on my girlfriend" vs ref "my girlfriend cheated on me" (stemmed: cheated -> cheat)
    #   unigrams: cheat, on, my, girlfriend = 4 of 5 -> 4/5; bigrams: {cheat on, my girlfriend} 2 of 4 -> 1/2
    #   LCS: "cheat on" or "my girlfriend" = 2 of 5 -> 2/5
    preds = ["the cat sat on the mat", "i cheated on my girlfriend"]
    refs = ["the cat is on the mat", "my girlfriend cheated on me"]
    got = rouge_scores(preds, refs)
    assert got["rouge1"] == pytest.approx((5 / 6 + 4 / 5) / 2, abs=1e-12)  # 49/60
    assert got["rouge2"] == pytest.approx((3 / 5 + 1 / 2) / 2, abs=1e-12)  # 11/20
    assert got["rougeL"] == pytest.approx((5 / 6 + 2 / 5) / 2, abs=1e-12)  # 37/60
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for k in got:
        assert got[k] == pytest.approx(sum(scorer.score(r, p)[k].fmeasure for p, r in zip(preds, refs)) / 2, abs=1e-12)
    # unequal lengths: pred "the cat sat" (3 tokens) vs the 6-token ref "the cat sat on the mat"
    #   R1: P 3/3, R 3/6 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3; R2: 2 bigrams of 2 and 5 -> F1 = 2 * 1 * 0.4 / 1.4 = 4/7; RL: LCS 3 -> 2/3
    got = rouge_scores(["the cat sat"], ["the cat sat on the mat"])
    assert (got["rouge1"], got["rouge2"], got["rougeL"]) == pytest.approx((2 / 3, 4 / 7, 2 / 3), abs=1e-12)
    # stemming: "cheated" and "cheating" both stem to "cheat"
    assert rouge_scores(["cheated"], ["cheating"])["rouge1"] == 1.0
    assert rouge_scores(["cheated"], ["cheating"], use_stemmer=False)["rouge1"] == 0.0
    assert rouge_scores([""], ["a summary"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])


def test_nplus_27_win_rate_on_a_fixed_table_of_judged_pairs():
    # judge scores (policy, reference): 2 > 1 win, -1 < 0 loss, 0.5 = 0.5 tie, 3 > -3 win
    outcomes = outcomes_from_scores([2.0, -1.0, 0.5, 3.0], [1.0, 0.0, 0.5, -3.0])
    assert outcomes == [1.0, 0.0, 0.5, 1.0]
    # plus an LLM verdict that could not be parsed (None): counted, left out of the rate
    # (2 wins + 0.5 tie) / 4 judged = 0.625
    assert win_rate(outcomes + [None]) == {"win_rate": 0.625, "n": 4, "wins": 2, "losses": 1, "ties": 1, "unparseable": 1}
    assert math.isnan(win_rate([None, None])["win_rate"])
    with pytest.raises(ValueError, match="outcome must be"):
        win_rate([0.3])
    with pytest.raises(ValueError):
        outcomes_from_scores([1.0], [1.0, 2.0])


def test_nplus_27_length_controlled_win_rate_by_hand():
    # 6 pairs where the summary is 12 tokens longer than the reference (40 vs 28): 5 wins, 1 loss;
    # 2 pairs where it is 4 tokens shorter (20 vs 24): 1 win, 1 loss. Raw win rate 6/8 = 0.75.
    # Two distinct differences: the maximum-likelihood logistic fit (l2 = 0) is saturated, it reproduces
    # both groups' rates: a + 12 k = logit(5/6) = ln 5 and a - 4 k = logit(1/2) = 0
    #   -> k = ln 5 / 16 per token, a = ln 5 / 4, LC win rate = sigmoid(ln 5 / 4) = 5^(1/4) / (1 + 5^(1/4)) = 0.59926
    outcomes = [1, 1, 1, 1, 1, 0, 1, 0]
    pol = [40] * 6 + [20] * 2
    ref = [28] * 6 + [24] * 2
    r = length_controlled_win_rate(outcomes, pol, ref, l2=0.0)
    assert r["lc_win_rate"] == pytest.approx(5**0.25 / (1 + 5**0.25), abs=1e-9)
    assert r["intercept"] == pytest.approx(math.log(5) / 4, abs=1e-9)
    assert r["slope_per_token"] == pytest.approx(math.log(5) / 16, abs=1e-9)
    assert r["raw_win_rate"] == 0.75 and r["n"] == 8
    assert r["mean_length_diff"] == 8.0  # (6 * 12 - 2 * 4) / 8
    assert r["extrapolated"] is False  # differences from -4 to +12 surround 0
    # a tie is half a win: the shorter pair [win, loss] as two ties gives the same fit;
    # a pair without a verdict (None) is dropped
    tied = length_controlled_win_rate([1, 1, 1, 1, 1, 0, 0.5, 0.5, None], pol + [99], ref + [1], l2=0.0)
    assert tied["lc_win_rate"] == pytest.approx(r["lc_win_rate"], abs=1e-9) and tied["n"] == 8
    # the default prior (l2 = 1) shrinks the length slope, so less of the raw advantage is explained by length
    shrunk = length_controlled_win_rate(outcomes, pol, ref)
    assert r["lc_win_rate"] < shrunk["lc_win_rate"] < 0.75 and 0 < shrunk["slope_per_token"] < r["slope_per_token"]


def test_length_controlled_win_rate_special_cases():
    # perfect separation by length (longer always wins): the MLE slope is infinite; the prior keeps it
    # finite, and by the symmetry (d, y) -> (-d, 1 - y) of this table the intercept is exactly 0
    sep = length_controlled_win_rate([1, 1, 1, 0, 0, 0], [30] * 3 + [10] * 3, [20] * 6)
    assert sep["lc_win_rate"] == pytest.approx(0.5, abs=1e-12) and math.isfinite(sep["slope_per_token"]) and sep["slope_per_token"] > 0
    assert length_controlled_win_rate([1, 1], [30, 10], [20, 20])["lc_win_rate"] == 1.0  # all wins
    assert length_controlled_win_rate([0, 0.0], [30, 10], [20, 20])["lc_win_rate"] == 0.0  # all losses
    # equal length differences: nothing to extrapolate with; the raw rate, slope 0
    flat = length_controlled_win_rate([1, 0, 1, 1], [25] * 4, [20] * 4)
    assert (flat["lc_win_rate"], flat["slope_per_token"]) == (0.75, 0.0)
    assert math.isnan(length_controlled_win_rate([None], [1], [2])["lc_win_rate"])
    # every summary longer than its reference: the rate at zero difference is an extrapolation, flagged
    assert length_controlled_win_rate([1, 0, 1], [30, 25, 22], [20, 20, 20])["extrapolated"] is True
    with pytest.raises(ValueError, match="lengths differ"):
        length_controlled_win_rate([1, 0], [1], [1, 2])


def test_kl_from_logprobs_by_hand():
    pi = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    sft = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -0.25]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5 (the padded third token is ignored)
    # row 1: 0.5 + 0.5 - 0.25 = 0.75; mean 0.125, population std 0.625
    kl = kl_from_logprobs(pi, sft, mask)
    assert kl == {"kl": pytest.approx(0.125, abs=1e-12), "kl_std": pytest.approx(0.625, abs=1e-12), "n": 2}
    assert kl_from_logprobs(pi, pi, mask)["kl"] == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        kl_from_logprobs(pi, sft[:1], mask)


def test_parse_policies():
    got = parse_policies(["sft=runs/a/final", "runs/ppo-x/final", "/m/SmolLM2.gguf", " dpo = runs/d/final "])
    assert got == {"sft": "runs/a/final", "ppo-x": "runs/ppo-x/final", "SmolLM2": "/m/SmolLM2.gguf", "dpo": "runs/d/final"}
    with pytest.raises(DataError, match="used twice"):
        parse_policies(["a=x", "a=y"])
    with pytest.raises(DataError, match=r"policies\[0\]"):
        parse_policies(["=x"])


def test_held_out_posts_are_the_sft_split_and_queries_that_cannot_fit_are_counted(qwen_tokenizer):
    from tldr_rlhf.data.tldr import load_post_splits

    data = TldrDataArgs(train=str(POSTS), valid_fraction=0.1, max_query_length=64)
    train, valid = load_post_splits(data)
    posts, dropped = held_out_posts(EvaluateConfig(data=data, num_posts=6), [qwen_tokenizer])
    assert len(posts) == 6 and {p.id for p in posts} <= {p.id for p in valid} and not {p.id for p in posts} & {p.id for p in train}
    # the first held-out posts whose title leaves room in 64 tokens, in file order; the others counted
    from tldr_rlhf.data.tldr import format_query

    def fits(p):
        try:
            format_query(qwen_tokenizer, p.subreddit, p.title, p.post, 64)
            return True
        except DataError:
            return False

    scanned = valid[: valid.index(posts[-1]) + 1]
    assert posts == [p for p in scanned if fits(p)] and dropped == sum(not fits(p) for p in scanned) and dropped > 0
    all_posts, _ = held_out_posts(EvaluateConfig(data=data, num_posts=0))
    assert all_posts == valid


def test_metrics_table():
    results = {
        "posts": {"n": 2, "source": "posts.jsonl"},
        "judge_is_training_rm": False,
        "reference": {"mean_length": 20.5, "rm_score": 0.0},
        "policies": {
            "ppo": {
                "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.25, "rm_score": 1.234, "rm_win_rate": 0.9, "judge": {"win_rate": 0.5, "lc": {"lc_win_rate": 0.4, "extrapolated": True}},
                "llm_judge": {"win_rate": 0.75, "n": 4, "unparseable": 1, "failed": 1, "lc": {"lc_win_rate": 0.6}}, "kl_to_sft": 3.14159, "mean_length": 30.25, "eos_rate": 1.0,
            },
            "base": {"rouge1": 0.1, "rouge2": 0.0, "rougeL": 0.1, "mean_length": 63.0, "eos_rate": 0.0},
        },
    }
    header, rows = metrics_rows(results)
    assert header[6] == "judge win"
    assert rows[0] == ["ppo", "0.300", "0.100", "0.250", "1.234", "0.900", "0.500", "0.400*", "0.750 (4, 2)", "0.600", "3.14", "30.2", "1.00"]
    assert rows[1] == ["base", "0.100", "0.000", "0.100", "-", "-", "-", "-", "-", "-", "-", "63.0", "0.00"]
    assert rows[2][0] == "reference" and rows[2][4] == "0.000" and rows[2][11] == "20.5"
    table = format_table(results)
    assert table.startswith("2 held-out posts from posts.jsonl") and "| ppo | 0.300 |" in table
    # a KL asked for but not measured is said under the table, not just shown as "-"
    results["policies"]["base"].update(kl_to_sft=None, kl_to_sft_note="tokenizer differs from the SFT policy's")
    assert format_table(results).endswith("\n\nKL to SFT of base not measured: tokenizer differs from the SFT policy's")


@pytest.mark.slow
def test_evaluate_the_real_smollm2_gguf_on_real_posts(tmp_path):
    """The base policy of the cpu-smol pipeline (a .gguf file) through ``evaluate``: real summaries,
    and its KL to itself (as the SFT policy) exactly 0."""
    from tldr_rlhf.evaluate import evaluate

    from conftest import SMOL_GGUF

    cfg = EvaluateConfig(
        policies=(f"base={SMOL_GGUF}",), sft_path=str(SMOL_GGUF), data=TldrDataArgs(train=str(POSTS), max_query_length=256, valid_fraction=0.1),
        num_posts=2, response_length=24, batch_size=2, output_dir=str(tmp_path), num_threads=1,
    )
    res = evaluate(cfg)
    m = res["policies"]["base"]
    assert res["posts"]["n"] == 2 and m["kl_to_sft"] == 0.0 and 0 < m["mean_length"] <= 24
    assert 0.0 <= m["rouge1"] <= 1.0 and "rm_score" not in m
    lines = (tmp_path / "summaries.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(l)["summaries"]["base"]["text"] for l in lines)


def test_evaluate_refuses_bad_inputs_before_loading_any_model(tmp_path):
    from tldr_rlhf.config import JudgeArgs
    from tldr_rlhf.errors import ModelLoadError
    from tldr_rlhf.evaluate import evaluate
    from tldr_rlhf.judge import JudgeError

    from conftest import SMOL_GGUF

    base = dict(data=TldrDataArgs(train=str(POSTS)), output_dir=str(tmp_path / "ev"))
    with pytest.raises(DataError, match="no policies"):
        evaluate(EvaluateConfig(**base))
    with pytest.raises(ModelLoadError, match="policy 'ppo': model path does not exist: runs/none/final"):
        evaluate(EvaluateConfig(policies=(f"base={SMOL_GGUF}", "ppo=runs/none/final"), **base))
    with pytest.raises(ModelLoadError, match="--rm-path"):
        evaluate(EvaluateConfig(policies=(f"base={SMOL_GGUF}",), rm_path=str(tmp_path / "no-rm"), **base))
    # nothing listens on port 9: the judge is checked before any summary is generated
    dead = JudgeArgs(url="http://127.0.0.1:9/v1", retries=0, timeout_s=2)
    with pytest.raises(JudgeError, match="does not answer"):
        evaluate(EvaluateConfig(policies=(f"base={SMOL_GGUF}",), judge=dead, **base))
    assert not (tmp_path / "ev").exists()


def test_evaluate_refuses_a_model_of_the_wrong_kind_before_generating_anything(tmp_path, qwen_tokenizer, monkeypatch):
    """A policy as --rm-path (or a reward model among the policies) is named with its flag and what it
    is, from config.json, before any summary is generated or anything is written."""
    from rl_fixtures import make_checkpoints

    from tldr_rlhf import evaluate as ev
    from tldr_rlhf.errors import ModelLoadError

    sft, rm = make_checkpoints(qwen_tokenizer)
    monkeypatch.setattr(ev, "run_policy", lambda *a, **k: pytest.fail("generated summaries before checking the models"))
    base = dict(data=TldrDataArgs(train=str(POSTS), max_query_length=128), num_posts=2, output_dir=str(tmp_path / "ev"))
    with pytest.raises(ModelLoadError, match=rf"^--rm-path {sft} is a causal LM policy, not a reward model$"):
        ev.evaluate(EvaluateConfig(policies=(f"a={sft}", f"b={sft}"), rm_path=sft, **base))
    with pytest.raises(ModelLoadError, match=rf"^--judge-rm-path {sft} is a causal LM policy, not a reward model$"):
        ev.evaluate(EvaluateConfig(policies=(f"a={sft}",), rm_path=rm, judge_rm_path=sft, **base))
    with pytest.raises(ModelLoadError, match=rf"^--policies b={rm} is a reward model, not a policy$"):
        ev.evaluate(EvaluateConfig(policies=(f"a={sft}", f"b={rm}"), rm_path=rm, **base))
    with pytest.raises(ModelLoadError, match=rf"^--sft-path {rm} is a reward model, not a policy$"):
        ev.evaluate(EvaluateConfig(policies=(f"a={sft}",), sft_path=rm, **base))
    assert not (tmp_path / "ev").exists()


def test_a_crash_keeps_the_summaries_of_the_policies_done_and_a_rerun_reuses_them(tmp_path, qwen_tokenizer, monkeypatch):
    """A crash while evaluating policy 2 leaves policy 1's summaries on disk; the rerun generates only
    policies 2 and 3 and gives exactly the results of an uninterrupted run. A changed checkpoint or
    changed settings are generated again."""
    import os
    import shutil

    from rl_fixtures import make_checkpoints

    from tldr_rlhf import evaluate as ev

    sft, _ = make_checkpoints(qwen_tokenizer)
    a = tmp_path / "a"
    shutil.copytree(sft, a)
    real = ev.run_policy
    calls: list[str] = []

    def counting(name, *args, crash_on=None, **kw):
        calls.append(name)
        if name == crash_on:
            raise RuntimeError("killed")
        return real(name, *args, **kw)

    base = dict(
        policies=(f"a={a}", f"b={sft}", f"c={sft}"), sft_path=sft, data=TldrDataArgs(train=str(POSTS), valid_fraction=0.1, max_query_length=64),
        num_posts=2, response_length=3, batch_size=2, greedy=True, num_threads=1,
    )
    out = tmp_path / "ev"
    monkeypatch.setattr(ev, "run_policy", lambda name, *x, **k: counting(name, *x, crash_on="b", **k))
    with pytest.raises(RuntimeError, match="killed"):
        ev.evaluate(EvaluateConfig(**base, output_dir=str(out)))
    assert calls == ["a", "b"] and not (out / "eval.json").exists()
    assert sorted(f.name for f in (out / "policies").iterdir()) == ["a.jsonl"]  # no half-written file of b
    lines = (out / "policies" / "a.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["policy"] == "a"
    assert all(json.loads(line)["response"] and "kl_logprobs" in json.loads(line) for line in lines[1:])

    calls.clear()
    monkeypatch.setattr(ev, "run_policy", counting)
    resumed = ev.evaluate(EvaluateConfig(**base, output_dir=str(out)))
    assert calls == ["b", "c"]  # a's summaries (and KL sample) were not generated again
    assert resumed["policies"]["a"]["summaries_reused"] == str(out / "policies" / "a.jsonl") and "summaries_reused" not in resumed["policies"]["b"]
    fresh = ev.evaluate(EvaluateConfig(**base, output_dir=str(tmp_path / "fresh")))
    strip = lambda res: {n: {k: v for k, v in m.items() if k not in ("seconds", "summaries_reused")} for n, m in res["policies"].items()}
    assert strip(resumed) == strip(fresh)  # reused summaries and KL log-probs give the uninterrupted run's results
    assert (out / "summaries.jsonl").read_text() == (tmp_path / "fresh" / "summaries.jsonl").read_text()

    calls.clear()
    ev.evaluate(EvaluateConfig(**base, output_dir=str(out)))
    assert calls == []  # everything reused
    os.utime(a / "model.safetensors", ns=(1, 1))  # a's checkpoint changed
    ev.evaluate(EvaluateConfig(**base, output_dir=str(out)))
    assert calls == ["a"]
    calls.clear()
    ev.evaluate(EvaluateConfig(**{**base, "response_length": 4}, output_dir=str(out)))  # other settings
    assert calls == ["a", "b", "c"]
