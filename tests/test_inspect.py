"""tldr-rlhf inspect: the numbers behind the colours equal independent full forwards (log-probs of
logits / temperature, per-token KL, reward-model score), colours by hand, the HTML and JSON views."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rl_fixtures import POSTS, STAGE_HIDDEN, make_checkpoints, make_tiny_qwen2

from tldr_rlhf.cli import main
from tldr_rlhf.config import TldrDataArgs
from tldr_rlhf.errors import ConfigError
from tldr_rlhf.inspection import InspectConfig, inspect_policies, kl_rgb, logprob_rgb, render_html
from tldr_rlhf.metrics import kl_from_logprobs
from tldr_rlhf.modeling import load_causal_lm, load_tokenizer
from tldr_rlhf.reward.loading import load_frozen_reward_model
from tldr_rlhf.tasks import query_ids, response_ids

T = 0.7
DATA = TldrDataArgs(train=POSTS, valid=POSTS, max_query_length=96)


@pytest.fixture(scope="module")
def models(qwen_tokenizer):
    sft, rm = make_checkpoints(qwen_tokenizer)
    root = Path(tempfile.mkdtemp(prefix="tldr-inspect-"))
    other = root / "ppo"
    make_tiny_qwen2(seed=3, hidden=STAGE_HIDDEN).save_pretrained(other)
    qwen_tokenizer.save_pretrained(other)
    yield sft, str(other), rm
    shutil.rmtree(root, ignore_errors=True)


def _full_logprobs(path: str, query: list[int], response: list[int]) -> list[float]:
    """log softmax(logits / T) of each response token from one unpadded forward of query + response."""
    model = load_causal_lm(path).eval()
    ids = torch.tensor([query + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(query) - 1 : len(query) + len(response) - 1].float() / T
    return F.log_softmax(logits, -1)[torch.arange(len(response)), torch.tensor(response)].tolist()


def test_numbers_behind_the_colours_equal_independent_forwards(models):
    sft, ppo, rm = models
    cfg = InspectConfig(policies=(f"sft={sft}", f"ppo={ppo}"), reference=sft, rm_path=rm, data=DATA, num_posts=2, response_length=6, temperature=T)
    records = inspect_policies(cfg)
    tok = load_tokenizer(sft)
    reward_model = load_frozen_reward_model(rm)
    assert len(records) == 2
    for rec in records:
        post = next(p for p in _posts() if p.id == rec["id"])
        query = query_ids(tok, post, DATA)
        for name, path in (("sft", sft), ("ppo", ppo)):
            p = rec["policies"][name]
            assert p["tokens"] == [tok.decode([i]) for i in p["ids"]]
            assert "".join(t for t, i in zip(p["tokens"], p["ids"]) if i != tok.eos_token_id).strip() == p["text"].strip()
            want = _full_logprobs(path, query, p["ids"])
            assert p["logprobs"] == pytest.approx(want, abs=2e-5)  # padded batch vs one unpadded row: float32 rounding
            ref = _full_logprobs(sft, query, p["ids"])
            assert p["kl"] == pytest.approx([a - b for a, b in zip(want, ref)], abs=4e-5)
            mask = torch.ones(1, len(p["ids"]), dtype=torch.bool)
            k1 = kl_from_logprobs(torch.tensor([p["logprobs"]]), torch.tensor([ref]), mask)["kl"]
            assert p["kl_sum"] == pytest.approx(k1, abs=1e-4)
            # the reward model reads " " + summary + EOS after the query, at its EOS
            ids = torch.tensor([query + response_ids(tok, p["text"], DATA)])
            with torch.no_grad():
                score = reward_model(input_ids=ids).rewards[0].item()
            assert p["rm_score"] == pytest.approx(score, abs=1e-5)
        # the reference against itself: every KL term is exactly 0 (same weights, same batch)
        assert rec["policies"]["sft"]["kl"] == [0.0] * len(rec["policies"]["sft"]["ids"])
        assert any(abs(k) > 1e-3 for k in rec["policies"]["ppo"]["kl"])


def _posts():
    from tldr_rlhf.data.tldr import load_posts

    return load_posts(POSTS, "validation")


def test_colours_by_hand():
    assert logprob_rgb(math.log(0.5)) == (230, 230, 60)  # yellow
    assert logprob_rgb(math.log(0.2)) == (230, 128, 60)  # 60 + 340 * 0.2 = 128
    assert logprob_rgb(math.log(0.9)) == (94, 230, 60)  # 230 - 340 * 0.4 = 94
    assert logprob_rgb(0.0) == (60, 230, 60)
    assert kl_rgb(0.7) == (255, 194, 194)  # 255 - 175 * 0.35 = 193.75
    assert kl_rgb(-3.0) == (80, 80, 255) and kl_rgb(0.0) == (255, 255, 255)


def test_cli_writes_html_and_json_and_colours_by_kl(models, tmp_path, capsys):
    sft, ppo, rm = models
    page, numbers = tmp_path / "view.html", tmp_path / "view.json"
    argv = ["inspect", "--policies", f"sft={sft}", f"ppo={ppo}", "--reference", sft, "--rm-path", rm, "--data.train", POSTS, "--data.valid", POSTS,
            "--data.max-query-length", "96", "--response-length", "5", "--html", str(page), "--output", str(numbers)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    records = json.loads(numbers.read_text())
    first = records[0]["policies"]["ppo"]
    assert f"r/{records[0]['subreddit']}: {records[0]['title']}" in out and f"KL {first['kl_sum']:.3f}" in out and "RM score" in out
    text = page.read_text()
    r, g, b = kl_rgb(first["kl"][0])
    assert f"background:rgb({r},{g},{b})' title='log-prob {first['logprobs'][0]:.3f} | KL {first['kl'][0]:.3f}'" in text
    cfg = InspectConfig(policies=(f"ppo={ppo}",), data=DATA)
    plain = render_html(records, cfg)  # no reference: coloured by log-prob
    r, g, b = logprob_rgb(first["logprobs"][0])
    assert f"background:rgb({r},{g},{b})" in plain


def test_bad_inputs_are_one_line(models, capsys):
    sft, ppo, rm = models
    assert main(["inspect", "--policies", f"sft={sft}", "--rm-path", sft, "--data.valid", POSTS]) == 2
    assert "--rm-path" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--policies: give at least one NAME=PATH"):
        inspect_policies(InspectConfig(data=DATA))
