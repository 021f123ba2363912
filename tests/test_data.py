"""TL;DR formatting, loading, bad input, comparisons and the split by post id (N+ details 1-6)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CNNDM, COMPARISONS, EOS, POSTS

from tldr_rlhf.data.batching import collate_pairs, collate_query_response, collate_queries
from tldr_rlhf.data.comparisons import build_preference_examples, load_comparisons, split_by_post_id
from tldr_rlhf.data.tldr import Post, build_sft_examples, format_cnndm_query, format_query, format_response, load_posts, token_length_report
from tldr_rlhf.errors import DataError


def test_nplus_2_query_format_exact_string_and_ids(qwen_tokenizer):
    text, ids, truncated = format_query(qwen_tokenizer, "AskReddit", "Hi there", "Hello world", 512)
    assert text == "SUBREDDIT: r/AskReddit\n\nTITLE: Hi there\n\nPOST: Hello world\n\nTL;DR:"
    assert not text.endswith(" ")
    assert not truncated
    # Qwen2.5 byte-level BPE pieces, one id each:
    # "SUB" "RE" "DD" "IT" ":" " r" "/" "Ask" "Reddit" "\n\n" "TITLE" ":" " Hi" " there" "\n\n" "POST" ":"
    # " Hello" " world" "\n\n" "TL" ";" "DR" ":"
    assert ids == [29038, 787, 4103, 952, 25, 435, 14, 26172, 60474, 271, 50328, 25, 21018, 1052, 271, 2946, 25,
                   21927, 1879, 271, 13470, 26, 7687, 25]  # ends with ":" -- no trailing space token
    assert qwen_tokenizer.decode(ids) == text


def test_nplus_3_response_is_space_summary_eos(qwen_tokenizer):
    ids = format_response(qwen_tokenizer, "Hello world")
    assert ids == [21927, 1879, EOS]  # " Hello" " world" <|endoftext|>
    # OpenAI's files already carry a leading space; exactly one survives.
    assert format_response(qwen_tokenizer, " Hello world") == ids
    assert format_response(qwen_tokenizer, "  Hello world\n") == ids


def test_nplus_2_smart_truncation_cuts_at_last_newline(qwen_tokenizer):
    post = "first paragraph is here.\nsecond paragraph is a bit longer than the first.\nthird line"
    full = len(format_query(qwen_tokenizer, "sub", "t", post, 10_000)[1])
    without_third = len(format_query(qwen_tokenizer, "sub", "t", post[: post.rfind("\n")], 10_000)[1])
    text, ids, truncated = format_query(qwen_tokenizer, "sub", "t", post, without_third)
    assert truncated and full > without_third
    assert text.endswith("POST: first paragraph is here.\nsecond paragraph is a bit longer than the first.\n\nTL;DR:")
    assert len(ids) == without_third
    # One token less: the second newline cut happens too.
    text, ids, _ = format_query(qwen_tokenizer, "sub", "t", post, without_third - 1)
    assert "POST: first paragraph is here.\n\nTL;DR:" in text
    assert len(ids) <= without_third - 1


def test_nplus_2_hard_cut_only_without_newline(qwen_tokenizer):
    post = "word " * 200
    empty = len(format_query(qwen_tokenizer, "sub", "t", "", 10_000)[1])
    text, ids, truncated = format_query(qwen_tokenizer, "sub", "t", post, empty + 20)
    assert truncated and len(ids) <= empty + 20
    kept = text.split("POST: ")[1].split("\n\nTL;DR:")[0]
    assert post.startswith(kept)
    # the longest prefix that fits: one more character would not fit
    longer = post[: len(kept) + 1]
    assert len(format_query(qwen_tokenizer, "sub", "t", longer, 10_000)[1]) > empty + 20


def test_nplus_4_response_cap_drops_and_counts(qwen_tokenizer):
    posts = [Post("a", "s", "t", "p", "short"), Post("b", "s", "t", "p", "word " * 100)]
    ex, drops = build_sft_examples(posts, qwen_tokenizer, max_response_length=63)
    assert [e.id for e in ex] == ["a"]
    assert drops.counts == {"response_too_long": 1}
    assert ex[0].response_ids[-1] == EOS


def test_real_posts_load_and_lengths(qwen_tokenizer):
    posts = load_posts(POSTS)
    assert len(posts) == 1600 and posts[0].id == "oai1b-0000"
    report = token_length_report(posts[:200], qwen_tokenizer)
    assert report["query"]["max"] <= 512
    assert report["response"]["max"] <= 63  # the seed's 63-token cap holds on real references


def test_padding_sides_and_layout():
    b = collate_query_response([[1, 2, 3], [4]], [[5, EOS], [6, 7, EOS]], EOS)
    assert b.query_width == 3
    assert b.input_ids.tolist() == [[1, 2, 3, 5, EOS, EOS], [EOS, EOS, 4, 6, 7, EOS]]
    assert b.attention_mask.tolist() == [[True, True, True, True, True, False], [False, False, True, True, True, True]]
    # pad == EOS: the response mask comes from lengths, so the first row's real EOS is kept and the pad is not
    assert b.response_mask.tolist() == [[True, True, False], [True, True, True]]
    ids, mask = collate_queries([[1, 2], [3]], EOS)
    assert ids.tolist() == [[1, 2], [EOS, 3]] and mask.tolist() == [[True, True], [False, True]]
    pairs = collate_pairs([[1]], [[2, EOS]], [[3, 4, EOS]], EOS)
    assert pairs.input_ids.tolist() == [[1, 2, EOS, EOS], [1, 3, 4, EOS]]


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return p


def test_bad_posts_name_file_line_field(tmp_path):
    good = {"id": "1", "subreddit": "s", "title": "t", "post": "p", "summary": "x"}
    p = _write(tmp_path, "bad.jsonl", [good, "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl:2.*invalid JSON"):
        load_posts(p)
    p = _write(tmp_path, "missing.jsonl", [good, {k: v for k, v in good.items() if k != "title"}])
    with pytest.raises(DataError, match=r"missing.jsonl:2, field 'title': missing field"):
        load_posts(p)
    p = _write(tmp_path, "empty.jsonl", [dict(good, post="  \n")])
    with pytest.raises(DataError, match=r"empty.jsonl:1, field 'post': empty post"):
        load_posts(p)
    p = _write(tmp_path, "ws.jsonl", [dict(good, summary="   ")])
    with pytest.raises(DataError, match=r"ws.jsonl:1, field 'summary'"):
        load_posts(p)
    with pytest.raises(DataError, match="file not found"):
        load_posts(tmp_path / "nope.jsonl")


def test_unreachable_hub_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load dataset 'no-such-user/no-such-dataset'"):
        load_posts("no-such-user/no-such-dataset")


def test_hub_trl_tldr_layout_via_local_dataset_folder(tmp_path):
    """The trl-lib/tldr layout (prompt, completion), loaded through `datasets` like the hub."""
    rows = [{"prompt": "SUBREDDIT: r/a\n\nTITLE: T\n\nPOST: line one\nline two\n\nTL;DR:", "completion": " short one"}]
    (tmp_path / "train.json").write_text("\n".join(json.dumps(r) for r in rows))
    posts = load_posts(str(tmp_path), "train")
    assert posts == [Post("line-1", "a", "T", "line one\nline two", " short one")]


def test_comparisons_real_file_and_split_by_post_id(qwen_tokenizer):
    comps, drops = load_comparisons(COMPARISONS)
    assert len(comps) + drops.total == 1097
    first = comps[0]
    assert first.post_id == "t3_4ne9lx" and first.confidence == 3 and first.chosen.startswith(" Started dating")
    train, valid = split_by_post_id(comps, 0.2)
    assert not {c.post_id for c in train} & {c.post_id for c in valid}
    assert 0.1 < len(valid) / len(comps) < 0.3
    # deterministic and independent of order
    train2, valid2 = split_by_post_id(list(reversed(comps)), 0.2)
    assert {c.post_id for c in valid2} == {c.post_id for c in valid}
    ex, _ = build_preference_examples(comps[:5], qwen_tokenizer)
    assert ex[0].chosen_ids[-1] == EOS and ex[0].rejected_ids[-1] == EOS
    assert qwen_tokenizer.decode(ex[0].query_ids).endswith("\n\nTL;DR:")


def test_bad_comparisons_counted_not_crashing(tmp_path, qwen_tokenizer):
    base = {"info": {"id": "p1", "post": "p", "title": "t", "subreddit": "s"}, "summaries": [{"text": " a"}, {"text": " b"}], "choice": 0, "split": "train", "extra": {"confidence": 5}}
    lines = [
        base,
        dict(base, choice=2),
        dict(base, summaries=[{"text": " same"}, {"text": "same "}]),
        dict(base, summaries=[{"text": " "}, {"text": " b"}]),
        dict(base, choice=1),
    ]
    comps, drops = load_comparisons(_write(tmp_path, "c.jsonl", lines))
    assert drops.counts == {"choice_not_0_or_1": 1, "identical_summaries": 1, "empty_summary": 1}
    assert [(c.chosen, c.rejected) for c in comps] == [(" a", " b"), (" b", " a")]
    with pytest.raises(DataError, match=r"c2.jsonl:1, field 'info.title'"):
        load_comparisons(_write(tmp_path, "c2.jsonl", [dict(base, info={"id": "x", "post": "p", "subreddit": "s"})]))


def test_nplus_6_cnndm_query_format(qwen_tokenizer):
    comps, _ = load_comparisons(CNNDM)
    assert comps[0].is_cnndm
    text, ids, _ = format_cnndm_query(qwen_tokenizer, comps[0].query_fields["article"], 1919)
    assert text.startswith("Article:\n") and text.endswith("\n\nTL;DR:\n") and len(ids) <= 1919
    text, ids, truncated = format_cnndm_query(qwen_tokenizer, "a\nb\n" + "c " * 50, 12)
    assert truncated and len(ids) <= 12 and text.startswith("Article:\na") and text.endswith("\n\nTL;DR:\n")


def test_left_padding_tensor_dtypes():
    ids, mask = collate_queries([[5]], EOS)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
