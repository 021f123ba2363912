"""The report built from a small fake run folder: every plot, the stage times, the metrics table, the
reward-model accuracies and the side-by-side table, in Markdown and HTML."""

import json

import pytest

from tldr_rlhf.config import ReportConfig
from tldr_rlhf.errors import DataError
from tldr_rlhf.plots import metric_series, plot_win_rates
from tldr_rlhf.report import build_report, render_html, render_markdown, standalone_stage

PNG = b"\x89PNG\r\n\x1a\n"
POLICIES = ["base", "sft", "dpo", "ppo", "grpo"]


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_run(root):
    """A run folder as the pipeline leaves it, with made-up numbers."""
    root.mkdir()
    (root / "pipeline.json").write_text(json.dumps({"stages": {
        "sft": {"status": "done", "seconds": 90.0}, "rm": {"status": "skipped", "seconds": 300.0}, "dpo": {"status": "done", "seconds": 120.0},
        "ppo": {"status": "done", "seconds": 240.0}, "grpo": {"status": "done", "seconds": 180.0}, "evaluate": {"status": "done", "seconds": 60.0},
    }}))
    _jsonl(root / "sft" / "metrics.jsonl", [{"step": 0, "valid/loss": 3.0}] + [{"step": s, "loss/sft": 3.0 - 0.2 * s} for s in range(1, 6)] + [{"step": 5, "valid/loss": 2.1}])
    _jsonl(root / "rm" / "metrics.jsonl", [{"step": s, "loss/rm": 0.7 - 0.01 * s, "rm/accuracy": 0.5 + 0.02 * s} for s in range(1, 6)] + [{"step": 5, "valid/accuracy": 0.58}])
    (root / "rm" / "eval_rm.json").write_text(json.dumps({"heldout": {"n": 64, "accuracy": 0.59375}, "cnndm": {"n": 32, "accuracy": 0.5625}, "judge": {"n": 64, "agreement": 0.640625}}))
    _jsonl(root / "dpo" / "metrics.jsonl", [{"step": s, "loss/dpo": 0.69 - 0.02 * s, "rewards/accuracy": 0.5 + 0.05 * s, "rewards/margin": 0.01 * s} for s in range(1, 4)])
    (root / "dpo" / "eval.json").write_text(json.dumps({"held_out": {"n": 64, "accuracy": 0.546875}}))
    for stage, slope in (("ppo", 1.0), ("grpo", 0.5)):
        _jsonl(root / stage / "metrics.jsonl", [{"step": s, "objective/kl": 0.5 * s, "objective/scores": slope * s, "loss/policy": -0.01 * s, "objective/response_length": 20 + s} for s in range(1, 6)]
               + [{"step": 5, "perf/peak_memory_mb": 900.0}])
    policies = {}
    for i, name in enumerate(POLICIES):
        policies[name] = {
            "rouge1": 0.1 + 0.05 * i, "rouge2": 0.02 * i, "rougeL": 0.1 + 0.04 * i, "rm_score": -1.0 + 0.5 * i, "rm_win_rate": 0.1 * i,
            "judge": {"win_rate": 0.1 + 0.1 * i, "lc": {"lc_win_rate": 0.1 + 0.08 * i}}, "kl_to_sft": [5.0, 0.0, 2.0, 4.0, 3.0][i],
            "mean_length": 20.0 + 5 * i, "eos_rate": 1.0,
        }
    policies["grpo"]["judge"]["lc"]["extrapolated"] = True
    policies["ppo"]["llm_judge"] = {"win_rate": 0.625, "n": 8, "unparseable": 1, "failed": 0, "lc": {"lc_win_rate": 0.5}}
    (root / "evaluate").mkdir()
    (root / "evaluate" / "eval.json").write_text(json.dumps({
        "posts": {"n": 3, "source": "valid_sample.jsonl"}, "decoding": {"greedy": True, "response_length": 63},
        "judge_rm_path": "judge-rm", "judge_is_training_rm": False, "reference": {"mean_length": 24.0, "rm_score": 0.0}, "policies": policies,
    }))
    summaries = []
    for k in range(3):
        summaries.append({
            "id": f"p{k}", "subreddit": "relationships", "title": f"Title {k}", "post": f"Post text {k} <b>",
            "reference": f"reference summary {k}", "reference_rm_score": 0.25,
            "summaries": {n: {"text": f"{n} summary of post {k}" + (" | with a pipe" if n == "ppo" else ""), "length": 10 + 3 * i + k, "reference_length": 12 + k, "eos": n != "base", "rm_score": 0.5 * i}
                          for i, n in enumerate(POLICIES)},
        })
    _jsonl(root / "evaluate" / "summaries.jsonl", summaries)
    return root


def test_report_from_a_fake_run_has_every_plot_and_the_side_by_side_table(tmp_path):
    run = fake_run(tmp_path / "run")
    md_path = build_report(ReportConfig(run_dir=str(run), table_posts=2))
    out = run / "report"
    assert md_path == out / "report.md"
    pngs = ["win_rate.png", "rouge.png", "lengths.png", "reward_vs_kl.png"] + [f"curves_{s}.png" for s in ("sft", "rm", "dpo", "ppo", "grpo")]
    md = md_path.read_text()
    for png in pngs:
        assert (out / png).read_bytes()[:8] == PNG, png
        assert f"]({png})" in md, png
    # stage times (minutes) with the total: 90 + 300 + 120 + 240 + 180 + 60 s = 16.5 min
    assert "| sft | done | 1.5 min |" in md and "| rm | skipped | 5.0 min |" in md and "| total |  | 16.5 min |" in md
    # metrics table: one row per policy and the reference; the judge is not the training RM here
    assert "| ppo | 0.250 | 0.060 | 0.220 | 0.500 | 0.300 | 0.400 | 0.340 | 0.625 (8, 1) | 0.500 | 4.00 | 35.0 | 1.00 |" in md
    assert "| grpo | 0.300 | 0.080 | 0.260 | 1.000 | 0.400 | 0.500 | 0.420* |" in md and "* = extrapolated" in md
    assert "| reference | - | - | - | 0.000 |" in md and "judge reward model: judge-rm." in md
    # reward model and DPO accuracy
    assert "| RM held-out TL;DR comparisons | 64 | 0.594 |" in md and "| RM agreement with GPT-3.5 judge | 64 | 0.641 |" in md
    assert "| DPO implicit-reward accuracy, held-out comparisons | 64 | 0.547 |" in md
    # side by side: the first 2 posts, every policy's summary, escaped pipes, no-EOS marked
    assert "### Post 1: r/relationships: Title 0" in md and "### Post 2: r/relationships: Title 1" in md and "Title 2" not in md
    assert "| human reference | reference summary 0 | 12 | 0.25 |" in md
    assert "| ppo | ppo summary of post 1 \\| with a pipe | 20 | 1.50 |" in md
    assert "| base | base summary of post 0 [no EOS] | 10 | 0.00 |" in md
    html = (out / "report.html").read_text()
    assert html.count("<img") == len(pngs) and "Post text 0 &lt;b&gt;" in html and "<b>" not in html
    assert html.count("<table>") == sum(line.startswith("|---") for line in md.splitlines()) == 5 and "ppo summary of post 1 | with a pipe" in html


def test_report_of_a_partial_run_and_bad_folders(tmp_path):
    run = tmp_path / "partial"
    _jsonl(run / "sft" / "metrics.jsonl", [{"step": 1, "loss/sft": 2.0}, {"step": 2, "loss/sft": 1.5}])
    md = build_report(ReportConfig(run_dir=str(run))).read_text()
    assert "](curves_sft.png)" in md and "win_rate.png" not in md and "Side by side" not in md
    with pytest.raises(DataError, match="run folder not found"):
        build_report(ReportConfig(run_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="nothing to report"):
        build_report(ReportConfig(run_dir=str(tmp_path / "empty")))
    (run / "pipeline.json").write_text("{not json")
    with pytest.raises(DataError, match="pipeline.json"):
        build_report(ReportConfig(run_dir=str(run)))


def test_metric_series_skips_missing_and_non_finite_values():
    records = [{"step": 1, "a": 1.0}, {"step": 2}, {"step": 3, "a": float("nan")}, {"step": 4, "a": True}, {"step": 5, "a": 2}]
    assert metric_series(records, "a") == ([1.0, 5.0], [1.0, 2.0])
    assert plot_win_rates({"policies": {}}, None) is None


def test_blocks_render_the_same_content():
    blocks = [("h1", "T"), ("p", "a < b"), ("table", ["x", "y"], [["1", "a|b"]]), ("img", "f.png", "alt"), ("quote", "line 1\nline 2")]
    assert render_markdown(blocks) == "# T\n\na < b\n\n| x | y |\n|---|---|\n| 1 | a\\|b |\n\n![alt](f.png)\n\n> line 1\n> line 2\n"
    html = render_html(blocks, "T")
    assert "<p>a &lt; b</p>" in html and "<td>a|b</td>" in html and '<img src="f.png" alt="alt">' in html and "line 1<br>line 2" in html
    with pytest.raises(ValueError, match="unknown block"):
        render_markdown([("video", "x")])


def test_cli_report_command(tmp_path):
    from tldr_rlhf.cli import main

    run = fake_run(tmp_path / "run")
    assert main(["report", str(run), "--table-posts", "1"]) == 0
    assert "### Post 1:" in (run / "report" / "report.md").read_text() and "### Post 2:" not in (run / "report" / "report.md").read_text()
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_side_by_side_shows_an_ultrafeedback_prompt_and_its_chosen_response():
    from tldr_rlhf.report import side_by_side_blocks

    rec = {"id": "a1", "prompt": "Name a color.", "reference": "Blue.", "reference_rm_score": 0.5,
           "summaries": {"sft": {"text": "Red", "length": 1, "reference_length": 2, "eos": False, "rm_score": -0.25}}}
    blocks = side_by_side_blocks([rec], 1)
    assert blocks[0] == ("h3", "Prompt 1") and blocks[1] == ("quote", "Name a color.")
    assert blocks[2] == ("table", ["model", "summary", "tokens", "RM score"], [["chosen response", "Blue.", "2", "0.50"], ["sft", "Red [no EOS]", "1", "-0.25"]])


def test_report_of_a_single_stage_run_folder(tmp_path):
    """``tldr-rlhf report RUN`` on a stage's own run folder (metrics.jsonl at its top): its training
    curves, and for an RL stage the reward-vs-KL plot; the stage comes from final/'s marker, else
    from its metric names."""
    import shutil

    pipeline_run = fake_run(tmp_path / "pipe")
    alone = tmp_path / "my-ppo-run"
    shutil.copytree(pipeline_run / "ppo", alone)
    assert standalone_stage(alone) == "ppo" and standalone_stage(pipeline_run) is None
    md = build_report(ReportConfig(run_dir=str(alone))).read_text()
    assert "](curves_ppo.png)" in md and "](reward_vs_kl.png)" in md and "win_rate.png" not in md
    assert (alone / "report" / "curves_ppo.png").read_bytes()[:8] == PNG
    # GRPO and RLOO log the same metric names: the folder name decides, or final/'s marker when there is one
    rloo = tmp_path / "rloo-run"
    shutil.copytree(pipeline_run / "grpo", rloo)
    assert standalone_stage(rloo) == "rloo"
    (rloo / "final").mkdir()
    (rloo / "final" / "COMPLETE.json").write_text(json.dumps({"stage": "grpo", "step": 3}))
    assert standalone_stage(rloo) == "grpo"
    assert "](curves_grpo.png)" in build_report(ReportConfig(run_dir=str(rloo))).read_text()
