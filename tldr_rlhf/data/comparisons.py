"""Human comparisons of two summaries: loading, formatting, and a split by post id.

Sources: OpenAI's comparison JSON-lines (``info``, ``summaries[2]``, ``choice``, ``split``,
``extra.confidence``; the hub's ``openai/summarize_from_feedback`` "comparisons" config has the
same fields), ``trl-lib/tldr-preference`` (``prompt``, ``chosen``, ``rejected``), and OpenAI's CNN/DM
comparisons (``info.article``) for out-of-distribution evaluation.

Semantic problems in a record (identical summaries, ``choice`` outside {0, 1}, an empty summary, a
response over the cap) are counted in ``DropCounts`` and the record skipped: one bad comparison
never stops a run or gets a silent wrong label. Malformed JSON and missing fields raise DataError
naming the file, line and field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import DataError
from .io import check_local_source, in_valid_split, read_jsonl, require
from .tldr import TRL_PROMPT_PATTERN, DropCounts, format_cnndm_query, format_query, format_response, load_hub_rows

COMPARISONS_DATASET = "openai/summarize_from_feedback"


@dataclass(frozen=True)
class Comparison:
    """One human judgement: the query fields and the chosen / rejected summary texts."""

    post_id: str
    query_fields: dict[str, str]  # subreddit/title/post, or article for CNN/DM
    chosen: str
    rejected: str
    split: str = ""
    confidence: int | None = None
    policies: tuple[str, str] = ("", "")  # (chosen policy, rejected policy)

    @property
    def is_cnndm(self) -> bool:
        return "article" in self.query_fields


@dataclass(frozen=True)
class PreferenceExample:
    """Tokenized comparison: query ids (unpadded) and two responses ending in EOS."""

    post_id: str
    query_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    confidence: int | None = None


def _comparison_from_record(record: dict[str, Any], drops: DropCounts, *, path: str, line: int) -> Comparison | None:
    if "prompt" in record and "info" not in record:  # trl-lib/tldr-preference
        prompt = require(record, "prompt", path=path, line=line)
        chosen = require(record, "chosen", path=path, line=line)
        rejected = require(record, "rejected", path=path, line=line)
        m = TRL_PROMPT_PATTERN.match(prompt)
        if not m:
            raise DataError("prompt is not in the TL;DR query format", path=path, line=line, field="prompt")
        fields = m.groupdict()
        post_id = str(record.get("id") or hashlib.sha1(prompt.encode()).hexdigest()[:16])
        split, confidence, policies = str(record.get("split", "")), None, ("", "")
    else:
        info = require(record, "info", path=path, line=line, kind=dict)
        summaries = require(record, "summaries", path=path, line=line, kind=list)
        choice = record.get("choice")
        # Hub rows carry every info field, None where it does not apply (article on TL;DR rows).
        if info.get("article") is not None:
            fields = {"article": require(record, "info.article", path=path, line=line)}
        else:
            fields = {k: require(record, f"info.{k}", path=path, line=line) for k in ("subreddit", "title", "post")}
        if len(summaries) != 2 or not all(isinstance(s, dict) and isinstance(s.get("text"), str) for s in summaries):
            raise DataError("expected two summaries with a 'text' each", path=path, line=line, field="summaries")
        if type(choice) is not int or choice not in (0, 1):  # 1.0, True, "1", None: not a label we trust
            drops.add("choice_not_0_or_1")
            return None
        chosen, rejected = summaries[choice]["text"], summaries[1 - choice]["text"]
        post_id = str(info.get("id", f"line-{line}"))
        split = str(record.get("split", ""))
        conf = (record.get("extra") or {}).get("confidence")
        confidence = int(conf) if isinstance(conf, (int, float)) and not isinstance(conf, bool) else None
        policies = (str(summaries[choice].get("policy", "")), str(summaries[1 - choice].get("policy", "")))
    if not chosen.strip() or not rejected.strip():
        drops.add("empty_summary")
        return None
    if chosen.strip() == rejected.strip():
        drops.add("identical_summaries")
        return None
    return Comparison(post_id, fields, chosen, rejected, split, confidence, policies)


def load_comparisons(source: str | Path, split: str = "train", *, limit: int | None = None) -> tuple[list[Comparison], DropCounts]:
    """Load comparisons from a local JSON-lines file (or a folder of ``*.json``/``*.jsonl``), or from
    a hub dataset (``openai/summarize_from_feedback`` config "comparisons", ``trl-lib/tldr-preference``).

    ``split`` is only used for hub datasets; local OpenAI files carry their own ``split`` field.
    Returns ``(comparisons, drops)``. Raises DataError for malformed JSON or missing fields.
    """
    check_local_source(source)
    drops = DropCounts()
    out: list[Comparison] = []
    path = Path(source)
    files = sorted([*path.glob("*.json"), *path.glob("*.jsonl")]) if path.is_dir() else [path]
    if path.exists():
        for f in files:
            for line, record in read_jsonl(f):
                c = _comparison_from_record(record, drops, path=str(f), line=line)
                if c is not None:
                    out.append(c)
                if limit is not None and len(out) >= limit:
                    return out, drops
        return out, drops
    config = "comparisons" if str(source) == COMPARISONS_DATASET else None
    hub_split = {"train": "train", "valid": "validation", "validation": "validation"}.get(split, split)
    for i, row in enumerate(load_hub_rows(str(source), hub_split, config)):
        c = _comparison_from_record(dict(row), drops, path=f"{source}[{hub_split}]", line=i + 1)
        if c is not None:
            out.append(c)
        if limit is not None and len(out) >= limit:
            break
    return out, drops


# How a drop reason reads in a message (other reasons: their name with spaces).
_DROP_WORDS = {"choice_not_0_or_1": "invalid choice", "cnndm_set_aside": "CNN/DM set aside", "not_cnndm": "not CNN/DM"}


def describe_drops(counts: dict[str, int]) -> str:
    """Drop counts as words for a message: "invalid choice 40, identical summaries 2" ("none")."""
    return ", ".join(f"{_DROP_WORDS.get(k, k.replace('_', ' '))} {v}" for k, v in sorted(counts.items()) if v) or "none"


def no_usable_comparisons(source: str | Path, kept: int, drops: DropCounts, what: str = "comparisons") -> DataError:
    """The error for a source whose comparisons were all dropped, naming the counts by reason:
    "SOURCE: no usable comparisons: 0 of 40 kept; dropped: invalid choice 40"."""
    return DataError(f"no usable {what}: {kept} of {kept + drops.total} kept; dropped: {describe_drops(drops.counts)}", path=str(source))


def split_by_post_id(items: Iterable[Comparison], valid_fraction: float = 0.2, salt: str = "tldr-rlhf") -> tuple[list[Comparison], list[Comparison]]:
    """Deterministic train/validation split by post id: a post's comparisons all land on one side.

    A post goes to validation when ``sha256(salt + post_id)`` mapped to [0, 1) is below
    ``valid_fraction``; the result does not depend on the order or count of the records.
    """
    train, valid = [], []
    for c in items:
        (valid if in_valid_split(c.post_id, valid_fraction, salt) else train).append(c)
    return train, valid


def build_preference_examples(
    comparisons: Iterable[Comparison],
    tokenizer,
    *,
    max_query_length: int = 512,
    max_response_length: int = 133,
    max_cnndm_query_length: int = 1919,
    drops: DropCounts | None = None,
    notes: DropCounts | None = None,
) -> tuple[list[PreferenceExample], DropCounts]:
    """Tokenize comparisons: query with smart truncation, responses ``" " + text + EOS``.

    A comparison with a response over ``max_response_length`` tokens (EOS included; 133 for
    Qwen2.5, N+ detail 4) is dropped and counted under ``response_too_long``; one whose query does
    not fit even with an empty post (a title over the cap) under ``query_does_not_fit``. Posts cut
    to fit the query cap are kept and counted in ``notes`` (``query_truncated``) when given.
    """
    drops = drops if drops is not None else DropCounts()
    out = []
    for c in comparisons:
        try:
            if c.is_cnndm:
                _, q, truncated = format_cnndm_query(tokenizer, c.query_fields["article"], max_cnndm_query_length)
            else:
                f = c.query_fields
                _, q, truncated = format_query(tokenizer, f["subreddit"], f["title"], f["post"], max_query_length)
        except DataError:
            drops.add("query_does_not_fit")
            continue
        if truncated and notes is not None:
            notes.add("query_truncated")
        ch, rj = format_response(tokenizer, c.chosen), format_response(tokenizer, c.rejected)
        if max(len(ch), len(rj)) > max_response_length:
            drops.add("response_too_long")
            continue
        out.append(PreferenceExample(c.post_id, q, ch, rj, c.confidence))
    return out, drops


@dataclass(frozen=True)
class JudgedSample:
    """A policy summary and the human reference for one post, with an LLM judge's verdict."""

    id: str
    query_fields: dict[str, str]  # subreddit/title/post
    response: str
    reference: str
    judge_preferred: str  # "policy" or "reference"
    judge: str = ""
    policy: str = ""


def load_judged_samples(path: str | Path) -> tuple[list[JudgedSample], DropCounts]:
    """Judged (policy summary, reference) pairs from JSON-lines with ``id, query, response,
    reference, judge_preferred`` (and ``judge``, ``policy``): the format of
    ``policy_samples/openai_ppo_1.3b.jsonl``. The query is parsed back into subreddit / title / post
    so that it can be re-formatted (and re-truncated) like training queries.

    Records with no verdict (``judge_preferred`` null or not policy/reference), a query not in the
    TL;DR format, an empty summary or identical summaries are dropped and counted. Raises DataError
    (file, line, field) for malformed JSON and missing or mistyped fields.
    """
    drops, out = DropCounts(), []
    for line, record in read_jsonl(path):
        query = require(record, "query", path=str(path), line=line)
        response = require(record, "response", path=str(path), line=line)
        reference = require(record, "reference", path=str(path), line=line)
        verdict = record.get("judge_preferred")
        if verdict not in ("policy", "reference"):
            drops.add("no_judge_verdict")
            continue
        m = TRL_PROMPT_PATTERN.match(query)
        if not m:
            drops.add("query_not_tldr_format")
            continue
        if not response.strip() or not reference.strip():
            drops.add("empty_summary")
            continue
        if response.strip() == reference.strip():
            drops.add("identical_summaries")
            continue
        out.append(JudgedSample(str(record.get("id", f"line-{line}")), m.groupdict(), response, reference, verdict, str(record.get("judge", "")), str(record.get("policy", ""))))
    return out, drops
