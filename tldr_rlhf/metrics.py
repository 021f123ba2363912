"""Metrics shared by ``evaluate`` (policies), ``evaluate-rm`` (reward models) and DPO: pure functions,
lists / tensors and scalars in, numbers out, each tested by hand.

Policies against the reference (Stiennon et al. 2020 sec. 4; N+ details 27-28):

* ``rouge_scores``: mean ROUGE-1/2/L F1 of summaries against the references (rouge-score, Porter
  stemming; the N+ paper reports SFT ROUGE-L ~0.25);
* ``outcomes_from_scores`` and ``win_rate``: a summary wins against the reference when the judge
  scores it higher (a tie is half a win); unparseable LLM verdicts are counted, never guessed;
* ``length_controlled_win_rate``: PPO lengthens summaries (~31 -> ~44 tokens in N+) and judges favour
  length, so a raw win rate mixes quality with length. We fit a logistic regression of the outcome on
  the length difference, ``P(win) = sigmoid(a + b * d / s)`` with ``d = len(summary) - len(reference)``
  in tokens and ``s`` the standard deviation of d, and report ``sigmoid(a)``: the predicted win rate
  of a summary exactly as long as the reference. (Chosen over length buckets because it uses every
  pair; a small evaluation set leaves buckets nearly empty.) A weak Gaussian prior on the slope (L2
  ``l2 = 1`` per standard deviation of d) keeps the fit finite when wins separate perfectly by length;
  with ``l2 = 0`` it is the plain maximum-likelihood fit;
* ``kl_from_logprobs``: KL(pi || pi_sft) estimated on responses sampled from pi as the mean over
  responses of ``sum_t log pi(y_t) - log pi_sft(y_t)`` (the k1 estimator the RL stages log as
  ``objective/kl``), both with logits divided by the sampling temperature (N+ detail 21).

Scored comparisons (reward-model rewards, DPO implicit rewards; Stiennon et al. 2020 sec. 3.4, N+
details 15 and 26):

* ``comparison_metrics``: accuracy on (chosen, rejected) pairs, by annotator confidence, the
  model's calibration and the "longer response wins" baseline (``pair_lengths``);
* ``judge_agreement``: agreement with a judge's verdicts on (policy summary, reference) pairs.

Shapes: N pairs (or responses), T response tokens.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch


# ----------------------------------------------------------------------------------------------
# Policies against the reference


def rouge_scores(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (Lin 2004) of ``predictions`` against ``references``.

    Computed with Google's rouge-score (lower-cased, non-alphanumerics dropped, Porter stemming when
    ``use_stemmer``); ROUGE-L is the sentence-level longest common subsequence. Returns {"rouge1",
    "rouge2", "rougeL"} in [0, 1], each the mean over the N pairs. An empty prediction scores 0.
    Raises ValueError for lists of different lengths or no pairs.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_scores needs at least one pair")
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." per scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        s = scorer.score(ref, pred)  # rouge-score's order: (target, prediction)
        for k in sums:
            sums[k] += float(s[k].fmeasure)
    return {k: v / len(predictions) for k, v in sums.items()}


def outcomes_from_scores(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> list[float]:
    """Per-pair outcome of a score judge: 1.0 when the policy summary scores higher than the
    reference, 0.0 when lower, 0.5 for an exact tie. Shapes: two length-N sequences -> N floats.
    Raises ValueError for different lengths."""
    if len(policy_scores) != len(reference_scores):
        raise ValueError(f"{len(policy_scores)} policy scores but {len(reference_scores)} reference scores")
    return [1.0 if p > r else 0.0 if p < r else 0.5 for p, r in zip(policy_scores, reference_scores)]


def win_rate(outcomes: Sequence[float | None]) -> dict[str, Any]:
    """Win rate against the reference (Stiennon et al. 2020 fig. 1; N+ detail 27).

    ``outcomes``: per pair 1.0 (win), 0.0 (loss), 0.5 (tie) or None (no verdict: an unparseable or
    failed judgement). None is counted in ``unparseable`` and left out of the rate, never guessed.
    Returns {win_rate (nan when nothing was judged), n (judged pairs), wins, losses, ties, unparseable}.
    Raises ValueError for an outcome outside {0, 0.5, 1, None}.
    """
    wins = losses = ties = missing = 0
    for o in outcomes:
        if o is None:
            missing += 1
        elif o == 1.0:
            wins += 1
        elif o == 0.0:
            losses += 1
        elif o == 0.5:
            ties += 1
        else:
            raise ValueError(f"outcome must be 0, 0.5, 1 or None, got {o!r}")
    n = wins + losses + ties
    return {"win_rate": (wins + 0.5 * ties) / n if n else float("nan"), "n": n, "wins": wins, "losses": losses, "ties": ties, "unparseable": missing}


def length_controlled_win_rate(
    outcomes: Sequence[float | None],
    policy_lengths: Sequence[int],
    reference_lengths: Sequence[int],
    *,
    l2: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-12,
) -> dict[str, Any]:
    """Win rate at matched length: logistic regression of the outcome on the length difference,
    evaluated at zero difference.

    Model: ``P(win_i) = sigmoid(a + b * x_i)`` with ``x_i = d_i / s``, ``d_i = policy_lengths[i] -
    reference_lengths[i]`` (tokens) and ``s`` the population standard deviation of d over the judged
    pairs. Fitted by Newton's method on the Bernoulli log-likelihood ``sum y log p + (1 - y) log(1 - p)``
    (a tie, y = 0.5, is half a win) minus ``l2 / 2 * b**2`` (a N(0, 1/l2) prior on the slope per standard
    deviation of d; the intercept is not penalized). Pairs with outcome None are dropped. Returns
    {lc_win_rate = sigmoid(a), intercept a, slope_per_token b / s, n, mean_length_diff (tokens),
    raw_win_rate, extrapolated: True when every summary is longer, or every one shorter, than its
    reference, so that zero difference lies outside the data}. Special cases: no judged pair gives nan; all outcomes equal give that value
    (the intercept is infinite); lengths that do not vary fix b = 0 (nothing to extrapolate with).
    Raises ValueError for sequences of different lengths.
    """
    if not len(outcomes) == len(policy_lengths) == len(reference_lengths):
        raise ValueError(f"lengths differ: {len(outcomes)} outcomes, {len(policy_lengths)} policy lengths, {len(reference_lengths)} reference lengths")
    rows = [(float(o), float(p) - float(r)) for o, p, r in zip(outcomes, policy_lengths, reference_lengths) if o is not None]
    n = len(rows)
    if n == 0:
        return {"lc_win_rate": float("nan"), "intercept": float("nan"), "slope_per_token": float("nan"), "n": 0, "mean_length_diff": float("nan"), "raw_win_rate": float("nan"), "extrapolated": False}
    y = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    d = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    raw = y.mean().item()
    out = {"n": n, "mean_length_diff": d.mean().item(), "raw_win_rate": raw, "extrapolated": not (d.min().item() <= 0.0 <= d.max().item())}
    if raw in (0.0, 1.0):
        return {**out, "lc_win_rate": raw, "intercept": math.copysign(math.inf, raw - 0.5), "slope_per_token": 0.0}
    s = d.std(unbiased=False).item()
    if s == 0.0:  # no length variation: the slope is not identified
        a = math.log(raw / (1 - raw))
        return {**out, "lc_win_rate": raw, "intercept": a, "slope_per_token": 0.0}
    x = torch.stack([torch.ones_like(d), d / s], 1)  # (N, 2)
    penalty = torch.diag(torch.tensor([0.0, l2], dtype=torch.float64))
    w = torch.tensor([math.log(raw / (1 - raw)), 0.0], dtype=torch.float64)
    for _ in range(max_iter):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (y - p) - penalty @ w
        hess = (x.T * (p * (1 - p))) @ x + penalty
        step = torch.linalg.solve(hess, grad)
        w = w + step
        if step.abs().max().item() < tol:
            break
    a, b = w.tolist()
    return {**out, "lc_win_rate": 1.0 / (1.0 + math.exp(-a)), "intercept": a, "slope_per_token": b / s}


def kl_from_logprobs(policy_logprobs: torch.Tensor, sft_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """KL(pi || pi_sft) in nats per response, k1 estimator on responses sampled from pi.

    Shapes: policy_logprobs, sft_logprobs (N, T) log-probs of the sampled tokens (same temperature);
    mask (N, T) bool, True on real response tokens. Per response ``kl_i = sum_t mask * (lp_pi -
    lp_sft)``; returns {kl (mean over N), kl_std, n}. The mean is unbiased for the sequence KL; single
    values can be negative. Raises ValueError for mismatched shapes or N = 0.
    """
    if policy_logprobs.shape != sft_logprobs.shape or policy_logprobs.shape != mask.shape:
        raise ValueError(f"shapes differ: {tuple(policy_logprobs.shape)}, {tuple(sft_logprobs.shape)}, {tuple(mask.shape)}")
    if policy_logprobs.shape[0] == 0:
        raise ValueError("kl_from_logprobs needs at least one response")
    per = ((policy_logprobs.double() - sft_logprobs.double()) * mask.double()).sum(-1)
    return {"kl": per.mean().item(), "kl_std": per.std(unbiased=False).item(), "n": int(per.shape[0])}


# ----------------------------------------------------------------------------------------------
# Scored comparisons


def pair_lengths(examples: Sequence) -> torch.Tensor:
    """Response token counts of preference examples (anything with ``chosen_ids`` and
    ``rejected_ids``): (N, 2) long, (chosen, rejected); (0, 2) for no examples."""
    return torch.tensor([[len(e.chosen_ids), len(e.rejected_ids)] for e in examples], dtype=torch.long).reshape(-1, 2)


def comparison_metrics(
    rewards: torch.Tensor, confidences: Sequence[int | None] | None = None, *, lengths: torch.Tensor | None = None, calibration_bins: int = 5
) -> dict[str, Any]:
    """Reward-model accuracy on comparisons.

    ``rewards`` (N, 2): (chosen, rejected). A comparison is right when r_chosen > r_rejected (a tie is
    wrong and counted in ``ties``). Returns {accuracy, n, ties, loss (mean -log sigmoid margin), margin,
    chosen_reward, rejected_reward, accuracy_by_confidence {c: {accuracy, n}} (annotator confidence),
    calibration {bins: [{p_mean, accuracy, n}], ece}} where p = sigmoid(|r_chosen - r_rejected|) is
    the model's probability for the summary it prefers (Bradley-Terry), binned in [0.5, 1].
    With ``lengths`` (N, 2) response token counts: ``longer_wins_accuracy`` (the baseline "the
    longer summary is better"; equal lengths count as wrong) and ``rm_prefers_longer`` (share of
    pairs of unequal length where the model prefers the longer one): humans and judges favour length,
    so an accuracy is only informative next to this baseline.
    """
    n = int(rewards.shape[0])
    if n == 0:
        return {"n": 0, "accuracy": float("nan")}
    r = rewards.double()
    diff = r[:, 0] - r[:, 1]
    right = diff > 0
    out: dict[str, Any] = {
        "accuracy": right.double().mean().item(),
        "n": n,
        "ties": int((diff == 0).sum()),
        "loss": torch.nn.functional.softplus(-diff).mean().item(),
        "margin": diff.mean().item(),
        "chosen_reward": r[:, 0].mean().item(),
        "rejected_reward": r[:, 1].mean().item(),
    }
    if confidences is not None:
        by: dict[int, list[bool]] = {}
        for c, ok in zip(confidences, right.tolist()):
            if c is not None:
                by.setdefault(int(c), []).append(ok)
        out["accuracy_by_confidence"] = {str(k): {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by.items())}
    if lengths is not None:
        out.update(_length_stats(lengths, diff > 0))
        out["longer_wins_accuracy"] = (lengths[:, 0] > lengths[:, 1]).double().mean().item()
    p = torch.sigmoid(diff.abs())
    bins, ece = [], 0.0
    edges = torch.linspace(0.5, 1.0, calibration_bins + 1, dtype=torch.float64)
    for i in range(calibration_bins):
        inside = (p >= edges[i]) & ((p < edges[i + 1]) if i < calibration_bins - 1 else (p <= edges[i + 1]))
        k = int(inside.sum())
        if k == 0:
            continue
        acc = right[inside].double().mean().item()
        pm = p[inside].mean().item()
        bins.append({"p_low": round(edges[i].item(), 3), "p_high": round(edges[i + 1].item(), 3), "p_mean": pm, "accuracy": acc, "n": k})
        ece += k / n * abs(acc - pm)
    out["calibration"] = {"bins": bins, "ece": ece}
    return out


def _length_stats(lengths: torch.Tensor, first_preferred: torch.Tensor) -> dict[str, Any]:
    """Share of pairs of unequal length where the first-preferred choice is the longer response."""
    unequal = lengths[:, 0] != lengths[:, 1]
    longer_first = lengths[:, 0] > lengths[:, 1]
    k = int(unequal.sum())
    return {"rm_prefers_longer": ((first_preferred == longer_first) & unequal).double().sum().item() / k if k else float("nan")}


def judge_agreement(rewards: torch.Tensor, judge_prefers_first: Sequence[bool], *, lengths: torch.Tensor | None = None) -> dict[str, Any]:
    """Agreement of the reward model with a judge on (policy summary, reference) pairs.

    ``rewards`` (N, 2): (policy, reference). The model prefers the policy summary when r_policy >
    r_reference (a tie counts as preferring the reference, and is counted). Returns {agreement, n,
    ties, rm_policy_win_rate, judge_policy_win_rate, cohen_kappa, policy_reward, reference_reward};
    with ``lengths`` (N, 2) also the length baseline's agreement with the judge
    (``longer_agreement``) and how often the model / the judge prefer the longer summary."""
    n = int(rewards.shape[0])
    if n == 0:
        return {"n": 0, "agreement": float("nan")}
    rm = (rewards[:, 0] > rewards[:, 1]).tolist()
    judge = [bool(j) for j in judge_prefers_first]
    agree = sum(a == b for a, b in zip(rm, judge)) / n
    p_rm, p_judge = sum(rm) / n, sum(judge) / n
    expected = p_rm * p_judge + (1 - p_rm) * (1 - p_judge)
    kappa = (agree - expected) / (1 - expected) if expected < 1 else float("nan")
    extra: dict[str, Any] = {}
    if lengths is not None:
        longer_first = (lengths[:, 0] > lengths[:, 1]).tolist()
        extra = {
            "longer_agreement": sum(a == b for a, b in zip(longer_first, judge)) / n,
            "rm_prefers_longer": _length_stats(lengths, torch.tensor(rm))["rm_prefers_longer"],
            "judge_prefers_longer": _length_stats(lengths, torch.tensor(judge))["rm_prefers_longer"],
        }
    return {
        **extra,
        "agreement": agree,
        "n": n,
        "ties": int((rewards[:, 0] == rewards[:, 1]).sum()),
        "rm_policy_win_rate": p_rm,
        "judge_policy_win_rate": p_judge,
        "cohen_kappa": kappa,
        "policy_reward": rewards[:, 0].double().mean().item(),
        "reference_reward": rewards[:, 1].double().mean().item(),
    }
