"""``tldr-rlhf export-rm``: the exported stock classifier scores real comparisons like our reward model.

Scores are compared on real TL;DR comparisons (query + summary + EOS, several rows of different
lengths batched with padding): the stock class's ``logits[:, 0] + config.score_bias`` equals our
``ScalarRewardModel``'s score within 1e-4, loaded with ``AutoModelForSequenceClassification`` and no
``trust_remote_code``, for a Qwen2 and a Llama backbone.
"""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

from conftest import COMPARISONS, EOS, QWEN_TOKENIZER
from rl_fixtures import STAGE_HIDDEN, make_checkpoints, one_thread
from tldr_rlhf import cli
from tldr_rlhf.data.comparisons import load_comparisons
from tldr_rlhf.data.tldr import format_query, format_response
from tldr_rlhf.export import ExportRMArgs, export_reward_model, pick_pad_token
from tldr_rlhf.modeling import load_tokenizer
from tldr_rlhf.reward.loading import load_reward_checkpoint, save_reward_model
from tldr_rlhf.reward.reward_model import RewardModelConfig, ScalarRewardModel, score

FIM_PAD = 151662  # <|fim_pad|> in Qwen2.5's vocabulary
BIAS = 0.37  # a normalized head: bias = -reward_offset


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(QWEN_TOKENIZER))


def _normalized_copy(tok, src, dst, text_config=None):
    """Our reward model saved to ``dst`` with a nonzero head bias, as normalization leaves it."""
    if text_config is None:
        model = load_reward_checkpoint(src, tokenizer=tok)
    else:
        torch.manual_seed(3)
        model = ScalarRewardModel(RewardModelConfig(text_config=text_config))
    with torch.no_grad():
        model.score.bias.fill_(BIAS)
    model.config.reward_offset = -BIAS
    model.config.normalization = {"n": 8, "mean_before": -BIAS, "std_before": 0.5, "source": "test"}
    save_reward_model(model, tok, dst)
    return str(dst)


def _rows(tok, n=6):
    """(query ids + response ids ending in EOS) for the chosen and rejected summaries of n real comparisons."""
    comparisons, _ = load_comparisons(COMPARISONS, limit=n)
    rows = []
    for c in comparisons:
        query = format_query(tok, c.query_fields["subreddit"], c.query_fields["title"], c.query_fields["post"], 96)[1]
        rows += [query + format_response(tok, c.chosen), query + format_response(tok, c.rejected)]
    assert len({len(r) for r in rows}) > 1  # padding is exercised
    return rows


def _pad(rows, pad_id, side):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    return ids, mask


def _check_export(tok, rm, out, arch):
    result = export_reward_model(ExportRMArgs(rm, str(out)))
    assert result["architecture"] == arch and result["pad_token"] == "<|fim_pad|>" and result["pad_token_id"] == FIM_PAD
    assert result["score_bias"] == pytest.approx(BIAS, abs=1e-7)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] != "tldr_rlhf_reward" and "auto_map" not in config and not list(out.glob("*.py"))
    assert (config["pad_token_id"], config["eos_token_id"], config["num_labels"] if "num_labels" in config else len(config["id2label"])) == (FIM_PAD, EOS, 1)
    stock = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(stock).__name__ == arch
    ours = load_reward_checkpoint(rm, tokenizer=tok).eval()
    rows = _rows(tok)
    with torch.no_grad():
        ids, mask = _pad(rows, EOS, "right")
        want = score(ours, ids, mask)
        assert want.std() > 1e-3  # distinct scores: a wrong read position would show
        for side in ("right", "left"):
            got = stock(*_pad(rows, FIM_PAD, side)).logits[:, 0] + stock.config.score_bias
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        # With pad = EOS (as in our checkpoint) the stock class reads the token before the EOS: wrong.
        stock.config.pad_token_id = EOS
        wrong = stock(*_pad(rows, EOS, "right")).logits[:, 0] + BIAS
        assert (wrong - want).abs().max() > 1e-3
        stock.config.pad_token_id = FIM_PAD
        # The user's path (README.md): text + EOS through the exported tokenizer, padded by it.
        out_tok = AutoTokenizer.from_pretrained(str(out))
        assert (out_tok.pad_token_id, out_tok.eos_token_id) == (FIM_PAD, EOS)
        texts = [tok.decode(r) for r in rows]
        assert all(t.endswith("<|endoftext|>") for t in texts)
        batch = out_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        assert [r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"])] == rows
        got = stock(**batch).logits[:, 0] + stock.config.score_bias
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    return stock


def test_export_qwen2_scores_equal_ours(tok, tmp_path):
    with one_thread():
        rm = _normalized_copy(tok, make_checkpoints(tok)[1], tmp_path / "rm")
        _check_export(tok, rm, tmp_path / "out", "Qwen2ForSequenceClassification")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Append EOS (`<|endoftext|>`) to each text before scoring.**" in card
    out = tmp_path / "out"
    assert f'AutoModelForSequenceClassification.from_pretrained("{out}")  # no trust_remote_code' in card
    assert "`score_bias` = 0.370000005" in card  # float32(0.37) to 9 digits
    assert "the mean raw score of 8 (query, reference summary) pairs, -0.37, was subtracted (`reward_offset` = -0.37; std before 0.5)" in card


def test_export_llama_backbone(tok, tmp_path):
    """SmolLM2 is a Llama: a tiny Llama-backbone reward model exports as LlamaForSequenceClassification."""
    text = LlamaConfig(
        vocab_size=151665, hidden_size=STAGE_HIDDEN, intermediate_size=2 * STAGE_HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=EOS, eos_token_id=EOS, bos_token_id=None,
    )
    with one_thread():
        rm = _normalized_copy(tok, None, tmp_path / "rm", text_config=text)
        _check_export(tok, rm, tmp_path / "out", "LlamaForSequenceClassification")


def test_export_refuses_a_policy_and_a_used_folder(tok, tmp_path, capsys):
    sft, rm = make_checkpoints(tok)
    assert cli.main(["export-rm", sft, str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: {sft} is a policy (causal LM); export-rm converts the final/ of a `tldr-rlhf rm` run\n"
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert cli.main(["export-rm", rm, str(tmp_path / "used")]) == 2
    assert capsys.readouterr().err == f"tldr-rlhf: error: {tmp_path / 'used'} exists and is not empty; give a new folder\n"
    assert not (tmp_path / "out").exists()


def test_pad_token_choice():
    qwen = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
    qwen.pad_token = qwen.eos_token
    assert pick_pad_token(qwen) == "<|fim_pad|>"
    qwen.pad_token = "<|video_pad|>"
    assert pick_pad_token(qwen) == "<|video_pad|>"  # an own pad distinct from EOS is kept


def test_trl_grpo_accepts_the_export(tok, tmp_path):
    """TRL (in the test extra): GRPOTrainer loads the exported folder as ``reward_funcs`` through the stock
    class, and the README's EOS-appending reward function gives our scores."""
    import trl  # the test extra installs it
    from datasets import Dataset

    with one_thread():
        sft, rm = make_checkpoints(tok)
        out = tmp_path / "rm-export"
        export_reward_model(ExportRMArgs(rm, str(out)))
        args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=2, num_generations=2, max_completion_length=4, max_steps=1, use_cpu=True, report_to=[])
        prompts = ["SUBREDDIT: r/test\n\nTITLE: hello\n\nPOST: a post\n\nTL;DR:"] * 2
        try:
            trainer = trl.GRPOTrainer(model=sft, reward_funcs=str(out), args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
            assert type(trainer.reward_funcs[0]).__name__ == "Qwen2ForSequenceClassification"
        finally:  # the trainer's accelerate state (its mixed precision) would bind the stages run after this test
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        rm_model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
        rm_tok = AutoTokenizer.from_pretrained(str(out))

        def tldr_reward(prompts, completions, **kwargs):  # as in README.md
            texts = [p + c + rm_tok.eos_token for p, c in zip(prompts, completions)]
            batch = rm_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                return (rm_model(**batch).logits[:, 0] + rm_model.config.score_bias).tolist()

        completions = [" short one", " a longer summary of it"]
        ours = load_reward_checkpoint(rm, tokenizer=tok).eval()
        rows = [tok.encode(p + c, add_special_tokens=False) + [EOS] for p, c in zip(prompts, completions)]
        with torch.no_grad():
            want = score(ours, *_pad(rows, EOS, "right"))
        torch.testing.assert_close(torch.tensor(tldr_reward(prompts, completions)), want, atol=1e-4, rtol=0)


def test_export_a_trained_reward_model(tok, tmp_path):
    """A reward model trained 2 steps and normalized by ``tldr-rlhf rm``: its head bias is exactly
    -reward_offset (the pairwise loss gives the bias no gradient), and the export scores like it."""
    from conftest import POSTS
    from tldr_rlhf.config import ModelArgs, OptimArgs, PreferenceDataArgs, RewardNormArgs, RMConfig, RunArgs
    from tldr_rlhf.train import rm as rm_stage

    cfg = RMConfig(
        model=ModelArgs(path=make_checkpoints(tok)[0], dtype="float32"),
        data=PreferenceDataArgs(comparisons=str(COMPARISONS), max_query_length=64, limit=16, valid_limit=4),
        norm=RewardNormArgs(posts=str(POSTS), limit=8),
        optim=OptimArgs(lr=1e-3),
        run=RunArgs(output_dir=str(tmp_path / "run"), progress=False, max_steps=2),
        micro_batch_size=4, gradient_accumulation_steps=1, eval_batch_size=8,
    )
    with one_thread():
        rm_stage.train(cfg)
        final = tmp_path / "run" / "final"
        trained = json.loads((final / "config.json").read_text())
        assert trained["reward_offset"] != 0.0
        result = export_reward_model(ExportRMArgs(str(final), str(tmp_path / "out")))
        assert result["score_bias"] == pytest.approx(-trained["reward_offset"], abs=1e-6)
        stock = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
        ours = load_reward_checkpoint(str(final), tokenizer=tok).eval()
        rows = _rows(tok, 4)
        with torch.no_grad():
            want = score(ours, *_pad(rows, EOS, "right"))
            got = stock(*_pad(rows, FIM_PAD, "right")).logits[:, 0] + stock.config.score_bias
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
