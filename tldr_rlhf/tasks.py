"""Task dispatch: every stage asks here for its data, whatever the task (``data.task``).

A stage never branches on the task; it calls one of these with its data section and a tokenizer and
gets the same types back for TL;DR and UltraFeedback:

* ``sft_examples`` -> (train, held-out) ``SFTExample`` lists and their drop counts;
* ``preference_examples`` -> (train, held-out) ``PreferenceExample`` lists and a report;
* ``rl_prompts`` -> the training prompts (``Prompt``: id, query ids, reference text);
* ``reference_examples`` -> (query, reference response) pairs for reward normalization;
* ``held_out_items`` / ``query_ids`` / ``response_ids`` / ``query_text`` / ``reference_of`` for
  ``evaluate``, which works on items (TL;DR ``Post`` or UltraFeedback ``Instruction``).

TL;DR keeps its loaders where they were (data/tldr.py, data/comparisons.py and the stages'
``load_*`` functions); UltraFeedback's are in data/ultrafeedback.py. The UltraFeedback split is by
prompt with a seeded shuffle (``eval_fraction``, ``split_seed``), identical in every stage because
every stage loads the whole source before splitting and limiting.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

from .config import TaskArgs, TldrDataArgs
from .data import ultrafeedback as uf
from .data.tldr import SFT_DATASET, DropCounts, Post, Prompt, SFTExample, build_prompts, build_sft_examples, format_query, format_response, load_post_splits, load_posts
from .errors import DataError

_TLDR_DEFAULTS = (SFT_DATASET, "openai/summarize_from_feedback")


def is_tldr(data: TaskArgs) -> bool:
    return data.task == "tldr"


def sources(data: TaskArgs) -> tuple[str, str]:
    """(training source, held-out source) of a data section: ``train``/``valid`` for posts,
    ``comparisons``/``valid_comparisons`` for comparisons. For UltraFeedback a TL;DR default source
    becomes ``trl-lib/ultrafeedback_binarized``."""
    train, valid = (data.comparisons, data.valid_comparisons) if hasattr(data, "comparisons") else (data.train, data.valid)
    if not is_tldr(data) and train in _TLDR_DEFAULTS:
        train = uf.DATASET
    return train, valid


@functools.lru_cache(maxsize=4)
def _load_ultrafeedback(source: str, split: str, min_score_gap: float, english_only: bool, mtime_ns: int | None) -> uf.UltraFeedbackData:
    """One parse per process of a source: a stage asks for its pairs, references and prompts
    separately, and on raw data every parse runs language identification over every text. A local
    file's modification time is part of the key, so an edited file is read again. Callers must not
    mutate the result."""
    return uf.load_ultrafeedback(source, split, min_score_gap=min_score_gap, english_only=english_only)


def _load(source: str, split: str, data: TaskArgs) -> uf.UltraFeedbackData:
    path = Path(source)
    return _load_ultrafeedback(source, split, data.min_score_gap, data.english_only, path.stat().st_mtime_ns if path.exists() else None)


def ultrafeedback_splits(data: TaskArgs) -> tuple[uf.UltraFeedbackData, uf.UltraFeedbackData, str]:
    """(train, held-out) UltraFeedback data of a data section and the source's name. The held-out
    side is the held-out source when one is given (a file, or a folder's / hub dataset's 'test'
    split), else the prompts
    split off by ``split_by_prompt``. Raises DataError for bad records (file, line, field)."""
    train_src, valid_src = sources(data)
    full = _load(train_src, "train", data)
    if valid_src:
        held = _load(valid_src, "test", data)
        return full, held, train_src
    train, held = uf.split_by_prompt(full, data.eval_fraction, data.split_seed)
    return train, held, train_src


def _caps(data: TaskArgs) -> dict[str, Any]:
    return dict(template=data.template, max_query_length=data.max_query_length, max_response_length=data.max_response_length)


def sft_examples(data: TldrDataArgs, tokenizer) -> tuple[list[SFTExample], list[SFTExample], DropCounts, DropCounts]:
    """(train, held-out) SFT examples and the drops of each side. TL;DR: reference summaries of the
    posts (smart truncation, response cap); UltraFeedback: the demonstrations (chosen responses of
    binarized rows, unpaired completions of raw ones), over-long ones dropped. ``limit`` caps the
    training side, ``valid_limit`` the held-out side (both counted after the drops). Raises DataError for bad records."""
    if is_tldr(data):
        train_posts, valid_posts = load_post_splits(data)
        caps = dict(max_query_length=data.max_query_length, max_response_length=data.max_response_length)
        train, drops = build_sft_examples(train_posts, tokenizer, **caps)
        valid, vdrops = build_sft_examples(valid_posts[: data.valid_limit or None], tokenizer, **caps)
        return train, valid, drops, vdrops
    train_data, held, _ = ultrafeedback_splits(data)
    train, drops = uf.build_sft_examples(train_data.demonstrations, tokenizer, **_caps(data))
    valid, vdrops = uf.build_sft_examples(held.demonstrations, tokenizer, **_caps(data))
    drops.update(train_data.drops)
    return train[: data.limit or None], valid[: data.valid_limit or None], drops, vdrops


def ultrafeedback_preferences(data: TaskArgs, tokenizer, *, need_train: bool = True) -> tuple[list, list, dict[str, Any]]:
    """(train, held-out) UltraFeedback ``PreferenceExample`` lists and a report shaped like the TL;DR
    loaders' (``{"train": {"n", "dropped"}, "valid": {...}}``). Raises DataError for bad records or
    an empty held-out set."""
    train_data, held, source = ultrafeedback_splits(data)
    train, drops = uf.build_preference_examples(train_data.pairs if need_train else [], tokenizer, **_caps(data))
    valid, vdrops = uf.build_preference_examples(held.pairs, tokenizer, **_caps(data))
    drops.update(train_data.drops, train_data.pair_drops)
    vdrops.update(held.drops, held.pair_drops)
    train, valid = train[: data.limit or None], valid[: data.valid_limit or None]
    if not valid:
        from .data.comparisons import describe_drops

        raise DataError(f"no held-out pairs left to evaluate on (dropped: {describe_drops(vdrops.counts)}; check the length caps and eval_fraction)", path=source)
    report = {
        "train": {"n": len(train), "dropped": dict(drops.counts), "query_truncated": 0},
        "valid": {"n": len(valid), "dropped": dict(vdrops.counts), "query_truncated": 0},
        "source": source,
    }
    return train, valid, report


def rl_prompts(data: TaskArgs, tokenizer) -> tuple[list[Prompt], int]:
    """The training prompts of an RL stage (PPO, GRPO, RLOO) and a count: TL;DR's SFT training posts
    (N+ detail 17) with smart truncation (detail 2), counting the queries truncated; UltraFeedback's
    training prompts (``ultrafeedback_prompts``), counting those dropped as over ``max_query_length``.
    Raises DataError for malformed records (file, line, field) or an empty prompt set; nothing is
    loaded but the tokenizer."""
    if not is_tldr(data):
        return ultrafeedback_prompts(data, tokenizer)
    posts, _ = load_post_splits(data)
    if not posts:
        raise DataError("no training posts", path=data.train)
    return build_prompts(posts, tokenizer, max_query_length=data.max_query_length)


def ultrafeedback_prompts(data: TaskArgs, tokenizer) -> tuple[list[Prompt], int]:
    """The training prompts as RL ``Prompt``s (reference = best-scored response) and how many were
    dropped for a prompt over ``max_query_length``. Raises DataError when none is left."""
    train_data, _, source = ultrafeedback_splits(data)
    prompts, dropped = [], 0
    for item in train_data.instructions:
        ids = uf.prompt_ids(tokenizer, item.prompt, data.template)
        if len(ids) > data.max_query_length:
            dropped += 1
            continue
        prompts.append(Prompt(item.id, ids, item.reference.strip()))
    prompts = prompts[: data.limit or None]
    if not prompts:
        raise DataError("no training prompts fit in max_query_length", path=source)
    return prompts, dropped


def reference_examples(data: TaskArgs, tokenizer, *, limit: int) -> tuple[list[SFTExample], dict[str, Any]]:
    """UltraFeedback (prompt, best response) pairs of the training prompts for reward normalization,
    formatted like the training data; over-long ones dropped and counted, then the first ``limit`` kept."""
    train_data, _, source = ultrafeedback_splits(data)
    demos = [uf.Demonstration(i.id, i.prompt, i.reference) for i in train_data.instructions]
    out, drops = uf.build_sft_examples(demos, tokenizer, **_caps(data))
    out = out[: limit or None]
    if not out:
        raise DataError("no reference responses left for reward normalization", path=source)
    return out, {"n": len(out), "dropped": dict(drops.counts), "source": source}


# ----------------------------------------------------------------------------------------------
# Items for evaluation: TL;DR posts or UltraFeedback instructions


def held_out_items(data: TldrDataArgs) -> list:
    """Every held-out item of a data section: TL;DR posts (the SFT stage's split) or UltraFeedback
    instructions (the held-out prompts, reference = the chosen / best response)."""
    if is_tldr(data):
        if data.valid:
            return load_posts(data.valid, "validation")
        if Path(data.train).exists():
            return load_post_splits(dataclasses.replace(data, limit=0))[1]
        return load_posts(data.train, "validation")
    return ultrafeedback_splits(data)[1].instructions


def query_ids(tokenizer, item, data: TaskArgs) -> list[int]:
    """Query ids of an item. TL;DR: smart truncation to ``max_query_length`` (DataError when even an
    empty post does not fit); UltraFeedback: the formatted prompt, DataError when over the cap."""
    if isinstance(item, Post):
        return format_query(tokenizer, item.subreddit, item.title, item.post, data.max_query_length)[1]
    ids = uf.prompt_ids(tokenizer, item.prompt, data.template)
    if len(ids) > data.max_query_length:
        raise DataError(f"prompt is {len(ids)} tokens, over max_query_length {data.max_query_length}", field="prompt")
    return ids


def response_ids(tokenizer, text: str, data: TaskArgs) -> list[int]:
    """Response ids as the task trains them: TL;DR ``" " + text + EOS``, UltraFeedback ``text + EOS``."""
    return format_response(tokenizer, text) if is_tldr(data) else uf.response_ids(tokenizer, text)


def query_text(item) -> str:
    """Human-readable query of an item (reports and LLM judging)."""
    if isinstance(item, Post):
        return f"SUBREDDIT: r/{item.subreddit}\n\nTITLE: {item.title}\n\nPOST: {item.post}"
    return item.prompt


def reference_of(item) -> str:
    """The reference response of an item: the human TL;DR or the chosen / best response."""
    return item.summary if isinstance(item, Post) else item.reference


def held_out_pairs(data: TaskArgs, tokenizer) -> Sequence | None:
    """Held-out preference pairs of an evaluation data section when the task has them in the same
    source (UltraFeedback), else None (TL;DR comparisons are a separate source: ``evaluate-rm``)."""
    if is_tldr(data):
        return None
    return ultrafeedback_preferences(data, tokenizer, need_train=False)[1]
