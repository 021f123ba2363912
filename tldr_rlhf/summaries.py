"""The summaries ``evaluate`` scores: each policy's summaries of the held-out posts (greedy by default)
and, for the KL to the SFT policy, a sample at the sampling temperature with its log-probs
(``run_policy``, ``kl_to_sft``), one model in memory at a time.

Each policy's summaries (and its KL sample with log-probs) are written to ``policies/NAME.jsonl`` in
the output folder as soon as they exist (``save_policy_run``), so a crash or Ctrl-C keeps the
policies already done. A rerun reuses such a file (``load_policy_run``) when its header matches
(``generation_key``): the checkpoint path with each of its files' size and modification time (a
retrained checkpoint does not match), the posts' ids and query tokens, and the decoding settings
(greedy, temperature, length, seed, batch size, KL sample, dtype, device).

Shapes: N posts (or responses), T response tokens.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import EvaluateConfig
from .data.batching import collate_query_response
from .metrics import kl_from_logprobs
from .modeling import load_causal_lm, load_tokenizer_cached
from .precision import bf16_autocast, master_weights_dtype
from .progress import progress
from .tasks import query_ids
from .generation import decode_response, generate
from .rollout import plain_sampling_config, response_logprobs
from .rollout_engine import engine_for

POLICY_DIR = "policies"  # one file of summaries per policy, written as each policy finishes
_POLICY_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Model passes


def eval_device() -> torch.device:
    """CUDA when there is one, else the CPU: where ``evaluate`` runs each model."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory() -> None:
    """Return a deleted model's accelerator memory (CPU memory goes back when the last reference dies)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@dataclasses.dataclass
class PolicyRun:
    """What one policy produced: greedy (or sampled) summaries and, for the KL, a sample with its
    log-probs. ``queries`` are the policy tokenizer's query ids."""

    name: str
    path: str
    queries: list[list[int]]
    responses: list[list[int]]
    texts: list[str]
    lengths: list[int]
    has_eos: list[bool]
    kl_responses: list[list[int]] | None = None
    kl_logprobs: torch.Tensor | None = None
    seconds: float = 0.0


def eval_engine(model, queries: list[list[int]], cfg: EvaluateConfig, *, group: int = 1):
    """The engine that writes the summaries (``--rollout-engine``): None for hf (``generation.generate``
    on ``model``), else a vLLM engine on a copy of ``model``'s weights, its context the longest query
    plus ``cfg.response_length``, sized for ``group`` samples of every query, seeded with ``cfg.seed``
    (``rollout_engine.engine_for``). Close it when done."""
    if cfg.rollout_engine == "hf":
        return None
    return engine_for(cfg, model, max_tokens=max(map(len, queries)) + cfg.response_length, sequences=len(queries) * group, seed=cfg.seed)


def generate_in_length_order(model, queries, tok, cfg: EvaluateConfig, *, greedy: bool, engine=None, seed: int | None = None, desc: str = "generating") -> list[list[int]]:
    """One response per query, in the queries' order; generated in order of query length (batches
    of similar width), with progress (``desc``). ``engine`` (``eval_engine``; None =
    ``generation.generate`` on ``model``) samples instead, its requests seeded from ``seed``."""
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=cfg.response_length, temperature=cfg.temperature, greedy=greedy, batch_size=cfg.batch_size)
    with progress(len(queries), desc, unit="post") as bar:
        if engine is not None:
            out = engine.generate(model, [queries[i] for i in order], seed=seed, **kw)
            bar.update(len(queries))  # the engine schedules every request at once
        else:
            out = generate(model, [queries[i] for i in order], on_batch=bar.update, **kw)
    result: list[list[int]] = [[] for _ in queries]
    for i, r in zip(order, out):
        result[i] = r
    return result


def _summed_logprobs(model, queries, responses, pad: int, cfg: EvaluateConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) log-probs at the sampling temperature and the (N, T) response mask."""
    batch = collate_query_response(queries, responses, pad)
    lp, _ = response_logprobs(model, batch, temperature=cfg.temperature, batch_size=cfg.batch_size)
    return lp.cpu(), batch.response_mask


def load_eval_policy(path: str, posts: list, cfg: EvaluateConfig):
    """(tokenizer, query ids of ``posts``, device, policy) for an evaluation pass: the policy in
    ``cfg.dtype``'s master weights on ``eval_device()``, sampling config reset to plain sampling with
    explicit EOS / pad (N+ detail 19). Raises ModelLoadError for a path that does not load."""
    tok = load_tokenizer_cached(path)
    queries = [query_ids(tok, p, cfg.data) for p in posts]
    device = eval_device()
    model = load_causal_lm(path, dtype=master_weights_dtype(cfg.dtype), tokenizer=tok).to(device)
    plain_sampling_config(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok, queries, device, model


def run_policy(name: str, path: str, posts: list, cfg: EvaluateConfig, *, seed: int) -> PolicyRun:
    """Generate the summaries of one policy (and its KL sample with log-probs) on ``posts``.
    Raises ModelLoadError for a path that does not load."""
    t0 = time.perf_counter()
    tok, queries, device, model = load_eval_policy(path, posts, cfg)
    eos = tok.eos_token_id
    engine = eval_engine(model, queries, cfg)  # --rollout-engine vllm: it writes the summaries
    with bf16_autocast(device, cfg.dtype):
        torch.manual_seed(seed)
        responses = generate_in_length_order(model, queries, tok, cfg, greedy=cfg.greedy, engine=engine, seed=seed * 1_000_033, desc=f"{name}: summaries")
        run = PolicyRun(
            name=name, path=path, queries=queries, responses=responses,
            texts=[decode_response(tok, r) for r in responses],
            lengths=[len(r) - (1 if r and r[-1] == eos else 0) for r in responses],
            has_eos=[bool(r) and r[-1] == eos for r in responses],
        )
        if cfg.kl and cfg.sft_path:
            if cfg.greedy:
                torch.manual_seed(seed + 1)
                kl_responses = generate_in_length_order(model, queries, tok, cfg, greedy=False, engine=engine, seed=(seed + 1) * 1_000_033, desc=f"{name}: KL sample")
            else:
                kl_responses = responses
            run.kl_responses = kl_responses
            run.kl_logprobs, _ = _summed_logprobs(model, queries, kl_responses, tok.pad_token_id, cfg)  # the policy's, not the engine's
    if engine is not None:
        engine.close()
    del model
    free_memory()
    run.seconds = time.perf_counter() - t0
    return run


# ----------------------------------------------------------------------------------------------
# Per-policy summaries on disk: written as each policy finishes, reused by a rerun


def _checkpoint_fingerprint(path: str) -> list | str | None:
    """[name, size, mtime_ns] of every file of a checkpoint folder (or of a .gguf file): a retrained
    or replaced checkpoint gives another fingerprint. A hub id: its cached snapshot, else None."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
            return str(Path(cached).parent) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001
            return None
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def policy_file(out_dir: str | Path, name: str) -> Path:
    """Where ``evaluate`` keeps one policy's summaries: ``OUT/policies/NAME.jsonl`` (a name with
    other characters than letters, digits, ``._-`` gets them replaced and a short hash added)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe != name or not safe.strip("."):
        safe = f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return Path(out_dir) / POLICY_DIR / f"{safe}.jsonl"


def generation_key(path: str, posts: list, cfg: EvaluateConfig, *, seed: int) -> dict[str, Any]:
    """What a policy's summaries depend on: the checkpoint (path and file fingerprint), the posts
    (ids and query tokens in the policy's tokenizer) and the decoding settings. Equal keys give the
    same summaries, so a rerun may reuse them."""
    tok = load_tokenizer_cached(path)
    queries = [[str(p.id), query_ids(tok, p, cfg.data)] for p in posts]
    return {
        "format": _POLICY_FORMAT,
        "path": str(path),
        "checkpoint": _checkpoint_fingerprint(path),
        "posts": hashlib.sha256(json.dumps(queries).encode()).hexdigest(),
        "n": len(posts),
        "settings": {
            "greedy": cfg.greedy, "temperature": cfg.temperature, "response_length": cfg.response_length, "seed": seed,
            "batch_size": cfg.batch_size, "kl_sample": bool(cfg.kl and cfg.sft_path), "dtype": cfg.dtype, "device": eval_device().type,
            # another engine samples other summaries; hf's keys stay as they were (earlier runs reused)
            **({"rollout_engine": cfg.rollout_engine, "vllm_dtype": cfg.vllm_dtype} if cfg.rollout_engine != "hf" else {}),
        },
    }


def save_policy_run(file: Path, run: PolicyRun, key: dict[str, Any], post_ids: Sequence[str]) -> None:
    """Write one policy's summaries (token ids and text, KL sample and its log-probs) to ``file``
    (JSON lines: a header with ``key``, then one record per post), through a temporary name."""
    file.parent.mkdir(parents=True, exist_ok=True)
    lp = run.kl_logprobs
    header = {"policy": run.name, "key": key, "seconds": run.seconds, "kl_width": None if lp is None else int(lp.shape[1]), "kl_dtype": None if lp is None else str(lp.dtype).removeprefix("torch.")}
    tmp = file.with_name(file.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(header) + "\n")
        for i, pid in enumerate(post_ids):
            rec: dict[str, Any] = {"id": pid, "text": run.texts[i], "response": run.responses[i]}
            if run.kl_responses is not None and lp is not None:
                rec["kl_response"] = run.kl_responses[i]
                rec["kl_logprobs"] = lp[i, : len(run.kl_responses[i])].tolist()
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, file)


def load_policy_run(file: Path, name: str, path: str, key: dict[str, Any], posts: list, cfg: EvaluateConfig) -> PolicyRun | None:
    """The PolicyRun saved in ``file`` when its header's key equals ``key`` and it holds every post
    in order; else None (missing, other settings or checkpoint, unreadable)."""
    try:
        lines = file.read_text().splitlines()
        header = json.loads(lines[0])
        records = [json.loads(line) for line in lines[1:]]
    except (OSError, ValueError, IndexError):
        return None
    if header.get("key") != key or [r.get("id") for r in records] != [str(p.id) for p in posts]:
        return None
    tok = load_tokenizer_cached(path)
    eos = tok.eos_token_id
    responses = [r["response"] for r in records]
    run = PolicyRun(
        name=name, path=path, queries=[query_ids(tok, p, cfg.data) for p in posts], responses=responses,
        texts=[r["text"] for r in records],
        lengths=[len(r) - (1 if r and r[-1] == eos else 0) for r in responses],
        has_eos=[bool(r) and r[-1] == eos for r in responses],
        seconds=float(header.get("seconds") or 0.0),
    )
    if key["settings"]["kl_sample"]:
        if header.get("kl_width") is None or not all("kl_logprobs" in r for r in records):
            return None
        lp = torch.zeros(len(records), int(header["kl_width"]), dtype=getattr(torch, header["kl_dtype"]))
        for i, r in enumerate(records):
            lp[i, : len(r["kl_logprobs"])] = torch.tensor(r["kl_logprobs"], dtype=lp.dtype)
        run.kl_responses = [r["kl_response"] for r in records]
        run.kl_logprobs = lp
    return run


def kl_to_sft(runs: list[PolicyRun], posts: list, cfg: EvaluateConfig) -> dict[str, dict[str, Any]]:
    """KL(pi || pi_sft) of every policy run that has a KL sample, with the SFT model loaded once.
    A policy whose tokenizer gives other query ids than the SFT tokenizer gets {"kl": None, "note"}."""

    todo = [r for r in runs if r.kl_responses is not None]
    if not todo:
        return {}
    tok = load_tokenizer_cached(cfg.sft_path)
    queries = [query_ids(tok, p, cfg.data) for p in posts]
    device = eval_device()
    model = load_causal_lm(cfg.sft_path, dtype=torch.float32, tokenizer=tok).to(device)
    out: dict[str, dict[str, Any]] = {}
    with bf16_autocast(device, cfg.dtype):
        for r in todo:
            if r.queries != queries:
                out[r.name] = {"kl": None, "note": "tokenizer differs from the SFT policy's"}
                continue
            sft_lp, mask = _summed_logprobs(model, queries, r.kl_responses, tok.pad_token_id, cfg)
            out[r.name] = kl_from_logprobs(r.kl_logprobs, sft_lp, mask)
    del model
    free_memory()
    return out
