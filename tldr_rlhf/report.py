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

The plots are ``plots.py``'s, the gold experiment's section ``gold_report.py``'s. The Markdown and the
HTML come from the same list of blocks.
"""

from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from .config import ReportConfig
from .data.io import read_records
from .errors import DataError
from .evaluate import SUMMARIES_FILE, markdown_table, metrics_rows
from .checkpoints import COMPLETE
from .gold_report import gold_blocks
from .pipeline import STATE_FILE
from .plots import STAGE_CURVES, is_number, plot_lengths, plot_reward_vs_kl, plot_rouge, plot_training_curves, plot_win_rates
from .stages import COMMANDS, DPO_EVAL_FILE, EVAL_FILE, EVAL_RM_FILE, GOLD_FILE, RL_STAGES, TRAIN_STAGES

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Reading


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at line {e.lineno})", path=str(path), line=e.lineno) from None


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
    return f"{seconds / 60:.1f} min" if is_number(seconds) else "-"


def stage_table(state: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of stage | status | time from pipeline.json, with a total row."""
    rows = [[name, s.get("status", "?"), _minutes(s.get("seconds"))] for name, s in state.get("stages", {}).items()]
    total = sum(s.get("seconds", 0.0) for s in state.get("stages", {}).values() if is_number(s.get("seconds")))
    rows.append(["total", "", _minutes(total)])
    return ["stage", "status", "time"], rows


def reward_model_rows(eval_rm: dict[str, Any] | None, dpo_eval: dict[str, Any] | None) -> list[list[str]]:
    """Rows (what, n, accuracy) of reward-model and DPO implicit-reward accuracy."""
    rows = []
    if eval_rm:
        for key, label, metric in (("heldout", "RM held-out TL;DR comparisons", "accuracy"), ("cnndm", "RM CNN/DM comparisons (out of distribution)", "accuracy"), ("judge", "RM agreement with GPT-3.5 judge", "agreement")):
            m = eval_rm.get(key)
            if m and is_number(m.get(metric)):
                rows.append([label, str(m.get("n", "")), f"{m[metric]:.3f}"])
    if dpo_eval and isinstance(dpo_eval.get("held_out"), dict) and is_number(dpo_eval["held_out"].get("accuracy")):
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
        rows = [["chosen response" if "prompt" in rec else "human reference", rec.get("reference", ""), str(first.get("reference_length", "-")), f"{ref_score:.2f}" if is_number(ref_score) else "-"]]
        for name, s in rec.get("summaries", {}).items():
            text = s.get("text", "") + ("" if s.get("eos", True) else " [no EOS]")
            rows.append([name, text, str(s.get("length", "-")), f"{s['rm_score']:.2f}" if is_number(s.get("rm_score")) else "-"])
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
