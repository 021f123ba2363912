"""Rewards beyond a reward model: what ``--reward`` names for PPO, GRPO, RLOO, online DPO and
``evaluate`` (docs/rewards.md).

A reward spec is one term or a weighted sum of terms, ``TERM[:WEIGHT],TERM[:WEIGHT],...`` (weight 1
when left out; the weight is the part after the last ``:`` when it is a plain number), each term one of:

* a built-in text reward (``BUILTINS``): ``rouge-l`` (ROUGE-L F1 of the response against the item's
  human reference, Lin 2004, via rouge-score with Porter stemming, as ``metrics.rouge_scores``),
  ``rouge-1``, ``rouge-2``, ``rouge-1-post`` (ROUGE-1 F1 against the post itself: extractiveness,
  ``rouge1_post``), and ``length`` (the response's length in whitespace-separated words);
* a Python callable ``module:function`` (the module importable from the working directory or the
  Python path), called as ``function(queries, responses, references)`` with three lists of N strings
  (the query text as the policy reads it, the response text without EOS, the reference text or None
  where the data has none) and returning N finite floats;
* a reward-model checkpoint (run folder ``final/``, hub id): its score at the response's EOS, the
  RL stages' reward before this module (N+ detail 11).

Examples: ``rouge-l``, ``rouge-l:1.0,length:-0.01``, ``runs/rm/final,length:-0.02``,
``my_rewards:bleu:0.5``. The reward is ``r = sum_k w_k r_k`` per response; the RL stages then give
responses without EOS the no-EOS score instead (the EOS trick, N+ detail 23, ``rollout.apply_no_eos_penalty``),
whatever the terms.

A term that raises, returns the wrong number of values, or a value that is not a finite number
fails the run with one ``RewardError`` line naming the flag and the term, e.g.
``--reward my_rewards:bleu: returned 3 values for 4 responses``.

Shapes: N responses (B rows of a rollout chunk), P query tokens, T response tokens.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..checkpoints import check_input, require_kind
from ..errors import ConfigError, RewardError
from ..generation import decode_response
from .loading import load_frozen_reward_model
from ..value_model import score_at_last_token

TextRewardFn = Callable[[list[str], list[str], list["str | None"]], Sequence[float]]
"""``fn(queries, responses, references) -> N floats``: the text reward of N responses."""

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _rouge(kind: str) -> TextRewardFn:
    def fn(queries: list[str], responses: list[str], references: list[str | None]) -> list[float]:
        import logging

        from rouge_score import rouge_scorer

        logging.getLogger("absl").setLevel(logging.WARNING)
        scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
        out = []
        for i, (resp, ref) in enumerate(zip(responses, references)):
            if ref is None:
                raise ValueError(f"response {i} has no reference text to compare with (this data has none)")
            out.append(float(scorer.score(ref, resp)[kind].fmeasure))  # rouge-score's order: (target, prediction)
        return out

    fn.__doc__ = f"{kind} F1 of each response against its reference, in [0, 1] (Porter stemming; empty response 0)."
    return fn


_POST_BODY = re.compile(r"\n\nPOST: (?P<post>.*?)\n\nTL;DR:\s*$", re.S)


def post_of_query(query: str) -> str:
    """The post body inside a TL;DR query (``data.tldr.QUERY_TEMPLATE``, as the policy reads it, truncated
    body included): the text between ``POST: `` and the final ``TL;DR:``; the whole query when it has no
    such part (another task's prompt)."""
    match = _POST_BODY.search(query)
    return match.group("post") if match else query


def rouge1_post(queries: list[str], responses: list[str], references: list[str | None]) -> list[float]:
    """ROUGE-1 F1 of each response against the POST it summarizes (not the reference), in [0, 1]:
    extractiveness, the positive-control reward of docs/learning.md (a reward a 135M policy can learn
    on held-out posts). Porter stemming as ``rouge-l``; empty response 0; needs no reference."""
    import logging

    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return [float(scorer.score(post_of_query(q), resp)["rouge1"].fmeasure) for q, resp in zip(queries, responses)]


def length_words(queries: list[str], responses: list[str], references: list[str | None]) -> list[float]:
    """The length of each response in whitespace-separated words (0 for an empty one)."""
    return [float(len(r.split())) for r in responses]


BUILTINS: dict[str, TextRewardFn] = {
    "rouge-l": _rouge("rougeL"),
    "rouge-1": _rouge("rouge1"),
    "rouge-2": _rouge("rouge2"),
    "rouge-1-post": rouge1_post,
    "length": length_words,
}


# ----------------------------------------------------------------------------------------------
# Parsing a spec


@dataclass
class Term:
    """One term of a reward spec: ``text`` as written, its ``weight``, its ``kind`` ("builtin",
    "callable" or "model"), and once resolved its text function ``fn`` or its loaded reward ``model``."""

    text: str
    weight: float
    kind: str
    fn: TextRewardFn | None = None
    model: Any = None


def term_kind(text: str) -> str:
    """"builtin" for a name in ``BUILTINS``; "model" for an existing path; "callable" for
    ``module:function``; else "model" (a hub id or a path that the validation reports missing)."""
    if text in BUILTINS:
        return "builtin"
    if Path(text).exists():
        return "model"
    if _CALLABLE.match(text):
        return "callable"
    return "model"


def parse_reward(spec: str, *, flag: str = "--reward") -> list[Term]:
    """The terms of a reward spec ``TERM[:WEIGHT],...`` (module docstring), unresolved. Pure.
    Raises ConfigError (one line naming ``flag``) for an empty spec or term, or a weight that is not a
    finite number."""
    if not spec or not spec.strip():
        raise ConfigError(f"{flag} '{spec}': empty reward")
    terms = []
    for part in spec.split(","):
        part = part.strip()
        text, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep and _NUMBER.match(tail.strip()):
            text, weight = head.strip(), float(tail)
        elif sep and tail.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity"):
            raise ConfigError(f"{flag} {spec}: weight '{tail}' of '{head}' must be a finite number")
        if not text:
            raise ConfigError(f"{flag} {spec}: empty term (expected TERM[:WEIGHT],TERM[:WEIGHT],...)")
        if not math.isfinite(weight):
            raise ConfigError(f"{flag} {spec}: weight of '{text}' must be a finite number")
        terms.append(Term(text, weight, term_kind(text)))
    return terms


def load_callable(text: str, *, flag: str = "--reward") -> TextRewardFn:
    """The function ``module:function`` names. Raises ConfigError (one line naming ``flag``) when the
    module does not import or has no such callable."""
    module, _, name = text.partition(":")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module: one line
        raise ConfigError(f"{flag} {text}: cannot import module '{module}': {type(e).__name__}: {e}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ConfigError(f"{flag} {text}: module '{module}' has no callable '{name}'")
    return fn


def check_reward_spec(spec: str, *, flag: str = "--reward", check_paths: bool = True) -> list[Term]:
    """``parse_reward`` plus, with ``check_paths``, each callable imported and each reward-model path
    present and of the reward-model kind (``checkpoints.require_kind``). Returns the terms (callables
    resolved when checked). Raises ConfigError naming ``flag``."""
    terms = parse_reward(spec, flag=flag)
    if not check_paths:
        return terms
    for t in terms:
        if t.kind == "callable":
            t.fn = load_callable(t.text, flag=flag)
        elif t.kind == "model":
            if not Path(t.text).exists() and "/" not in t.text:
                raise ConfigError(f"{flag} {t.text}: not a built-in ({', '.join(BUILTINS)}), a module:function, nor an existing reward-model path")
            check_input(t.text, flag, "reward-model path")
            if Path(t.text).is_dir():
                require_kind(t.text, "reward_model", flag)
    return terms


# ----------------------------------------------------------------------------------------------
# Scoring


def checked_values(values: Any, n: int, *, flag: str, term: str) -> torch.Tensor:
    """``values`` (a term's output) as an (n,) float32 tensor. Raises RewardError naming ``flag`` and
    ``term`` when they are not n finite numbers."""
    try:
        t = torch.as_tensor(values if not isinstance(values, torch.Tensor) else values.detach().cpu(), dtype=torch.float64)
    except Exception:  # noqa: BLE001 - strings, ragged lists, None: one line
        raise RewardError(f"{flag} {term}: returned {type(values).__name__} {str(values)[:80]!r}, expected {n} floats") from None
    if t.dim() == 0:
        raise RewardError(f"{flag} {term}: returned one number, expected {n} floats (one per response)")
    if t.dim() != 1 or t.shape[0] != n:
        raise RewardError(f"{flag} {term}: returned {t.shape[0] if t.dim() == 1 else 'shape ' + str(tuple(t.shape))} values for {n} responses")
    bad = (~torch.isfinite(t)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise RewardError(f"{flag} {term}: returned {t[i].item()} for response {i} ({len(bad)} of {n} not finite)")
    return t.float()


def text_term_scores(term: Term, queries: list[str], responses: list[str], references: list[str | None], *, flag: str) -> torch.Tensor:
    """(N,) scores of one text term (built-in or callable), unweighted. Raises RewardError naming
    ``flag`` and the term when it raises or returns something other than N finite floats."""
    fn = term.fn or BUILTINS.get(term.text) or load_callable(term.text, flag=flag)
    term.fn = fn
    try:
        out = fn(list(queries), list(responses), list(references))
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's function failed: one line naming it
        raise RewardError(f"{flag} {term.text}: raised {type(e).__name__}: {e}") from None
    return checked_values(out, len(responses), flag=flag, term=term.text)


def weighted_sum(parts: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``sum_k w_k r_k`` of (weight, (N,) scores) pairs, in float32 -> (N,)."""
    total = torch.zeros_like(parts[0][1], dtype=torch.float32)
    for w, s in parts:
        total = total + w * s.float()
    return total


def score_texts(terms: Sequence[Term], queries: list[str], responses: list[str], references: list[str | None], *, flag: str = "--reward") -> torch.Tensor:
    """(N,) weighted sum of text terms (every term must be a built-in or callable). Raises
    RewardError as ``text_term_scores``, and for a model term (``RLReward`` / ``evaluate`` score those)."""
    parts = []
    for t in terms:
        if t.kind == "model":
            raise RewardError(f"{flag} {t.text}: a reward model cannot score texts here")
        parts.append((t.weight, text_term_scores(t, queries, responses, references, flag=flag)))
    return weighted_sum(parts)


class RLReward:
    """The ``score_fn`` of an RL stage for a reward spec (``rollout.score_batch`` calls
    ``score_rows``): each row of a ``[left-padded query | right-padded response]`` batch is decoded
    to query and response text (``generation.decode_response``: EOS and the leading space dropped),
    its reference looked up by its query token ids among the run's prompts, the text terms computed on
    the texts and the reward-model terms read at the last real token (N+ detail 11) on ``device``;
    the weighted sum is returned (B,) float32 on the CPU. Called as a plain ``ScoreFn`` (ids, mask)
    it works only when every term is a reward model; then it also ``shares_prompt``: called with
    ``num_queries`` / ``query_width`` (``group_rl.score_groups``), each reward model runs every query
    once for its group, as the stage's own reward-model scoring does."""

    def __init__(self, terms: list[Term], tokenizer, prompts: Sequence, *, device, autocast=None, flag: str = "--reward"):
        self.terms, self.tokenizer, self.device, self.autocast, self.flag = terms, tokenizer, device, autocast, flag
        self.references: dict[tuple[int, ...], str] = {}
        for p in prompts:
            self.references.setdefault(tuple(p.query_ids), p.reference)

    @property
    def reward_model(self):
        """The first reward-model term's model (PPO's value model starts from it), else None."""
        return next((t.model for t in self.terms if t.kind == "model"), None)

    @property
    def shares_prompt(self) -> bool:
        """Whether ``__call__`` takes the shared-prompt layout: every term is a reward model."""
        return all(t.kind == "model" for t in self.terms)

    @torch.no_grad()
    def _model_scores(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **shared) -> torch.Tensor:
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            return score_at_last_token(model, input_ids.to(self.device), attention_mask.to(self.device), **shared).float().cpu()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **shared) -> torch.Tensor:
        """(B,) rewards of full rows; ``shared`` (``num_queries``, ``query_width``): row r holds the
        query of row r % Q, each query computed once (``value_model.score_at_last_token``)."""
        if not self.shares_prompt:
            raise RewardError(f"{self.flag}: text rewards need the query / response split (call score_rows)")
        return weighted_sum([(t.weight, self._model_scores(t.model, input_ids, attention_mask, **shared)) for t in self.terms])

    def texts(self, batch) -> tuple[list[str], list[str], list[str | None]]:
        """(queries, responses, references) of a ``QueryResponseBatch``'s rows (reference None for a
        query that is none of the prompts')."""
        p = batch.query_width
        queries, responses, refs = [], [], []
        for i in range(batch.input_ids.shape[0]):
            q = batch.input_ids[i, :p][batch.attention_mask[i, :p].bool()].tolist()
            r = batch.responses[i][batch.response_mask[i].bool()].tolist()
            queries.append(self.tokenizer.decode(q))
            responses.append(decode_response(self.tokenizer, r))
            refs.append(self.references.get(tuple(q)))
        return queries, responses, refs

    def score_rows(self, batch) -> torch.Tensor:
        """(B,) rewards of a ``QueryResponseBatch``'s rows (class docstring)."""
        texts = self.texts(batch) if any(t.kind != "model" for t in self.terms) else None
        parts = []
        for t in self.terms:
            if t.kind == "model":
                parts.append((t.weight, self._model_scores(t.model, batch.input_ids, batch.attention_mask)))
            else:
                parts.append((t.weight, text_term_scores(t, *texts, flag=self.flag)))
        return weighted_sum(parts)


def rl_reward_spec(cfg) -> tuple[str, str]:
    """(spec, flag) of an RL stage's reward: ``cfg.reward`` (``--reward``) when set, else the reward
    model ``cfg.rm_path`` (``--rm-path``, the field older configs name it by). Raises ConfigError
    when neither is given."""
    if cfg.reward:
        return cfg.reward, "--reward"
    if cfg.rm_path:
        return cfg.rm_path, "--rm-path"
    raise ConfigError("--reward: give a reward (--reward rouge-l, --reward module:function, --reward RM_PATH, ...) or --rm-path")


def load_rl_reward(cfg, tokenizer, prompts: Sequence, *, dtype: torch.dtype, device, autocast=None) -> RLReward:
    """The reward of an RL stage (``rl_reward_spec``), its callables imported and its reward models
    loaded frozen in ``dtype`` on ``device`` (dropout off, N+ detail 7). Raises ConfigError for a bad
    spec, ModelLoadError for a reward-model path that does not load."""
    spec, flag = rl_reward_spec(cfg)
    # the old field is one reward-model path, whatever it looks like
    terms = [Term(spec, 1.0, "model")] if flag == "--rm-path" else check_reward_spec(spec, flag=flag)
    for t in terms:
        if t.kind == "model":
            t.model = load_frozen_reward_model(t.text, dtype=dtype).to(device)
    return RLReward(terms, tokenizer, prompts, device=device, autocast=autocast, flag=flag)
