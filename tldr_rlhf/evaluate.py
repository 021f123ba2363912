"""Evaluation of policies on held-out posts: ROUGE, reward-model score, win rate against the human
reference (by a reward-model judge, optionally by an LLM judge), length-controlled win rate, KL to
the SFT policy, summary length and EOS rate (N+ details 27-28; Stiennon et al. 2020 sec. 4).

The metric functions (ROUGE, win rate, length-controlled win rate, KL) are in ``metrics.py``.

``evaluate(cfg)`` (``tldr-rlhf evaluate``) runs every policy on the same held-out posts, one model in
memory at a time: summaries (greedy by default), a second sample at the sampling temperature for the
KL estimate, then the SFT model's log-probs of those samples, then the reward model's and the judge's
scores of every summary and reference, then the optional LLM judge (``judge.py``). The reward models
score text: each summary is formatted again with the reward model's own tokenizer as
``" " + summary + EOS`` after the query, the layout it was trained on, so policies, reward model and
judge need not share a tokenizer. Writes ``eval.json``, ``summaries.jsonl`` (one record per post with
every policy's summary) and ``eval_table.md``.

Each policy's summaries (and its KL sample with log-probs) are written to ``policies/NAME.jsonl`` in
the output folder as soon as they exist, so a crash or Ctrl-C keeps the policies already done, and a
rerun with the same checkpoint, posts and settings reuses them (``summaries.py``).

Shapes: N posts (or responses), T response tokens.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import EvaluateConfig
from .data.batching import collate_query_response
from .tasks import held_out_items, held_out_pairs, query_ids, query_text, reference_of, response_ids
from .errors import DataError, ModelLoadError
from .metrics import comparison_metrics, length_controlled_win_rate, outcomes_from_scores, pair_lengths, rouge_scores, win_rate
from .modeling import check_model_exists, load_tokenizer_cached
from .reward.loading import load_frozen_reward_model
from .precision import bf16_autocast
from .paired import format_paired, paired_differences
from .progress import progress
from .rollout_engine import check_engine_available
from .summaries import PolicyRun, eval_device, free_memory, generation_key, kl_to_sft, load_policy_run, policy_file, run_policy, save_policy_run
from .stages import EVAL_FILE
from .validation import validate_config
from .best_of_n import best_of_n_names, best_of_n_run, best_of_n_spec
from .checkpoints import require_kind
from .judge import ChatClient, JudgeError, judge_pairs
from .reward.scoring import pair_rewards
from .scoring import score_preference_pairs
from .reward.specs import check_reward_spec, text_term_scores, weighted_sum
from .value_model import score_at_last_token

log = logging.getLogger(__name__)
SUMMARIES_FILE = "summaries.jsonl"
TABLE_FILE = "eval_table.md"


# ----------------------------------------------------------------------------------------------
# Inputs


def parse_policies(entries: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` entries -> {name: path}, in order. A bare PATH is named after its run folder
    (``runs/ppo-x/final`` -> ``ppo-x``) or its file stem. Raises DataError for an empty entry or a
    name used twice."""
    out: dict[str, str] = {}
    for i, entry in enumerate(entries):
        name, sep, path = entry.partition("=")
        if not sep:
            path = entry
            p = Path(entry)
            name = p.parent.name if p.name == "final" else p.stem
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise DataError(f"policy entry {entry!r} is not NAME=PATH", field=f"policies[{i}]")
        if name in out:
            raise DataError(f"policy name '{name}' is used twice", field=f"policies[{i}]")
        out[name] = path
    return out


def held_out_posts(cfg: EvaluateConfig, tokenizers: Sequence = ()) -> tuple[list, int]:
    """The held-out items to evaluate on (TL;DR posts, or UltraFeedback instructions with
    ``data.task ultrafeedback``) and how many were left out: ``data.valid`` when given; for a local
    ``data.train`` file the posts held out from SFT by id (``data.valid_fraction``, the SFT stage's own
    split; UltraFeedback: the prompts of its seeded split); else the hub dataset's 'validation' split.
    Items whose query cannot fit in ``data.max_query_length`` tokens with one of ``tokenizers`` (a
    very long title or prompt) are skipped and counted; the first ``num_posts`` that fit are kept
    (0 = all). Raises DataError for bad records or no items."""
    data = cfg.data
    kept, dropped = [], 0
    for p in held_out_items(data):
        if cfg.num_posts and len(kept) >= cfg.num_posts:
            break
        try:
            for tok in tokenizers:
                query_ids(tok, p, data)
        except DataError:
            dropped += 1
            continue
        kept.append(p)
    if not kept:
        raise DataError("no held-out posts to evaluate on", path=data.valid or data.train)
    return kept, dropped


# ----------------------------------------------------------------------------------------------
# Reward-model scores of summaries


@torch.no_grad()
def score_summaries(model, tok, posts: Sequence, summaries: Sequence[str], *, data, batch_size: int = 16, desc: str = "scoring") -> list[float]:
    """Reward of each (post, summary) under a scalar-head reward model, read at the EOS of the
    response formatted as the task trains it (TL;DR ``" " + summary + EOS``) after the formatted query
    (the layout the reward model trained on; N+ details 2-3, 12-13). ``data`` is the evaluation data
    section (task, caps). Rows are scored in length order (less padding), with progress (``desc``).
    Returns N floats."""
    device = next(model.parameters()).device
    queries = [query_ids(tok, p, data) for p in posts]
    responses = [response_ids(tok, s, data) for s in summaries]
    order = sorted(range(len(posts)), key=lambda i: len(queries[i]) + len(responses[i]))
    out = [0.0] * len(posts)
    with progress(len(order), desc, unit="post") as bar:
        for k in range(0, len(order), batch_size):
            idx = order[k : k + batch_size]
            b = collate_query_response([queries[i] for i in idx], [responses[i] for i in idx], tok.pad_token_id)
            scores = score_at_last_token(model, b.input_ids.to(device), b.attention_mask.to(device)).float().cpu().tolist()
            for i, s in zip(idx, scores):
                out[i] = s
            bar.update(len(idx))
    return out


def score_with(path: str, posts: list, texts: dict[str, list[str]], cfg: EvaluateConfig, *, pair_metrics: dict | None = None) -> dict[str, list[float]]:
    """Scores of every list of summaries in ``texts`` ({name: N summaries}) by the reward model at
    ``path`` (loaded once). With ``pair_metrics`` (a dict) and a task whose source holds held-out
    preference pairs (UltraFeedback), the reward model's accuracy on them is stored in it
    (``metrics.comparison_metrics``: accuracy, n, longer-wins baseline, ...). Raises ModelLoadError
    for a path that is not a one-output reward model."""
    tok = load_tokenizer_cached(path)
    device = eval_device()
    model = load_frozen_reward_model(path, dtype=torch.float32).to(device)
    out = {}
    with bf16_autocast(device, cfg.dtype):
        for name, summaries in texts.items():
            out[name] = score_summaries(model, tok, posts, summaries, data=cfg.data, batch_size=cfg.batch_size, desc=f"{name}: reward-model scores")
        pairs = held_out_pairs(cfg.data, tok) if pair_metrics is not None else None
        if pairs:
            r = score_preference_pairs(model, pairs, pair_rewards, pad_token_id=tok.pad_token_id, batch_size=cfg.batch_size, desc="held-out pairs", progress=True)
            pair_metrics.update(comparison_metrics(r, lengths=pair_lengths(pairs)))
    del model
    free_memory()
    return out


def reward_scores(spec: str, flag: str, posts: list, texts: dict[str, list[str]], cfg: EvaluateConfig, tok) -> dict[str, list[float]]:
    """A reward spec's (``reward/specs.py``) scores of every list of summaries in ``texts`` ({name: N
    summaries}): text terms get the query as ``tok`` (the first policy's tokenizer) formats it, the
    summary and the post's reference; reward-model terms score as ``score_with``. Returns {name: N
    weighted sums}. Raises ConfigError / RewardError naming ``flag``."""
    terms = check_reward_spec(spec, flag=flag)
    queries = [tok.decode(query_ids(tok, p, cfg.data)) for p in posts]
    refs: list[str | None] = [reference_of(p).strip() for p in posts]
    parts: dict[str, list] = {name: [] for name in texts}
    for t in terms:
        if t.kind == "model":
            scored = score_with(t.text, posts, texts, cfg)
            for name in texts:
                parts[name].append((t.weight, torch.tensor(scored[name])))
        else:
            for name, summaries in texts.items():
                parts[name].append((t.weight, text_term_scores(t, queries, summaries, refs, flag=flag)))
    return {name: weighted_sum(p).tolist() for name, p in parts.items()}


def _best_of_n_runs(policies: dict[str, str], posts: list, cfg: EvaluateConfig, tok) -> dict[str, tuple[PolicyRun, dict[str, Any]]]:
    """{NAME-boN: (its PolicyRun, its metrics)} of every policy best-of-n samples from
    (``best_of_n.best_of_n_run``), the candidates scored by ``best_of_n.best_of_n_spec``'s reward
    (``reward_scores``)."""
    spec, flag = best_of_n_spec(cfg)
    out = {}
    for i, name in enumerate(best_of_n_names(policies, cfg.best_of_n_policies)):
        score = lambda ps, texts: reward_scores(spec, flag, ps, {"candidates": texts}, cfg, tok)["candidates"]  # noqa: E731
        run, metrics = best_of_n_run(name, policies[name], posts, cfg, score=score, seed=cfg.seed * 1000 + 7 + i)
        out[run.name] = (run, {**metrics, "reward": spec})
    return out


# ----------------------------------------------------------------------------------------------
# Orchestration


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _check(cfg: EvaluateConfig, policies: dict[str, str]) -> None:
    """Refuse bad inputs before any model is loaded or summary generated: missing paths, and a model
    of the wrong kind for its flag (read from config.json: a reward model among the policies, a
    policy as --rm-path)."""
    if not policies:
        raise DataError("no policies to evaluate: give --policies NAME=PATH ...", field="policies")
    for name, path in policies.items():
        try:
            check_model_exists(path)
        except ModelLoadError as e:
            raise ModelLoadError(f"policy '{name}': {e}") from None
    for field_name in ("sft_path", "rm_path", "judge_rm_path"):
        path = getattr(cfg, field_name)
        if path:
            try:
                check_model_exists(path)
            except ModelLoadError as e:
                raise ModelLoadError(f"--{field_name.replace('_', '-')}: {e}") from None
    for name, path in policies.items():
        require_kind(path, "policy", f"--policies {name}=")
    for field_name, kind in (("sft_path", "policy"), ("rm_path", "reward_model"), ("judge_rm_path", "reward_model")):
        if getattr(cfg, field_name):
            require_kind(getattr(cfg, field_name), kind, f"--{field_name.replace('_', '-')}")
    if cfg.judge.url and cfg.data.task != "tldr":
        raise DataError("the LLM judge asks the N+ TL;DR summarization question; it has no prompt for the ultrafeedback task", field="judge.url")
    if not cfg.greedy and cfg.temperature <= 0:
        raise DataError(f"temperature must be > 0 for sampling, got {cfg.temperature}", field="temperature")


def _judge_client(cfg: EvaluateConfig):
    """The LLM judge's client when ``judge.url`` is set (else None), checked with a first request so
    that a judge that does not answer fails before any summary is generated. Raises JudgeError."""
    if not cfg.judge.url:
        return None

    client = ChatClient(cfg.judge.url, cfg.judge.model, api_key_env=cfg.judge.api_key_env, timeout_s=cfg.judge.timeout_s, retries=cfg.judge.retries, temperature=cfg.judge.temperature)
    try:
        client.complete("Reply with the single word OK.")
    except JudgeError as e:
        raise JudgeError(f"the LLM judge (--judge.url {cfg.judge.url}, model {cfg.judge.model}) does not answer: {e}") from None
    return client


def _policy_runs(policies: dict[str, str], posts: list, cfg: EvaluateConfig, out_dir: Path) -> tuple[list[PolicyRun], set[str]]:
    """Every policy's summaries, in order: read back from ``policies/NAME.jsonl`` when its key matches
    (those names are returned as reused), else generated by ``run_policy`` and written there at once."""
    runs: list[PolicyRun] = []
    reused: set[str] = set()
    post_ids = [str(p.id) for p in posts]
    for name, path in policies.items():
        file = policy_file(out_dir, name)
        key = generation_key(path, posts, cfg, seed=cfg.seed)
        run = load_policy_run(file, name, path, key, posts, cfg)
        if run is not None:
            reused.add(name)
            log.info("policy %s: reusing its %d summaries in %s (same checkpoint, posts and settings)", name, len(posts), file)
        else:
            log.info("policy %s: %s", name, path)
            run = run_policy(name, path, posts, cfg, seed=cfg.seed)
            save_policy_run(file, run, key, post_ids)
            log.info("policy %s: %d responses in %.1f s (mean length %.1f tokens, EOS rate %.2f); written to %s", name, len(posts), run.seconds, _mean(run.lengths), _mean(run.has_eos), file)
        runs.append(run)
    return runs, reused


def _llm_verdicts(client, runs: list[PolicyRun], posts: list, references: list[str], cfg: EvaluateConfig) -> dict[str, list]:
    """The LLM judge's verdicts on the first ``judge.limit`` posts (all when 0) of every policy
    ({name: verdicts}); {} without a judge."""
    if client is None:
        return {}

    k = cfg.judge.limit or len(posts)
    judged_posts = [query_text(p) for p in posts[:k]]
    return {r.name: judge_pairs(client, judged_posts, r.texts[:k], references[:k], seed=cfg.seed * 1000 + i, max_parallel=cfg.judge.max_parallel, desc=f"{r.name}: LLM judge") for i, r in enumerate(runs)}


def _policy_metrics(r: PolicyRun, references: list[str], ref_lengths: list[int], rm_scores: dict, judge_scores: dict, verdicts: list | None, kl: dict | None) -> dict[str, Any]:
    """One policy's entry of ``eval.json`` (see ``evaluate``) from its summaries, the reference
    lengths in its tokenizer, the reward models' scores ({} when absent), its LLM verdicts and KL."""
    m: dict[str, Any] = {"path": r.path, **rouge_scores(r.texts, references)}
    m["mean_length"] = _mean(r.lengths)
    m["reference_mean_length"] = _mean(ref_lengths)
    m["eos_rate"] = _mean([float(e) for e in r.has_eos])
    if rm_scores:
        m["rm_score"] = _mean(rm_scores[r.name])
        m["rm_win_rate"] = win_rate(outcomes_from_scores(rm_scores[r.name], rm_scores["reference"]))["win_rate"]
    if judge_scores:
        outcomes = outcomes_from_scores(judge_scores[r.name], judge_scores["reference"])
        m["judge"] = {**win_rate(outcomes), "score": _mean(judge_scores[r.name])}
        m["judge"]["lc"] = length_controlled_win_rate(outcomes, r.lengths, ref_lengths)
    if verdicts is not None:
        outcomes = [v.outcome for v in verdicts]
        k = len(verdicts)
        m["llm_judge"] = {**win_rate(outcomes), "failed": sum(v.error is not None for v in verdicts), "lc": length_controlled_win_rate(outcomes, r.lengths[:k], ref_lengths[:k])}
        m["llm_judge"]["unparseable"] -= m["llm_judge"]["failed"]
    if kl is not None:
        m["kl_to_sft"] = kl.get("kl")
        m["kl_to_sft_std"] = kl.get("kl_std")
        if kl.get("note"):  # asked for but not measured: say why
            m["kl_to_sft_note"] = kl["note"]
    m["seconds"] = r.seconds
    return m


def _write_summaries(path: Path, posts: list, references: list[str], runs: list[PolicyRun], ref_lengths: dict[str, list[int]], rm_scores: dict, judge_scores: dict, llm: dict[str, list], rewards: dict | None = None) -> None:
    """``summaries.jsonl``: per post its fields, the reference and every policy's summary with its
    length, EOS, scores (``--reward``'s as ``reward``) and LLM verdict."""
    rewards = rewards or {}
    with path.open("w") as f:
        for i, p in enumerate(posts):
            fields = {"subreddit": p.subreddit, "title": p.title, "post": p.post} if hasattr(p, "post") else {"prompt": p.prompt}
            rec: dict[str, Any] = {"id": p.id, **fields, "reference": references[i], "summaries": {}}
            if rm_scores:
                rec["reference_rm_score"] = rm_scores["reference"][i]
            if rewards:
                rec["reference_reward"] = rewards["reference"][i]
            for r in runs:
                s: dict[str, Any] = {"text": r.texts[i], "length": r.lengths[i], "reference_length": ref_lengths[r.name][i], "eos": r.has_eos[i]}
                if rm_scores:
                    s["rm_score"] = rm_scores[r.name][i]
                if rewards:
                    s["reward"] = rewards[r.name][i]
                if judge_scores is not rm_scores and judge_scores:
                    s["judge_score"] = judge_scores[r.name][i]
                if r.name in llm and i < len(llm[r.name]):
                    v = llm[r.name][i]
                    s["llm_verdict"] = v.preferred
                    s["llm_policy_first"] = v.policy_first
                rec["summaries"][r.name] = s
            f.write(json.dumps(rec) + "\n")


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every policy of ``cfg.policies`` on the same held-out posts; writes ``eval.json``,
    ``summaries.jsonl`` and ``eval_table.md`` to ``cfg.output_dir``, prints the table and returns the
    results. Each policy's summaries go to ``policies/NAME.jsonl`` there as soon as they exist, and a
    rerun reuses them when the checkpoint, posts and settings are the same (``summaries_reused``).

    Per policy: ``rouge1/rouge2/rougeL``; ``rm_score`` (mean training reward model score, and
    ``rm_win_rate`` against the reference by that model); ``judge`` (win rate against the reference by
    the judge reward model, ``judge_rm_path`` or else the training one, with its length-controlled
    win rate); ``llm_judge`` (win rate, unparseable and failed counts, length-controlled win rate)
    when ``judge.url`` is set; ``kl_to_sft``; ``mean_length`` (tokens, EOS excluded), ``eos_rate``;
    ``reward`` (mean ``--reward`` score, also for the reference). With ``best_of_n`` N, each policy of
    ``best_of_n_policies`` also gets a policy ``NAME-boN`` (``best_of_n.py``) with ``best_of_n`` (n,
    base, candidate and kept mean reward, analytic KL) and ``kl_best_of_n`` (log n - (n-1)/n; its
    ``kl_to_sft`` too when the base is the SFT policy).
    Raises DataError / ModelLoadError for bad inputs, and JudgeError for an LLM judge that does not
    answer a first request, before any model is loaded.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # 1. Inputs: every path, kind and value checked, the judge asked once, the posts read.
    policies = parse_policies(cfg.policies)
    _check(cfg, policies)
    validate_config(cfg)  # every value, and no run's final/ that its save left incomplete
    check_engine_available(cfg.rollout_engine)  # --rollout-engine vllm without vllm: the install line
    if cfg.best_of_n:  # its policies and its reward, before anything is generated

        best_of_n_names(policies, cfg.best_of_n_policies)
        best_of_n_spec(cfg)
    client = _judge_client(cfg)
    tokenizers = [load_tokenizer_cached(p) for p in policies.values()]
    tokenizers += [load_tokenizer_cached(p) for p in (cfg.sft_path, cfg.rm_path, cfg.judge_rm_path) if p]
    posts, dropped = held_out_posts(cfg, tokenizers)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    references = [reference_of(p).strip() for p in posts]
    log.info("evaluating %d policies on %d held-out %s", len(policies), len(posts), "posts" if cfg.data.task == "tldr" else "prompts")
    t_start = time.perf_counter()

    # 2. Summaries (generated or reused), then the KL sample's log-probs under the SFT policy.
    runs, reused = _policy_runs(policies, posts, cfg, out_dir)
    kls = kl_to_sft(runs, posts, cfg) if cfg.kl and cfg.sft_path else {}
    bon = _best_of_n_runs(policies, posts, cfg, tokenizers[0]) if cfg.best_of_n else {}
    runs += [run for run, _ in bon.values()]

    # 3. Scores: training reward model, judge reward model, LLM judge.
    texts = {r.name: r.texts for r in runs}
    texts["reference"] = references
    rm_pairs: dict[str, Any] = {}
    rm_scores = score_with(cfg.rm_path, posts, texts, cfg, pair_metrics=rm_pairs) if cfg.rm_path else {}
    judge_path = cfg.judge_rm_path or cfg.rm_path
    judge_scores = score_with(judge_path, posts, texts, cfg) if judge_path and judge_path != cfg.rm_path else rm_scores
    # reference lengths in each policy's tokenizer (for the length-controlled win rate)
    ref_lengths = {r.name: [len(response_ids(load_tokenizer_cached(r.path), s, cfg.data)) - 1 for s in references] for r in runs}
    llm = _llm_verdicts(client, runs, posts, references, cfg)
    rewards = reward_scores(cfg.reward, "--reward", posts, texts, cfg, tokenizers[0]) if cfg.reward else {}

    # 4. Metrics per policy, then eval.json, summaries.jsonl and the table.
    results: dict[str, Any] = {
        "posts": {"n": len(posts), "task": cfg.data.task, "source": cfg.data.valid or cfg.data.train, "max_query_length": cfg.data.max_query_length, "query_does_not_fit": dropped},
        "decoding": {"greedy": cfg.greedy, "temperature": cfg.temperature, "response_length": cfg.response_length},
        "rm_path": cfg.rm_path,
        "rm_heldout_pairs": {k: rm_pairs[k] for k in ("accuracy", "n", "ties", "longer_wins_accuracy", "rm_prefers_longer") if k in rm_pairs} or None,
        "judge_rm_path": judge_path,
        "judge_is_training_rm": bool(judge_path) and judge_path == cfg.rm_path,
        "sft_path": cfg.sft_path,
        "llm_judge": {"url": cfg.judge.url, "model": cfg.judge.model} if cfg.judge.url else None,
        "reference": {"mean_length": None, "rm_score": _mean(rm_scores["reference"]) if rm_scores else None, "judge_score": _mean(judge_scores["reference"]) if judge_scores else None},
        "policies": {},
    }
    if rewards:
        results["reward"] = cfg.reward
        results["reference"]["reward"] = _mean(rewards["reference"])
    for r in runs:
        m = _policy_metrics(r, references, ref_lengths[r.name], rm_scores, judge_scores, llm.get(r.name), kls.get(r.name))
        if rewards:
            m["reward"] = _mean(rewards[r.name])
        if r.name in bon:
            m["best_of_n"] = bon[r.name][1]
            m["kl_best_of_n"] = bon[r.name][1]["kl_analytic"]  # to its base policy, analytic
            if policies[bon[r.name][1]["base"]] == cfg.sft_path:  # best-of-n of SFT: that is the KL to SFT
                m["kl_to_sft"] = m["kl_best_of_n"]
        if r.name in reused:
            m["summaries_reused"] = str(policy_file(out_dir, r.name))
        results["policies"][r.name] = m
    if runs:
        results["reference"]["mean_length"] = results["policies"][runs[0].name]["reference_mean_length"]
    results["paired_vs_sft"] = paired_differences(rewards, "sft") if rewards else {}
    results["seconds"] = time.perf_counter() - t_start

    (out_dir / EVAL_FILE).write_text(json.dumps(results, indent=2) + "\n")
    _write_summaries(out_dir / SUMMARIES_FILE, posts, references, runs, ref_lengths, rm_scores, judge_scores, llm, rewards)
    table = format_table(results)
    if results.get("paired_vs_sft"):  # every policy against the one named "sft", post by post (issue 26)
        table += "\n\nPaired with sft on the same posts (--reward):\n\n" + format_paired(results["paired_vs_sft"])
    (out_dir / TABLE_FILE).write_text(table + "\n")
    print(table)
    print(f"\nresults: {out_dir / EVAL_FILE}")
    return results


# ----------------------------------------------------------------------------------------------
# The table (eval_table.md; the report's metrics table)


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _lc(lc: dict[str, Any] | None) -> str:
    """A length-controlled win rate, starred when it extrapolates beyond the observed length differences."""
    if not lc:
        return "-"
    return _fmt(lc.get("lc_win_rate")) + ("*" if lc.get("extrapolated") else "")


def metrics_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-policy metrics table of ``evaluate`` results (used by the report).
    A length-controlled win rate read outside the observed length differences is starred."""
    judge = "judge" if not results.get("judge_is_training_rm") else "judge (= training RM)"
    header = ["policy", "ROUGE-1", "ROUGE-2", "ROUGE-L", "RM score", "RM win", f"{judge} win", "LC win", "LLM win (n, unparsed)", "LLM LC win", "KL to SFT", "length", "EOS rate"]
    rows = []
    for name, m in results["policies"].items():
        j = m.get("judge", {})
        llm = m.get("llm_judge")
        rows.append([
            name, _fmt(m["rouge1"]), _fmt(m["rouge2"]), _fmt(m["rougeL"]), _fmt(m.get("rm_score")), _fmt(m.get("rm_win_rate")),
            _fmt(j.get("win_rate")), _lc(j.get("lc")),
            f"{_fmt(llm['win_rate'])} ({llm['n']}, {llm['unparseable'] + llm['failed']})" if llm else "-",
            _lc(llm["lc"]) if llm else "-",
            _fmt(m.get("kl_to_sft"), ".2f") + (" (analytic)" if m.get("kl_best_of_n") is not None and m.get("kl_to_sft") is not None else ""),
            _fmt(m["mean_length"], ".1f"), _fmt(m["eos_rate"], ".2f"),
        ])
    ref = results["reference"]
    rows.append(["reference", "-", "-", "-", _fmt(ref.get("rm_score")), "-", "-", "-", "-", "-", "-", _fmt(ref.get("mean_length"), ".1f"), "-"])
    if results.get("reward"):  # --reward's mean score, after the RM columns
        header.insert(6, f"reward ({results['reward']})")
        for row, m in zip(rows, [*results["policies"].values(), ref]):
            row.insert(6, _fmt(m.get("reward")))
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; ``|`` and newlines in cells are escaped."""

    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    """A readable Markdown table of ``evaluate`` results: one row per policy and the reference."""
    p = results["posts"]
    tldr = p.get("task", "tldr") == "tldr"
    items, reference = ("posts", "the human reference") if tldr else ("prompts", "the chosen (best-scored) response")
    head = (f"{p['n']} held-out {items} from {p['source']}; win rates against {reference}; lengths in tokens (EOS excluded); "
            "* = length-controlled win rate extrapolated (every response longer, or every one shorter, than its reference)")
    pairs = results.get("rm_heldout_pairs")
    if pairs:
        head += (f"\n\nreward model accuracy on {pairs['n']} held-out preference pairs: {_fmt(pairs['accuracy'])} "
                 f"(\"longer response wins\" baseline {_fmt(pairs.get('longer_wins_accuracy'))})")
    notes = [f"KL to SFT of {name} not measured: {m['kl_to_sft_note']}" for name, m in results["policies"].items() if m.get("kl_to_sft_note")]
    return head + "\n\n" + markdown_table(*metrics_rows(results)) + "".join("\n\n" + n for n in notes)
