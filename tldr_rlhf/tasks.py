"""Task dispatch: every stage asks here for its data, whatever the task (``data.task``).

A stage never branches on the task; it calls one of these with its data section and a tokenizer and
gets the same types back for TL;DR and UltraFeedback:

* ``sft_examples`` -> (train, held-out) ``SFTExample`` lists and their drop counts;
* ``rm_pairs`` / ``dpo_pairs`` -> the reward model's / DPO's (train, held-out) ``PreferenceExample``
  lists and a report;
* ``normalization_references`` -> the reward model's normalization references; ``ood_sets`` -> which
  out-of-distribution sets ``evaluate-rm`` scores;
* ``rl_prompts`` -> the training prompts (``Prompt``: id, query ids, reference text);
* ``held_out_items`` / ``query_ids`` / ``response_ids`` / ``query_text`` / ``reference_of`` for
  ``evaluate``, which works on items (TL;DR ``Post`` or UltraFeedback ``Instruction``).

TL;DR keeps its loaders where they were (data/tldr.py, data/comparisons.py and the stages'
``load_*`` functions; the reward model's and DPO's comparisons are split here); UltraFeedback's are
in data/ultrafeedback.py. The UltraFeedback split is by prompt with a seeded shuffle
(``eval_fraction``, ``split_seed``), identical in every stage because every stage loads the whole
source before splitting and limiting.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

from .config import PreferenceDataArgs, RewardNormArgs, TaskArgs, TldrDataArgs
from .data import ultrafeedback as uf
from .data.comparisons import (
    Comparison,
    PreferenceExample,
    build_preference_examples,
    describe_drops,
    load_comparisons,
    no_usable_comparisons,
    split_by_post_id,
)
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
# Preference pairs of the reward model and DPO, the reward model's normalization references and
# out-of-distribution sets


def rm_pairs(data: PreferenceDataArgs, tokenizer, *, need_train: bool = True) -> tuple[list[PreferenceExample], list[PreferenceExample], dict[str, Any]]:
    """The reward model's (train, held-out) tokenized pairs and a report of what was dropped or
    truncated (``{"train": {"n", "dropped", "query_truncated"}, "valid": {...}}``).

    TL;DR: held-out comparisons come from ``valid_comparisons``, else (local file) the posts held
    out by id, else (hub) the dataset's validation split; CNN/DM comparisons found among them are
    set aside and counted (they are ``evaluate-rm``'s out-of-distribution set). UltraFeedback:
    ``ultrafeedback_preferences``. Raises DataError for malformed files (file, line, field), and for
    no usable held-out (or, with ``need_train``, training) pairs, naming the drop counts by reason.
    """
    if not is_tldr(data):
        return ultrafeedback_preferences(data, tokenizer, need_train=need_train)
    split_locally = Path(data.comparisons).exists() and not data.valid_comparisons
    comps: list[Comparison] = []
    drops = DropCounts()
    if need_train or split_locally:
        comps, drops = load_comparisons(data.comparisons, "train")
    comps, valid, vdrops = _held_out_comparisons(data, comps)
    comps, valid = _tldr_only(comps, drops), _tldr_only(valid, vdrops)
    if split_locally and not comps and not valid:  # every record of the file dropped or set aside
        raise no_usable_comparisons(data.comparisons, 0, DropCounts().update(drops, vdrops))
    if not need_train:
        comps = []
    train_ex, valid_ex, (notes, vnotes) = _tokenized_pairs(data, tokenizer, comps, valid, drops, vdrops, need_train=need_train)
    return train_ex, valid_ex, {
        "train": {"n": len(train_ex), "dropped": dict(drops.counts), "query_truncated": notes.counts.get("query_truncated", 0)},
        "valid": {"n": len(valid_ex), "dropped": dict(vdrops.counts), "query_truncated": vnotes.counts.get("query_truncated", 0)},
    }


def dpo_pairs(data: PreferenceDataArgs, tokenizer) -> tuple[list[PreferenceExample], list[PreferenceExample], dict[str, str]]:
    """DPO's (train, held-out) tokenized pairs and the drop counts of each side, as text.

    TL;DR: held-out comparisons come from ``valid_comparisons``, else (local file) the posts held
    out by id, else (hub) the dataset's validation split (CNN/DM comparisons are kept). UltraFeedback:
    ``ultrafeedback_preferences``. Raises DataError for malformed files (file, line, field), no
    usable training comparisons and an empty held-out set.
    """
    if not is_tldr(data):
        train_ex, valid_ex, report = ultrafeedback_preferences(data, tokenizer)
        return train_ex, valid_ex, {side: ", ".join(f"{k}: {v}" for k, v in sorted(report[side]["dropped"].items())) or "none" for side in ("train", "valid")}
    comps, drops = load_comparisons(data.comparisons, "train")
    if not comps:  # every record of the training source dropped
        raise no_usable_comparisons(data.comparisons, 0, drops)
    comps, valid, vdrops = _held_out_comparisons(data, comps)
    train_ex, valid_ex, _ = _tokenized_pairs(data, tokenizer, comps, valid, drops, vdrops, need_train=True)
    return train_ex, valid_ex, {"train": str(drops), "valid": str(vdrops)}


def _held_out_comparisons(data: PreferenceDataArgs, comps: list[Comparison]) -> tuple[list[Comparison], list[Comparison], DropCounts]:
    """(training, held-out) TL;DR comparisons and the held-out source's drops: ``valid_comparisons``,
    else (local file) the posts of ``comps`` held out by id, else (hub) the validation split. Raises
    DataError when a local split holds out none of the posts."""
    vdrops = DropCounts()
    if data.valid_comparisons:
        valid, vdrops = load_comparisons(data.valid_comparisons, "validation")
    elif Path(data.comparisons).exists():
        comps, valid = split_by_post_id(comps, data.valid_fraction)
        if comps and not valid:
            raise DataError(f"no held-out comparisons: valid_fraction {data.valid_fraction} holds out none of the posts of the {len(comps)} usable comparisons (raise it or give valid_comparisons)", path=data.comparisons)
    else:
        valid, vdrops = load_comparisons(data.comparisons, "validation")
    return comps, valid, vdrops


def _tokenized_pairs(data, tokenizer, comps, valid, drops: DropCounts, vdrops: DropCounts, *, need_train: bool):
    """Both sides' comparisons limited (``limit``, ``valid_limit``) and tokenized (drops counted into
    ``drops`` / ``vdrops``) -> (train, held-out, (notes, held-out notes)). Raises DataError when no
    held-out pair (or, with ``need_train``, no training pair) is left."""
    if data.limit:
        comps = comps[: data.limit]
    if data.valid_limit:
        valid = valid[: data.valid_limit]
    caps = dict(max_query_length=data.max_query_length, max_response_length=data.max_response_length)
    notes, vnotes = DropCounts(), DropCounts()
    train_ex, drops = build_preference_examples(comps, tokenizer, drops=drops, notes=notes, **caps)
    valid_ex, vdrops = build_preference_examples(valid, tokenizer, drops=vdrops, notes=vnotes, **caps)
    if not valid_ex:
        split_locally = Path(data.comparisons).exists() and not data.valid_comparisons
        raise no_usable_comparisons(data.valid_comparisons or data.comparisons, 0, vdrops, "held-out comparisons" if split_locally else "comparisons")
    if need_train and not train_ex:
        raise no_usable_comparisons(data.comparisons, 0, drops, "training comparisons")
    return train_ex, valid_ex, (notes, vnotes)


def _tldr_only(comps: list[Comparison], drops: DropCounts) -> list[Comparison]:
    """The TL;DR comparisons of ``comps``; CNN/DM ones are counted in ``drops`` as ``cnndm_set_aside``."""
    out = [c for c in comps if not c.is_cnndm]
    if len(out) < len(comps):
        drops.counts["cnndm_set_aside"] = drops.counts.get("cnndm_set_aside", 0) + len(comps) - len(out)
    return out


def load_references(norm: RewardNormArgs, tokenizer, *, max_query_length: int, max_response_length: int) -> tuple[list[SFTExample], dict[str, Any]]:
    """(query, reference summary) pairs of SFT posts for reward normalization, formatted like the
    training data; posts whose query cannot fit or whose reference is over the cap are dropped and
    counted. Raises DataError when none is left."""
    posts = load_posts(norm.posts, norm.split, limit=norm.limit or None)
    notes = DropCounts()
    out, drops = build_sft_examples(posts, tokenizer, max_query_length=max_query_length, max_response_length=max_response_length, notes=notes)
    if not out:
        raise DataError("no reference summaries left for reward normalization", path=norm.posts)
    return out, {"n": len(out), "dropped": dict(drops.counts), "query_truncated": notes.counts.get("query_truncated", 0), "source": norm.posts, "split": norm.split}


def normalization_references(norm: RewardNormArgs, data: PreferenceDataArgs, tokenizer) -> tuple[list[SFTExample], dict[str, Any]]:
    """The (query, reference response) pairs the reward model is normalized on (N+ detail 14) and a
    report of them. TL;DR: the reference summaries of ``norm``'s SFT posts (``load_references``);
    UltraFeedback: the best response of each training prompt (``reference_examples``, ``norm.limit``
    of them), formatted like the training pairs. Raises DataError when none is left."""
    if is_tldr(data):
        return load_references(norm, tokenizer, max_query_length=data.max_query_length, max_response_length=data.max_response_length)
    return reference_examples(data, tokenizer, limit=norm.limit)


def ood_sets(data: TaskArgs) -> tuple[str, ...]:
    """The out-of-distribution sets of ``evaluate-rm`` that exist for the task of ``data``: "cnndm"
    (OpenAI's CNN/DM comparisons) and "judge" (GPT-3.5-judged PPO summaries against the reference)
    are TL;DR sets; another task has none."""
    return ("cnndm", "judge") if is_tldr(data) else ()


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
