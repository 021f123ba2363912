"""Run by test_vllm_distributed.py under torchrun (2 gloo processes on CPU): the vLLM rollout engine with one
engine per process (``distributed_executor_backend="external_launcher"``). Usage:

- ``engine OUT``: each process holds the same tiny tied-``lm_head`` Qwen2 twice, FSDP2-sharded (the
  trained policy) and whole (the HF reference), builds its engine from the sharded one, perturbs both
  identically, checks the engine is stale, syncs it (weights gathered one at a time) and writes
  OUT.RANK.json: greedy outputs of vLLM and HF before / after, the largest log-prob error, the sync's
  seconds, seeded samples (twice, for repeatability) and whether the parameters were sharded.
- ``stage STAGE fsdp|ddp SFT_DIR RM_DIR OUT``: GRPO or RLOO through the CLI (``torchrun -m tldr_rlhf.cli
  grpo ...``) with ``--rollout-engine vllm``, sharded (``--run.fsdp``) or data-parallel, 2 updates, a
  checkpoint after each, into OUT (resumed when OUT holds an unfinished run).
"""

import contextlib
import copy
import json
import sys
import weakref

import torch
import torch.distributed as dist

from conftest import POSTS


def perturb_both(sharded, whole, scale: float = 0.05, seed: int = 1) -> None:
    """The same scale x N(0, 1) noise (drawn whole, identically on every process) added to ``whole``'s
    weights and, as this process's shard of it, to ``sharded``'s (FSDP2 DTensors)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (n, p), (m, q) in zip(sharded.named_parameters(), whole.named_parameters(), strict=True):
            assert n == m, (n, m)
            noise = scale * torch.randn(q.shape, generator=g)
            q.add_(noise)
            p.add_(distribute_tensor(noise, p.device_mesh, p.placements) if isinstance(p, DTensor) else noise)


@contextlib.contextmanager
def gathers_alive():
    """Within: every weight ``rollout_engine._full`` gathers is tracked; yields a list that gets, at each
    gather, how many gathered weights are alive (still referenced) at that moment, itself included."""
    from tldr_rlhf import rollout_engine

    real, refs, alive = rollout_engine._full, [], []

    def tracked(p):
        w = real(p)
        refs.append(weakref.ref(w))
        alive.append(sum(r() is not None for r in refs))
        return w

    rollout_engine._full = tracked
    try:
        yield alive
    finally:
        rollout_engine._full = real


def engine_check(out: str) -> None:
    from test_vllm_engine import QUERIES, max_logprob_error, tiny_policy
    from torch.distributed.tensor import DTensor

    from tldr_rlhf.generation import generate
    from tldr_rlhf.rollout_engine import VLLMEngine
    from tldr_rlhf.train.fsdp import shard_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    whole = tiny_policy(tied=True)
    policy = shard_model(copy.deepcopy(whole), torch.device("cpu"))
    sharded = all(isinstance(p, DTensor) for p in policy.parameters())
    engine = VLLMEngine(policy, kv_cache_gb=0.1, max_model_len=256, seed=0, rank=rank, world_size=world)
    kw = dict(eos_token_id=1, pad_token_id=0, max_new_tokens=16, greedy=True)
    res = {"sharded": sharded, "hf_start": generate(whole, QUERIES, **kw), "vllm_start": engine.generate(None, QUERIES, **kw)}
    perturb_both(policy, whole)
    res["hf_perturbed"], res["vllm_stale"] = generate(whole, QUERIES, **kw), engine.generate(None, QUERIES, **kw)
    with gathers_alive() as alive:
        res["sync_s"] = engine.sync_weights(policy)
    res["gathered"], res["most_alive"] = len(alive), max(alive)
    res["hf"], res["vllm"] = generate(whole, QUERIES, **kw), engine.generate(None, QUERIES, **kw)
    res["max_logprob_error"] = max_logprob_error(engine, whole)
    sample = dict(eos_token_id=1, pad_token_id=0, max_new_tokens=12, temperature=0.7, seed=11)
    res["samples"] = [engine.sample_groups(None, QUERIES, 2, **sample)[0] for _ in range(2)]
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(res, f)
    engine.close()
    dist.barrier()  # the launcher's process group outlives the engines (vLLM's shutdown would destroy it)


def stage(name: str, mode: str, sft: str, rm: str, out: str) -> int:
    from tldr_rlhf import cli

    argv = [
        name, "--sft-path", sft, "--rm-path", rm, "--dtype", "float32", "--data.train", str(POSTS), "--data.limit", "8",
        "--data.max-query-length", "64", "--data.valid-fraction", "0.1", "--response-length", "6", "--num-sample-posts", "0",
        "--optim.lr", "1e-3", "--total-episodes", "16", "--rollout-prompts", "2", "--group-size", "4", "--mini-batch-size", "4",
        "--micro-batch-size", "2", "--update-per-rollout", "1", "--no-eos-penalty", "None",
        "--rollout-engine", "vllm", "--vllm-kv-cache-gb", "0.25", "--run.num-threads", "1",
        "--run.output-dir", out, "--run.no-progress", "--run.save-every", "1", "--run.eval-every", "0",
    ]
    return cli.main(argv + (["--run.fsdp"] if mode == "fsdp" else []))


if __name__ == "__main__":
    torch.set_num_threads(1)  # before any engine: a CPU vLLM engine fixes the thread count for the process
    mode, *args = sys.argv[1:]
    if mode == "engine":
        engine_check(*args)
    else:
        sys.exit(stage(*args))
