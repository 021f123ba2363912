"""The gold experiment's section of the report (``gold.py`` writes the records it reads): the table of
every held-out measurement, the gain over SFT per method and update against the seed spread and the SFT
policy's own resampling spread, the greedy final policies paired with SFT post by post, and the plots
``gold_direct.png``, ``gold_direct_as_trained.png`` and ``gold_proxy.png``.

This module knows nothing about the pipeline report around it (``report.py`` adds ``gold_blocks``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .data.io import read_records
from .gold import GREEDY_EVAL, SFT_RESAMPLED, eval_name, read_gold_records
from .paired import standard_error
from .plots import figure, is_number, save_figure


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if is_number(v) else "-"


def per_post_gold(gold_dir: Path) -> dict[tuple[str, str], list[tuple[float, bool]]]:
    """{(evaluation folder, policy): its (gold reward, ended with EOS) per held-out post} from the
    ``summaries.jsonl`` of every evaluation folder of a gold experiment (``eval/FOLDER/``; a folder
    evaluated several times keeps its last evaluation's); ``gold.eval_name`` gives a record's folder."""
    out: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    for f in sorted(Path(gold_dir).glob("eval/*/summaries.jsonl")):
        for rec in read_records(f):
            for name, s in rec.get("summaries", {}).items():
                if is_number(s.get("reward")):
                    out.setdefault((f.parent.name, name), []).append((float(s["reward"]), bool(s.get("eos", True))))
    return out


def _per_post_of(record: dict[str, Any], per_post: dict[tuple[str, str], list[tuple[float, bool]]]) -> list[tuple[float, bool]]:
    return per_post.get((eval_name(record), record.get("policy", "")), [])


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
    return [r[key] for r in records if r["experiment"] == "direct" and r["method"] in ("sft", SFT_RESAMPLED) and is_number(r.get(key))]


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
    sft = next((r[key] for r in records if r["method"] == "sft" and r["experiment"] == "direct" and is_number(r.get(key))), None)
    noise = sft_noise(records, key)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["method"] in ("sft", SFT_RESAMPLED, "best-of-n") or not is_number(r.get(key)):
            continue
        groups.setdefault((r["experiment"], r["method"], r.get("update")), []).append(r)
    rows = []
    for (exp, method, update), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "direct", kv[0][1], kv[0][2] or 0)):
        values = [r[key] for r in rs]
        mean, spread = sum(values) / len(values), max(values) - min(values)
        kls = [r["kl"] for r in rs if is_number(r.get("kl"))]
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
        paired = [(p[name], p["sft"]) for p in posts if name in p and is_number(p[name].get("reward"))]
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
    fig, (a, b, c) = figure(3, width=4.6, height=3.6)
    for (method, seed), rs in series.items():
        mk = markers[seeds.index(seed) % len(markers)] if seed in seeds else "o"
        up = [(r.get("update") or 0, r) for r in rs]
        line = f"{method} s{seed}"
        a.plot([u for u, r in up if is_number(r.get(key))], [r[key] for u, r in up if is_number(r.get(key))], marker=mk, color=colors[method], label=line, markersize=4)
        b.plot([u for u, r in up if is_number(r.get("kl"))], [r["kl"] for u, r in up if is_number(r.get("kl"))], marker=mk, color=colors[method], label=line, markersize=4)
        pts = [(r["kl"], r[key]) for r in rs if is_number(r.get("kl")) and is_number(r.get(key))]
        c.plot([p[0] for p in pts], [p[1] for p in pts], marker=mk, color=colors[method], label=line, markersize=4)
    sft = next((r for r in records if r["experiment"] == "direct" and r["method"] == "sft" and is_number(r.get(key))), None)
    for ax in (a, c):
        if sft:
            ax.axhline(sft[key], color="gray", linestyle="--", linewidth=1)
            if sft_range is not None:
                ax.axhspan(sft_range[0], sft_range[1], color="gray", alpha=0.15, linewidth=0)
            elif is_number(sft_se):
                ax.axhspan(sft[key] - sft_se, sft[key] + sft_se, color="gray", alpha=0.15, linewidth=0)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.set_xlabel("update")
    band = " and its resampled range)" if sft_range is not None else (" +- SE)" if is_number(sft_se) else ")")
    name = label.removeprefix("held-out ").split(" (")[0]
    a.set_title(f"{name} vs update (dashed: SFT{band}", fontsize=10)
    b.set_xlabel("update")
    b.set_ylabel("KL to SFT (nats / response)")
    b.set_title("KL to SFT vs update", fontsize=10)
    b.grid(alpha=0.3)
    c.set_xlabel("KL to SFT (nats / response)")
    c.set_title(f"{name} vs KL", fontsize=10)
    c.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the panel, not over the lines
    return save_figure(fig, path)


def plot_gold_proxy(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """The proxy experiment (Gao et al. 2022, fig. 1): held-out proxy score (left) and gold reward
    (right) against KL to SFT for each method and seed optimizing the proxy, and for best-of-n of SFT
    picked by the proxy (analytic KL, one point per n, from SFT at n = 1). None without proxy records."""
    series = _series(records, "proxy")
    bon = sorted((r for r in records if r["experiment"] == "proxy" and r["method"] in ("sft", "best-of-n")), key=lambda r: r.get("n") or 1)
    if not series and len(bon) < 2:
        return None
    colors = _method_colors(sorted({m for m, _ in series} | {"best-of-n"}))
    fig, (left, right) = figure(2, width=5.0, height=3.8)
    for ax, key, title in ((left, "proxy", "proxy reward model score"), (right, "gold", "gold reward (ROUGE-L)")):
        for (method, seed), rs in series.items():
            pts = [(r["kl"], r[key]) for r in rs if is_number(r.get("kl")) and is_number(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color=colors[method], label=f"{method} s{seed}", alpha=0.9 if seed in (None, 1) else 0.6)
        pts = [(r["kl"], r[key], r.get("n") or 1) for r in bon if is_number(r.get("kl")) and is_number(r.get(key))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", markersize=4, linestyle="--", color=colors["best-of-n"], label="best-of-n (SFT)")
            for kl, v, n in pts:
                ax.annotate(f"n={n}", (kl, v), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel("KL to SFT (nats / response)")
        ax.set_ylabel(f"held-out {title}")
        ax.set_title(f"{title} vs KL", fontsize=10)
        ax.grid(alpha=0.3)
    right.legend(fontsize=7)
    return save_figure(fig, path)


def gold_blocks(gold_dir: Path, out: Path) -> list[tuple]:
    """The report's section on the gold experiment in ``gold_dir`` (gold.json, or the evaluations so
    far): the SFT policy's own spread when it was resampled, both tables and the plots
    ``gold_direct.png``, ``gold_direct_as_trained.png`` and ``gold_proxy.png`` (written to ``out``);
    [] when the folder holds no measurement."""
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
    for folder in sorted((Path(gold_dir) / "eval").glob(f"{GREEDY_EVAL}-*/summaries.jsonl")):  # variants on another reward
        rows = greedy_rows(read_records(folder))
        if rows is not None:
            blocks += [("h3", f"Greedy, paired with SFT, measured by the reward those runs optimize ({folder.parent.name})"), ("table", *rows)]
    blocks += [("h3", "Every measurement"), ("table", *gold_rows(records, per_post))]
    return blocks
