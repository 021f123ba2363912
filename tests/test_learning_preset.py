"""Issue 26's experiment (docs/learning.md): the cpu-learn pipeline preset resolves to the designed
settings (400 held-out posts, 48-token responses, 1,024 episodes per arm, the arms and their seeds), and
the gold experiment's arms (gold_arms.py) are parsed and ordered as documented."""

import dataclasses
import json

import pytest

from tldr_rlhf import gold
from tldr_rlhf.errors import ConfigError
from tldr_rlhf.gold_arms import Arm, direct_arms, parse_variant, worker_arms
from tldr_rlhf.pipeline import check_stages, stage_configs
from tldr_rlhf.presets import PIPELINE_PRESETS

from test_gold import short_eos_responses, tiny_gold  # noqa: F401 - the fixture and the tiny set-up of the gold tests

METHODS = list(gold.METHOD_FIELDS)


def test_cpu_learn_preset_resolves_to_the_designed_settings(tmp_path):
    cfg = dataclasses.replace(PIPELINE_PRESETS["cpu-learn"], run_dir=str(tmp_path / "run"))
    assert check_stages(cfg) == ["sft", "gold", "report"]
    sc = stage_configs(cfg)
    sft, g = sc["sft"], sc["gold"]
    assert g.data == sft.data and g.sft_path == str(tmp_path / "run" / "sft" / "final")
    d = g.data
    assert (d.valid_count, d.max_response_length, d.max_query_length, d.limit) == (400, 48, 160, 0)
    assert (sft.epochs, sft.run.max_steps, sft.micro_batch_size) == (1, 0, 8)
    assert (g.greedy_final, g.greedy_posts, g.evaluate.num_posts, g.evaluate.response_length, g.gold_reward) == (True, 0, 100, 48, "rouge-l")
    assert g.proxy_methods == () and g.best_of_n == () and g.proxy_no_eos_penalty is False
    arms = direct_arms(g.methods, g.seeds, g.single_seed_methods, g.variants, g.gold_reward, METHODS)
    assert [(a.name, a.seed) for a in arms] == [
        ("rloo", 1), ("grpo", 1), ("ppo", 1), ("online-dpo", 1), ("rloo", 2), ("grpo", 2), ("rloo", 3), ("grpo", 3),
        ("rloo-no-eos-penalty", 1), ("rloo-rouge-1-post", 1),
    ]
    for arm in arms:
        run_cfg = dataclasses.replace(gold.method_config(g, arm.method, arm.seed, reward=arm.reward, output_dir=tmp_path / arm.name), **arm.changes)
        assert run_cfg.num_updates() * gold.episodes_per_update(arm.method, run_cfg) == 1024, arm
        assert (run_cfg.response_length, run_cfg.run.save_every, run_cfg.data.valid_count, run_cfg.run.seed) == (48, 16, 400, arm.seed)
        if arm.method != "online-dpo":
            assert run_cfg.kl_coef == pytest.approx(0.02)
        assert run_cfg.reward == ("rouge-1-post" if arm.name == "rloo-rouge-1-post" else "rouge-l")
        assert run_cfg.no_eos_penalty == (None if arm.name == "rloo-no-eos-penalty" else -1.0)
    rloo = gold.method_config(g, "rloo", 1, reward="rouge-l", output_dir=tmp_path / "r")
    assert (rloo.group_size, rloo.rollout_prompts) == (4, 4)


def test_variants_parse_and_bad_ones_are_one_line():
    assert parse_variant("x=rloo;no_eos_penalty=None;reward=rouge-1-post", METHODS) == ("x", "rloo", {"no_eos_penalty": None, "reward": "rouge-1-post"})
    assert parse_variant("y=grpo;no_eos_penalty=-0.5", METHODS) == ("y", "grpo", {"no_eos_penalty": -0.5})
    for text, message in [
        ("rloo", "expected NAME=METHOD"), ("x=sft", "unknown method 'sft'"), ("x=rloo;lr=1", "unknown setting 'lr'"),
        ("x=rloo;no_eos_penalty=off", "must be a number or None"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_variant(text, METHODS)
    with pytest.raises(ConfigError, match="already a method"):
        direct_arms(("rloo",), (1,), (), ("rloo=rloo;reward=length",), "rouge-l", METHODS)
    with pytest.raises(ConfigError, match="not one of --methods"):
        direct_arms(("rloo",), (1,), ("ppo",), (), "rouge-l", METHODS)
    assert direct_arms(("ppo",), (5, 6), (), (), "rouge-l", METHODS) == [Arm("ppo", "ppo", 5, "rouge-l"), Arm("ppo", "ppo", 6, "rouge-l")]
    assert gold.greedy_folder("rouge-1-post") == "direct-greedy-rouge-1-post" and gold.greedy_folder("a:0.5,b") == "direct-greedy-a_0.5_b"


def test_variants_and_single_seed_methods_run_measure_and_report_end_to_end(qwen_tokenizer, short_eos_responses, tmp_path):
    """On tiny models (test_gold's set-up): GRPO at seeds 1 and 2, online DPO at seed 1 only, and two GRPO
    variants at seed 1 (another reward; no EOS trick), each measured, the greedy measurement split by reward."""
    from rl_fixtures import make_checkpoints
    from tldr_rlhf.config import ReportConfig
    from tldr_rlhf.report import build_report

    sft, _ = make_checkpoints(qwen_tokenizer)
    out = tmp_path / "gold"
    cfg = tiny_gold(
        sft, out, methods=("grpo", "online-dpo"), seeds=(1, 2), single_seed_methods=("online-dpo",), proxy_methods=(), best_of_n=(),
        sft_resample_seeds=(), greedy_final=True, variants=("grpo-post=grpo;reward=rouge-1-post", "grpo-no-eos=grpo;no_eos_penalty=None"),
    )
    result = gold.run(cfg)
    finals = {(r["method"], r["seed"]) for r in result["records"] if r["path"] and r["path"].endswith("final")}
    assert finals == {("grpo", 1), ("grpo", 2), ("online-dpo", 1), ("grpo-post", 1), ("grpo-no-eos", 1)}
    assert (out / "direct" / "grpo-no-eos-s1" / "final").is_dir() and not (out / "direct" / "online-dpo-s2").exists()
    saved = json.loads((out / "direct" / "grpo-no-eos-s1" / "config.json").read_text())
    assert saved["no_eos_penalty"] is None and json.loads((out / "direct" / "grpo-s1" / "config.json").read_text())["no_eos_penalty"] == -1.0
    assert json.loads((out / "direct" / "grpo-post-s1" / "config.json").read_text())["reward"] == "rouge-1-post"
    greedy = json.loads((out / "eval" / gold.GREEDY_EVAL / "eval.json").read_text())
    assert set(greedy["policies"]) == {"sft", "grpo-s1", "grpo-s2", "online-dpo-s1", "grpo-no-eos-s1"} and greedy["reward"] == cfg.gold_reward
    post = json.loads((out / "eval" / gold.greedy_folder("rouge-1-post") / "eval.json").read_text())
    assert set(post["policies"]) == {"sft", "grpo-post-s1"} and post["reward"] == "rouge-1-post"
    assert set(post["paired_vs_sft"]) == {"grpo-post-s1"}
    text = build_report(ReportConfig(run_dir=str(tmp_path), table_posts=0)).read_text()
    assert "(direct-greedy-rouge-1-post)" in text and "| grpo-post-s1 | 4 |" in text


def test_workers_share_the_arms_in_run_order_and_bad_worker_is_one_line():
    arms = [Arm(f"m{k}", "rloo", 1, "rouge-l") for k in range(1, 11)]  # run order m1..m10, as the cpu-learn preset's 10 arms
    one, i1 = worker_arms(arms, "1/2")
    two, i2 = worker_arms(arms, "2/2")
    assert ([a.name for a in one], i1) == (["m1", "m3", "m5", "m7", "m9"], 1)
    assert ([a.name for a in two], i2) == (["m2", "m4", "m6", "m8", "m10"], 2)
    assert [a.name for a in worker_arms(arms, "3/3")[0]] == ["m3", "m6", "m9"] and worker_arms(arms, "") == (arms, 1)
    for bad in ("3/2", "0/2", "1", "a/b", "1/2/3", "-1/2"):
        with pytest.raises(ConfigError, match=f"--worker '{bad}': expected I/N"):
            worker_arms(arms, bad)


def test_two_workers_train_disjoint_runs_then_the_plain_run_trains_nothing_and_writes_gold_json(qwen_tokenizer, short_eos_responses, tmp_path, monkeypatch):
    """Worker 1/2 trains GRPO at seeds 1 and 2 (runs 1 and 3 of the order) and measures SFT; worker 2/2
    trains online DPO (run 2) only; neither writes gold.json. The run without --worker then trains and
    evaluates nothing again and writes gold.json with every record."""
    from rl_fixtures import make_checkpoints

    sft, _ = make_checkpoints(qwen_tokenizer)
    out = tmp_path / "gold"
    cfg = tiny_gold(sft, out, methods=("grpo", "online-dpo"), seeds=(1, 2), single_seed_methods=("online-dpo",), proxy_methods=(), best_of_n=(), sft_resample_seeds=(), greedy_final=True)
    first = gold.run(dataclasses.replace(cfg, worker="1/2"))
    assert sorted(p.name for p in (out / "direct").iterdir()) == ["grpo-s1", "grpo-s2"] and not (out / gold.GOLD_FILE).exists()
    assert {r["method"] for r in first["records"]} == {"sft", "grpo"} and first["worker"] == "1/2"
    second = gold.run(dataclasses.replace(cfg, worker="2/2"))
    assert sorted(p.name for p in (out / "direct").iterdir()) == ["grpo-s1", "grpo-s2", "online-dpo-s1"] and not (out / gold.GOLD_FILE).exists()
    assert {r["method"] for r in second["records"]} == {"online-dpo"}  # worker 2 measures its own run only, not SFT again
    assert not (out / "eval" / gold.GREEDY_EVAL).exists()
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("direct/*/final/model.safetensors")}
    from tldr_rlhf.stages import Stage

    trained_again = []
    monkeypatch.setattr(Stage, "function", lambda self: trained_again.append)
    result = gold.run(cfg)
    assert trained_again == [] and {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert {(r["method"], r["seed"]) for r in result["records"] if r["path"] and r["path"].endswith("final")} == {("grpo", 1), ("grpo", 2), ("online-dpo", 1)}
    assert (out / gold.GOLD_FILE).is_file() and set(json.loads((out / "eval" / gold.GREEDY_EVAL / "eval.json").read_text())["policies"]) == {"sft", "grpo-s1", "grpo-s2", "online-dpo-s1"}
