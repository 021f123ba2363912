"""UltraFeedback (Cui et al. 2023): instruction-following preference data, the second task.

Three record forms are read, from local JSON-lines files or the hub, one form per record so a file
may even mix them:

* raw ``openbmb/UltraFeedback``: ``instruction``, ``source``, ``completions[4]`` each with
  ``response``, ``overall_score`` (1-10) and per-aspect ``annotations``. Preference pairs are built
  as the instruction-following system this project reproduces builds them (``pair_completions``):
  English instruction/response pairs only (``lingua`` language identification, ``is_english``), a prompt's
  completions sorted by overall score, the best remaining one paired greedily with the next one
  scoring at least ``min_score_gap`` (2.0) lower; the completions left unpaired are the SFT
  demonstrations;
* ``trl-lib/ultrafeedback_binarized`` (chosen = highest overall score, rejected = a random lower
  one; ``score_chosen`` / ``score_rejected`` at the top level or under ``metadata``) and Argilla's
  mean-rating binarization (``metadata.rating_chosen`` / ``rating_rejected``, or ``chosen-rating``
  / ``rejected-rating``). ``chosen`` / ``rejected`` are plain text or chat messages (the last
  assistant turn is the response). Ties (equal scores) carry no preference: dropped and counted.
  The chosen response of every row is its SFT demonstration.

Held-out split (``split_by_prompt``): the distinct prompts in first-seen order, shuffled by a
seeded RNG, the first ``1 - eval_fraction`` (0.8) for training; all of a prompt's pairs and
demonstrations land on one side.

Formatting (``format_prompt``): the tokenizer's chat template with one user turn and the
generation prompt when it has one, otherwise the plain template ``PLAIN_TEMPLATE``; the response is
``response.strip() + EOS``. Prompts over the prompt cap and responses over the response cap are
dropped and counted, never cut (a cut instruction asks something else).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from ..errors import DataError
from .comparisons import PreferenceExample
from .io import check_local_source, read_jsonl, require
from .tldr import DropCounts, SFTExample, load_hub_rows

DATASET = "trl-lib/ultrafeedback_binarized"
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
Template = Literal["auto", "chat", "plain"]


@dataclass(frozen=True)
class Completion:
    """One model's answer to an instruction with its overall score (raw form)."""

    response: str
    score: float
    model: str = ""


@dataclass(frozen=True)
class Pair:
    """A preference pair: ``chosen`` scored higher than ``rejected`` for ``prompt``."""

    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    score_chosen: float
    score_rejected: float


@dataclass(frozen=True)
class Demonstration:
    """An SFT example in text: a prompt and a response to imitate."""

    prompt_id: str
    prompt: str
    response: str


@dataclass(frozen=True)
class Instruction:
    """An RL / evaluation prompt and its reference: the best-scored response known for it."""

    id: str
    prompt: str
    reference: str


@dataclass
class UltraFeedbackData:
    """Everything one source yields: pairs, SFT demonstrations, prompts, and what was dropped:
    ``drops`` records or completions lost to every use, ``pair_drops`` rows that give no preference
    pair but still an SFT demonstration (ties)."""

    pairs: list[Pair] = field(default_factory=list)
    demonstrations: list[Demonstration] = field(default_factory=list)
    instructions: list[Instruction] = field(default_factory=list)
    drops: DropCounts = field(default_factory=DropCounts)
    pair_drops: DropCounts = field(default_factory=DropCounts)


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of sha1(prompt)."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# English filtering


_DETECTOR = None


def is_english(text: str) -> bool:
    """False only when ``text`` is identifiably in another language, by ``lingua`` (all languages,
    high-accuracy mode): its most likely language is not English, with a confidence of at least
    ``0.1`` and at least twice English's. Short answers that no language explains well ("Ten.",
    "Yes", "42", a line of code) stay: the filter drops what is plainly non-English, not what is
    hard to place (lingua calls "Ten." German with confidence 0.06). The detector is built once per
    process (its language models load lazily: about 6 s and 1 GB for all of them)."""
    global _DETECTOR
    if _DETECTOR is None:
        from lingua import LanguageDetectorBuilder

        _DETECTOR = LanguageDetectorBuilder.from_all_languages().build()
    ranked = _DETECTOR.compute_language_confidence_values(text)
    if not ranked or ranked[0].language.name == "ENGLISH":
        return True
    english = next((c.value for c in ranked if c.language.name == "ENGLISH"), 0.0)
    return not (ranked[0].value >= 0.1 and ranked[0].value >= 2 * english)


# ----------------------------------------------------------------------------------------------
# Pairing (raw form)


def pair_completions(completions: list[Completion], min_score_gap: float = 2.0) -> tuple[list[tuple[Completion, Completion]], list[Completion]]:
    """Greedy min-gap pairing of one prompt's completions.

    Completions are sorted by score, best first (ties keep their input order). Repeatedly the best
    remaining completion is paired, as chosen, with the first remaining one (the highest-scored)
    whose score is at least ``min_score_gap`` lower, and both leave the pool; a best completion with
    no such partner leaves the pool unpaired. Returns ``(pairs, unpaired)``, each in that order.

    Example, scores [9, 8.5, 8, 3] with gap 2: (9, 3) is a pair; 8.5 and 8 find no partner -> unpaired.
    Raises ValueError for a negative gap.
    """
    if min_score_gap < 0:
        raise ValueError(f"min_score_gap must be >= 0, got {min_score_gap}")
    pool = sorted(completions, key=lambda c: -c.score)
    pairs, unpaired = [], []
    while pool:
        best = pool.pop(0)
        j = next((k for k, c in enumerate(pool) if best.score - c.score >= min_score_gap), None)
        if j is None:
            unpaired.append(best)
        else:
            pairs.append((best, pool.pop(j)))
    return pairs, unpaired


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _from_raw(record: dict[str, Any], prompt: str, out: UltraFeedbackData, *, path: str, line: int, min_score_gap: float, english_only: bool) -> None:
    completions = require(record, "completions", path=path, line=line, kind=list)
    if not prompt.strip():
        out.drops.add("empty_prompt")
        return
    if english_only and not is_english(prompt):
        out.drops.add("prompt_not_english")
        return
    kept = []
    for i, c in enumerate(completions):
        if not isinstance(c, dict):
            raise DataError("expected an object", path=path, line=line, field=f"completions[{i}]")
        response = c.get("response")
        if not isinstance(response, str):
            raise DataError("missing field" if response is None else f"expected str, got {type(response).__name__}", path=path, line=line, field=f"completions[{i}].response")
        score = _number(c.get("overall_score"))
        if score is None:
            out.drops.add("completion_without_score")
        elif not response.strip():
            out.drops.add("empty_response")
        elif english_only and not is_english(response):
            out.drops.add("response_not_english")
        else:
            kept.append(Completion(response, score, str(c.get("model", ""))))
    pid = prompt_id(prompt)
    pairs, unpaired = pair_completions(kept, min_score_gap)
    out.pairs += [Pair(pid, prompt, a.response, b.response, a.score, b.score) for a, b in pairs]
    out.demonstrations += [Demonstration(pid, prompt, c.response) for c in unpaired]
    if kept:
        out.instructions.append(Instruction(pid, prompt, max(kept, key=lambda c: c.score).response))
    else:
        out.drops.add("prompt_without_completions")


def _text(value: Any, *, path: str, line: int, field: str) -> str:
    """A response given as plain text or as chat messages (the last assistant turn)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        turns = [m.get("content") for m in value if m.get("role") == "assistant"]
        if turns and isinstance(turns[-1], str):
            return turns[-1]
    raise DataError("expected text or chat messages with an assistant turn", path=path, line=line, field=field)


def _prompt_text(record: dict[str, Any], *, path: str, line: int) -> str:
    if "prompt" in record:
        value = record["prompt"]
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # chat messages: the user turn
            turns = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
            if turns and isinstance(turns[-1], str):
                return turns[-1]
        raise DataError("expected text or chat messages with a user turn", path=path, line=line, field="prompt")
    chosen = record.get("chosen")  # trl-lib rows may carry the prompt only inside the messages
    if isinstance(chosen, list):
        turns = [m.get("content") for m in chosen if isinstance(m, dict) and m.get("role") == "user"]
        if turns and isinstance(turns[0], str):
            return turns[0]
    raise DataError("missing field", path=path, line=line, field="prompt")


_SCORE_FIELDS = (("score_chosen", "score_rejected"), ("rating_chosen", "rating_rejected"), ("chosen-rating", "rejected-rating"), ("chosen_rating", "rejected_rating"))


def _scores(record: dict[str, Any], *, path: str, line: int) -> tuple[float, float]:
    meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    for a, b in _SCORE_FIELDS:
        for where, prefix in ((record, ""), (meta, "metadata.")):
            if a in where:
                sa, sb = _number(where[a]), _number(where.get(b))
                if sa is None:
                    raise DataError("expected a number", path=path, line=line, field=prefix + a)
                if sb is None:
                    raise DataError("expected a number", path=path, line=line, field=prefix + b)
                return sa, sb
    raise DataError("no scores: expected score_chosen/score_rejected or rating_chosen/rating_rejected (top level or under metadata)", path=path, line=line, field="score_chosen")


def _from_binarized(record: dict[str, Any], prompt: str, out: UltraFeedbackData, *, path: str, line: int) -> None:
    chosen = _text(record["chosen"], path=path, line=line, field="chosen")
    rejected = _text(record["rejected"], path=path, line=line, field="rejected")
    sc, sr = _scores(record, path=path, line=line)
    if not prompt.strip():
        out.drops.add("empty_prompt")
        return
    if not chosen.strip() or not rejected.strip():
        out.drops.add("empty_response")
        return
    pid = prompt_id(prompt)
    out.demonstrations.append(Demonstration(pid, prompt, chosen))
    out.instructions.append(Instruction(pid, prompt, chosen))
    if sc == sr:
        out.pair_drops.add("tie")
    elif sc < sr:
        out.pair_drops.add("chosen_scored_lower")
    elif chosen.strip() == rejected.strip():
        out.pair_drops.add("identical_responses")
    else:
        out.pairs.append(Pair(pid, prompt, chosen, rejected, sc, sr))


def _records(source: str | Path, split: str) -> Iterable[tuple[str, int, dict[str, Any]]]:
    check_local_source(source)
    path = Path(source)
    if path.is_dir() and (path / f"{split}.jsonl").is_file():
        path = path / f"{split}.jsonl"
    if path.is_file():
        for line, record in read_jsonl(path):
            yield str(path), line, record
        return
    for i, row in enumerate(load_hub_rows(str(source), split)):
        yield f"{source}[{split}]", i + 1, dict(row)


def load_ultrafeedback(source: str | Path, split: str = "train", *, min_score_gap: float = 2.0, english_only: bool = True, limit: int | None = None) -> UltraFeedbackData:
    """Pairs, SFT demonstrations and prompts of an UltraFeedback source in any of the three forms.

    ``source``: a JSON-lines file, a folder holding ``{split}.jsonl``, or a hub dataset id
    (``openbmb/UltraFeedback``, ``trl-lib/ultrafeedback_binarized``,
    ``argilla/ultrafeedback-binarized-preferences-cleaned``). ``limit`` stops after that many records.
    A prompt that occurs twice keeps its first record (counted as ``duplicate_prompt``).

    Raises DataError naming file, line and field for malformed JSON, missing fields, scores that are
    not numbers and a record in none of the forms; an unreachable hub dataset raises DataError too.
    """
    out, seen = UltraFeedbackData(), set()
    for n, (path, line, record) in enumerate(_records(source, split)):
        if limit is not None and n >= limit:
            break
        raw = "completions" in record and "instruction" in record
        if not raw and not ("chosen" in record and "rejected" in record):
            raise DataError("not an UltraFeedback record: expected instruction + completions (raw) or prompt + chosen + rejected (binarized)", path=path, line=line, field="instruction")
        prompt = require(record, "instruction", path=path, line=line) if raw else _prompt_text(record, path=path, line=line)
        if prompt in seen:
            out.drops.add("duplicate_prompt")
            continue
        seen.add(prompt)
        if raw:
            _from_raw(record, prompt, out, path=path, line=line, min_score_gap=min_score_gap, english_only=english_only)
        else:
            _from_binarized(record, prompt, out, path=path, line=line)
    return out


def split_by_prompt(data: UltraFeedbackData, eval_fraction: float = 0.2, seed: int = 42) -> tuple[UltraFeedbackData, UltraFeedbackData]:
    """(train, eval): distinct prompt ids in first-seen order, shuffled with ``random.Random(seed)``,
    the first ``round((1 - eval_fraction) * n)`` train. Drop counts stay with the train side.
    Raises ValueError for a fraction outside [0, 1]."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval fraction must be in [0, 1], got {eval_fraction}")
    ids = list(dict.fromkeys([i.id for i in data.instructions] + [p.prompt_id for p in data.pairs] + [d.prompt_id for d in data.demonstrations]))
    random.Random(seed).shuffle(ids)
    train_ids = set(ids[: round((1 - eval_fraction) * len(ids))])

    def side(keep: bool) -> UltraFeedbackData:
        return UltraFeedbackData(
            pairs=[p for p in data.pairs if (p.prompt_id in train_ids) == keep],
            demonstrations=[d for d in data.demonstrations if (d.prompt_id in train_ids) == keep],
            instructions=[i for i in data.instructions if (i.id in train_ids) == keep],
            drops=data.drops if keep else DropCounts(),
            pair_drops=data.pair_drops if keep else DropCounts(),
        )

    return side(True), side(False)


# ----------------------------------------------------------------------------------------------
# Formatting


def format_prompt(tokenizer, prompt: str, template: Template = "auto") -> str:
    """The query text of ``prompt``: the chat template with one user turn and the generation prompt
    (``template`` chat, or auto when the tokenizer has one), else ``PLAIN_TEMPLATE``. Raises
    DataError for ``template="chat"`` with a tokenizer that has no chat template."""
    use_chat = template == "chat" or (template == "auto" and getattr(tokenizer, "chat_template", None))
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("template 'chat' asked for, but the tokenizer has no chat template", field="data.template")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(prompt=prompt)


def prompt_ids(tokenizer, prompt: str, template: Template = "auto") -> list[int]:
    """Token ids of ``format_prompt`` (special tokens of the template are parsed, none added)."""
    return tokenizer.encode(format_prompt(tokenizer, prompt, template), add_special_tokens=False)


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of ``response.strip()`` followed by the EOS id."""
    return tokenizer.encode(response.strip(), add_special_tokens=False) + [tokenizer.eos_token_id]


def _within_caps(tokenizer, prompt: str, responses: list[str], drops: DropCounts, *, template: Template, max_query_length: int, max_response_length: int) -> tuple[list[int], list[list[int]]] | None:
    """(prompt ids, response ids) when the prompt and every response fit their caps; else None,
    counted in ``drops`` as ``prompt_too_long`` or ``response_too_long`` (EOS included)."""
    q = prompt_ids(tokenizer, prompt, template)
    if len(q) > max_query_length:
        drops.add("prompt_too_long")
        return None
    rs = [response_ids(tokenizer, r) for r in responses]
    if max(len(r) for r in rs) > max_response_length:
        drops.add("response_too_long")
        return None
    return q, rs


def build_sft_examples(demos: Iterable[Demonstration], tokenizer, *, template: Template = "auto", max_query_length: int = 512, max_response_length: int = 512) -> tuple[list[SFTExample], DropCounts]:
    """Tokenized demonstrations; over-long prompts (``prompt_too_long``) and responses
    (``response_too_long``, EOS included) are dropped and counted."""
    out, drops = [], DropCounts()
    caps = dict(template=template, max_query_length=max_query_length, max_response_length=max_response_length)
    for d in demos:
        if fit := _within_caps(tokenizer, d.prompt, [d.response], drops, **caps):
            out.append(SFTExample(id=d.prompt_id, query_ids=fit[0], response_ids=fit[1][0]))
    return out, drops


def build_preference_examples(pairs: Iterable[Pair], tokenizer, *, template: Template = "auto", max_query_length: int = 512, max_response_length: int = 512) -> tuple[list[PreferenceExample], DropCounts]:
    """Tokenized pairs; a pair with an over-long prompt or either response over the cap is dropped
    and counted (``prompt_too_long`` / ``response_too_long``)."""
    out, drops = [], DropCounts()
    caps = dict(template=template, max_query_length=max_query_length, max_response_length=max_response_length)
    for p in pairs:
        if fit := _within_caps(tokenizer, p.prompt, [p.chosen, p.rejected], drops, **caps):
            out.append(PreferenceExample(p.prompt_id, fit[0], *fit[1]))
    return out, drops
