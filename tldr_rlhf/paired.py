"""Paired comparison of policies on the same posts (``evaluate``'s "paired vs SFT" table; the gold
report's greedy table): per post the difference of a policy's score and the baseline's, their mean, its
standard error and t = mean / SE (issue 26: a method "improves" when t >= 3 in every seed)."""

from __future__ import annotations

import math
from typing import Any, Sequence


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of a mean, ``sd / sqrt(n)`` with the n - 1 standard deviation; None under 2 values.
    [0.1, 0.3] -> sd 0.141421, se 0.1."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_differences(scores: dict[str, Sequence[float]], baseline: str = "sft") -> dict[str, dict[str, Any]]:
    """{policy: {n, mean, mean_diff, se, t}} of every policy of ``scores`` ({name: one score per post, the
    same posts in the same order}) other than ``baseline`` and "reference": its mean score, the mean of its
    per-post difference to ``baseline``'s, that mean's standard error and t (None when SE is 0 or under 2
    posts). {} without ``baseline``. Raises ValueError when a policy has another number of posts.
    SFT [0.2, 0.3, 0.1], policy [0.27, 0.2, 0.2] -> diffs [0.07, -0.1, 0.1]: mean 0.023333, SE 0.062272, t 0.37."""
    if baseline not in scores:
        return {}
    base = list(scores[baseline])
    out = {}
    for name, values in scores.items():
        if name in (baseline, "reference"):
            continue
        if len(values) != len(base):
            raise ValueError(f"policy '{name}' has {len(values)} scores, '{baseline}' {len(base)}: not paired")
        diffs = [v - b for v, b in zip(values, base)]
        mean_diff, se = (sum(diffs) / len(diffs), standard_error(diffs)) if diffs else (None, None)
        out[name] = {"n": len(diffs), "mean": sum(values) / len(values) if values else None, "mean_diff": mean_diff, "se": se, "t": mean_diff / se if se else None}
    return out


def format_paired(paired: dict[str, dict[str, Any]], baseline: str = "sft") -> str:
    """The markdown table of ``paired_differences``: policy, posts, mean, minus baseline, SE, t."""
    def f(v, d=4):
        return "-" if v is None else f"{v:.{d}f}"

    lines = [f"| policy | posts | reward | minus {baseline} (paired) | SE | t |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {p['n']} | {f(p['mean'])} | {f(p['mean_diff'])} | {f(p['se'])} | {f(p['t'], 2)} |" for n, p in paired.items()]
    return "\n".join(lines)
