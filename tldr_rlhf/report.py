"""Report of a pipeline run folder (``tldr-rlhf report RUN_DIR``): Markdown and HTML with PNG plots.

Reads what the stages left in the run folder (any part may be missing; what is there is reported):

* ``<stage>/metrics.jsonl`` of sft, rm, dpo, ppo, grpo, rloo, online-dpo -> training curves, one PNG per stage
  (``curves_<stage>.png``), and for the RL stages the reward against the KL to the reference per
  update (``reward_vs_kl.png``, with the held-out evaluation's RM score against KL to SFT beside it);
* ``evaluate/eval.json`` -> the metrics table, win rate per policy (``win_rate.png``: RM judge, its
  length-controlled version, the LLM judge when there is one, with each policy's mean length under
  its name, because judges favour length: N+ detail 27) and ROUGE per policy (``rouge.png``);
* ``evaluate/summaries.jsonl`` -> summary length distributions (``lengths.png``) and the side-by-side
  table of every policy's summary of the same held-out posts, as in the seeds;
* ``gold/`` (the gold experiment, ``gold.py``; or a gold output folder itself) -> the table of every
  held-out measurement, the gain over SFT per method and update against the seed spread and the SFT
  policy's own resampling spread, the greedy final policies paired with SFT post by post, and the plots
  ``gold_direct.png`` (gold reward and KL per update, gold vs KL), ``gold_direct_as_trained.png`` (the
  same for the reward as trained) and ``gold_proxy.png`` (proxy and gold reward vs KL for the methods
  optimizing the proxy and for best-of-n);
* ``rm/eval_rm.json`` and ``dpo/eval.json`` -> reward-model accuracy (held-out, CNN/DM, agreement with
  GPT-3.5) and DPO's implicit-reward accuracy; ``pipeline.json`` -> time per stage.

Plots use matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (no pyplot, no display, no
global backend change). The Markdown and the HTML come from the same list of blocks.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from .config import ReportConfig
from .data.io import read_jsonl
from .errors import DataError
from .evaluate import SUMMARIES_FILE, markdown_table, metrics_rows
from .checkpoints import COMPLETE
from .pipeline import STATE_FILE
from .stages import COMMANDS, DPO_EVAL_FILE, EVAL_FILE, EVAL_RM_FILE, GOLD_FILE, RL_STAGES, STAGES, TRAIN_STAGES

log = logging.getLogger(__name__)

# metrics.jsonl keys plotted per training stage (the stage row's ``curves``)
STAGE_CURVES: dict[str, tuple[str, ...]] = {s.name: s.curves for s in STAGES if s.train}


# ----------------------------------------------------------------------------------------------
# Reading


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file ([] when it does not exist). Raises DataError naming the file
    and line for invalid JSON."""
    return [r for _, r in read_jsonl(path)] if path.is_file() else []


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at line {e.lineno})", path=str(path), line=e.lineno) from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over metrics records that carry it as a finite number, in order."""
    steps, values = [], []
    for r in records:
        if _number(r.get(key)) and _number(r.get("step")):
            steps.append(float(r["step"]))
            values.append(float(r[key]))
    return steps, values


# ----------------------------------------------------------------------------------------------
# Plots (PNG, matplotlib Agg)


def _figure(n_panels: int = 1, *, width: float = 4.2, height: float = 3.2):
    from matplotlib.figure import Figure

    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig, path: Path) -> Path:
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
    fig, axes = _figure(len(series))
    for ax, (key, x, y) in zip(axes, series):
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{stage}: training curves")
    return _save(fig, path)


def plot_reward_vs_kl(rl_records: dict[str, Sequence[dict[str, Any]]], eval_results: dict[str, Any] | None, path: Path) -> Path | None:
    """Left: reward-model score against KL to the reference, per update of each RL stage
    (``objective/kl``, ``objective/scores``). Right: the held-out evaluation's mean RM score against
    KL to SFT of every policy. None when neither has points."""
    lines = {}
    for stage, records in rl_records.items():
        pts = [(r["objective/kl"], r["objective/scores"]) for r in records if _number(r.get("objective/kl")) and _number(r.get("objective/scores"))]
        if pts:
            lines[stage] = pts
    points = {}
    if eval_results:
        for name, m in eval_results.get("policies", {}).items():
            if _number(m.get("kl_to_sft")) and _number(m.get("rm_score")):
                points[name] = (m["kl_to_sft"], m["rm_score"])
    if not lines and not points:
        return None
    fig, (left, right) = _figure(2, width=5.0, height=3.8)
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
    return _save(fig, path)


def _policy_labels(eval_results: dict[str, Any]) -> list[str]:
    return [f"{n}\n({m['mean_length']:.0f} tok)" if _number(m.get("mean_length")) else n for n, m in eval_results["policies"].items()]


def _grouped_bars(ax, labels: list[str], groups: dict[str, list[float]]) -> None:
    k = max(1, len(groups))
    width = 0.8 / k
    for j, (name, values) in enumerate(groups.items()):
        xs = [i + (j - (k - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [v if _number(v) else 0.0 for v in values], width=width, label=name)
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
        if any(_number(v) for v in values):
            groups[label] = values

    add("judge win rate" + (" (judge = training RM)" if eval_results.get("judge_is_training_rm") else ""), lambda m: m.get("judge", {}).get("win_rate"))
    add("judge, length-controlled", lambda m: m.get("judge", {}).get("lc", {}).get("lc_win_rate"))
    if not eval_results.get("judge_is_training_rm"):
        add("training RM win rate", lambda m: m.get("rm_win_rate"))
    add("LLM judge", lambda m: (m.get("llm_judge") or {}).get("win_rate"))
    add("LLM judge, length-controlled", lambda m: (m.get("llm_judge") or {}).get("lc", {}).get("lc_win_rate"))
    if not groups:
        return None
    fig, (ax,) = _figure(1, width=max(6.0, 1.3 * len(pol) + 2), height=4.0)
    _grouped_bars(ax, _policy_labels(eval_results), groups)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs human reference")
    ax.set_title("win rate against the reference (mean summary length in tokens)", fontsize=10)
    return _save(fig, path)


def plot_rouge(eval_results: dict[str, Any], path: Path) -> Path | None:
    """ROUGE-1/2/L F1 against the references per policy."""
    pol = eval_results.get("policies", {})
    if not pol:
        return None
    groups = {k: [m.get(k) for m in pol.values()] for k in ("rouge1", "rouge2", "rougeL")}
    fig, (ax,) = _figure(1, width=max(6.0, 1.3 * len(pol) + 2), height=4.0)
    _grouped_bars(ax, list(pol), groups)
    ax.set_ylabel("F1")
    ax.set_title("ROUGE against the human reference", fontsize=10)
    return _save(fig, path)


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
    fig, (ax,) = _figure(1, width=7.0, height=4.0)
    for name, v in lengths.items():
        ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (mean {sum(v) / len(v):.1f})")
    ax.set_xlabel("summary length (tokens)")
    ax.set_ylabel("posts")
    ax.set_title("summary length distributions", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# The gold experiment (gold.py): records of held-out measurements -> table and plots


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if _number(v) else "-"


def per_post_gold(gold_dir: Path) -> dict[tuple[str, str], list[tuple[float, bool]]]:
    """{(evaluation folder, policy): its (gold reward, ended with EOS) per held-out post} from the
    ``summaries.jsonl`` of every evaluation folder of a gold experiment (``eval/FOLDER/``; a folder
    evaluated several times keeps its last evaluation's); ``gold.eval_name`` gives a record's folder."""
    out: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    for f in sorted(Path(gold_dir).glob("eval/*/summaries.jsonl")):
        for rec in read_records(f):
            for name, s in rec.get("summaries", {}).items():
                if _number(s.get("reward")):
                    out.setdefault((f.parent.name, name), []).append((float(s["reward"]), bool(s.get("eos", True))))
    return out


def _per_post_of(record: dict[str, Any], per_post: dict[tuple[str, str], list[tuple[float, bool]]]) -> list[tuple[float, bool]]:
    from .gold import eval_name

    return per_post.get((eval_name(record), record.get("policy", "")), [])


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of a mean, ``sd / sqrt(n)`` with the n - 1 standard deviation; None under 2 values.
    [0.1, 0.3] -> sd 0.141421, se 0.1."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def as_trained(pairs: Sequence[tuple[float, bool]], no_eos_penalty: float = -1.0) -> float | None:
    """Mean gold reward as the RL stages score it (N+ detail 23): a summary's gold reward when it ended
    with EOS, else ``no_eos_penalty``. [(0.3, True), (0.5, False)] -> (0.3 - 1) / 2 = -0.35; None when empty."""
    return sum(g if e else no_eos_penalty for g, e in pairs) / len(pairs) if pairs else None


def gold_rows(records: Sequence[dict[str, Any]], per_post: dict[tuple[str, str], list[tuple[float, bool]]] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of every held-out measurement of the gold experiment, one row per policy:
    experiment, method, seed, update (best-of-n: n), episodes, gold reward, its standard error over the
    posts and the gold reward as trained (no-EOS summaries at -1) from ``per_post`` ({(evaluation folder,
    policy): per-post (gold, EOS)}, ``per_post_gold``; "-" without), proxy score, KL to SFT (nats per response), length (tokens), EOS rate;
    in experiment, method, seed, update order."""
    per_post = per_post or {}

    def order(r):
        return (r["experiment"] != "direct", r["method"] != "sft", r["method"], r.get("seed") or 0, r.get("update") or 0, r.get("n") or 0)

    rows = []
    for r in sorted(records, key=order):
        step = f"n={r['n']}" if r["method"] == "best-of-n" else str(r.get("update", "-"))
        pp = _per_post_of(r, per_post)
        rows.append([
            r["experiment"], r["method"], "-" if r.get("seed") is None else str(r["seed"]), step, "-" if r.get("episodes") is None else str(r["episodes"]),
            _fmt(r.get("gold")), _fmt(standard_error([g for g, _ in pp])), _fmt(as_trained(pp)), _fmt(r.get("proxy")), _fmt(r.get("kl")),
            _fmt(r.get("length"), 1), _fmt(r.get("eos_rate"), 2),
        ])
    header = ["experiment", "method", "seed", "update", "episodes", "gold (held-out)", "gold SE (posts)", "gold as trained", "proxy (held-out)", "KL to SFT", "length", "EOS rate"]
    return header, rows


def sft_measurements(records: Sequence[dict[str, Any]], key: str = "gold") -> list[float]:
    """``key`` of every measurement of the direct experiment's SFT policy: its first one and those at
    further sampling seeds (``gold.SFT_RESAMPLED``)."""
    from .gold import SFT_RESAMPLED

    return [r[key] for r in records if r["experiment"] == "direct" and r["method"] in ("sft", SFT_RESAMPLED) and _number(r.get(key))]


def sft_noise(records: Sequence[dict[str, Any]], key: str = "gold") -> tuple[float, float, int] | None:
    """(mean, spread = max - min, count) of ``sft_measurements``; None under 2 measurements.
    [0.200, 0.216, 0.188] -> (0.201333, 0.028, 3)."""
    values = sft_measurements(records, key)
    if len(values) < 2:
        return None
    return sum(values) / len(values), max(values) - min(values), len(values)


def gold_summary(records: Sequence[dict[str, Any]], key: str = "gold") -> tuple[list[str], list[list[str]]]:
    """(header, rows) per experiment, method and update over the seeds of the records' ``key`` (gold
    reward; "gold_as_trained" for the reward as trained): its mean, seed spread (max - min), the gain
    over the direct experiment's SFT policy (its first measurement, at the runs' own sampling seed), KL
    mean, whether the gain exceeds the seed spread ("yes" / "no"; "1 seed" when there is no spread to
    compare with), and whether it exceeds the SFT policy's own spread over its resampled measurements
    (``sft_noise``; "-" without them)."""
    from .gold import SFT_RESAMPLED

    sft = next((r[key] for r in records if r["method"] == "sft" and r["experiment"] == "direct" and _number(r.get(key))), None)
    noise = sft_noise(records, key)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["method"] in ("sft", SFT_RESAMPLED, "best-of-n") or not _number(r.get(key)):
            continue
        groups.setdefault((r["experiment"], r["method"], r.get("update")), []).append(r)
    rows = []
    for (exp, method, update), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "direct", kv[0][1], kv[0][2] or 0)):
        values = [r[key] for r in rs]
        mean, spread = sum(values) / len(values), max(values) - min(values)
        kls = [r["kl"] for r in rs if _number(r.get("kl"))]
        gain = mean - sft if sft is not None else None
        verdict = "1 seed" if len(rs) < 2 else ("yes" if gain is not None and gain > spread else "no")
        beyond_noise = "-" if noise is None or gain is None else ("yes" if gain > noise[1] else "no")
        rows.append([exp, method, str(update), str(len(rs)), _fmt(mean), _fmt(spread), _fmt(gain, 3) if gain is not None else "-", _fmt(sum(kls) / len(kls) if kls else None), verdict, beyond_noise])
    return ["experiment", "method", "update", "seeds", f"{key} mean", "seed spread", "gain over SFT", "KL mean", "gain > spread", "gain > SFT resampled spread"], rows


def greedy_rows(summaries: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of the greedy measurement of the final policies (``gold.GREEDY_EVAL``'s
    summaries.jsonl: one record per held-out post with every policy's summary): per policy its mean gold
    reward, the mean difference to the SFT policy's on the same posts with that difference's standard
    error and t (mean / SE), mean length and EOS rate; SFT first, then the policies in name order. None
    without an "sft" summary on every post. SFT [0.2, 0.3, 0.1] and a policy [0.27, 0.2, 0.2] -> differences
    [0.07, -0.1, 0.1], mean 0.023333, SE 0.062272, t 0.37."""
    posts = [s.get("summaries", {}) for s in summaries]
    if not posts or any("sft" not in p for p in posts):
        return None
    names = sorted({n for p in posts for n in p if n != "sft"})
    rows = []
    for name in ["sft", *names]:
        paired = [(p[name], p["sft"]) for p in posts if name in p and _number(p[name].get("reward"))]
        values = [s["reward"] for s, _ in paired]
        diffs = [s["reward"] - b["reward"] for s, b in paired]
        mean_diff, se = (sum(diffs) / len(diffs), standard_error(diffs)) if diffs else (None, None)
        t = mean_diff / se if name != "sft" and se else None
        rows.append([
            name, str(len(values)), _fmt(sum(values) / len(values) if values else None), "-" if name == "sft" else _fmt(mean_diff),
            "-" if name == "sft" else _fmt(se), _fmt(t, 2), _fmt(sum(s.get("length", 0) for s, _ in paired) / len(paired) if paired else None, 1),
            _fmt(sum(bool(s.get("eos")) for s, _ in paired) / len(paired) if paired else None, 2),
        ])
    return ["policy", "posts", "gold (greedy)", "minus SFT (paired)", "SE", "t", "length", "EOS rate"], rows


def _series(records: Sequence[dict[str, Any]], experiment: str) -> dict[tuple[str, Any], list[dict[str, Any]]]:
    """{(method, seed): records in update order} of an experiment's RL runs, each starting at the SFT
    record of that experiment (update 0, KL 0) when there is one."""
    from .gold import SFT_RESAMPLED

    start = next((r for r in records if r["experiment"] == experiment and r["method"] == "sft"), None)
    out: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in records:
        if r["experiment"] == experiment and r["method"] not in ("sft", SFT_RESAMPLED, "best-of-n"):
            out.setdefault((r["method"], r.get("seed")), []).append(r)
    return {k: ([start] if start else []) + sorted(v, key=lambda r: r.get("update") or 0) for k, v in sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))}


def _method_colors(methods: Sequence[str]) -> dict[str, str]:
    # matplotlib's ten categorical colours, then two more: methods keep distinct colours up to 12
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan", "black", "gold"]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def plot_gold_direct(
    records: Sequence[dict[str, Any]], path: Path, *, sft_se: float | None = None, sft_range: tuple[float, float] | None = None,
    key: str = "gold", label: str = "held-out gold reward (ROUGE-L)",
) -> Path | None:
    """The direct experiment: held-out ``key`` (the gold reward; "gold_as_trained" for the reward as
    trained) against updates, KL to SFT against updates and ``key`` against KL, one colour per method
    and one line per seed (marker per seed), each line from the SFT policy (update 0, KL 0; a dashed
    line at its value, shaded over ``sft_range`` (lowest, highest of its resampled measurements) when
    given, else +- ``sft_se``, its standard error over the posts, when given). None without RL records."""
    series = _series(records, "direct")
    if not series:
        return None
    colors = _method_colors(sorted({m for m, _ in series}))
    markers = ["o", "s", "^", "D", "v"]
    seeds = sorted({s for _, s in series if s is not None})
    fig, (a, b, c) = _figure(3, width=4.6, height=3.6)
    for (method, seed), rs in series.items():
        mk = markers[seeds.index(seed) % len(markers)] if seed in seeds else "o"
        up = [(r.get("update") or 0, r) for r in rs]
        line = f"{method} s{seed}"
        a.plot([u for u, r in up if _number(r.get(key))], [r[key] for u, r in up if _number(r.get(key))], marker=mk, color=colors[method], label=line, markersize=4)
        b.plot([u for u, r in up if _number(r.get("kl"))], [r["kl"] for u, r in up if _number(r.get("kl"))], marker=mk, color=colors[method], label=line, markersize=4)
        pts = [(r["kl"], r[key]) for r in rs if _number(r.get("kl")) and _number(r.get(key))]
        c.plot([p[0] for p in pts], [p[1] for p in pts], marker=mk, color=colors[method], label=line, markersize=4)
    sft = next((r for r in records if r["experiment"] == "direct" and r["method"] == "sft" and _number(r.get(key))), None)
    for ax in (a, c):
        if sft:
            ax.axhline(sft[key], color="gray", linestyle="--", linewidth=1)
            if sft_range is not None:
                ax.axhspan(sft_range[0], sft_range[1], color="gray", alpha=0.15, linewidth=0)
            elif _number(sft_se):
                ax.axhspan(sft[key] - sft_se, sft[key] + sft_se, color="gray", alpha=0.15, linewidth=0)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.set_xlabel("update")
    band = " and its resampled range)" if sft_range is not None else (" +- SE)" if _number(sft_se) else ")")
    name = label.removeprefix("held-out ").split(" (")[0]
    a.set_title(f"{name} vs update (dashed: SFT{band}", fontsize=10)
    b.set_xlabel("update")
    b.set_ylabel("KL to SFT (nats / response)")
    b.set_title("KL to SFT vs update", fontsize=10)
    b.grid(alpha=0.3)
    c.set_xlabel("KL to SFT (nats / response)")
    c.set_title(f"{name} vs KL", fontsize=10)
    c.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the panel, not over the lines
    return _save(fig, path)


def plot_gold_proxy(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """The proxy experiment (Gao et al. 2022, fig. 1): held-out proxy score (left) and gold reward
    (right) against KL to SFT for each method and seed optimizing the proxy, and for best-of-n of SFT
    picked by the proxy (analytic KL, one point per n, from SFT at n = 1). None without proxy records."""
    series = _series(records, "proxy")
    bon = sorted((r for r in records if r["experiment"] == "proxy" and r["method"] in ("sft", "best-of-n")), key=lambda r: r.get("n") or 1)
    if not series and len(bon) < 2:
        return None
    colors = _method_colors(sorted({m for m, _ in series} | {"best-of-n"}))
    fig, (left, right) = _figure(2, width=5.0, height=3.8)
    for ax, key, title in ((left, "proxy", "proxy reward model score"), (right, "gold", "gold reward (ROUGE-L)")):
        for (method, seed), rs in series.items():
            pts = [(r["kl"], r[key]) for r in rs if _number(r.get("kl")) and _number(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color=colors[method], label=f"{method} s{seed}", alpha=0.9 if seed in (None, 1) else 0.6)
        pts = [(r["kl"], r[key], r.get("n") or 1) for r in bon if _number(r.get("kl")) and _number(r.get(key))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", markersize=4, linestyle="--", color=colors["best-of-n"], label="best-of-n (SFT)")
            for kl, v, n in pts:
                ax.annotate(f"n={n}", (kl, v), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel("KL to SFT (nats / response)")
        ax.set_ylabel(f"held-out {title}")
        ax.set_title(f"{title} vs KL", fontsize=10)
        ax.grid(alpha=0.3)
    right.legend(fontsize=7)
    return _save(fig, path)


def gold_blocks(gold_dir: Path, out: Path) -> list[tuple]:
    """The report's section on the gold experiment in ``gold_dir`` (gold.json, or the evaluations so
    far): the SFT policy's own spread when it was resampled, both tables and the plots
    ``gold_direct.png``, ``gold_direct_as_trained.png`` and ``gold_proxy.png`` (written to ``out``);
    [] when the folder holds no measurement."""
    from .gold import GREEDY_EVAL
    from .gold import read_records as read_gold_records

    records, complete = read_gold_records(gold_dir)
    if not records:
        return []
    blocks: list[tuple] = [("h2", "Gold-reward experiment")]
    blocks.append(("p", (
        f"{'Complete' if complete else 'Partial (the experiment has not finished)'}: {len(records)} held-out measurements. "
        "Gold reward = mean ROUGE-L F1 of a summary sampled at temperature 0.7 against the post's human reference, on held-out "
        "posts no run trained on; proxy = the proxy reward model's score (trained on SFT pairs labelled by the gold reward); KL to "
        "SFT in nats per response (k1 on the same samples; best-of-n: log n - (n-1)/n); length in tokens, EOS excluded. "
        "A gain counts when the mean over seeds exceeds the SFT policy's gold reward by more than the spread (max - min) between seeds; "
        "gold SE is the standard error of a policy's mean over the posts (its sampling noise on this held-out set); "
        "gold as trained scores a summary without EOS -1, as the RL stages did during training (N+ detail 23)."
    )))
    per_post = per_post_gold(gold_dir)
    trained = [{**r, "gold_as_trained": as_trained(_per_post_of(r, per_post))} for r in records]
    for k, label in (("gold", "gold reward"), ("gold_as_trained", "gold reward as trained")):
        noise = sft_noise(trained, k)
        if noise is not None:
            blocks.append(("p", (
                f"The SFT policy's {label} measured {noise[2]} times, at as many sampling seeds: mean {_fmt(noise[0])}, spread (max - min) "
                f"{_fmt(noise[1])}. A policy identical to SFT moves by up to this much on these posts: the measurement's resolution."
            )))
    blocks += [("h3", "Gain over SFT per method and update: gold reward (ROUGE-L of the text)"), ("table", *gold_summary(records))]
    blocks += [("h3", "The same for the gold reward as trained (a summary without EOS scores -1)"), ("table", *gold_summary(trained, "gold_as_trained"))]
    sft = next((r for r in records if r["experiment"] == "direct" and r["method"] == "sft"), None)
    sft_se = standard_error([g for g, _ in _per_post_of(sft, per_post)]) if sft else None

    def sft_range(k):  # lowest and highest of the SFT policy's measurements, when it was resampled
        values = sft_measurements(trained, k)
        return (min(values), max(values)) if len(values) > 1 else None

    band = "shaded: the SFT policy's lowest to highest measurement" if sft_range("gold") else "shaded: SFT +- its standard error over the posts"
    plots = [
        (f"Direct: held-out gold reward and KL to SFT per update ({band})", plot_gold_direct(records, out / "gold_direct.png", sft_se=sft_se, sft_range=sft_range("gold"))),
        ("Direct: held-out gold reward as trained (a summary without EOS scores -1) per update", plot_gold_direct(
            trained, out / "gold_direct_as_trained.png", sft_range=sft_range("gold_as_trained"), key="gold_as_trained", label="held-out gold reward as trained")),
        ("Proxy: held-out proxy and gold reward vs KL (PPO, GRPO, best-of-n)", plot_gold_proxy(records, out / "gold_proxy.png")),
    ]
    blocks += [("img", p.name, alt) for alt, p in plots if p is not None]
    greedy_file = Path(gold_dir) / "eval" / GREEDY_EVAL / "summaries.jsonl"
    greedy = greedy_rows(read_records(greedy_file)) if greedy_file.is_file() else None
    if greedy is not None:
        blocks += [("h3", "Final policies, greedy summaries, paired with SFT post by post"), ("p", (
            "The SFT policy and every direct run's final policy summarize the same held-out posts greedily (no sampling noise, so a "
            "difference is the policies' own); minus SFT = the mean over posts of (policy - SFT), with its standard error and t."
        )), ("table", *greedy)]
    blocks += [("h3", "Every measurement"), ("table", *gold_rows(records, per_post))]
    return blocks


# ----------------------------------------------------------------------------------------------
# Document: blocks rendered to Markdown and HTML


def render_markdown(blocks: Sequence[tuple]) -> str:
    """Blocks -> Markdown: ("h1"|"h2"|"h3", text), ("p", text), ("quote", text), ("table", header,
    rows), ("img", file, alt)."""
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "quote":
            out.append("\n".join("> " + line for line in rest[0].splitlines() or [""]))
        elif kind == "table":
            out.append(markdown_table(rest[0], [[str(c) for c in row] for row in rest[1]]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    return "\n\n".join(out) + "\n"


def render_html(blocks: Sequence[tuple], title: str) -> str:
    """The same blocks as a standalone HTML page (images referenced by relative path)."""
    e = html.escape
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(rest[0])}</p>")
        elif kind == "quote":
            body.append("<blockquote>" + "<br>".join(e(line) for line in rest[0].splitlines()) + "</blockquote>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in rest[0])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rest[1])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<figure><img src="{e(rest[0])}" alt="{e(rest[1])}"><figcaption>{e(rest[1])}</figcaption></figure>')
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%}blockquote{color:#444;border-left:3px solid #ccc;margin:0;padding-left:1em}"
    )
    return f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"


# ----------------------------------------------------------------------------------------------
# Sections


def _minutes(seconds: Any) -> str:
    return f"{seconds / 60:.1f} min" if _number(seconds) else "-"


def stage_table(state: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of stage | status | time from pipeline.json, with a total row."""
    rows = [[name, s.get("status", "?"), _minutes(s.get("seconds"))] for name, s in state.get("stages", {}).items()]
    total = sum(s.get("seconds", 0.0) for s in state.get("stages", {}).values() if _number(s.get("seconds")))
    rows.append(["total", "", _minutes(total)])
    return ["stage", "status", "time"], rows


def reward_model_rows(eval_rm: dict[str, Any] | None, dpo_eval: dict[str, Any] | None) -> list[list[str]]:
    """Rows (what, n, accuracy) of reward-model and DPO implicit-reward accuracy."""
    rows = []
    if eval_rm:
        for key, label, metric in (("heldout", "RM held-out TL;DR comparisons", "accuracy"), ("cnndm", "RM CNN/DM comparisons (out of distribution)", "accuracy"), ("judge", "RM agreement with GPT-3.5 judge", "agreement")):
            m = eval_rm.get(key)
            if m and _number(m.get(metric)):
                rows.append([label, str(m.get("n", "")), f"{m[metric]:.3f}"])
    if dpo_eval and isinstance(dpo_eval.get("held_out"), dict) and _number(dpo_eval["held_out"].get("accuracy")):
        h = dpo_eval["held_out"]
        rows.append(["DPO implicit-reward accuracy, held-out comparisons", str(h.get("n", "")), f"{h['accuracy']:.3f}"])
    return rows


def side_by_side_blocks(summaries: Sequence[dict[str, Any]], k: int) -> list[tuple]:
    """For each of the first ``k`` posts: a heading, the post (first 700 characters) and a table of
    the reference and every policy's summary with its length and reward-model score."""
    blocks: list[tuple] = []
    for i, rec in enumerate(summaries[:k]):
        if "prompt" in rec:  # an UltraFeedback instruction
            post = rec["prompt"]
            blocks.append(("h3", f"Prompt {i + 1}"))
        else:
            post = rec.get("post", "")
            blocks.append(("h3", f"Post {i + 1}: r/{rec.get('subreddit', '?')}: {rec.get('title', '')}"))
        blocks.append(("quote", post[:700] + (" [...]" if len(post) > 700 else "")))
        first = next(iter(rec.get("summaries", {}).values()), {})
        ref_score = rec.get("reference_rm_score")
        rows = [["chosen response" if "prompt" in rec else "human reference", rec.get("reference", ""), str(first.get("reference_length", "-")), f"{ref_score:.2f}" if _number(ref_score) else "-"]]
        for name, s in rec.get("summaries", {}).items():
            text = s.get("text", "") + ("" if s.get("eos", True) else " [no EOS]")
            rows.append([name, text, str(s.get("length", "-")), f"{s['rm_score']:.2f}" if _number(s.get("rm_score")) else "-"])
        blocks.append(("table", ["model", "summary", "tokens", "RM score"], rows))
    return blocks


def standalone_stage(run_dir: Path) -> str | None:
    """The training stage whose own run folder ``run_dir`` is (it holds metrics.jsonl itself): the
    stage its final/ records, else the one its metric names belong to, else (the RL stages log much the
    same names) the RL stage the folder's name contains, GRPO by default. None for a pipeline folder."""
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    marker = _read_json(run_dir / "final" / COMPLETE) or {}
    if marker.get("stage") in STAGE_CURVES:
        return marker["stage"]
    keys = {k for r in read_records(run_dir / "metrics.jsonl") for k in r}
    for key, stage in (("loss/sft", "sft"), ("loss/rm", "rm"), ("loss/dpo", "dpo"), ("loss/value", "ppo"), ("online_dpo/tied_pairs", "online-dpo")):
        if key in keys:
            return stage
    return next((stage for stage in RL_STAGES if stage in run_dir.name), "grpo")


def build_report(cfg: ReportConfig) -> Path:
    """Write report.md, report.html and the PNGs for the run folder ``cfg.run_dir``; returns the
    Markdown path. Raises DataError when the folder does not exist or holds nothing to report."""
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise DataError("run folder not found", path=str(run_dir))
    out = Path(cfg.output_dir) if cfg.output_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    state = _read_json(run_dir / STATE_FILE) or {}
    alone = standalone_stage(run_dir)
    if alone is not None:  # one stage's own run folder (tldr-rlhf sft ... --run.output-dir RUN)
        metrics = {alone: read_records(run_dir / "metrics.jsonl")}
    else:
        metrics = {s: read_records(run_dir / s / "metrics.jsonl") for s in TRAIN_STAGES}
    metrics = {s: r for s, r in metrics.items() if r}
    # an evaluate --output-dir folder holds eval.json and summaries.jsonl itself (a DPO run's eval.json is its own)
    eval_folder = run_dir if alone is None and (run_dir / SUMMARIES_FILE).is_file() else run_dir / "evaluate"
    eval_results = _read_json(eval_folder / EVAL_FILE)
    summaries = read_records(eval_folder / SUMMARIES_FILE)
    eval_rm = _read_json(run_dir / EVAL_RM_FILE if alone == "rm" else run_dir / COMMANDS["evaluate-rm"].output)
    dpo_eval = _read_json((run_dir if alone == "dpo" else run_dir / "dpo") / DPO_EVAL_FILE)
    # a gold experiment's own folder (tldr-rlhf gold --output-dir RUN), else a pipeline's gold/
    own = (run_dir / GOLD_FILE).is_file() or ((run_dir / "eval").is_dir() and alone is None and not state)
    gold_dir = run_dir if own else run_dir / "gold"
    gold_section = gold_blocks(gold_dir, out) if gold_dir.is_dir() else []
    if not (state or metrics or eval_results or summaries or gold_section):
        raise DataError("nothing to report: no pipeline.json, metrics.jsonl, stage metrics.jsonl, eval.json or gold experiment", path=str(run_dir))

    title = f"tldr-rlhf report: {run_dir}"
    blocks: list[tuple] = [("h1", title), ("p", f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {run_dir.resolve()}.")]
    if state.get("stages"):
        blocks += [("h2", "Stages"), ("table", *stage_table(state))]
    if eval_results:
        p = eval_results.get("posts", {})
        judge = eval_results.get("judge_rm_path") or "-"
        blocks += [
            ("h2", "Evaluation"),
            ("p", f"{p.get('n', '?')} held-out posts from {p.get('source', '?')}; summaries "
                  f"{'greedy' if eval_results.get('decoding', {}).get('greedy', True) else 'sampled'}, at most "
                  f"{eval_results.get('decoding', {}).get('response_length', '?')} tokens. Win rates are against the human reference "
                  f"(a tie counts half); judge reward model: {judge}"
                  f"{' (the training reward model: its win rates measure what was optimized, not quality)' if eval_results.get('judge_is_training_rm') else ''}. "
                  "LC win = win rate at matched length (logistic regression of the outcome on the length difference, read at zero; "
                  "* = extrapolated: every summary longer, or every one shorter, than its reference). "
                  "LLM win: (judged pairs, pairs without a verdict). KL in nats per response (k1 estimate on samples at the sampling temperature). "
                  "Length in tokens, EOS excluded."),
            ("table", *metrics_rows(eval_results)),
        ]
    rm_rows = reward_model_rows(eval_rm, dpo_eval)
    if rm_rows:
        blocks += [("h2", "Reward model and DPO accuracy"), ("table", ["set", "n", "accuracy"], rm_rows)]

    blocks += gold_section
    plots: list[tuple[str, Path | None]] = []
    if eval_results:
        plots.append(("Win rate against the human reference", plot_win_rates(eval_results, out / "win_rate.png")))
        plots.append(("ROUGE against the human reference", plot_rouge(eval_results, out / "rouge.png")))
    plots.append(("Summary lengths", plot_lengths(summaries, out / "lengths.png")))
    plots.append(("Reward vs KL", plot_reward_vs_kl({s: metrics[s] for s in RL_STAGES if s in metrics}, eval_results, out / "reward_vs_kl.png")))
    curve_plots = [(f"{s}: training curves", plot_training_curves(s, recs, out / f"curves_{s}.png")) for s, recs in metrics.items()]
    shown = [(alt, p) for alt, p in plots if p is not None]
    if shown:
        blocks.append(("h2", "Plots"))
        blocks += [("img", p.name, alt) for alt, p in shown]
    curves = [(alt, p) for alt, p in curve_plots if p is not None]
    if curves:
        blocks.append(("h2", "Training curves"))
        blocks += [("img", p.name, alt) for alt, p in curves]
    if summaries and cfg.table_posts > 0:
        blocks.append(("h2", "Side by side: summaries of the same held-out posts"))
        blocks += side_by_side_blocks(summaries, cfg.table_posts)

    md = out / "report.md"
    md.write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks, title))
    log.info("report: %s (%d plots)", md, len(shown) + len(curves))
    print(f"report: {md}\n        {out / 'report.html'}")
    return md
