"""The report's plots as PNG files (matplotlib's Agg canvas through ``matplotlib.figure.Figure``: no
pyplot, no display, no global backend change): training curves per stage (the curves its stage row
names), reward against KL for the RL stages, win rates, ROUGE and summary lengths per policy; and the
two helpers every plot uses (``figure``, ``save_figure``).

This module knows nothing about the report's document or the run folder's layout: each function takes
the records it plots and the path it writes, and returns the path (None when there is nothing to plot).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .stages import STAGES

# metrics.jsonl keys plotted per training stage (the stage row's ``curves``)
STAGE_CURVES: dict[str, tuple[str, ...]] = {s.name: s.curves for s in STAGES if s.train}


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over metrics records that carry it as a finite number, in order."""
    steps, values = [], []
    for r in records:
        if is_number(r.get(key)) and is_number(r.get("step")):
            steps.append(float(r["step"]))
            values.append(float(r[key]))
    return steps, values


# ----------------------------------------------------------------------------------------------
# Plots (PNG, matplotlib Agg)


def figure(n_panels: int = 1, *, width: float = 4.2, height: float = 3.2):
    from matplotlib.figure import Figure

    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_training_curves(stage: str, records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """One panel per curve of ``STAGE_CURVES[stage]`` present in the records (loss/* keys for an
    unknown stage). Returns the PNG path, or None when there is nothing to plot."""
    keys = STAGE_CURVES.get(stage) or tuple(sorted({k for r in records for k in r if k.startswith("loss/")}))
    series = [(k, *metric_series(records, k)) for k in keys]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, axes = figure(len(series))
    for ax, (key, x, y) in zip(axes, series):
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{stage}: training curves")
    return save_figure(fig, path)


def plot_reward_vs_kl(rl_records: dict[str, Sequence[dict[str, Any]]], eval_results: dict[str, Any] | None, path: Path) -> Path | None:
    """Left: reward-model score against KL to the reference, per update of each RL stage
    (``objective/kl``, ``objective/scores``). Right: the held-out evaluation's mean RM score against
    KL to SFT of every policy. None when neither has points."""
    lines = {}
    for stage, records in rl_records.items():
        pts = [(r["objective/kl"], r["objective/scores"]) for r in records if is_number(r.get("objective/kl")) and is_number(r.get("objective/scores"))]
        if pts:
            lines[stage] = pts
    points = {}
    if eval_results:
        for name, m in eval_results.get("policies", {}).items():
            if is_number(m.get("kl_to_sft")) and is_number(m.get("rm_score")):
                points[name] = (m["kl_to_sft"], m["rm_score"])
    if not lines and not points:
        return None
    fig, (left, right) = figure(2, width=5.0, height=3.8)
    for stage, pts in lines.items():
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=stage)
    left.set_title("RL training: score vs KL (per update)", fontsize=10)
    left.set_xlabel("KL to reference (nats / response)")
    left.set_ylabel("reward-model score")
    if lines:
        left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for name, (kl, score) in points.items():
        right.scatter([kl], [score], s=30)
        right.annotate(name, (kl, score), textcoords="offset points", xytext=(4, 4), fontsize=8)
    right.set_title("held-out: RM score vs KL to SFT", fontsize=10)
    right.set_xlabel("KL to SFT (nats / response)")
    right.set_ylabel("mean reward-model score")
    right.grid(alpha=0.3)
    return save_figure(fig, path)


def _policy_labels(eval_results: dict[str, Any]) -> list[str]:
    return [f"{n}\n({m['mean_length']:.0f} tok)" if is_number(m.get("mean_length")) else n for n, m in eval_results["policies"].items()]


def _grouped_bars(ax, labels: list[str], groups: dict[str, list[float]]) -> None:
    k = max(1, len(groups))
    width = 0.8 / k
    for j, (name, values) in enumerate(groups.items()):
        xs = [i + (j - (k - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [v if is_number(v) else 0.0 for v in values], width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_win_rates(eval_results: dict[str, Any], path: Path) -> Path | None:
    """Win rate against the human reference per policy: judge, length-controlled judge, training RM,
    and the LLM judge (raw and length-controlled) when present; each policy's mean length in its
    label; a line at 0.5 (as good as the reference)."""
    pol = eval_results.get("policies", {})
    if not pol:
        return None
    groups: dict[str, list[float]] = {}

    def add(label: str, get) -> None:
        values = [get(m) for m in pol.values()]
        if any(is_number(v) for v in values):
            groups[label] = values

    add("judge win rate" + (" (judge = training RM)" if eval_results.get("judge_is_training_rm") else ""), lambda m: m.get("judge", {}).get("win_rate"))
    add("judge, length-controlled", lambda m: m.get("judge", {}).get("lc", {}).get("lc_win_rate"))
    if not eval_results.get("judge_is_training_rm"):
        add("training RM win rate", lambda m: m.get("rm_win_rate"))
    add("LLM judge", lambda m: (m.get("llm_judge") or {}).get("win_rate"))
    add("LLM judge, length-controlled", lambda m: (m.get("llm_judge") or {}).get("lc", {}).get("lc_win_rate"))
    if not groups:
        return None
    fig, (ax,) = figure(1, width=max(6.0, 1.3 * len(pol) + 2), height=4.0)
    _grouped_bars(ax, _policy_labels(eval_results), groups)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs human reference")
    ax.set_title("win rate against the reference (mean summary length in tokens)", fontsize=10)
    return save_figure(fig, path)


def plot_rouge(eval_results: dict[str, Any], path: Path) -> Path | None:
    """ROUGE-1/2/L F1 against the references per policy."""
    pol = eval_results.get("policies", {})
    if not pol:
        return None
    groups = {k: [m.get(k) for m in pol.values()] for k in ("rouge1", "rouge2", "rougeL")}
    fig, (ax,) = figure(1, width=max(6.0, 1.3 * len(pol) + 2), height=4.0)
    _grouped_bars(ax, list(pol), groups)
    ax.set_ylabel("F1")
    ax.set_title("ROUGE against the human reference", fontsize=10)
    return save_figure(fig, path)


def plot_lengths(summaries: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Histograms of summary length in tokens (EOS excluded) per policy and for the reference."""
    if not summaries:
        return None
    names = list(summaries[0].get("summaries", {}))
    lengths: dict[str, list[int]] = {n: [] for n in names}
    ref: list[int] = []
    for rec in summaries:
        for n in names:
            s = rec["summaries"].get(n)
            if s is not None:
                lengths[n].append(int(s["length"]))
        first = next(iter(rec["summaries"].values()), None)
        if first is not None and "reference_length" in first:
            ref.append(int(first["reference_length"]))
    if ref:
        lengths["reference"] = ref
    lengths = {k: v for k, v in lengths.items() if v}
    if not lengths:
        return None
    top = max(max(v) for v in lengths.values())
    bins = list(range(0, top + 2, max(1, (top + 1) // 30 + 1)))
    fig, (ax,) = figure(1, width=7.0, height=4.0)
    for name, v in lengths.items():
        ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (mean {sum(v) / len(v):.1f})")
    ax.set_xlabel("summary length (tokens)")
    ax.set_ylabel("posts")
    ax.set_title("summary length distributions", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
