"""TL;DR posts: loading (local OpenAI JSON-lines or the hub) and query/response formatting.

Implements N+ details 1-5 (Huang et al. 2024, section 3):

* query ``SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:`` with no trailing
  space, at most ``max_query_length`` (512) tokens; while too long the post is cut back to its last
  ``\\n`` (the newline and what follows are dropped), and only when no newline is left is it cut
  character by character (smart truncation, detail 2);
* response ``" " + summary + EOS`` (detail 3), as N+ built it (``f" {summary}<|endoftext|>"`` from
  the hub copy, whose summaries have no leading space). OpenAI's files store summaries with a
  leading space already and some pipelines added a second one, so leading whitespace is replaced
  by exactly one space (the single-space token the model sees after ``TL;DR:``); trailing
  whitespace is kept as N+ kept it (58 of the 1,600 shared references end in spaces, which then
  come before the EOS);
* a response-length cap (detail 4): examples over the cap are dropped and counted, never cut.

Shapes are Python lists of token ids here; batching into tensors lives in ``data.batching``.
"""

from __future__ import annotations

import contextlib
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..config import TldrDataArgs
from ..errors import DataError, hub_unreachable, hub_unreachable_message
from .io import check_local_source, held_out_keys, in_valid_split, read_jsonl, require
from ..modeling import hub_host_resolves

QUERY_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
CNNDM_TEMPLATE = "Article:\n{article}\n\nTL;DR:\n"
SFT_DATASET = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
TRL_PROMPT_PATTERN = re.compile(r"^SUBREDDIT: r/(?P<subreddit>.*?)\n\nTITLE: (?P<title>.*?)\n\nPOST: (?P<post>.*)\n\nTL;DR:\s*$", re.S)
"""A prompt already formatted as ``QUERY_TEMPLATE`` (the TRL-style hub datasets' ``prompt`` column): its
subreddit, title and post as named groups, so that rows from those datasets are re-formatted like ours."""


@dataclass(frozen=True)
class Post:
    """One Reddit post with its human reference TL;DR (OpenAI ``tldr_3_filtered`` fields)."""

    id: str
    subreddit: str
    title: str
    post: str
    summary: str = ""


@dataclass(frozen=True)
class SFTExample:
    """A formatted SFT example: query ids (no padding) and response ids ending in EOS."""

    id: str
    query_ids: list[int]
    response_ids: list[int]


@dataclass(frozen=True)
class Prompt:
    """One RL prompt: the item id, its formatted query ids (unpadded) and the reference response text
    (the human TL;DR of a post, or UltraFeedback's best-scored response)."""

    id: str
    query_ids: list[int]
    reference: str


@dataclass
class DropCounts:
    """Examples dropped while formatting, by reason (reported, never silent)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def update(self, *others: "DropCounts") -> "DropCounts":
        """Add the counts of ``others`` to these (in place); returns self."""
        for other in others:
            for reason, n in other.counts.items():
                self.add(reason, n)
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "none"


# ----------------------------------------------------------------------------------------------
# Loading


def _post_from_record(record: dict[str, Any], *, path: str | None, line: int | None, need_summary: bool) -> Post:
    if "prompt" in record and "post" not in record:  # trl-lib/tldr layout: prompt + completion
        prompt = require(record, "prompt", path=path, line=line)
        m = TRL_PROMPT_PATTERN.match(prompt)
        if not m:
            raise DataError("prompt is not in the TL;DR query format", path=path, line=line, field="prompt")
        summary = record.get("completion", "")
        if not isinstance(summary, str):
            raise DataError("expected str", path=path, line=line, field="completion")
        fields = dict(m.groupdict(), summary=summary)
        pid = str(record.get("id", f"line-{line}"))
    else:
        fields = {k: require(record, k, path=path, line=line) for k in ("subreddit", "title", "post")}
        fields["summary"] = require(record, "summary", path=path, line=line) if need_summary else record.get("summary", "")
        pid = str(record.get("id", f"line-{line}"))
    if not fields["post"].strip():
        raise DataError("empty post", path=path, line=line, field="post")
    if need_summary and not fields["summary"].strip():
        raise DataError("summary is empty or only whitespace", path=path, line=line, field="summary")
    return Post(id=pid, **fields)


def load_posts(source: str | Path, split: str = "train", *, need_summary: bool = True, limit: int | None = None) -> list[Post]:
    """Load TL;DR posts.

    ``source`` is a local JSON-lines file in OpenAI's ``tldr_3_filtered`` format (``id, subreddit,
    title, post, summary``), a folder holding ``{split}.jsonl``, or a hub dataset id in the
    ``vwxyzjn/summarize_from_feedback_tldr_3_filtered`` (same fields) or ``trl-lib/tldr``
    (``prompt``, ``completion``) layout. Every record is validated before anything trains.

    Raises DataError naming file, line and field for malformed JSON, missing fields, an empty post
    or (when ``need_summary``) an empty summary; DataError for an unreachable hub dataset.
    """
    check_local_source(source)
    path = Path(source)
    if path.is_dir() and (path / f"{split}.jsonl").is_file():
        path = path / f"{split}.jsonl"
    if path.is_file():
        posts = []
        for line, record in read_jsonl(path):
            posts.append(_post_from_record(record, path=str(path), line=line, need_summary=need_summary))
            if limit is not None and len(posts) >= limit:
                break
        return posts
    rows = load_hub_rows(str(source), split)
    posts = []
    for i, row in enumerate(rows):
        posts.append(_post_from_record(dict(row), path=f"{source}[{split}]", line=i + 1, need_summary=need_summary))
        if limit is not None and len(posts) >= limit:
            break
    return posts


def load_hub_rows(name: str, split: str, config: str | None = None) -> Iterable[dict[str, Any]]:
    """Rows of a hub dataset (or a local folder ``datasets`` understands) via ``datasets.load_dataset``.

    When the hub's host does not resolve (no network) the dataset is looked up in the local cache only
    (datasets' and huggingface_hub's offline mode for this call): a cached dataset loads, an uncached
    one fails at once instead of after ~30 s of retries with a warning each.
    Raises DataError when the dataset cannot be found or the hub cannot be reached.
    """
    import os

    import datasets

    no_network = not Path(name).expanduser().exists() and os.environ.get("HF_HUB_OFFLINE", "") in ("", "0") and not hub_host_resolves()
    try:
        with _hub_offline(no_network):
            return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; we re-raise one clear error
        if hub_unreachable(e):
            raise DataError(hub_unreachable_message("dataset", name)) from e
        raise DataError(
            f"cannot load dataset '{name}' split '{split}' ({type(e).__name__}: {e}). It is neither a local "
            "file nor a folder, and the Hugging Face hub could not provide it (offline? wrong id?)",
            path=name,
        ) from e


@contextlib.contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """While ``on``: datasets' and huggingface_hub's offline switches set (the local cache only, no
    request), both restored after. The switches are module constants read at call time."""
    import datasets
    import huggingface_hub.constants as hub_constants

    if not on:
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_post_splits(data: TldrDataArgs) -> tuple[list[Post], list[Post]]:
    """(train, valid) posts of a data section. With no ``valid`` source: a local file is split by post
    id (``valid_fraction``, ``io.in_valid_split``; or exactly ``valid_count`` posts, ``io.held_out_keys``); a hub dataset uses its 'validation' split.
    ``limit`` caps the training side. Raises DataError for malformed records (file, line, field)."""
    limit = data.limit or None
    if data.valid:
        return load_posts(data.train, "train", limit=limit), load_posts(data.valid, "validation")
    if Path(data.train).exists():
        posts = load_posts(data.train, "train")
        if data.valid_count:
            try:
                held = held_out_keys((p.id for p in posts), data.valid_count)
            except ValueError as e:
                raise DataError(str(e), path=data.train, field="data.valid_count") from None
            train, valid = [p for p in posts if p.id not in held], [p for p in posts if p.id in held]
        else:
            train = [p for p in posts if not in_valid_split(p.id, data.valid_fraction)]
            valid = [p for p in posts if in_valid_split(p.id, data.valid_fraction)]
        return (train[:limit] if limit else train), valid
    return load_posts(data.train, "train", limit=limit), load_posts(data.train, "validation")


# ----------------------------------------------------------------------------------------------
# Formatting


# How far a token count may fall when text is appended (BPE counts are not monotone in the prefix
# length: post oai1b-0027 gives 256, 257, 256, 256 Qwen2.5 tokens at 884..887 characters). On the
# 1,600 shared posts the count of a longer prefix is never more than 3 below a shorter one's; 8
# is the margin the hard cut relies on (see ``_hard_cut``).
_COUNT_DROP_SLACK = 8


def _hard_cut(count, n_full: int, max_length: int) -> int:
    """The prefix length that cutting one character at a time from the end reaches (N+ detail 2,
    OpenAI's reference loop): the first ``n`` in ``n_full - 1, n_full - 2, ...`` with
    ``count(n) <= max_length``, where ``count(n)`` is the token count of the query with the body
    cut to its first ``n`` characters; ``count(0) <= max_length`` must hold.

    Plain bisection is not this: counts are not monotone in ``n``, so it can stop at a boundary
    below the first fitting length from the top (11 of the 1,600 shared posts at 256 tokens, 66 at
    128). Instead: bisect for an adjacent pair with ``count(lo) <= max_length + slack <
    count(lo + 1)``; every length above ``lo`` then exceeds ``max_length`` as long as a longer
    prefix never has more than ``slack`` (``_COUNT_DROP_SLACK``) tokens fewer than a shorter one,
    so the reference loop would pass them all; walk down one character at a time from ``lo``
    (from ``n_full - 1`` when the full body is within the slack) to the first length that fits.
    About log2(n_full) + 4 * slack token counts instead of ``n_full - n``.
    """
    limit = max_length + _COUNT_DROP_SLACK
    n = n_full - 1
    if count(n_full) > limit:
        lo, hi = 0, n_full  # count(lo) <= limit < count(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if count(mid) <= limit:
                lo = mid
            else:
                hi = mid
        n = lo
    while count(n) > max_length:
        n -= 1
    return n


def _smart_truncate(render, body: str, max_length: int, tokenizer, field: str) -> tuple[str, list[int], bool]:
    """Tokenize ``render(body)``, cutting ``body`` until it fits in ``max_length`` tokens (N+ detail 2):
    while too long, cut at the last newline (the newline and what follows go); with no newline left,
    cut one character at a time from the end until it fits (``_hard_cut``, the same result found
    with far fewer tokenizer calls). Returns ``(text, ids, truncated)``; raises DataError naming
    ``field`` when even an empty body does not fit."""

    def encode(b: str) -> tuple[str, list[int]]:
        text = render(b)
        return text, tokenizer.encode(text, add_special_tokens=False)

    text, ids = encode(body)
    truncated = False
    while len(ids) > max_length:
        truncated = True
        cut = body.rfind("\n")
        if cut >= 0:
            body = body[:cut]
            text, ids = encode(body)
            continue
        if len(encode("")[1]) > max_length:
            raise DataError(f"query does not fit in {max_length} tokens even with an empty {field}", field=field)
        counts = {len(body): len(ids)}

        def count(n: int) -> int:
            if n not in counts:
                counts[n] = len(encode(body[:n])[1])
            return counts[n]

        body = body[: _hard_cut(count, len(body), max_length)]
        text, ids = encode(body)
    return text, ids, truncated


def format_query(tokenizer, subreddit: str, title: str, post: str, max_query_length: int = 512) -> tuple[str, list[int], bool]:
    """Format and tokenize a TL;DR query with smart truncation of the post (N+ detail 2).

    Returns ``(text, ids, truncated)`` with ``len(ids) <= max_query_length``. Raises DataError when
    even an empty post does not fit (a title over the cap).
    """
    render = lambda p: QUERY_TEMPLATE.format(subreddit=subreddit, title=title, post=p)  # noqa: E731
    return _smart_truncate(render, post, max_query_length, tokenizer, "post")


def format_response(tokenizer, summary: str) -> list[int]:
    """Token ids of ``" " + summary.lstrip()`` followed by the EOS id (N+ detail 3): N+'s
    ``f" {summary}<|endoftext|>"`` for a summary without leading whitespace; trailing whitespace is
    kept, as in N+."""
    return tokenizer.encode(" " + summary.lstrip(), add_special_tokens=False) + [tokenizer.eos_token_id]


def format_cnndm_query(tokenizer, article: str, max_query_length: int = 1919) -> tuple[str, list[int], bool]:
    """CNN/DM query ``Article:\\n{article}\\n\\nTL;DR:\\n`` (N+ detail 6), the article cut back like a
    TL;DR post. Returns ``(text, ids, truncated)``."""
    return _smart_truncate(lambda a: CNNDM_TEMPLATE.format(article=a), article, max_query_length, tokenizer, "article")


def build_sft_examples(
    posts: Iterable[Post], tokenizer, *, max_query_length: int = 512, max_response_length: int = 63, notes: DropCounts | None = None
) -> tuple[list[SFTExample], DropCounts]:
    """Format posts into (query, reference response) examples: SFT data, and the references that
    reward normalization scores. Responses longer than ``max_response_length`` tokens (EOS
    included) are dropped and counted under ``response_too_long`` (N+ detail 4); posts whose query
    cannot fit even with an empty post (a very long title) under ``query_does_not_fit``. Kept posts
    that were cut to fit are counted in ``notes`` (``query_truncated``) when given."""
    examples, drops = [], DropCounts()
    for p in posts:
        try:
            _, q, truncated = format_query(tokenizer, p.subreddit, p.title, p.post, max_query_length)
        except DataError:
            drops.add("query_does_not_fit")
            continue
        r = format_response(tokenizer, p.summary)
        if len(r) > max_response_length:
            drops.add("response_too_long")
            continue
        if truncated and notes is not None:
            notes.add("query_truncated")
        examples.append(SFTExample(id=p.id, query_ids=q, response_ids=r))
    return examples, drops


def build_prompts(posts: Iterable[Post], tokenizer, *, max_query_length: int = 512) -> tuple[list[Prompt], int]:
    """RL prompts of posts (N+ detail 17: the SFT training posts), each query formatted with smart
    truncation (detail 2) and the stripped summary as its reference. Returns (prompts, number of
    queries truncated). Raises DataError for a post whose query cannot fit even when empty."""
    prompts, truncated = [], 0
    for p in posts:
        _, ids, cut = format_query(tokenizer, p.subreddit, p.title, p.post, max_query_length)
        truncated += cut
        prompts.append(Prompt(p.id, ids, p.summary.strip()))
    return prompts, truncated


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min / mean / median / p95 / max of a list of token counts."""
    if not lengths:
        return {"n": 0}
    s = sorted(lengths)
    return {
        "n": len(s),
        "min": s[0],
        "mean": round(statistics.fmean(s), 2),
        "median": statistics.median(s),
        "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
        "max": s[-1],
    }


def token_length_report(posts: list[Post], tokenizer, *, max_query_length: int = 512) -> dict[str, Any]:
    """Query and formatted-response token-length statistics (for ``tldr-rlhf stats``)."""
    q_lens, r_lens, truncated = [], [], 0
    for p in posts:
        _, q, t = format_query(tokenizer, p.subreddit, p.title, p.post, max_query_length)
        q_lens.append(len(q))
        truncated += t
        if p.summary.strip():
            r_lens.append(len(format_response(tokenizer, p.summary)))
    return {"query": length_stats(q_lens), "response": length_stats(r_lens), "queries_truncated": truncated}
