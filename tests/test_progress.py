"""Progress with an ETA on long work (issue 27, item 5): ``progress.progress`` is a tqdm bar on a
terminal and a log line every tenth of the work elsewhere; ``evaluate`` (generation, reward-model
scoring), ``generate --posts``, ``inspect`` and ``evaluate-rm`` show it."""

import logging
import re

import pytest

from tldr_rlhf import cli, progress as progress_module
from tldr_rlhf.progress import progress

from conftest import COMPARISONS, POSTS
from rl_fixtures import make_checkpoints

# tqdm's words: "DESC:  40% 10/25 [00:01<00:02,  7.50post/s]" (elapsed < remaining, the ETA)
LINE = re.compile(r"^(?P<desc>.+?):\s+(?P<pct>\d+)% (?P<n>\d+)/(?P<total>\d+) \[\d\d:\d\d<\d\d:\d\d, +[\d.?]+(?:post|s/post|pair|s/pair|pass|s/pass|example|s/example)(?:/s)?\]$")


def _lines(caplog, desc_part: str = "") -> list[re.Match]:
    out = []
    for rec in caplog.records:
        if rec.name == "tldr_rlhf.progress" and desc_part in rec.getMessage():
            m = LINE.match(rec.getMessage())
            assert m, rec.getMessage()
            out.append(m)
    return out


def test_off_a_terminal_a_line_every_tenth_with_the_eta(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "_on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="tldr_rlhf.progress"):
        with progress(25, "scoring sft", unit="post") as bar:
            for _ in range(25):
                bar.update(1)
    lines = _lines(caplog)
    # every 3 posts (a tenth of 25, rounded up) and at the end
    assert [int(m["n"]) for m in lines] == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert all(m["desc"] == "scoring sft" and m["total"] == "25" for m in lines) and lines[-1]["pct"] == "100"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tldr_rlhf.progress"):
        with progress(25, "quiet", unit="post", enabled=False) as bar:  # --no-progress, other processes
            bar.update(25)
    assert caplog.records == []


def test_on_a_terminal_a_tqdm_bar(capsys, monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "_on_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="tldr_rlhf.progress"):
        with progress(4, "generating", unit="post") as bar:
            bar.update(2)
            bar.update(2)
    err = capsys.readouterr().err
    assert "generating: 100%" in err and "4/4" in err and "post/s]" in err
    assert _lines(caplog) == []  # the bar, not log lines


def test_evaluate_shows_generation_and_scoring_progress(qwen_tokenizer, tmp_path, caplog):
    from tldr_rlhf.config import EvaluateConfig, TldrDataArgs
    from tldr_rlhf.evaluate import evaluate

    from rl_fixtures import one_thread

    sft, rm = make_checkpoints(qwen_tokenizer)
    cfg = EvaluateConfig(
        policies=(f"sft={sft}",), sft_path=sft, rm_path=rm, data=TldrDataArgs(train=str(POSTS), valid_fraction=0.1, max_query_length=64),
        num_posts=3, response_length=4, batch_size=2, greedy=True, kl=False, num_threads=1, output_dir=str(tmp_path / "ev"),
    )
    with one_thread(), caplog.at_level(logging.INFO, logger="tldr_rlhf.progress"):
        evaluate(cfg)
    gen = _lines(caplog, "sft: summaries")
    assert [(m["n"], m["total"]) for m in gen] == [("2", "3"), ("3", "3")]  # after each batch (2 posts, then 1): a line every post here
    for name in ("sft", "reference"):
        assert [m["n"] for m in _lines(caplog, f"{name}: reward-model scores")][-1] == "3"


def test_generate_over_a_posts_file_shows_progress(qwen_tokenizer, caplog):
    sft, _ = make_checkpoints(qwen_tokenizer)
    with caplog.at_level(logging.INFO, logger="tldr_rlhf.progress"):
        assert cli.main(["generate", "--model", sft, "--posts", str(POSTS), "--limit", "3", "--max-new-tokens", "2", "--batch-size", "2", "--greedy"]) == 0
    assert [(m["desc"], m["n"], m["total"]) for m in _lines(caplog)] == [("generating", "2", "3"), ("generating", "3", "3")]


def test_inspect_shows_progress_by_pass(qwen_tokenizer, caplog, capsys):
    sft, rm = make_checkpoints(qwen_tokenizer)
    argv = ["inspect", "--policies", f"sft={sft}", "--reference", sft, "--rm-path", rm, "--data.train", str(POSTS), "--data.valid", str(POSTS),
            "--data.max-query-length", "64", "--response-length", "3", "--num-posts", "1"]
    with caplog.at_level(logging.INFO, logger="tldr_rlhf.progress"):
        assert cli.main(argv) == 0
    lines = _lines(caplog, "inspect")
    assert [(m["desc"], m["n"], m["total"]) for m in lines] == [
        ("inspect: sft: summaries and log-probs", "1", "3"), ("inspect: sft: reference log-probs", "2", "3"), ("inspect: reward-model scores", "3", "3"),
    ]


def test_evaluate_rm_shows_scoring_progress(qwen_tokenizer, tmp_path, caplog):
    from tldr_rlhf import evaluate_rm
    from tldr_rlhf.config import EvaluateRMConfig
    from tldr_rlhf.config.parts import PreferenceDataArgs

    _, rm = make_checkpoints(qwen_tokenizer)
    cfg = EvaluateRMConfig(model=rm, data=PreferenceDataArgs(comparisons=str(COMPARISONS), max_query_length=64), valid_limit=4, cnndm="", policy_samples="",
                           output=str(tmp_path / "eval_rm.json"), batch_size=2, num_threads=1)
    with caplog.at_level(logging.INFO, logger="tldr_rlhf.progress"):
        res = evaluate_rm.evaluate(cfg)
    n = res["heldout"]["n"]
    lines = _lines(caplog, "held-out")
    assert n > 0 and lines and lines[-1]["n"] == lines[-1]["total"] == str(n)
