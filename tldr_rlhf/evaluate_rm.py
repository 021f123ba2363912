"""``tldr-rlhf evaluate-rm``: a reward model measured against humans and a judge (Stiennon et al.
2020 sec. 3.4; N+ details 6 and 15).

Sets scored (each reported with its example count and drop counts):

* ``heldout``: comparisons of the training task held out from training (the training run's own
  data settings, read from the ``config.json`` next to ``final/``, else ``--data``): accuracy, accuracy
  by annotator confidence, the model's own calibration and the "longer response wins" baseline;
* ``cnndm``: OpenAI's CNN/DM comparisons (out of distribution);
* ``judge``: agreement with gpt-3.5-turbo judgements of OpenAI's 1.3B PPO summary against the human
  reference.

The out-of-distribution sets are those ``tasks.ood_sets`` names for the task (TL;DR sets); one asked
for with another task is listed under ``skipped``. Results go to ``eval_rm.json`` (next to the
model's run folder unless ``--output``), each pair's rewards to ``eval_rm.scores.jsonl`` beside it,
and a table to stdout. The metrics are ``metrics.comparison_metrics`` and
``metrics.judge_agreement``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import tasks
from .config import EvaluateRMConfig, RMConfig, PreferenceDataArgs, from_dict
from .data.comparisons import Comparison, PreferenceExample, build_preference_examples, describe_drops, load_comparisons, load_judged_samples
from .data.tldr import DropCounts
from .metrics import comparison_metrics, judge_agreement, pair_lengths
from .modeling import load_tokenizer
from .reward.loading import load_reward_checkpoint
from .precision import bf16_autocast, master_weights_dtype
from .reward.scoring import pair_rewards
from .scoring import score_preference_pairs
from .stages import EVAL_RM_FILE as EVAL_FILE

log = logging.getLogger(__name__)


def _run_data(cfg: EvaluateRMConfig) -> tuple[PreferenceDataArgs, str]:
    """The held-out data settings: the training run's own (config.json next to final/) or cfg.data."""
    run_cfg = Path(cfg.model).parent / "config.json"
    if cfg.from_run and run_cfg.is_file():
        try:
            saved = from_dict(RMConfig, json.loads(run_cfg.read_text()))
            return dataclasses.replace(saved.data, valid_limit=cfg.valid_limit), str(run_cfg)
        except TypeError:
            log.warning("%s is not a reward-model run config; using --data", run_cfg)
    return dataclasses.replace(cfg.data, valid_limit=cfg.valid_limit), "--data"


def _cnndm_pairs(cfg: EvaluateRMConfig, data: PreferenceDataArgs, tokenizer) -> tuple[list[PreferenceExample], dict[str, Any]]:
    """The CNN/DM comparisons of ``cfg.cnndm`` (its validation split; TL;DR rows there are counted
    as ``not_cnndm``, not as drops), tokenized, and their report (drops, truncated queries, and a
    ``note`` when none is left). Raises DataError for a malformed source."""
    comps, drops = load_comparisons(cfg.cnndm, "validation")
    not_cnndm = sum(not c.is_cnndm for c in comps)  # TL;DR rows of the hub's validation split: not drops
    comps = [c for c in comps if c.is_cnndm]
    if cfg.cnndm_limit:
        comps = comps[: cfg.cnndm_limit]
    notes = DropCounts()
    cnndm, drops = build_preference_examples(comps, tokenizer, max_response_length=data.max_response_length, max_cnndm_query_length=cfg.max_cnndm_query_length, drops=drops, notes=notes)
    report: dict[str, Any] = {"dropped": dict(drops.counts), "query_truncated": notes.counts.get("query_truncated", 0)}
    if not cnndm:
        report["not_cnndm"] = not_cnndm
        report["note"] = _nothing_left("CNN/DM comparison", {**report["dropped"], "not_cnndm": not_cnndm})
    return cnndm, report


def _judged_pairs(cfg: EvaluateRMConfig, data: PreferenceDataArgs, tokenizer) -> tuple[list[PreferenceExample], list[bool], dict[str, Any]]:
    """The judged (policy summary, reference) pairs of ``cfg.policy_samples``, tokenized as
    (first, second) = (policy, reference), whether the judge preferred the policy summary in each,
    and their report (drops, truncated queries, the judge, a ``note`` when none is left). Raises
    DataError for a malformed file."""
    samples, drops = load_judged_samples(cfg.policy_samples)
    if cfg.judge_limit:
        samples = samples[: cfg.judge_limit]
    notes = DropCounts()
    pairs = [Comparison(s.id, s.query_fields, s.response, s.reference) for s in samples]
    judged, drops = build_preference_examples(pairs, tokenizer, max_query_length=data.max_query_length, max_response_length=data.max_response_length, drops=drops, notes=notes)
    verdict = {s.id: s.judge_preferred for s in samples}
    judge_first = [verdict[e.post_id] == "policy" for e in judged]
    report: dict[str, Any] = {"dropped": dict(drops.counts), "query_truncated": notes.counts.get("query_truncated", 0), "judge": samples[0].judge if samples else ""}
    if not judged:
        report["note"] = _nothing_left("judged (policy summary, reference) pair", report["dropped"])
    return judged, judge_first, report


def _nothing_left(what: str, counts: dict[str, int]) -> str:
    """The note of an asked-for evaluation set that yields no example: why, with the counts."""
    total = sum(counts.values())
    if not total:
        return f"no {what} to score: the source has no records"
    return f"no {what} left to score: all {total} records were dropped ({describe_drops(counts)})"


def _pair_scores(name: str, examples: Sequence[PreferenceExample], rewards: torch.Tensor) -> list[dict[str, Any]]:
    """One scores.jsonl record per pair: set, id, annotator confidence, and the rewards of the first
    (chosen / policy summary) and second (rejected / reference) response."""
    return [{"set": name, "id": e.post_id, "confidence": e.confidence, "first": a, "second": b} for e, (a, b) in zip(examples, rewards.tolist())]


def evaluate(cfg: EvaluateRMConfig) -> dict[str, Any]:
    """Measure a reward model; writes the JSON results and prints a table. Returns the results.

    Sections (each with its example count and drop counts): ``heldout`` (comparisons held out from
    training, with accuracy by annotator confidence and calibration), ``cnndm`` (CNN/DM
    comparisons, out of distribution), ``judge`` (agreement with the GPT-3.5 judge on OpenAI PPO
    summary vs reference). A set asked for that yields no example (every record dropped) is kept
    with n 0, its drop counts and a ``note``, printed too; a set asked for that the task does not
    have (``tasks.ood_sets``) is listed under ``skipped``. Raises DataError / ModelLoadError before
    scoring anything.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg.model)
    data, data_from = _run_data(cfg)

    # Data first: every source is read and checked before the model is loaded.
    _, heldout, report = tasks.rm_pairs(data, tokenizer, need_train=False)
    ood = tasks.ood_sets(data)  # the out-of-distribution sets that exist for the task
    cnndm, cnndm_report = _cnndm_pairs(cfg, data, tokenizer) if cfg.cnndm and "cnndm" in ood else ([], {})
    judged, judge_first, judge_report = _judged_pairs(cfg, data, tokenizer) if cfg.policy_samples and "judge" in ood else ([], [], {})
    skipped = {name: f"a TL;DR set; the task is {data.task}" for name, asked in (("cnndm", cfg.cnndm), ("judge", cfg.policy_samples)) if asked and name not in ood}

    model = load_reward_checkpoint(cfg.model, dtype=master_weights_dtype(cfg.dtype), tokenizer=tokenizer).to(device)
    kw = dict(pad_token_id=tokenizer.pad_token_id, batch_size=cfg.batch_size, progress=cfg.progress)
    results: dict[str, Any] = {"model": cfg.model, "data_from": data_from, "normalization": model.config.normalization, "reward_offset": model.config.reward_offset}
    if skipped:
        results["skipped"] = skipped
    t0 = time.perf_counter()
    scores: list[dict[str, Any]] = []
    with bf16_autocast(device, cfg.dtype):
        r = score_preference_pairs(model, heldout, pair_rewards, desc=f"held-out {data.task} pairs", **kw)
        results["heldout"] = {**comparison_metrics(r, [e.confidence for e in heldout], lengths=pair_lengths(heldout)), **report["valid"], "source": data.valid_comparisons or data.comparisons, "task": data.task}
        scores += _pair_scores("heldout", heldout, r)
        if cnndm:
            r = score_preference_pairs(model, cnndm, pair_rewards, desc="CNN/DM pairs", **kw)
            results["cnndm"] = {**comparison_metrics(r, [e.confidence for e in cnndm], lengths=pair_lengths(cnndm)), **cnndm_report, "source": cfg.cnndm}
            scores += _pair_scores("cnndm", cnndm, r)
        elif cnndm_report:  # asked for, nothing left: said, not left out
            results["cnndm"] = {"n": 0, **cnndm_report, "source": cfg.cnndm}
        if judged:
            r = score_preference_pairs(model, judged, pair_rewards, desc="judged PPO vs reference", **kw)
            results["judge"] = {**judge_agreement(r, judge_first, lengths=pair_lengths(judged)), **judge_report, "source": cfg.policy_samples}
            scores += _pair_scores("judge", judged, r)
        elif judge_report:
            results["judge"] = {"n": 0, **judge_report, "source": cfg.policy_samples}
    results["seconds"] = time.perf_counter() - t0
    out = Path(cfg.output) if cfg.output else Path(cfg.model).parent / EVAL_FILE
    out.write_text(json.dumps(results, indent=2) + "\n")
    # Per-pair rewards (first = chosen / PPO summary, second = rejected / reference) for further analysis.
    out.with_suffix(".scores.jsonl").write_text("".join(json.dumps(x) + "\n" for x in scores))
    print(format_table(results))
    print(f"\nresults: {out}")
    return results


def format_table(results: dict[str, Any]) -> str:
    """A readable table of ``evaluate`` results."""
    lines = [f"reward model: {results['model']}", "", f"{'set':<31}{'n':>6}{'accuracy':>10}{'longer wins':>13}{'margin':>9}  dropped"]

    def row(name: str, m: dict[str, Any], key: str = "accuracy", baseline: str = "longer_wins_accuracy") -> None:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(m.get("dropped", {}).items())) or "none"
        margin = f"{m['margin']:>9.3f}" if "margin" in m else " " * 9
        base = f"{m[baseline]:>13.4f}" if baseline in m else " " * 13
        value = f"{m[key]:>10.4f}" if key in m else f"{'-':>10}"
        lines.append(f"{name:<31}{m['n']:>6}{value}{base}{margin}  {dropped}")

    row("held-out TL;DR comparisons" if results["heldout"].get("task", "tldr") == "tldr" else "held-out preference pairs", results["heldout"])
    if "cnndm" in results:
        row("CNN/DM comparisons (OOD)", results["cnndm"])
    if "judge" in results:
        row("agreement with GPT-3.5 judge", results["judge"], "agreement", "longer_agreement")
    lines.append("(longer wins: the baseline that always prefers the longer response, on the same pairs)")
    for key, label in (("cnndm", "CNN/DM comparisons"), ("judge", "agreement with GPT-3.5 judge")):
        if key in results and results[key].get("note"):
            lines.append(f"{label}: {results[key]['note']}")
        if key in results.get("skipped", {}):
            lines.append(f"{label}: skipped ({results['skipped'][key]})")
    h = results["heldout"]
    if h.get("accuracy_by_confidence"):
        lines += ["", "held-out accuracy by annotator confidence:", "  " + "  ".join(f"{c}: {v['accuracy']:.2f} (n={v['n']})" for c, v in h["accuracy_by_confidence"].items())]
    if h.get("calibration"):
        lines += ["", f"calibration (model probability of its preferred summary; ECE {h['calibration']['ece']:.3f}):"]
        lines += [f"  p in [{b['p_low']:.1f}, {b['p_high']:.1f}]: mean p {b['p_mean']:.3f}, accuracy {b['accuracy']:.3f} (n={b['n']})" for b in h["calibration"]["bins"]]
    if results.get("judge", {}).get("n"):
        j = results["judge"]
        lines += ["", f"judge set: RM prefers the PPO summary {j['rm_policy_win_rate']:.3f}, judge {j['judge_policy_win_rate']:.3f}; kappa {j['cohen_kappa']:.3f}; "
                  f"mean reward PPO {j['policy_reward']:.3f}, reference {j['reference_reward']:.3f}"]
        if "rm_prefers_longer" in j:
            lines.append(f"  prefers the longer summary: RM {j['rm_prefers_longer']:.3f}, judge {j['judge_prefers_longer']:.3f}")
    if "rm_prefers_longer" in h:
        lines.append(f"held-out: RM prefers the longer summary in {h['rm_prefers_longer']:.3f} of pairs of unequal length")
    return "\n".join(lines)
