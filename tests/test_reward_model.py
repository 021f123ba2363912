"""Reward model (issue 3): score at the response's EOS under any padding, head init, pairwise loss by
hand, shared-prompt pairs equal full rows, normalization to mean 0, save/load through the Auto classes,
bad comparisons counted, metrics by hand, a real training run on the real comparisons with a tiny
model (resume, evaluate-rm)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import COMPARISONS, CNNDM, EOS, POLICY_SAMPLES, POSTS
from transformers import AutoModelForSequenceClassification

from tldr_rlhf import evaluate_rm
from tldr_rlhf.config import EvaluateRMConfig, ModelArgs, OptimArgs, RMConfig, PreferenceDataArgs as RMDataArgs, RewardNormArgs, RunArgs
from tldr_rlhf.data.batching import collate_pairs, collate_query_response
from tldr_rlhf.data.comparisons import build_preference_examples, load_comparisons, load_judged_samples
from tldr_rlhf.data.tldr import DropCounts
from tldr_rlhf.losses import pairwise_loss
from tldr_rlhf.metrics import comparison_metrics, judge_agreement
from tldr_rlhf.reward.loading import build_reward_model, load_reward_checkpoint, save_reward_model
from tldr_rlhf.ops import left_pad, right_pad
from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel, last_real_index, response_values, score, train_top_layers
from tldr_rlhf.reward.scoring import pair_rewards, score_responses
from tldr_rlhf.tasks import load_references, rm_pairs as load_rm_data
from tldr_rlhf.train import rm


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def reward_model(reward_backbone_dir, qwen_tokenizer):
    """A reward model built the way the stage builds it: backbone of a saved causal LM + fresh head."""
    torch.manual_seed(0)
    return build_reward_model(reward_backbone_dir, tokenizer=qwen_tokenizer).eval()


# query / response token lists: responses end in EOS, which is also the pad id (Qwen).
QUERIES = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33, 34, 35, 36, 37]]
RESPONSES = [[101, 102, EOS], [201, EOS], [301, 302, 303, 304, EOS]]


def _alone(model, q, r):
    ids = torch.tensor([q + r])
    return score(model, ids, torch.ones_like(ids, dtype=torch.bool))[0]


@torch.no_grad()
def test_nplus_11_score_read_at_response_eos_under_left_right_and_query_response_padding(reward_model):
    alone = torch.stack([_alone(reward_model, q, r) for q, r in zip(QUERIES, RESPONSES)])
    full = [q + r for q, r in zip(QUERIES, RESPONSES)]
    left_ids, left_mask = left_pad(full, EOS)
    right_ids, right_mask = right_pad(full, EOS)
    qr = collate_query_response(QUERIES, RESPONSES, EOS)
    for ids, mask in [(left_ids, left_mask), (right_ids, right_mask), (qr.input_ids, qr.attention_mask)]:
        torch.testing.assert_close(score(reward_model, ids, mask), alone, rtol=1e-5, atol=1e-5)
    # The column read is the response's own EOS: the last True of the mask, not the last id != pad.
    assert last_real_index(qr.attention_mask).tolist() == [qr.query_width + len(r) - 1 for r in RESPONSES]
    # Reading "the last token that is not pad" (what library classifiers do) would pick the token
    # before the EOS, and give other scores: the test above would catch it.
    before_eos = [q + r[:-1] for q, r in zip(QUERIES, RESPONSES)]
    wrong = torch.stack([_alone(reward_model, s, []) for s in before_eos])
    assert (wrong - alone).abs().min() > 1e-4


@torch.no_grad()
def test_values_are_the_head_at_every_position_and_response_values_align(reward_model):
    qr = collate_query_response(QUERIES, RESPONSES, EOS)
    out = reward_model(input_ids=qr.input_ids, attention_mask=qr.attention_mask, return_values=True)
    idx = last_real_index(qr.attention_mask)
    torch.testing.assert_close(out.values[torch.arange(3), idx], out.rewards)
    v = response_values(reward_model, qr.input_ids, qr.attention_mask, qr.query_width)
    assert v.shape == qr.response_mask.shape
    torch.testing.assert_close(v, out.values[:, qr.query_width - 1 : -1])


@torch.no_grad()
def test_ppo_value_model_reads_the_same_scores(reward_model):
    """PPO's scalar-head helpers (value_model.py) recognize this model and give the same scores."""
    from tldr_rlhf.value_model import ValueModel, score_at_last_token

    qr = collate_query_response(QUERIES, RESPONSES, EOS)
    torch.testing.assert_close(score_at_last_token(reward_model, qr.input_ids, qr.attention_mask), score(reward_model, qr.input_ids, qr.attention_mask), rtol=1e-5, atol=1e-5)
    vm = ValueModel.from_scalar_model(reward_model)
    torch.testing.assert_close(vm(qr.input_ids, qr.attention_mask, qr.query_width), response_values(reward_model, qr.input_ids, qr.attention_mask, qr.query_width), rtol=1e-5, atol=1e-5)


def test_nplus_10_head_init_std_is_one_over_sqrt_d_plus_1(reward_model):
    d = reward_model.config.text_config.hidden_size  # 64
    expected = 1 / math.sqrt(d + 1)
    draws = []
    for seed in range(200):  # 200 x 64 = 12,800 draws: the std is known to about 0.6%
        torch.manual_seed(seed)
        reward_model.reset_head()
        draws.append(reward_model.score.weight.detach().flatten().clone())
        assert torch.count_nonzero(reward_model.score.bias) == 0
    w = torch.cat(draws)
    assert abs(w.std().item() / expected - 1) < 0.03
    assert abs(w.mean().item()) < 3 * expected / math.sqrt(w.numel())
    assert reward_model.config.head_init_std == pytest.approx(expected)
    # Built from a config (no backbone passed), the head gets the same init.
    torch.manual_seed(0)
    fresh = ScalarRewardModel(RewardModelConfig(text_config=reward_model.config.text_config.to_dict()))
    assert fresh.score.bias.item() == 0.0 and 0.5 * expected < fresh.score.weight.std().item() < 1.5 * expected


def test_pairwise_loss_by_hand():
    chosen = torch.tensor([2.0, 0.5, 0.0])
    rejected = torch.tensor([0.0, 0.5, 1.0])
    # diffs 2, 0, -1: -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147;
    # -log sigmoid(-1) = log(1 + e) = 1.313262; mean = 2.133337 / 3 = 0.711112
    loss, m = pairwise_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.711112, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert m["margin"].item() == pytest.approx(1 / 3)  # (2 + 0 - 1) / 3
    assert m["chosen"].item() == pytest.approx(2.5 / 3) and m["rejected"].item() == pytest.approx(0.5)
    # Normalized by a global pair count (gradient accumulation): sum / 6
    loss6, _ = pairwise_loss(chosen, rejected, num_pairs=6)
    assert loss6.item() == pytest.approx(2.133337 / 6, abs=1e-6)


def test_shared_prompt_gives_the_same_scores_and_gradients_as_full_rows(reward_model):
    chosen, rejected = RESPONSES, [[111, EOS], [211, 212, 213, EOS], [311, EOS]]
    batch = collate_pairs(QUERIES, chosen, rejected, EOS)
    reward_model.train()
    grads, scores = [], []
    for shared in (False, True):
        reward_model.zero_grad()
        r = pair_rewards(reward_model, batch, shared_prompt=shared)
        loss, _ = pairwise_loss(r[:3], r[3:])
        loss.backward()
        scores.append(r.detach())
        grads.append(torch.cat([p.grad.flatten() for p in reward_model.parameters() if p.grad is not None]))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    alone = torch.stack([_alone(reward_model, q, x) for q, x in zip(QUERIES + QUERIES, chosen + rejected)]).detach()
    torch.testing.assert_close(scores[1], alone, rtol=1e-5, atol=1e-5)


def test_nplus_14_normalization_makes_mean_reference_reward_zero(reward_model, qwen_tokenizer, tmp_path):
    refs, report = load_references(RewardNormArgs(posts=str(POSTS), limit=12), qwen_tokenizer, max_query_length=96, max_response_length=133)
    assert report["n"] == len(refs) > 0 and report["query_truncated"] > 0
    before = score_responses(reward_model, refs, pad_token_id=EOS, batch_size=5)
    bias_before = reward_model.score.bias.item()
    record = rm.normalize_rewards(reward_model, refs, pad_token_id=EOS, batch_size=5)
    after = score_responses(reward_model, refs, pad_token_id=EOS, batch_size=4)  # other batching: same scores
    assert abs(after.mean().item()) < 1e-4
    assert record["mean_before"] == pytest.approx(before.double().mean().item(), abs=1e-6)
    assert reward_model.score.bias.item() == pytest.approx(bias_before - record["mean_before"], abs=1e-6)
    torch.testing.assert_close(after, before - record["mean_before"], rtol=0, atol=1e-5)  # a pure shift
    assert reward_model.config.reward_offset == pytest.approx(record["mean_before"])
    assert reward_model.config.normalization["n"] == len(refs)
    # The offset and the shifted bias travel with the checkpoint.
    save_reward_model(reward_model, qwen_tokenizer, tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["reward_offset"] == pytest.approx(record["mean_before"]) and saved["normalization"]["n"] == len(refs)
    reloaded = load_reward_checkpoint(str(tmp_path / "rm")).eval()
    assert abs(score_responses(reloaded, refs, pad_token_id=EOS).mean().item()) < 1e-4


@torch.no_grad()
def test_save_load_through_auto_classes_gives_identical_scores(reward_model, qwen_tokenizer, tmp_path):
    path = tmp_path / "rm"
    save_reward_model(reward_model, qwen_tokenizer, path)
    assert (path / "reward_model.py").is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "tldr_rlhf_reward" and cfg["auto_map"]["AutoModelForSequenceClassification"] == "reward_model.ScalarRewardModel"
    qr = collate_query_response(QUERIES, RESPONSES, EOS)
    expected = score(reward_model, qr.input_ids, qr.attention_mask)
    loaded = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert isinstance(loaded, ScalarRewardModel)
    assert torch.equal(score(loaded, qr.input_ids, qr.attention_mask), expected)
    assert torch.equal(loaded(input_ids=qr.input_ids, attention_mask=qr.attention_mask).logits[:, 0], expected)
    # In a fresh interpreter without this package: trust_remote_code loads the copied reward_model.py.
    torch.save({"ids": qr.input_ids, "mask": qr.attention_mask, "expected": expected}, tmp_path / "batch.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(path)!r}, trust_remote_code=True).eval()\n"
        "assert not any(k.startswith('tldr_rlhf') for k in sys.modules), 'package was imported'\n"
        f"b = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad(): out = m(input_ids=b['ids'], attention_mask=b['mask']).rewards\n"
        "print(type(m).__module__.startswith('transformers_modules'), torch.equal(out, b['expected']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["True", "True"]


def test_train_top_layers_freezes_embeddings_and_lower_blocks(reward_model):
    train_top_layers(reward_model, 1)
    trainable = {n for n, p in reward_model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and "score.bias" in trainable and "backbone.norm.weight" in trainable
    assert any(n.startswith("backbone.layers.1.") for n in trainable)
    assert not any(n.startswith(("backbone.layers.0.", "backbone.embed_tokens")) for n in trainable)


# ----------------------------------------------------------------------------------------------
# Data: bad comparisons are counted, never mislabeled, never fatal midway


def _record(choice, a="first summary", b="second summary", post="A post.\nSecond line.", title="A title", **extra):
    return {"info": {"id": extra.pop("id", "p"), "post": post, "title": title, "subreddit": "test"}, "summaries": [{"text": a, "policy": "x"}, {"text": b, "policy": "y"}], "choice": choice, "split": "valid1", "extra": {"confidence": 7}, **extra}


def test_bad_comparisons_are_counted_and_labels_follow_choice(tmp_path, qwen_tokenizer):
    rows = [
        _record(0, id="a"),
        _record(1, id="b"),
        _record(2, id="c"),  # choice outside {0, 1}
        _record(1.0, id="d"),  # a float label: not trusted
        _record(True, id="e"),  # a bool label: not trusted
        _record(None, id="f"),
        _record(0, a=" same ", b="same", id="g"),  # identical texts
        _record(0, a="   ", id="h"),  # empty summary
        _record(0, post="word " * 400 + "\n" + "tail " * 50, id="i"),  # post over the query cap: truncated, kept
        _record(0, title="long title " * 200, id="j"),  # does not fit even with an empty post
        _record(1, b="x " * 300, id="k"),  # response over the cap
    ]
    rows.append({**_record(0, id="l"), "info": {"id": "l", "post": None, "title": None, "subreddit": None, "site": "cnn", "article": "An article."}})  # hub-style CNN/DM row
    rows.append({**_record(0, id="m"), "info": {"id": "m", "post": "P.", "title": "T", "subreddit": "s", "site": None, "article": None}})  # hub-style TL;DR row
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    comps, drops = load_comparisons(f)
    assert drops.counts == {"choice_not_0_or_1": 4, "identical_summaries": 1, "empty_summary": 1}
    by_id = {c.post_id: c for c in comps}
    assert by_id["a"].chosen == "first summary" and by_id["a"].rejected == "second summary"
    assert by_id["b"].chosen == "second summary" and by_id["b"].rejected == "first summary"
    assert by_id["l"].is_cnndm and not by_id["m"].is_cnndm
    notes = DropCounts()
    ex, drops = build_preference_examples([c for c in comps if not c.is_cnndm], qwen_tokenizer, max_query_length=128, max_response_length=64, notes=notes)
    assert drops.counts == {"query_does_not_fit": 1, "response_too_long": 1}
    assert notes.counts == {"query_truncated": 1}
    assert sorted(e.post_id for e in ex) == ["a", "b", "i", "m"] and all(len(e.query_ids) <= 128 for e in ex)


def test_load_rm_data_splits_real_comparisons_by_post(qwen_tokenizer):
    data = RMDataArgs(comparisons=str(COMPARISONS), max_query_length=128, valid_limit=0)
    train, valid, report = load_rm_data(data, qwen_tokenizer)
    assert not {e.post_id for e in train} & {e.post_id for e in valid}
    assert report["train"]["n"] == len(train) and report["valid"]["n"] == len(valid)
    assert 0.1 < len(valid) / (len(train) + len(valid)) < 0.3
    assert report["train"]["query_truncated"] > 0  # real posts are longer than 128 tokens
    assert all(e.chosen_ids[-1] == EOS and e.rejected_ids[-1] == EOS for e in train + valid)
    _, valid2, _ = load_rm_data(data, qwen_tokenizer, need_train=False)
    assert [e.post_id for e in valid2] == [e.post_id for e in valid]


def test_judged_samples_real_file():
    samples, drops = load_judged_samples(POLICY_SAMPLES)
    assert len(samples) == 1000 and drops.counts == {"no_judge_verdict": 600}
    assert sum(s.judge_preferred == "policy" for s in samples) == 640
    assert samples[0].query_fields["title"] == "How do you get someone out of your head?"


# ----------------------------------------------------------------------------------------------
# Metrics by hand


def test_comparison_metrics_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, 0.0]])
    m = comparison_metrics(rewards, [9, 9, 1, None], calibration_bins=5)
    assert m["accuracy"] == 0.5 and m["n"] == 4 and m["ties"] == 1
    assert m["margin"] == pytest.approx((1 - 1 + 0 + 3) / 4)
    # loss = mean softplus(-diff): softplus(-1) = 0.313262, softplus(1) = 1.313262, log 2 = 0.693147,
    # softplus(-3) = 0.048587; sum 2.368258 / 4 = 0.592064
    assert m["loss"] == pytest.approx(0.592064, abs=1e-6)
    assert m["accuracy_by_confidence"] == {"1": {"accuracy": 0.0, "n": 1}, "9": {"accuracy": 0.5, "n": 2}}
    # p = sigmoid(|diff|): 0.731, 0.731, 0.5, 0.953 -> bins [0.5, 0.6): 1 (wrong), [0.7, 0.8): 2 (1 right), [0.9, 1]: 1 (right)
    bins = {b["p_low"]: (b["n"], b["accuracy"]) for b in m["calibration"]["bins"]}
    assert bins == {0.5: (1, 0.0), 0.7: (2, 0.5), 0.9: (1, 1.0)}
    p1, p2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-3))
    assert m["calibration"]["ece"] == pytest.approx(0.25 * 0.5 + 0.5 * abs(0.5 - p1) + 0.25 * abs(1 - p2), abs=1e-9)


def test_length_baselines_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.5, 0.4]])  # RM prefers: first, second, first, first
    lengths = torch.tensor([[10, 5], [10, 5], [3, 8], [4, 4]])  # first is longer, longer, shorter, equal
    m = comparison_metrics(rewards, lengths=lengths)
    assert m["longer_wins_accuracy"] == 0.5  # the chosen (first) is longer in rows 0, 1; equal length counts as wrong
    # unequal rows 0-2: the RM picks the longer one in row 0 only (row 1: the shorter second; row 2: the shorter first)
    assert m["rm_prefers_longer"] == pytest.approx(1 / 3)
    j = judge_agreement(rewards, [True, False, False, True], lengths=lengths)
    assert j["longer_agreement"] == 0.5  # "longer first" T, T, F, F vs the judge T, F, F, T
    assert j["judge_prefers_longer"] == pytest.approx(2 / 3)  # rows 0 (first, longer) and 2 (second, longer)
    assert j["rm_prefers_longer"] == pytest.approx(1 / 3)


def test_judge_agreement_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.5, 0.5]])  # RM prefers policy: T, F, T, F (tie)
    j = judge_agreement(rewards, [True, True, False, False])
    assert j["agreement"] == 0.5 and j["n"] == 4 and j["ties"] == 1
    assert j["rm_policy_win_rate"] == 0.5 and j["judge_policy_win_rate"] == 0.5
    assert j["cohen_kappa"] == pytest.approx(0.0)  # (0.5 - 0.5) / (1 - 0.5)


# ----------------------------------------------------------------------------------------------
# A real run: tiny model, real comparisons, real references; resume; evaluate-rm


def _cfg(reward_backbone_dir, out, **run) -> RMConfig:
    return RMConfig(
        model=ModelArgs(path=reward_backbone_dir, dtype="float32"),
        data=RMDataArgs(comparisons=str(COMPARISONS), max_query_length=64, limit=48, valid_limit=16),
        norm=RewardNormArgs(posts=str(POSTS), limit=16),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_ratio=0.1, decay_steps=0),
        run=RunArgs(output_dir=str(out), progress=False, eval_every=2, save_every=2, **run),
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        eval_batch_size=8,
    )


def test_rm_training_run_resume_and_evaluate(reward_backbone_dir, qwen_tokenizer, tmp_path):
    out = tmp_path / "run"
    final = rm.train(_cfg(reward_backbone_dir, out, max_steps=4))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/rm" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss/rm", "rm/accuracy", "rm/margin", "rm/chosen_reward", "rm/rejected_reward", "lr", "grad_norm", "perf/pairs_per_s"):
        assert all(key in r for r in steps), key
    last = records[-1]
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["n"] + sum(report["train"]["dropped"].values()) == 48 and report["train"]["query_truncated"] > 0
    assert last["valid/n"] == report["valid"]["n"] == 16 - sum(report["valid"]["dropped"].values())
    assert abs(last["norm/mean_after"]) < 1e-4 and last["norm/n"] == report["normalization"]["n"]

    # Weights moved away from the causal LM's.
    model = load_reward_checkpoint(final)
    lm = build_reward_model(reward_backbone_dir)
    assert not torch.equal(model.backbone.layers[1].mlp.up_proj.weight, lm.backbone.layers[1].mlp.up_proj.weight)
    assert model.config.normalization["n"] == report["normalization"]["n"]

    # Resume: with final/ gone, the run continues from the step-2 checkpoint (model, optimizer,
    # scheduler, data order, RNG) and replays steps 3-4 with exactly the losses of the first run.
    import shutil

    first = {r["step"]: r["loss/rm"] for r in steps}
    shutil.rmtree(out / "final")
    rm.train(_cfg(reward_backbone_dir, out, max_steps=5))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r["loss/rm"] for r in records if "loss/rm" in r}
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    assert resumed[3] == first[3] and resumed[4] == first[4]

    # evaluate-rm on the same held-out split (read from the run's config.json), CNN/DM and the judge set.
    res = evaluate_rm.evaluate(EvaluateRMConfig(model=final, cnndm=str(CNNDM), max_cnndm_query_length=128, cnndm_limit=6, judge_limit=6, progress=False, batch_size=4))
    assert res["data_from"].endswith("config.json")
    assert res["heldout"]["n"] > 16 and res["cnndm"]["n"] == 6 and res["judge"]["n"] == 6
    assert res["cnndm"]["dropped"] == {"empty_summary": 12}
    assert res["judge"]["dropped"] == {"no_judge_verdict": 600}
    saved = json.loads((out / "eval_rm.json").read_text())
    assert saved["heldout"]["accuracy"] == res["heldout"]["accuracy"]
    assert "accuracy_by_confidence" in saved["heldout"] and saved["heldout"]["calibration"]["bins"]


def test_rm_cli_parses_presets():
    from tldr_rlhf.cli import parse

    fn, cfg = parse(["rm", "--preset", "cpu-smol", "--run.max-steps", "3"])
    assert isinstance(cfg, RMConfig) and cfg.run.max_steps == 3 and cfg.train_layers == 6
    _, seed = parse(["rm"])
    assert seed.model.path == "Qwen/Qwen2.5-1.5B" and seed.micro_batch_size == 8 and seed.gradient_accumulation_steps == 16
    assert seed.optim.lr == 5e-5 and seed.optim.warmup_ratio == 0.03 and seed.optim.betas == (0.9, 0.95) and seed.optim.weight_decay == 0.1
    assert seed.optim.max_grad_norm == 1.0 and seed.optim.optim_8bit == "auto" and seed.epochs == 1
    _, ev = parse(["evaluate-rm", "--preset", "cpu-smol"])
    assert isinstance(ev, EvaluateRMConfig) and ev.judge_limit == 256


def test_evaluate_rm_says_when_an_asked_for_set_yields_nothing(qwen_tokenizer, tmp_path, capsys):
    """A judge file with no verdict at all and a --cnndm file with no CNN/DM record: each asked-for
    set is reported with n 0, its drop counts and a note, in eval_rm.json and in the printout,
    instead of vanishing."""
    from rl_fixtures import make_checkpoints

    _, rm_dir = make_checkpoints(qwen_tokenizer)
    rows = [json.loads(line) for line in POLICY_SAMPLES.read_text().splitlines()[:5]]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({**r, "judge_preferred": None}) + "\n" for r in rows))
    tldr_only = tmp_path / "not_cnndm.jsonl"  # TL;DR comparisons given as --cnndm
    tldr_only.write_text("".join(line + "\n" for line in COMPARISONS.read_text().splitlines()[:3]))
    out = tmp_path / "eval_rm.json"
    res = evaluate_rm.evaluate(EvaluateRMConfig(
        model=rm_dir, data=RMDataArgs(comparisons=str(COMPARISONS), max_query_length=64), valid_limit=4, cnndm=str(tldr_only),
        policy_samples=str(samples), output=str(out), progress=False, batch_size=4,
    ))
    judge_note = "no judged (policy summary, reference) pair left to score: all 5 records were dropped (no judge verdict 5)"
    cnndm_note = "no CNN/DM comparison left to score: all 3 records were dropped (not CNN/DM 3)"
    assert res["judge"] == {"n": 0, "dropped": {"no_judge_verdict": 5}, "query_truncated": 0, "judge": "", "note": judge_note, "source": str(samples)}
    assert res["cnndm"]["n"] == 0 and res["cnndm"]["not_cnndm"] == 3 and res["cnndm"]["note"] == cnndm_note
    saved = json.loads(out.read_text())
    assert saved["judge"] == res["judge"] and saved["cnndm"]["note"] == cnndm_note and saved["heldout"]["n"] == res["heldout"]["n"] > 0
    printed = capsys.readouterr().out
    assert f"agreement with GPT-3.5 judge: {judge_note}" in printed and f"CNN/DM comparisons: {cnndm_note}" in printed


def test_no_usable_comparisons_names_the_file_and_the_drop_counts(qwen_tokenizer, tmp_path):
    """Every comparison dropped (choice 2 everywhere, or every held-out response over the cap): the
    error names the file and the counts by reason, for the reward model and DPO alike, instead of
    blaming valid_fraction."""
    from tldr_rlhf.config import PreferenceDataArgs as DPODataArgs
    from tldr_rlhf.errors import DataError
    from tldr_rlhf.tasks import dpo_pairs as load_dpo_data

    bad = tmp_path / "choice2.json"
    bad.write_text("".join(json.dumps({**json.loads(line), "choice": 2}) + "\n" for line in COMPARISONS.read_text().splitlines()[:40]))
    expected = f"{bad}: no usable comparisons: 0 of 40 kept; dropped: invalid choice 40"
    for need_train in (True, False):
        with pytest.raises(DataError) as e:
            load_rm_data(RMDataArgs(comparisons=str(bad), max_query_length=64), qwen_tokenizer, need_train=need_train)
        assert str(e.value) == expected
    with pytest.raises(DataError) as e:
        load_rm_data(RMDataArgs(comparisons=str(COMPARISONS), valid_comparisons=str(bad), max_query_length=64), qwen_tokenizer, need_train=False)
    assert str(e.value) == expected
    with pytest.raises(DataError) as e:
        load_dpo_data(DPODataArgs(comparisons=str(bad), max_query_length=64), qwen_tokenizer)
    assert str(e.value) == expected
    # a filter rule: every held-out response over a 2-token cap
    with pytest.raises(DataError) as e:
        load_rm_data(RMDataArgs(comparisons=str(COMPARISONS), max_response_length=2, valid_limit=10), qwen_tokenizer, need_train=False)
    assert str(e.value) == f"{COMPARISONS}: no usable held-out comparisons: 0 of 10 kept; dropped: response too long 10"
