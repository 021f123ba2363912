"""Rollouts shared by PPO, GRPO and RLOO: sample, truncate after EOS, log-probs at temperature, score.

One rollout (N+ details 19-21, 23):

1. sample a response for each left-padded query from the policy with pure temperature sampling
   (temperature 0.7, top_k 0, top_p 1.0), explicit EOS and pad ids, at most ``response_length`` new
   tokens (53 Pythia / 63 Qwen2.5), through ``generation.generate``; every response is kept up to
   and including its first EOS and padded after it (``ops.truncate_after_eos``). ``min_new_tokens``
   is never used: with EOS set it suppresses EOS entirely (the seeds' pitfall), and the EOS trick
   needs EOS free to be sampled;
2. lay the batch out as ``[left-padded query | right-padded response]``
   (``data.batching.collate_query_response``), the layout the reward model was trained on
   (N+ detail 13: keep padding consistent), with the response mask built from lengths;
3. compute the policy's and the reference model's log-probs of the sampled tokens with logits
   divided by the sampling temperature (``modeling.response_logits`` + ``ops.token_logprobs``),
   so that they are the log-probs of the distribution the tokens were drawn from (N+ detail 21);
4. score query + response with ``score_fn`` (the reward model, read at the last real token: the
   EOS), and replace the score of every response without EOS by a fixed penalty (-1; the EOS
   trick, N+ detail 23).

Log-probs are recomputed with a full forward pass (not taken from ``generate``), with the same
function the training step uses, so on the first minibatch of the first epoch, before any update,
the training pass gives the same numbers and the PPO ratio is exactly 1 (tested on CPU; on CUDA,
kernels chosen by batch size can differ in the last bits).

Shapes: B sequences, P query width, T response width (longest response in the batch, at most
``response_length``), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from .data.batching import QueryResponseBatch, collate_query_response
from .generation import generate
from .modeling import response_logits
from .ops import entropy_from_logits, token_logprobs

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score_fn(input_ids (B, L), attention_mask (B, L) bool) -> (B,)`` scalar reward per sequence,
read at the last real token; L = P + T in the ``[left-padded query | right-padded response]`` layout."""


@dataclass
class Rollout:
    """One batch of sampled responses with everything the updates need.

    batch: ``QueryResponseBatch`` (input_ids / attention_mask (B, P + T), response_mask (B, T)).
    logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens at the sampling temperature
    under the policy and the reference model (meaningful where ``response_mask``). ``logprobs`` is
    None until the update's own forward fills it when the rollout was sampled without the policy's
    scoring pass (``policy_logprobs=False``: GRPO with one optimizer step per rollout).
    entropy: (B, T) policy entropy in nats at the sampling temperature (None with ``logprobs``).
    scores: (B,) reward-model scores after the no-EOS penalty; raw_scores: (B,) before it.
    has_eos: (B,) bool, the response ended with EOS within ``response_length`` tokens.
    sample_logprobs: (B, T) log-probs the rollout engine drew the tokens with, when the sampler is
    not the policy (``rollout_engine``'s vllm; 0 after each response's end); None = the policy
    sampled. Only truncated importance sampling reads them (``importance_sampling``).
    """

    batch: QueryResponseBatch
    logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor | None
    scores: torch.Tensor
    raw_scores: torch.Tensor
    has_eos: torch.Tensor
    sample_logprobs: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool, True on real response tokens (up to and including the first EOS)."""
        return self.batch.response_mask

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) response lengths in tokens, EOS included."""
        return self.batch.response_mask.sum(-1)

    def __len__(self) -> int:
        return self.batch.input_ids.shape[0]

    def select(self, rows: torch.Tensor | list[int]) -> "Rollout":
        """The sub-rollout of the given rows (same P and T widths)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        b = self.batch
        sub = QueryResponseBatch(b.input_ids[rows], b.attention_mask[rows], b.response_mask[rows], b.query_width)
        return Rollout(sub, *(_apply(getattr(self, f.name), lambda t: t[rows]) for f in fields(self) if f.name != "batch"))

    def to(self, device) -> "Rollout":
        return Rollout(self.batch.to(device), *(_apply(getattr(self, f.name), lambda t: t.to(device)) for f in fields(self) if f.name != "batch"))


def _apply(t: torch.Tensor | None, fn):
    return None if t is None else fn(t)


def apply_no_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None = -1.0) -> torch.Tensor:
    """The EOS trick (N+ detail 23): responses without EOS get ``penalty`` instead of their score;
    ``penalty`` None keeps every score (no EOS trick, as TRL's ``missing_eos_penalty=None``).
    Shapes: scores (B,), has_eos (B,) bool -> (B,)."""
    if penalty is None:
        return scores
    return torch.where(has_eos, scores, torch.full_like(scores, penalty))


@torch.no_grad()
def response_logprobs(
    model, batch: QueryResponseBatch, *, temperature: float, batch_size: int = 16, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, T) of the response tokens under ``model`` with logits / ``temperature``, in
    forward chunks of ``batch_size`` rows; with ``with_entropy`` also the (B, T) entropy in nats of
    the tempered distribution (else None). Padded positions hold meaningless values: mask them."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logps, ents = [], []
    for i in range(0, batch.input_ids.shape[0], batch_size):
        ids = batch.input_ids[i : i + batch_size].to(device)
        att = batch.attention_mask[i : i + batch_size].to(device)
        logits = response_logits(model, ids, att, batch.query_width)
        logps.append(token_logprobs(logits, ids[:, batch.query_width:], temperature))
        if with_entropy:
            ents.append(entropy_from_logits(logits.float() / temperature))
        del logits
    model.train(was_training)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


@torch.no_grad()
def score_batch(score_fn: ScoreFn, batch: QueryResponseBatch, *, batch_size: int = 16) -> torch.Tensor:
    """Scores (B,) of the query + response rows from ``score_fn``, in chunks of ``batch_size``; a
    ``score_fn`` with a ``score_rows`` method (``reward.specs.RLReward``: text rewards need the query /
    response split) gets each chunk as a ``QueryResponseBatch`` instead. Raises ValueError when
    ``score_fn`` does not return one float per row."""
    out = []
    for i in range(0, batch.input_ids.shape[0], batch_size):
        ids, att = batch.input_ids[i : i + batch_size], batch.attention_mask[i : i + batch_size]
        if hasattr(score_fn, "score_rows"):
            s = score_fn.score_rows(QueryResponseBatch(ids, att, batch.response_mask[i : i + batch_size], batch.query_width))
        else:
            s = score_fn(ids, att)
        if s.shape != (ids.shape[0],):
            raise ValueError(f"score_fn must return shape ({ids.shape[0]},), got {tuple(s.shape)}")
        out.append(s.float().cpu())
    return torch.cat(out)


def sample_and_score(
    policy,
    score_fn: ScoreFn,
    queries: list[list[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    response_length: int = 53,
    temperature: float = 0.7,
    batch_size: int = 16,
) -> tuple[QueryResponseBatch, torch.Tensor, torch.Tensor]:
    """Steps 1, 2 and the scoring of step 4: sample one response per query, truncate after EOS,
    collate, and score. Returns (batch, raw scores (B,) before the no-EOS penalty, has_eos (B,) bool).
    Raises ValueError for a non-positive temperature or response length."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if response_length < 1:
        raise ValueError(f"response_length must be >= 1, got {response_length}")
    responses = generate(
        policy, queries, eos_token_id=eos_token_id, pad_token_id=pad_token_id, max_new_tokens=response_length,
        temperature=temperature, batch_size=batch_size,
    )
    has_eos = torch.tensor([bool(r) and r[-1] == eos_token_id for r in responses])
    batch = collate_query_response(queries, responses, pad_token_id)
    return batch, score_batch(score_fn, batch, batch_size=batch_size), has_eos


def finish_rollout(
    policy, ref_model, batch: QueryResponseBatch, raw_scores: torch.Tensor, has_eos: torch.Tensor, *,
    temperature: float, no_eos_penalty: float | None = -1.0, batch_size: int = 16, policy_logprobs: bool = True,
) -> Rollout:
    """Step 3 and the penalty of step 4: policy and reference log-probs at ``temperature``, policy
    entropy, and scores with the no-EOS penalty, for an already sampled and scored batch. Without
    ``policy_logprobs`` the policy's pass is skipped (logprobs and entropy None: the update fills them)."""
    logprobs = entropy = None
    if policy_logprobs:
        logprobs, entropy = response_logprobs(policy, batch, temperature=temperature, batch_size=batch_size, with_entropy=True)
        logprobs, entropy = logprobs.cpu(), entropy.cpu()
    ref_logprobs, _ = response_logprobs(ref_model, batch, temperature=temperature, batch_size=batch_size)
    return Rollout(
        batch=batch, logprobs=logprobs, ref_logprobs=ref_logprobs.cpu(), entropy=entropy,
        scores=apply_no_eos_penalty(raw_scores, has_eos, no_eos_penalty), raw_scores=raw_scores, has_eos=has_eos,
    )


def rollout(
    policy,
    ref_model,
    score_fn: ScoreFn,
    queries: list[list[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    response_length: int = 53,
    temperature: float = 0.7,
    no_eos_penalty: float | None = -1.0,
    batch_size: int = 16,
    policy_logprobs: bool = True,
) -> Rollout:
    """Sample one response per query and compute everything an RL update needs (see the module
    docstring for the steps and the N+ details they implement): ``sample_and_score`` then
    ``finish_rollout`` (its ``policy_logprobs``).

    ``queries``: unpadded query token lists (repeat a query G times for a GRPO / RLOO group).
    ``batch_size`` rows go through ``generate`` and each forward pass at a time. The returned tensors
    are on the CPU. Raises ValueError for a non-positive temperature or response length.
    """
    batch, raw, has_eos = sample_and_score(
        policy, score_fn, queries, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        response_length=response_length, temperature=temperature, batch_size=batch_size,
    )
    return finish_rollout(policy, ref_model, batch, raw, has_eos, temperature=temperature, no_eos_penalty=no_eos_penalty, batch_size=batch_size, policy_logprobs=policy_logprobs)


def select_rows(batch: QueryResponseBatch, rows: list[int], pad_token_id: int) -> QueryResponseBatch:
    """The given rows of a batch, re-collated so that P and T are those rows' own widths (after
    rejection sampling keeps a few of many candidates)."""
    queries, responses = [], []
    for i in rows:
        queries.append(batch.input_ids[i, : batch.query_width][batch.attention_mask[i, : batch.query_width]].tolist())
        responses.append(batch.responses[i][batch.response_mask[i]].tolist())
    return collate_query_response(queries, responses, pad_token_id)


def plain_sampling_config(model, *, eos_token_id: int, pad_token_id: int) -> None:
    """Replace ``model.generation_config`` by one with nothing but the EOS / pad ids, so that a
    checkpoint's own sampling defaults (repetition penalty, top_p, ...) cannot make the sampling
    distribution differ from ``softmax(logits / temperature)``, the distribution whose log-probs the
    updates use (N+ detail 21). In place."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=getattr(model.config, "bos_token_id", None))


def rollout_stats(r: Rollout) -> dict[str, float]:
    """Rollout metrics (N+ names): mean score and raw score, EOS rate, response length in tokens
    (EOS included), entropy per token in nats (tempered policy)."""
    mask = r.mask.float()
    return {
        "objective/scores": r.scores.mean().item(),
        "objective/raw_scores": r.raw_scores.mean().item(),
        "objective/eos_rate": r.has_eos.float().mean().item(),
        "objective/response_length": r.lengths.float().mean().item(),
        "objective/entropy": ((r.entropy * mask).sum() / mask.sum().clamp(min=1)).item(),
    }
