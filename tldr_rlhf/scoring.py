"""No-gradient scoring passes over a whole dataset, shared by every stage and evaluation that scores
examples once (reward-model scores, DPO's reference log-probs): rows in length order (less padding), and
with several processes each scores an interleaved share and the results are gathered back in item order.

* ``sharded_scores``: the pass itself, for any ``score_chunk(indices) -> (len(indices), width)``;
* ``score_preference_pairs``: (N, 2) scores of preference examples' chosen and rejected responses with a
  ``pair_fn`` (the reward model's rewards, DPO's summed log-probs).

This module knows nothing about what is scored (the model and ``pair_fn`` are given) or about the
training loops.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data.batching import collate_preferences


def sharded_scores(n: int, lengths: Sequence[int], width: int, score_chunk, *, batch_size: int, accelerator, desc: str, progress: bool) -> torch.Tensor:
    """Run ``score_chunk(indices) -> (len(indices), width)`` over all n items in length order (less
    padding), each process an interleaved share, gathered and put back in item order -> (n, width)
    float32 on CPU. Used by every no-grad scoring pass (reward-model scores, DPO reference log-probs)."""
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    order = sorted(range(n), key=lambda i: lengths[i])
    per_rank = -(-n // world)
    mine = order[rank::world]
    out = torch.zeros(per_rank, width)
    idx = torch.full((per_rank,), -1, dtype=torch.long)
    chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    # Every process runs the same number of forwards (an FSDP-sharded model gathers its weights in
    # each one, collectively): a process with a chunk fewer scores one item more, discarded.
    spare = [[order[0]]] * (-(-per_rank // batch_size) - len(chunks)) if n else []
    bar = tqdm(total=len(chunks), initial=0, desc=desc, disable=not (progress and rank == 0), dynamic_ncols=True)
    pos = 0
    for chunk in chunks:
        out[pos : pos + len(chunk)] = score_chunk(chunk)
        idx[pos : pos + len(chunk)] = torch.tensor(chunk)
        pos += len(chunk)
        bar.update(1)
    for chunk in spare:
        score_chunk(chunk)
    bar.close()
    if world > 1:
        device = accelerator.device
        out, idx = accelerator.gather(out.to(device)).cpu(), accelerator.gather(idx.to(device)).cpu()
    result = torch.zeros(n, width)
    keep = idx >= 0
    result[idx[keep]] = out[keep]
    return result


@torch.no_grad()
def score_preference_pairs(model: torch.nn.Module, examples: Sequence, pair_fn, *, pad_token_id: int, batch_size: int = 16, shared_prompt: bool = True, accelerator=None, desc: str = "scoring pairs", progress: bool = False) -> torch.Tensor:
    """Score every preference example's chosen and rejected response -> (N, 2) float32 on CPU, with
    ``pair_fn(model, batch, shared_prompt=...) -> (2B,)`` on ``collate_preferences`` batches (the
    reward model's rewards, DPO's summed log-probs). No gradients, eval mode (restored after), length
    order and a share per process through ``sharded_scores``, under the accelerator's autocast."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()

    def chunk_scores(chunk: list[int]) -> torch.Tensor:
        batch = collate_preferences([examples[i] for i in chunk], pad_token_id).to(device)
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            s = pair_fn(model, batch, shared_prompt=shared_prompt).float().cpu()
        return torch.stack([s[: len(chunk)], s[len(chunk) :]], 1)

    lengths = [len(e.query_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples]
    try:
        return sharded_scores(len(examples), lengths, 2, chunk_scores, batch_size=batch_size, accelerator=accelerator, desc=desc, progress=progress)
    finally:
        model.train(was_training)
