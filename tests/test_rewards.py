"""Rewards beyond a reward model (reward/specs.py): built-ins worked out by hand, weighted sums, a callable
from a test module (tests/reward_fns.py), one-line errors, and a GRPO / PPO run scored by them."""

import json

import pytest
import torch

from tldr_rlhf import cli
from tldr_rlhf.data.batching import collate_query_response
from tldr_rlhf.errors import ConfigError, RewardError
from tldr_rlhf.reward.specs import RLReward, check_reward_spec, parse_reward, score_texts

import reward_fns
from rl_fixtures import POSTS, one_thread

# ROUGE-L F1 = 2PR / (P + R) with P = LCS / |response|, R = LCS / |reference| (words, lower-cased, stemmed)
CASES = [
    # LCS "the cat on mat" = 4 of 6 and 6 words: P = R = 4/6, F = 2/3
    ("the cat lay on a mat", "The cat sat on the mat.", 2 / 3),
    # LCS "cat" = 1: P = 1/1, R = 1/3, F = 2 (1/3) / (4/3) = 0.5
    ("cat", "the cat sat", 0.5),
    # LCS of "my homework ate the dog" and "my dog ate my homework" is 2 ("my homework", "my dog", "my ate"): F = 0.4
    ("my homework ate the dog", "my dog ate my homework", 0.4),
    ("", "anything at all", 0.0),  # an empty response scores 0
]


def test_rouge_l_by_hand():
    resp, refs, want = zip(*CASES)
    got = score_texts(parse_reward("rouge-l"), [""] * 4, list(resp), list(refs))
    assert got.tolist() == pytest.approx(want, abs=1e-6)


def test_rouge_1_post_scores_against_the_post_body_not_the_title_or_reference():
    # post "my cat ate the fish today" (6 unigrams), response "the cat ate a big fish" (6): 4 shared
    # (cat, ate, the, fish) -> P = R = 4/6, F1 = 2/3. The title's "big" must not count (against the whole
    # query the value would differ); the reference is ignored (None is allowed).
    query = "SUBREDDIT: r/cats\n\nTITLE: big cat\n\nPOST: my cat ate the fish today\n\nTL;DR:"
    got = score_texts(parse_reward("rouge-1-post"), [query, "SUBREDDIT: r/x\n\nTITLE: y\n\nPOST: fish ate cat\n\nTL;DR:"],
                      ["the cat ate a big fish", "the cat ate a big fish"], [None, "unrelated reference"])
    # second: post "fish ate cat", P = 3/6, R = 3/3 -> F1 = 2 * 0.5 * 1 / 1.5 = 2/3 as well
    assert got.tolist() == pytest.approx([2 / 3, 2 / 3], abs=1e-6)
    got = score_texts(parse_reward("rouge-1-post:0.3"), [query], ["my cat ate the fish"], [None])
    # P = 5/5, R = 5/6 -> F1 = 10/11 = 0.90909..., times 0.3 = 0.272727...
    assert got.tolist() == pytest.approx([0.3 * 10 / 11], abs=1e-6)


def test_length_is_words_and_weighted_sum_by_hand():
    resp, refs, _ = zip(*CASES)
    assert score_texts(parse_reward("length"), [""] * 4, list(resp), list(refs)).tolist() == [6.0, 1.0, 5.0, 0.0]
    # rouge-l:1.0,length:-0.01 -> 2/3 - 0.06 = 0.60667, 0.5 - 0.01 = 0.49, 0.4 - 0.05 = 0.35, 0 - 0 = 0
    got = score_texts(parse_reward("rouge-l:1.0,length:-0.01"), [""] * 4, list(resp), list(refs))
    assert got.tolist() == pytest.approx([2 / 3 - 0.06, 0.49, 0.35, 0.0], abs=1e-6)
    # a term without weight counts once; weights may be written 2.5e-1
    got = score_texts(parse_reward("rouge-l, length:2.5e-1"), [""] * 4, list(resp), list(refs))
    assert got.tolist() == pytest.approx([2 / 3 + 1.5, 0.75, 0.4 + 1.25, 0.0], abs=1e-6)


def test_spec_parsing_kinds_and_weights(tmp_path):
    terms = parse_reward("reward_fns:marks:-0.5,rouge-l," + str(tmp_path))
    assert [(t.text, t.weight, t.kind) for t in terms] == [("reward_fns:marks", -0.5, "callable"), ("rouge-l", 1.0, "builtin"), (str(tmp_path), 1.0, "model")]
    assert [(t.text, t.weight, t.kind) for t in parse_reward("org/rm-model:3")] == [("org/rm-model", 3.0, "model")]


def test_callable_gets_queries_responses_references():
    reward_fns.CALLS.clear()
    terms = check_reward_spec("reward_fns:marks:2,length:0.1")
    got = score_texts(terms, ["q1", "q2"], ["wow!!", "fine"], ["ref", None])
    # marks: 1.5 * 2 + 0.25 = 3.25 and 0 + 0 = 0; x 2, plus 0.1 x words (1, 1)
    assert got.tolist() == pytest.approx([6.6, 0.1], abs=1e-6)
    assert reward_fns.CALLS == [(["q1", "q2"], ["wow!!", "fine"], ["ref", None])]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("reward_fns:one_short", "--reward reward_fns:one_short: returned 2 values for 3 responses"),
        ("reward_fns:with_nan", "--reward reward_fns:with_nan: returned nan for response 1 (2 of 3 not finite)"),
        ("reward_fns:raises", "--reward reward_fns:raises: raised KeyError: 'no such field'"),
        ("reward_fns:words", "--reward reward_fns:words: returned list \"['a', 'a', 'a']\", expected 3 floats"),
    ],
)
def test_a_bad_reward_function_is_one_line_naming_the_flag(spec, message):
    with pytest.raises(RewardError) as e:
        score_texts(check_reward_spec(spec), ["q"] * 3, ["a", "b", "c"], ["r"] * 3)
    assert str(e.value) == message


def test_rouge_without_reference_is_one_line():
    with pytest.raises(RewardError, match=r"^--reward rouge-l: raised ValueError: response 1 has no reference text"):
        score_texts(parse_reward("rouge-l"), ["q", "q"], ["a", "b"], ["a", None])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("rouge-l:nan", "--reward rouge-l:nan: weight 'nan' of 'rouge-l' must be a finite number"),
        ("rouge-l,,length", "--reward rouge-l,,length: empty term (expected TERM[:WEIGHT],TERM[:WEIGHT],...)"),
        ("no_such_module_xyz:f", "--reward no_such_module_xyz:f: cannot import module 'no_such_module_xyz': ModuleNotFoundError: No module named 'no_such_module_xyz'"),
        ("reward_fns:not_callable", "--reward reward_fns:not_callable: module 'reward_fns' has no callable 'not_callable'"),
        ("rouge_l", "--reward rouge_l: not a built-in (rouge-l, rouge-1, rouge-2, rouge-1-post, length), a module:function, nor an existing reward-model path"),
        ("./runs/nothing/final", "--reward ./runs/nothing/final: reward-model path does not exist"),
    ],
)
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError) as e:
        check_reward_spec(spec)
    assert str(e.value) == message


def test_rl_reward_decodes_rows_and_finds_references(qwen_tokenizer):
    from tldr_rlhf.data.tldr import Prompt

    tok = qwen_tokenizer
    q1, q2 = tok.encode("SUBREDDIT: r/cats\n\nTL;DR:"), tok.encode("TL;DR:")
    prompts = [Prompt("a", q1, "The cat sat on the mat."), Prompt("b", q2, "the cat sat")]
    r1 = tok.encode(" the cat lay on a mat") + [tok.eos_token_id]
    r2 = tok.encode(" cat")  # no EOS
    batch = collate_query_response([q1, q2, [1, 2, 3]], [r1, r2, r2], tok.pad_token_id)
    reward = RLReward(check_reward_spec("rouge-l,reward_fns:has_reference:0.5"), tok, prompts, device=torch.device("cpu"))
    assert reward.texts(batch) == (
        ["SUBREDDIT: r/cats\n\nTL;DR:", "TL;DR:", tok.decode([1, 2, 3])],
        ["the cat lay on a mat", "cat", "cat"],
        ["The cat sat on the mat.", "the cat sat", None],
    )
    # third row: a query none of the prompts have -> no reference -> rouge-l fails with one line
    with pytest.raises(RewardError, match="no reference text"):
        reward.score_rows(batch)
    sub = collate_query_response([q1, q2], [r1, r2], tok.pad_token_id)
    assert reward.score_rows(sub).tolist() == pytest.approx([2 / 3 + 0.5, 0.5 + 0.5], abs=1e-6)


def _rl_common(sft, out):
    from tldr_rlhf.config import OptimArgs, RunArgs, TldrDataArgs

    return dict(
        sft_path=sft, dtype="float32",
        data=TldrDataArgs(train=str(POSTS), limit=8, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), save_every=0, eval_every=1, progress=False, num_threads=1),
        forward_batch_size=8, response_length=6, num_sample_posts=8, no_eos_penalty=-1.7,
    )


def test_grpo_run_scored_by_a_weighted_text_reward_with_the_eos_trick(ckpts, tmp_path):
    from tldr_rlhf.config import GRPOConfig
    from tldr_rlhf.train import grpo

    out = tmp_path / "grpo"
    cfg = GRPOConfig(**_rl_common(ckpts[0], out), reward="length:0.5,reward_fns:has_reference:2.0", rollout_prompts=2, group_size=4,
                     micro_batch_size=2, total_episodes=8, mini_batch_size=4, update_per_rollout=1)
    with one_thread():
        grpo.train(cfg)
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["reference"] for s in samples)
    for s in samples:
        # raw score: 0.5 x words of the response + 2.0 (the reference was found by its query ids)
        assert s["raw_score"] == pytest.approx(0.5 * len(s["response"].split()) + 2.0, abs=1e-6)
        assert s["score"] == (s["raw_score"] if s["has_eos"] else pytest.approx(-1.7))
    assert not all(s["has_eos"] for s in samples)  # 6 tokens of a random tiny model: the penalty was exercised


def test_ppo_with_a_text_reward_and_no_reward_model(ckpts, tmp_path):
    from safetensors.torch import load_file

    from tldr_rlhf.config import PPOConfig
    from tldr_rlhf.train import ppo

    out = tmp_path / "ppo"
    cfg = PPOConfig(**_rl_common(ckpts[0], out), reward="rouge-l", rollout_batch_size=4, micro_batch_size=2, total_episodes=4, ppo_epochs=1)
    with one_thread():
        final = ppo.train(cfg)
    (u,) = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in l]
    assert u["ppo/first_minibatch_ratio_max_abs_dev"] == 0.0
    assert 0.0 <= u["objective/raw_scores"] <= 1.0  # ROUGE-L F1
    before, after = load_file(f"{ckpts[0]}/model.safetensors"), load_file(f"{final}/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "config.json").read_text())["reward"] == "rouge-l"


def test_cli_bad_reward_is_one_line(ckpts, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "run"
    argv = ["grpo", "--sft-path", ckpts[0], "--reward", "rouge-l:inf", "--data.train", str(POSTS), "--run.output-dir", str(out)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "tldr-rlhf: error: --reward rouge-l:inf: weight 'inf' of 'rouge-l' must be a finite number\n"
    argv = ["rloo", "--sft-path", ckpts[0], "--reward", f"{ckpts[0]},length", "--data.train", str(POSTS), "--run.output-dir", str(out)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: --reward {ckpts[0]} is a causal LM policy, not a reward model\n"
    assert not out.exists()


def test_evaluate_scores_summaries_and_reference_with_a_reward_mixing_text_and_model_terms(ckpts, tmp_path):
    from tldr_rlhf.config import EvaluateConfig, TldrDataArgs
    from tldr_rlhf.evaluate import evaluate, metrics_rows
    from tldr_rlhf.metrics import rouge_scores

    sft, rm = ckpts
    cfg = EvaluateConfig(
        policies=(f"sft={sft}",), rm_path=rm, reward=f"rouge-l:2,length:-0.1,{rm}:0.5", data=TldrDataArgs(train=str(POSTS), valid_fraction=0.1, max_query_length=64),
        num_posts=3, response_length=5, batch_size=2, kl=False, num_threads=1, output_dir=str(tmp_path / "ev"),
    )
    with one_thread():
        results = evaluate(cfg)
    recs = [json.loads(l) for l in (tmp_path / "ev" / "summaries.jsonl").read_text().splitlines()]
    assert len(recs) == 3
    for rec in recs:
        s = rec["summaries"]["sft"]
        want = 2 * rouge_scores([s["text"]], [rec["reference"]])["rougeL"] - 0.1 * len(s["text"].split()) + 0.5 * s["rm_score"]
        assert s["reward"] == pytest.approx(want, abs=1e-5)
        # the reference against itself: ROUGE-L 1
        assert rec["reference_reward"] == pytest.approx(2.0 - 0.1 * len(rec["reference"].split()) + 0.5 * rec["reference_rm_score"], abs=1e-5)
    assert results["policies"]["sft"]["reward"] == pytest.approx(sum(r["summaries"]["sft"]["reward"] for r in recs) / 3, abs=1e-6)
    header, rows = metrics_rows(results)
    assert header[6] == f"reward (rouge-l:2,length:-0.1,{rm}:0.5)" and rows[0][6] == format(results["policies"]["sft"]["reward"], ".3f")
    assert rows[-1][0] == "reference" and rows[-1][6] == format(results["reference"]["reward"], ".3f")
