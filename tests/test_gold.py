"""The gold-reward experiment (gold.py, docs/gold.md): pair labelling by the gold reward worked out by
hand (ROUGE-L computed by hand), held-out records from evaluation results, the cpu-gold pipeline preset
and its wiring (online DPO and gold as pipeline stages), and the whole experiment end to end on tiny
models built from a config (real tokenizer, real posts): every run is measured, a rerun trains and
evaluates nothing again, and the report shows the table and the plots."""

import dataclasses
import json
from pathlib import Path

import pytest

from tldr_rlhf import generation, gold, rollout, summaries
from tldr_rlhf.config import EvaluateConfig, GoldConfig, OnlineDPOConfig, OptimArgs, PreferenceDataArgs, RewardNormArgs, RMConfig, ModelArgs, RunArgs, TldrDataArgs
from tldr_rlhf.data.tldr import Post
from tldr_rlhf.errors import DataError
from tldr_rlhf.pipeline import check_stages, stage_configs
from tldr_rlhf.presets import GOLD_PRESETS, PIPELINE_PRESETS
from tldr_rlhf.reward.specs import check_reward_spec, score_texts
from tldr_rlhf.stages import COMMANDS

from rl_fixtures import EOS, POSTS, make_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

POST = Post("p1", "dogs", "my dog", "my dog ate my homework today", " my dog ate my homework")


def test_pairs_are_labelled_by_the_gold_reward_worked_out_by_hand():
    terms = check_reward_spec("rouge-l")
    ref = POST.summary.strip()
    a, b, c = "my dog ate it", "the cat slept", "my dog ate my homework"
    got = score_texts(terms, ["q"] * 3, [a, b, c], [ref] * 3).tolist()
    # ROUGE-L F1 against "my dog ate my homework" (5 words): a = "my dog ate it": LCS "my dog ate" = 3,
    # P = 3/4, R = 3/5, F = 2PR / (P + R) = 0.9 / 1.35 = 0.666667; b shares no word: 0; c is the reference: 1
    assert got == pytest.approx([2 / 3, 0.0, 1.0], abs=1e-6)
    # the EOS trick: b without EOS scores the penalty -1
    gold_scores = gold.gold_with_penalty(got, [True, False, True], -1.0)
    assert gold_scores == pytest.approx([2 / 3, -1.0, 1.0], abs=1e-6)
    rec = gold.comparison_record(POST, (b, a), (gold_scores[1], gold_scores[0]))
    assert rec["choice"] == 1 and [s["text"] for s in rec["summaries"]] == [b, a]  # the second, ROUGE-L 0.667 > -1
    assert rec["info"] == {"id": "p1", "subreddit": "dogs", "title": "my dog", "post": "my dog ate my homework today"}
    assert rec["summaries"][1]["note"] == "gold 0.666667"
    assert gold.label_pair(1.0, 2 / 3) == 0 and gold.label_pair(-1.0, -1.0) is None
    assert gold.comparison_record(POST, (a, b), (-1.0, -1.0)) is None  # both without EOS: a tie, no preference
    assert gold.comparison_record(POST, (a, a + " "), (0.5, 0.4)) is None  # the same text twice
    with pytest.raises(ValueError):
        gold.gold_with_penalty([0.1], [True, False], -1.0)


def test_the_reward_model_stage_reads_the_gold_labelled_pairs(tmp_path):
    from tldr_rlhf.data.comparisons import load_comparisons

    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(gold.comparison_record(POST, ("the cat slept", "my dog ate it"), (0.0, 2 / 3))) + "\n")
    (c,), drops = load_comparisons(f)
    assert (c.chosen, c.rejected, c.post_id) == ("my dog ate it", "the cat slept", "p1")


def test_records_from_hand_made_evaluation_results():
    results = {"policies": {
        "ppo-s1-u3": {"reward": 0.21, "rm_score": None, "kl_to_sft": 1.5, "mean_length": 20.0, "eos_rate": 0.75},
        "sft-bo4": {"reward": 0.25, "rm_score": 0.4, "kl_to_sft": 0.6363, "mean_length": 18.0, "eos_rate": 1.0},
    }}
    points = {
        "ppo-s1-u3": {"experiment": "direct", "method": "ppo", "seed": 1, "update": 3, "episodes": 24, "n": None, "path": "x"},
        "sft-bo4": {"experiment": "proxy", "method": "best-of-n", "seed": None, "update": None, "episodes": None, "n": 4, "path": "y"},
    }
    r1, r2 = gold.records_from_eval(results, points)
    assert r1 == {**points["ppo-s1-u3"], "policy": "ppo-s1-u3", "gold": 0.21, "proxy": None, "kl": 1.5, "length": 20.0, "eos_rate": 0.75}
    assert (r2["gold"], r2["proxy"], r2["kl"], r2["n"]) == (0.25, 0.4, 0.6363, 4)
    assert [gold.eval_name(r) for r in (r1, r2)] == ["direct-ppo-s1", "proxy-best-of-n"]
    assert gold.eval_name({"experiment": "direct", "method": "sft"}) == "direct-sft"
    with pytest.raises(DataError, match="no policy 'grpo'"):
        gold.records_from_eval(results, {"grpo": {}})


def test_episodes_per_update_of_each_method():
    g = GOLD_PRESETS["cpu-smol"]
    # PPO 8 prompts x 1, GRPO / RLOO 2 prompts x 4, online DPO 4 prompts x 2
    assert [gold.episodes_per_update(m, getattr(g, gold.METHOD_FIELDS[m])) for m in ("ppo", "grpo", "rloo", "online-dpo")] == [8, 8, 8, 8]


def test_cpu_gold_preset_resolves_and_wires_the_gold_stage(tmp_path):
    cfg = dataclasses.replace(PIPELINE_PRESETS["cpu-gold"], run_dir=str(tmp_path / "run"))
    assert check_stages(cfg) == ["sft", "gold", "report"]
    g = stage_configs(cfg)["gold"]
    assert g.sft_path == str(tmp_path / "run" / "sft" / "final") and g.output_dir == str(tmp_path / "run" / "gold")
    assert g.data == cfg.sft.data and g.data.max_query_length == 160 and g.data.max_response_length == 32
    assert g.methods == ("ppo", "grpo", "rloo", "online-dpo") and g.proxy_methods == ("ppo", "grpo") and g.seeds == (1, 2)
    for method in g.methods:
        run_cfg = gold.method_config(g, method, 2, reward="rouge-l", output_dir=tmp_path / method)
        assert (run_cfg.reward, run_cfg.rm_path, run_cfg.sft_path, run_cfg.run.seed) == ("rouge-l", "", g.sft_path, 2)
        assert run_cfg.run.save_every == 3 and run_cfg.num_updates() == 6 and run_cfg.response_length == 32 and run_cfg.data == g.data
    assert COMMANDS["gold"].needs(cfg) == ("sft",)
    assert stage_configs(cfg)["sft"].run.output_dir == str(tmp_path / "run" / "sft")


def test_online_dpo_is_a_pipeline_stage_that_needs_the_reward_model_only_without_its_own_reward(tmp_path):
    base = dataclasses.replace(PIPELINE_PRESETS["cpu-smol"], run_dir=str(tmp_path / "run"))
    with_rm = dataclasses.replace(base, stages=("sft", "rm", "online-dpo", "evaluate"))
    assert check_stages(with_rm) == ["sft", "rm", "online-dpo", "evaluate"]
    sc = stage_configs(with_rm)
    assert sc["online-dpo"].rm_path == str(tmp_path / "run" / "rm" / "final") and sc["online-dpo"].run.output_dir == str(tmp_path / "run" / "online-dpo")
    assert "online-dpo=" + str(tmp_path / "run" / "online-dpo" / "final") in sc["evaluate"].policies
    with pytest.raises(DataError, match="needs the output of rm"):
        check_stages(dataclasses.replace(base, stages=("sft", "online-dpo")))
    own = dataclasses.replace(base, stages=("sft", "online-dpo"), online_dpo=dataclasses.replace(base.online_dpo, reward="rouge-l"))
    assert check_stages(own) == ["sft", "online-dpo"]
    assert stage_configs(own)["online-dpo"].rm_path == ""


# ----------------------------------------------------------------------------------------------
# End to end on tiny models


@pytest.fixture
def short_eos_responses(monkeypatch):
    """A tiny random policy almost never samples EOS: every sampled response (RL rollouts, evaluation,
    proxy pairs) is cut to 2-4 of its tokens and ends with EOS, so rewards differ and pairs have labels."""
    real, real_groups = generation.generate, generation.generate_groups

    def generate(*args, **kwargs):
        return [r[: 2 + i % 3] + [EOS] for i, r in enumerate(real(*args, **kwargs))]

    def generate_groups(*args, **kwargs):
        out, lp = real_groups(*args, **kwargs)
        return [r[: 2 + i % 3] + [EOS] for i, r in enumerate(out)], None

    monkeypatch.setattr(generation, "generate", generate)
    monkeypatch.setattr(rollout, "generate", generate)
    monkeypatch.setattr(summaries, "generate", generate)  # evaluation and the proxy pairs sample through summaries
    import tldr_rlhf.train.group_rl as group_rl

    if hasattr(group_rl, "generate_groups"):
        monkeypatch.setattr(group_rl, "generate_groups", generate_groups)


def tiny_gold(sft: str, out: Path, **kw) -> GoldConfig:
    data = TldrDataArgs(train=POSTS, limit=16, max_query_length=64, valid_fraction=0.1, valid_limit=4)
    run = RunArgs(progress=False, num_threads=1, eval_every=0)
    optim = OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0)
    rl = dict(dtype="float32", data=data, optim=optim, run=run, total_episodes=8, response_length=6, forward_batch_size=8, num_sample_posts=0)
    base = GoldConfig(
        sft_path=sft, output_dir=str(out), data=data, gold_reward="length", methods=("grpo", "online-dpo"), proxy_methods=("grpo",),
        seeds=(1,), eval_every=1, proxy_pairs=8, best_of_n=(2,), sft_resample_seeds=(7,), greedy_final=True, greedy_posts=4,
        grpo=dataclasses.replace(GOLD_PRESETS["cpu-smol"].grpo, **rl, rollout_prompts=2, group_size=2, mini_batch_size=4, micro_batch_size=4, update_per_rollout=1),
        online_dpo=OnlineDPOConfig(**rl, rollout_prompts=2, mini_batch_size=2, micro_batch_size=2),
        proxy_rm=RMConfig(
            model=ModelArgs(path=sft, dtype="float32"), data=PreferenceDataArgs(max_query_length=64, max_response_length=64, valid_fraction=0.25),
            norm=RewardNormArgs(posts=POSTS, limit=4), optim=optim, run=RunArgs(progress=False, num_threads=1, eval_every=0, save_every=0),
            micro_batch_size=2, gradient_accumulation_steps=1, eval_batch_size=4,
        ),
        evaluate=EvaluateConfig(num_posts=4, response_length=6, batch_size=4, greedy=False),
        num_threads=1,
    )
    return dataclasses.replace(base, **kw)


def test_gold_experiment_end_to_end_resumes_and_reports(qwen_tokenizer, short_eos_responses, tmp_path):
    from tldr_rlhf.config import ReportConfig
    from tldr_rlhf.report import build_report

    sft, _ = make_checkpoints(qwen_tokenizer)
    out = tmp_path / "gold"
    cfg = tiny_gold(sft, out)
    result = gold.run(cfg)
    recs = result["records"]
    key = lambda r: (r["experiment"], r["method"], r["seed"], r["update"], r["n"])  # noqa: E731
    got = sorted(map(key, recs), key=str)
    want = sorted([
        ("direct", "sft", None, 0, None), ("direct", "sft-resampled", 7, 0, None),
        ("direct", "grpo", 1, 1, None), ("direct", "grpo", 1, 2, None),
        ("direct", "online-dpo", 1, 1, None), ("direct", "online-dpo", 1, 2, None),
        ("proxy", "sft", None, 0, 1), ("proxy", "best-of-n", None, None, 2),
        ("proxy", "grpo", 1, 1, None), ("proxy", "grpo", 1, 2, None),
    ], key=str)
    assert got == want
    by = {key(r): r for r in recs}
    assert by[("direct", "sft", None, 0, None)]["kl"] == 0.0  # the SFT policy against itself
    # measured again at sampling seed 7, in its own evaluation folder
    assert by[("direct", "sft-resampled", 7, 0, None)]["kl"] == 0.0
    head = json.loads((out / "eval" / "direct-sft-r7" / "policies" / "sft.jsonl").read_text().splitlines()[0])
    assert head["key"]["settings"]["seed"] == 7
    assert by[("direct", "grpo", 1, 2, None)]["episodes"] == 8 and by[("direct", "grpo", 1, 2, None)]["path"].endswith("final")
    assert by[("direct", "grpo", 1, 1, None)]["path"].endswith("checkpoints/step-1")
    assert all(r["proxy"] is not None for r in recs if r["experiment"] == "proxy") and all(r["proxy"] is None for r in recs if r["experiment"] == "direct")
    assert by[("proxy", "best-of-n", None, None, 2)]["kl"] == pytest.approx(0.193147, abs=1e-6)  # log 2 - 1/2
    # every gold reward is the mean word count of 2-4 token summaries; lengths are 2-4 tokens, EOS always
    assert all(r["eos_rate"] == 1.0 and 2 <= r["length"] <= 4 for r in recs)
    # the proxy pairs are labelled by the gold reward (words), each chosen summary has more words
    pairs = [json.loads(line) for line in (out / "proxy" / gold.PAIRS_FILE).read_text().splitlines()]
    assert pairs and all(float(p["summaries"][p["choice"]]["note"].split()[1]) > float(p["summaries"][1 - p["choice"]]["note"].split()[1]) for p in pairs)
    assert all(len(p["summaries"][p["choice"]]["text"].split()) == float(p["summaries"][p["choice"]]["note"].split()[1]) for p in pairs)
    # the training state of finished runs is dropped, their weights kept
    assert not list(out.glob("*/*/checkpoints/step-*/state.pt")) and list(out.glob("direct/grpo-s1/checkpoints/step-1/model.safetensors"))
    # a rerun trains and evaluates nothing again (the stage functions and evaluate would raise)
    import tldr_rlhf.evaluate as evaluate_mod

    mtime = (out / "direct" / "grpo-s1" / "final" / "model.safetensors").stat().st_mtime_ns
    def boom(*a, **k):
        raise AssertionError("evaluated again")
    original = evaluate_mod.evaluate
    evaluate_mod.evaluate = boom
    try:
        again = gold.run(cfg)
    finally:
        evaluate_mod.evaluate = original
    assert sorted(map(key, again["records"]), key=str) == want
    assert (out / "direct" / "grpo-s1" / "final" / "model.safetensors").stat().st_mtime_ns == mtime
    # the report of a folder holding the experiment: the table and both plots
    md = build_report(ReportConfig(run_dir=str(tmp_path), table_posts=0))
    text = md.read_text()
    assert "gold_direct.png" in text and "gold_proxy.png" in text and "| direct | grpo |" in text
    assert "The SFT policy's gold reward measured 2 times" in text and "| direct | sft-resampled | 7 | 0 |" in text
    # the greedy measurement: SFT and both direct runs' final policies on the same held-out posts, paired
    greedy = json.loads((out / "eval" / gold.GREEDY_EVAL / "eval.json").read_text())
    assert set(greedy["policies"]) == {"sft", "grpo-s1", "online-dpo-s1"} and result["greedy_eval"].endswith(gold.GREEDY_EVAL)
    assert greedy["policies"]["grpo-s1"]["path"].endswith("direct/grpo-s1/final") and "kl_to_sft" not in greedy["policies"]["sft"]
    assert "Final policies, greedy summaries, paired with SFT post by post" in text and "| online-dpo-s1 | 4 |" in text
    assert (md.parent / "gold_direct.png").stat().st_size > 0 and (md.parent / "gold_proxy.png").stat().st_size > 0
    assert (md.parent / "gold_direct_as_trained.png").stat().st_size > 0 and "lowest to highest measurement" in text


def test_gold_refuses_a_missing_sft_checkpoint_and_unknown_methods(tmp_path):
    with pytest.raises(DataError, match="SFT checkpoint"):
        gold.run(GoldConfig(sft_path=str(tmp_path / "nope"), output_dir=str(tmp_path / "g")))
    (tmp_path / "sft").mkdir()
    with pytest.raises(DataError, match="unknown method 'dpo'"):
        gold.run(GoldConfig(sft_path=str(tmp_path / "sft"), output_dir=str(tmp_path / "g"), methods=("dpo",)))


def test_report_tables_from_hand_made_records(tmp_path):
    from tldr_rlhf.gold_report import as_trained, gold_rows, gold_summary, plot_gold_direct, plot_gold_proxy, sft_noise, standard_error

    sft = {"experiment": "direct", "method": "sft", "seed": None, "update": 0, "episodes": 0, "n": None, "policy": "sft", "gold": 0.20, "proxy": None, "kl": 0.0, "length": 26.0, "eos_rate": 0.7}
    def rec(exp, method, seed, update, gold_v, kl, proxy=None, n=None):
        return {**sft, "experiment": exp, "method": method, "seed": seed, "update": update, "episodes": None if update is None else 8 * update,
                "n": n, "policy": f"{method}-s{seed}-u{update}", "gold": gold_v, "kl": kl, "proxy": proxy}
    records = [
        sft, rec("direct", "ppo", 1, 3, 0.25, 1.0), rec("direct", "ppo", 2, 3, 0.23, 2.0),
        rec("direct", "grpo", 1, 3, 0.21, 0.5), rec("direct", "grpo", 2, 3, 0.17, 0.7), rec("direct", "rloo", 1, 3, 0.30, 0.2),
        {**sft, "experiment": "proxy", "n": 1, "proxy": 0.1}, rec("proxy", "best-of-n", None, None, 0.22, 0.193147, 0.5, n=2),
        rec("proxy", "ppo", 1, 3, 0.18, 1.5, 0.9),
    ]
    header, rows = gold_summary(records)
    by = {(r[0], r[1], r[2]): r for r in rows}
    # ppo: mean (0.25 + 0.23) / 2 = 0.24, spread 0.02, gain 0.24 - 0.20 = 0.04 > 0.02: yes; KL mean 1.5
    # (no resampled SFT measurements: "-" in the last column)
    assert by[("direct", "ppo", "3")][3:] == ["2", "0.240", "0.020", "0.040", "1.500", "yes", "-"]
    # grpo: mean 0.19, spread 0.04, gain -0.01: no
    assert by[("direct", "grpo", "3")][3:] == ["2", "0.190", "0.040", "-0.010", "0.600", "no", "-"]
    assert by[("direct", "rloo", "3")][-2] == "1 seed" and by[("proxy", "ppo", "3")][6] == "-0.020"
    # the SFT policy measured again at sampling seeds 1 and 2: 0.216 and 0.187 with the first 0.20 ->
    # spread 0.029, mean 0.201; ppo's gain 0.04 exceeds it, a gain of 0.021 would not; none of them is a run
    resampled = [{**sft, "method": "sft-resampled", "seed": s, "policy": "sft", "gold": g} for s, g in ((1, 0.216), (2, 0.187))]
    noise = sft_noise(records + resampled)
    assert noise[2] == 3 and noise[0] == pytest.approx(0.201, abs=1e-9) and noise[1] == pytest.approx(0.029, abs=1e-9)
    assert sft_noise(records) is None
    header, rows = gold_summary(records + resampled + [rec("direct", "rloo", 2, 3, 0.142, 0.3)])
    by = {(r[0], r[1], r[2]): r for r in rows}
    assert header[-1] == "gain > SFT resampled spread" and len(rows) == 4
    assert by[("direct", "ppo", "3")][-2:] == ["yes", "yes"] and by[("direct", "grpo", "3")][-1] == "no"
    # rloo: seeds 0.30 / 0.142, mean 0.221, gain 0.021: below both the seed spread 0.158 and 0.029
    assert by[("direct", "rloo", "3")][4:] == ["0.221", "0.158", "0.021", "0.250", "no", "no"]
    header, rows = gold_rows(records, {("direct-sft", "sft"): [(0.1, True), (0.3, False)], ("proxy-ppo-s1", "ppo-s1-u3"): [(0.5, True)] * 2})
    # SE: sd 0.1414 / sqrt 2 = 0.1; as trained: (0.1 + -1) / 2 = -0.45
    assert header[6:8] == ["gold SE (posts)", "gold as trained"] and rows[0][:8] == ["direct", "sft", "-", "0", "0", "0.200", "0.100", "-0.450"]
    assert rows[1][6:8] == ["-", "-"]  # no per-post values for direct ppo (those given are the proxy run's)
    assert [r[7] for r in rows if r[0] == "proxy" and r[1] == "ppo"] == ["0.500"]
    assert [r[3] for r in rows if r[1] == "best-of-n"] == ["n=2"]
    assert standard_error([0.1, 0.3]) == pytest.approx(0.1) and standard_error([0.5]) is None
    assert as_trained([(0.3, True), (0.5, False)]) == pytest.approx(-0.35) and as_trained([]) is None
    # the same summary over another key: gold as trained, SFT -0.1, ppo seeds 0.3 / 0.1 -> mean 0.2, spread 0.2, gain 0.3 > 0.2
    trained = [{**r, "gold_as_trained": {"sft": -0.1, "ppo-s1-u3": 0.3, "ppo-s2-u3": 0.1}.get(r["policy"]) if r["experiment"] == "direct" else None} for r in records]
    header, rows = gold_summary(trained, "gold_as_trained")
    assert header[4] == "gold_as_trained mean" and rows == [["direct", "ppo", "3", "2", "0.200", "0.200", "0.300", "1.500", "yes", "-"]]
    assert plot_gold_direct(records, tmp_path / "d.png", sft_se=0.018).stat().st_size > 0
    assert plot_gold_direct(trained, tmp_path / "t.png", sft_range=(-0.2, 0.0), key="gold_as_trained", label="gold as trained").stat().st_size > 0
    assert plot_gold_proxy(records, tmp_path / "p.png").stat().st_size > 0
    assert plot_gold_direct([sft], tmp_path / "none.png") is None and plot_gold_proxy([sft], tmp_path / "none.png") is None


def test_greedy_table_pairs_each_final_policy_with_sft_by_post():
    from tldr_rlhf.gold_report import greedy_rows

    def post(sft, **others):
        return {"summaries": {"sft": {"reward": sft, "length": 20, "eos": True}, **{k: {"reward": v, "length": 17, "eos": k != "ppo-s1" or sft > 0.15} for k, v in others.items()}}}
    summaries = [post(0.2, **{"ppo-s1": 0.27, "grpo-s1": 0.2}), post(0.3, **{"ppo-s1": 0.2, "grpo-s1": 0.3}), post(0.1, **{"ppo-s1": 0.2, "grpo-s1": 0.1})]
    header, rows = greedy_rows(summaries)
    assert header[3:6] == ["minus SFT (paired)", "SE", "t"]
    assert [r[0] for r in rows] == ["sft", "grpo-s1", "ppo-s1"]
    # sft: mean 0.2 over 3 posts, no difference to itself
    assert rows[0] == ["sft", "3", "0.200", "-", "-", "-", "20.0", "1.00"]
    # ppo-s1: differences 0.07, -0.1, 0.1 -> mean 0.023333, sd 0.107858, SE 0.062272, t 0.37; EOS on 2 of 3 posts
    assert rows[2] == ["ppo-s1", "3", "0.223", "0.023", "0.062", "0.37", "17.0", "0.67"]
    # grpo-s1 equals SFT on every post: difference 0, SE 0, no t
    assert rows[1][3:6] == ["0.000", "0.000", "-"]
    assert greedy_rows([{"summaries": {"ppo-s1": {"reward": 0.3}}}]) is None and greedy_rows([]) is None
