"""Set-up the RL stages (PPO, GRPO, RLOO) share: prompts, frozen models, the reward model's score
function, the prompt order, the linear learning-rate anneal and sample records.

Shapes: B sequences, P query width, T response width.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TldrDataArgs
from ..data.tldr import format_query
from ..errors import DataError
from ..generation import decode_response
from ..modeling import frozen_weights_dtype as model_dtype  # noqa: F401  (ppo, grpo: the frozen models' dtype)
from ..modeling import load_causal_lm, load_frozen_reference, load_frozen_reward_model
from ..rollout import Rollout, ScoreFn
from ..value_model import score_at_last_token
from ..tasks import is_tldr, ultrafeedback_prompts
from .common import load_post_splits
from .loop import global_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One RL prompt: the post id, its formatted query ids (unpadded) and the human reference TL;DR."""

    id: str
    query_ids: list[int]
    reference: str


def load_prompts(data: TldrDataArgs, tokenizer) -> tuple[list[Prompt], int]:
    """The SFT training posts as RL prompts (N+ detail 17), formatted with smart truncation
    (detail 2). Returns (prompts, number of queries truncated). Raises DataError for malformed
    records (file, line, field) or an empty prompt set; nothing is loaded but the tokenizer.
    Another task's prompts come from ``tasks`` (the count is then of prompts dropped as too long)."""
    if not is_tldr(data):
        return ultrafeedback_prompts(data, tokenizer)
    posts, _ = load_post_splits(data)
    if not posts:
        raise DataError("no training posts", path=data.train)
    prompts, truncated = [], 0
    for p in posts:
        _, ids, cut = format_query(tokenizer, p.subreddit, p.title, p.post, data.max_query_length)
        truncated += cut
        prompts.append(Prompt(p.id, ids, p.summary.strip()))
    return prompts, truncated


def prompt_order(n: int, batch: int, seed: int, num_updates: int) -> list[list[int]]:
    """Prompt indices of every update's batch: passes over the prompts in a fresh random order each
    time they run out (N+ detail 17), the incomplete tail of each pass dropped. A pure function of
    its arguments, so a resumed run and every process agree. Raises DataError when there are fewer
    prompts than one batch."""
    if n < batch:
        raise DataError(f"{n} prompts are fewer than one rollout batch of {batch}")
    per_pass = n // batch
    return global_batches(n, batch, seed, math.ceil(num_updates / per_pass))[:num_updates]


def reward_score_fn(reward_model: nn.Module, device: torch.device, autocast=None) -> ScoreFn:
    """``score_fn`` for ``rollout``: the reward model's score at the last real token (N+ detail 12),
    computed on ``device`` without gradients, returned on the CPU as float32."""

    @torch.no_grad()
    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        import contextlib

        with autocast() if autocast is not None else contextlib.nullcontext():
            return score_at_last_token(reward_model, input_ids.to(device), attention_mask.to(device)).float().cpu()

    return score


def load_rl_models(sft_path: str, rm_path: str, tokenizer, *, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(policy, reference, reward model) of an RL stage: the trainable policy from the SFT checkpoint
    in float32 master weights on the CPU (the accelerator moves it), sampling config reset to plain
    sampling with explicit EOS / pad (N+ detail 19); the frozen reference (same checkpoint) and
    frozen reward model in ``dtype`` on ``device``, dropout off (N+ detail 7). Raises ModelLoadError
    for a path that does not load."""
    from ..rollout import plain_sampling_config

    policy = load_causal_lm(sft_path, dtype=torch.float32, tokenizer=tokenizer)
    plain_sampling_config(policy, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ref = load_frozen_reference(sft_path, tokenizer, dtype=dtype).to(device)
    reward_model = load_frozen_reward_model(rm_path, dtype=dtype).to(device)
    return policy, ref, reward_model


def linear_anneal(optimizer: torch.optim.Optimizer, num_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ``lr * (1 - u / num_updates)`` during update u = 0, 1, ... (N+ detail 16: linear
    anneal to 0); step it once per update, not per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / num_updates))


def sample_records(step: int, rollout: Rollout, prompts: list[Prompt], tokenizer, limit: int) -> list[dict]:
    """samples.jsonl records for the first ``limit`` rows of a rollout: query, response, reference,
    score (after the no-EOS penalty), raw score and whether the response ended with EOS."""
    out = []
    for i in range(min(limit, len(rollout))):
        n = int(rollout.lengths[i])
        ids = rollout.batch.responses[i, :n].tolist()
        out.append({
            "step": step,
            "id": prompts[i].id,
            "query": tokenizer.decode(prompts[i].query_ids),
            "response": decode_response(tokenizer, ids),
            "reference": prompts[i].reference,
            "score": float(rollout.scores[i]),
            "raw_score": float(rollout.raw_scores[i]),
            "has_eos": bool(rollout.has_eos[i]),
            "length": n,
        })
    return out




def collapse_signals(updates: list[dict], *, window: int = 5, min_eos_rate: float = 0.2, max_kl: float = 25.0, min_entropy: float = 0.05) -> list[str]:
    """Signs that an RL run collapsed, read off its per-update metrics (N+ detail 23: half of N+'s 1B
    PPO seeds collapsed to a win rate of about 0.2, so every seed's run gets this check).

    ``updates``: the metrics records that carry ``objective/scores`` (``metrics.jsonl`` of a PPO /
    GRPO / RLOO run), in step order. Over the last ``window`` updates (fewer if the run is shorter):

    * mean ``objective/eos_rate`` below ``min_eos_rate``: responses run to the length cap and all get
      the no-EOS score, the usual way a summarization policy degenerates;
    * mean ``objective/kl`` (nats per sequence) above ``max_kl``: the policy left the reference;
    * mean ``objective/entropy`` (nats per token) below ``min_entropy``: sampling became deterministic
      (repeated text);
    * the score falling while KL rises: the window's mean score below the first window's by more than
      the first window's score spread (max - min), with the window's KL above the first window's.

    Returns one readable line per sign; empty when none shows (which proves nothing on its own: the
    judge-based win rate of ``evaluate`` is the final word). Missing metrics skip their check.
    """
    if not updates:
        return []
    head, tail = updates[:window], updates[-window:]

    def mean(rows: list[dict], key: str) -> float | None:
        xs = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return sum(xs) / len(xs) if xs else None

    out = []
    eos, kl, ent = mean(tail, "objective/eos_rate"), mean(tail, "objective/kl"), mean(tail, "objective/entropy")
    n = len(tail)
    if eos is not None and eos < min_eos_rate:
        out.append(f"EOS rate {eos:.2f} over the last {n} updates (< {min_eos_rate}): responses run to the length cap")
    if kl is not None and kl > max_kl:
        out.append(f"KL to the reference {kl:.1f} nats over the last {n} updates (> {max_kl})")
    if ent is not None and ent < min_entropy:
        out.append(f"entropy {ent:.3f} nats/token over the last {n} updates (< {min_entropy}): degenerate sampling")
    first_scores = [r["objective/scores"] for r in head if isinstance(r.get("objective/scores"), (int, float))]
    score, kl0 = mean(tail, "objective/scores"), mean(head, "objective/kl")
    if len(updates) >= 2 * window and first_scores and score is not None and kl is not None and kl0 is not None:
        start, spread = sum(first_scores) / len(first_scores), max(first_scores) - min(first_scores)
        if score < start - spread and kl > kl0:
            out.append(f"score fell from {start:.3f} to {score:.3f} while KL rose from {kl0:.2f} to {kl:.2f}")
    return out


def check_collapse(run_path, *, name: str) -> list[str]:
    """``collapse_signals`` of the run folder's ``metrics.jsonl``, each logged as a warning."""
    import json
    from pathlib import Path

    path = Path(run_path) / "metrics.jsonl"
    updates = [r for r in map(json.loads, path.read_text().splitlines()) if "objective/scores" in r] if path.is_file() else []
    signals = collapse_signals(updates)
    for s in signals:
        log.warning("%s run may have collapsed (N+ detail 23: run several seeds): %s", name, s)
    return signals
