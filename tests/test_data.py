"""TL;DR formatting, loading, bad input, comparisons and the split by post id (N+ details 1-6)."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch
from conftest import CNNDM, COMPARISONS, EOS, POSTS

from tldr_rlhf.data.batching import collate_pairs, collate_query_response, collate_queries
from tldr_rlhf.data.comparisons import build_preference_examples, load_comparisons, split_by_post_id
from tldr_rlhf.data.tldr import QUERY_TEMPLATE, Post, build_sft_examples, format_cnndm_query, format_query, format_response, load_posts, token_length_report
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
    assert format_response(qwen_tokenizer, "  Hello world") == ids
    # Trailing whitespace stays, as in N+'s f" {summary}<|endoftext|>": "\n" is 198, " \n" 715
    assert format_response(qwen_tokenizer, "  Hello world\n") == [21927, 1879, 198, EOS]
    assert format_response(qwen_tokenizer, "Hello world \n") == [21927, 1879, 715, EOS]


def test_nplus_3_response_keeps_trailing_whitespace_of_real_references(qwen_tokenizer):
    # oai1b-0058's reference ends in "Need a way to go. ": the space is a token (220) before EOS,
    # as N+ tokenized f" {summary}<|endoftext|>" (the hub copy has no leading space).
    posts = load_posts(POSTS)
    p = next(p for p in posts if p.id == "oai1b-0058")
    assert p.summary.endswith("Need a way to go. ") and p.summary.startswith(" really")
    assert format_response(qwen_tokenizer, p.summary) == [
        2167, 11272, 291, 705, 714, 1366, 4297, 311, 387, 1182, 311, 4622, 320, 14801, 279, 45652, 4357, 8, 659, 4841,
        287, 311, 653, 4113, 13, 14656, 264, 1616, 311, 728, 13, 220, EOS,
    ]  # " really" " cock" "ed" " up" ... " Need" " a" " way" " to" " go" "." " " <|endoftext|>
    # Every shared post: exactly N+'s string tokenized whole; 58 of the 1,600 references end in
    # whitespace (52 " ", 5 "  ", 1 of 17 spaces), and only those differ from the stripped summary.
    enc = lambda s: qwen_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert all(format_response(qwen_tokenizer, p.summary) == enc(f" {p.summary.lstrip()}<|endoftext|>") for p in posts)
    changed = [p.id for p in posts if format_response(qwen_tokenizer, p.summary) != enc(" " + p.summary.strip()) + [EOS]]
    assert len(changed) == 58 and "oai1b-0058" in changed
    assert changed == [p.id for p in posts if p.summary != p.summary.rstrip()]


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


def test_nplus_2_hard_cut_is_first_fit_from_the_top_oai1b_0027(qwen_tokenizer):
    # Post oai1b-0027 has no newline (1,129 characters). Qwen2.5 token counts of its query with the
    # post cut to 884..888 characters: 256, 257, 256, 256, 257; every longer cut has more than 256.
    # Cutting one character at a time from the end (OpenAI / N+) first fits at 887 characters;
    # a bisection that assumes monotone counts stopped at 884 (the 257 at 885 hid 886 and 887).
    p = next(p for p in load_posts(POSTS) if p.id == "oai1b-0027")
    assert "\n" not in p.post and len(p.post) == 1129
    n_tokens = lambda n: len(qwen_tokenizer.encode(QUERY_TEMPLATE.format(subreddit=p.subreddit, title=p.title, post=p.post[:n])))  # noqa: E731
    assert [n_tokens(n) for n in range(884, 889)] == [256, 257, 256, 256, 257]
    text, ids, truncated = format_query(qwen_tokenizer, p.subreddit, p.title, p.post, 256)
    assert truncated and len(ids) == 256
    assert text.endswith("POST: " + p.post[:887] + "\n\nTL;DR:") and p.post[:887].endswith("my grandma ")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE token strings use it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:  # bytes that print badly map to 256, 257, ...
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def byte_vocab(qwen_tokenizer):
    """Qwen2.5's tokens as byte strings, all their prefixes, and the byte strings that a token can
    carry before the query's closing ``\\n\\nTL;DR:`` when it straddles the end of the post
    (``t[:-k]`` for every token t ending with the first k >= 1 bytes of it), with their suffixes."""
    dec = {c: b for b, c in _bytes_to_unicode().items()}
    added = qwen_tokenizer.get_added_vocab()
    vocab = {bytes(dec[c] for c in t) for t in qwen_tokenizer.get_vocab() if t not in added} | {t.encode() for t in added}
    prefixes = {t[:i] for t in vocab for i in range(1, len(t) + 1)}
    tail = b"\n\nTL;DR:"
    before_tail = {t[:-k] for t in vocab for k in range(1, len(tail) + 1) if len(t) > k and t.endswith(tail[:k])}
    suffixes = {e[-i:] for e in before_tail for i in range(1, len(e) + 1)}
    return vocab, prefixes, before_tail, suffixes


def _fewest_tokens(s: bytes, vocab, prefixes) -> list[int]:
    """opt[j]: the fewest vocabulary tokens whose concatenation is s[:j] (dynamic programming)."""
    opt = [len(s) + 1] * (len(s) + 1)
    opt[0] = 0
    for i in range(len(s)):
        for j in range(i + 1, len(s) + 1):
            piece = s[i:j]
            if piece not in prefixes:
                break
            if piece in vocab:
                opt[j] = min(opt[j], opt[i] + 1)
    return opt


def _reference_query_ids(tok, p, cap, byte_vocab) -> list[int]:
    """OpenAI's / N+'s truncation loop: while the query is over ``cap`` tokens, cut the post at its
    last newline, or with none left remove its last character. The character-at-a-time part starts
    at a length ``start`` proven to be at or above where that loop stops, instead of the post's
    full length (which takes minutes for all posts):

    Byte-level BPE token ids partition the bytes of the text (ASCII text, or text that NFC leaves
    unchanged, the normalizer being NFC). With S = header + post[:m] of X bytes and
    T = "\\n\\nTL;DR:", the token covering T's first byte starts at some i <= X and its bytes are
    S[i:X] + T[:k]; the tokens before it are a split of S[:i] into vocabulary tokens, at least
    opt[i] of them. So count(m) >= 1 + min(opt[X], opt[X - l] for every l with S[X - l:X] in
    ``before_tail``) =: bound(m). Every length m above ``start``, the largest m with bound(m) <= cap,
    is over the cap, so removing characters one at a time passes it, and the loop below from
    ``start`` down stops where the loop from the full length would."""
    vocab, prefixes, before_tail, suffixes = byte_vocab
    render = lambda b: QUERY_TEMPLATE.format(subreddit=p.subreddit, title=p.title, post=b)  # noqa: E731
    count = lambda b: len(tok.encode(render(b), add_special_tokens=False))  # noqa: E731
    body = p.post
    while count(body) > cap and "\n" in body:
        body = body[: body.rindex("\n")]
    if count(body) <= cap:
        return tok.encode(render(body), add_special_tokens=False)
    header = render("\0").split("\0")[0]
    s = (header + body).encode()
    opt = _fewest_tokens(s, vocab, prefixes)
    x = len(header.encode())
    ends = [x]  # ends[m]: byte length of header + body[:m]
    for ch in body:
        x += len(ch.encode())
        ends.append(x)

    def bound(m: int) -> int:
        x, best, l = ends[m], opt[ends[m]], 1
        while l <= x and s[x - l : x] in suffixes:
            if s[x - l : x] in before_tail:
                best = min(best, opt[x - l])
            l += 1
        return best + 1

    start = len(body) - 1
    while bound(start) > cap:
        start -= 1
    if not (render(body) + "\n").isascii() and not all(unicodedata.is_normalized("NFC", render(body[:m])) for m in range(start + 1, len(body))):
        start = len(body) - 1  # the byte argument needs NFC to leave the text alone: scan from the top
    n = start
    while count(body[:n]) > cap:
        n -= 1
    return tok.encode(render(body[:n]), add_special_tokens=False)


@pytest.mark.parametrize("cap", [512, 256, 128])
def test_nplus_2_truncation_matches_the_reference_loop_on_all_shared_posts(qwen_tokenizer, byte_vocab, cap):
    # Token for token against OpenAI's / N+'s loop (``_reference_query_ids``) on the 1,600 shared
    # posts. The bisection that assumed monotone counts differed on 0 / 11 / 66 posts at 512 / 256 / 128.
    posts = [p for path in sorted(POSTS.parent.glob("*.jsonl")) for p in load_posts(path)]
    assert len(posts) == 1600
    differ = [p.id for p in posts if format_query(qwen_tokenizer, p.subreddit, p.title, p.post, cap)[1] != _reference_query_ids(qwen_tokenizer, p, cap, byte_vocab)]
    assert not differ, f"{len(differ)} of {len(posts)} posts differ at {cap} tokens: {differ[:8]}"


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
    with pytest.raises(DataError, match="dataset 'no-such-user/no-such-dataset' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
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
