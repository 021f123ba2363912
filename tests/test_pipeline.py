"""The one-command pipeline on tiny models built from a config (real Qwen2.5 tokenizer, real posts and
comparisons): every stage runs, the report is built from real stage outputs, a second run skips every
finished stage, a crashed stage is resumed without redoing the stages before it, and evaluate's KL
and scores behave as they must (the SFT policy's KL to itself is exactly 0)."""

import json
import os
import shutil

import pytest

from tldr_rlhf.config import (
    DPOConfig, PreferenceDataArgs as DPODataArgs, EvaluateConfig, EvaluateRMConfig, GRPOConfig, JudgeArgs, ModelArgs, OptimArgs, PipelineConfig, PPOConfig,
    RewardNormArgs, RMConfig, PreferenceDataArgs as RMDataArgs, RunArgs, SFTConfig, TldrDataArgs,
)
from tldr_rlhf.errors import DataError
from tldr_rlhf.pipeline import check_stages, run_pipeline, stage_configs
from tldr_rlhf.presets import PIPELINE_PRESETS

from conftest import COMPARISONS
from judge_server import JudgeServer
from rl_fixtures import POSTS, make_checkpoints

TRAINING = ("sft", "rm", "dpo", "ppo", "grpo")


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def tiny_pipeline(base: str, run_dir, judge_url: str = "", **kw) -> PipelineConfig:
    """Every stage at its smallest: 2 optimizer steps or one rollout, 6-token responses, 64-token queries."""
    run = RunArgs(max_steps=2, save_every=0, eval_every=0, progress=False, num_threads=1)
    optim = OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0)
    posts = TldrDataArgs(train=POSTS, limit=8, max_query_length=64, valid_fraction=0.1, valid_limit=4)
    cfg = PipelineConfig(
        run_dir=str(run_dir),
        num_threads=1,
        table_posts=2,
        sft=SFTConfig(model=ModelArgs(path=base, dtype="float32"), data=posts, optim=optim, run=run, micro_batch_size=2, gradient_accumulation_steps=1, num_sample_posts=1),
        rm=RMConfig(
            model=ModelArgs(path=base, dtype="float32"), data=RMDataArgs(comparisons=str(COMPARISONS), max_query_length=64, limit=4, valid_limit=4),
            norm=RewardNormArgs(posts=POSTS, limit=4), optim=optim, run=run, micro_batch_size=2, gradient_accumulation_steps=1, eval_batch_size=4,
        ),
        evaluate_rm=EvaluateRMConfig(cnndm="", policy_samples="", valid_limit=4, batch_size=4, progress=False),
        dpo=DPOConfig(
            dtype="float32", data=DPODataArgs(comparisons=str(COMPARISONS), max_query_length=96, limit=4, valid_limit=4),
            optim=optim, run=run, micro_batch_size=2, gradient_accumulation_steps=1, eval_batch_size=4, num_sample_posts=1, sample_max_new_tokens=6,
        ),
        ppo=PPOConfig(
            dtype="float32", data=posts, optim=OptimArgs(lr=1e-3, max_grad_norm=0.0), run=run, total_episodes=4, rollout_batch_size=4,
            num_mini_batches=1, micro_batch_size=4, forward_batch_size=4, ppo_epochs=1, response_length=6, num_sample_posts=1,
        ),
        grpo=GRPOConfig(
            dtype="float32", data=posts, optim=optim, run=run, total_episodes=4, rollout_prompts=2, group_size=2, mini_batch_size=4,
            micro_batch_size=4, forward_batch_size=4, update_per_rollout=1, response_length=6, num_sample_posts=1,
        ),
        # sampled summaries serve the KL too, as in the cpu-smol preset (greedy is tested below)
        evaluate=EvaluateConfig(num_posts=4, response_length=6, batch_size=4, greedy=False, judge=JudgeArgs(url=judge_url, timeout_s=10, retries=0, max_parallel=2)),
    )
    return PipelineConfig(**{**cfg.__dict__, **kw})


@pytest.fixture(scope="module")
def pipeline_run(qwen_tokenizer, tmp_path_factory):
    base, _ = make_checkpoints(qwen_tokenizer)
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    server = JudgeServer(always="B")  # an LLM judge that always prefers the second summary shown
    try:
        cfg = tiny_pipeline(base, run_dir, judge_url=server.url)
        state = run_pipeline(cfg)
    finally:
        server.stop()
    return cfg, run_dir, state


def test_pipeline_runs_every_stage_and_builds_the_report(pipeline_run):
    cfg, run_dir, state = pipeline_run
    assert [s for s in state["stages"]] == ["sft", "rm", "evaluate-rm", "dpo", "ppo", "grpo", "evaluate", "report"]
    assert all(s["status"] == "done" and s["seconds"] > 0 for s in state["stages"].values())
    for stage in TRAINING:
        assert (run_dir / stage / "final" / "config.json").is_file(), stage
    # later stages were wired to the earlier ones' outputs
    assert json.loads((run_dir / "ppo" / "config.json").read_text())["rm_path"] == str(run_dir / "rm" / "final")
    assert json.loads((run_dir / "dpo" / "config.json").read_text())["sft_path"] == str(run_dir / "sft" / "final")
    # 4 held-out comparisons scored, one of them dropped: its query does not fit in 64 tokens
    assert json.loads((run_dir / "rm" / "eval_rm.json").read_text())["heldout"]["n"] == 3
    res = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    assert list(res["policies"]) == ["base", "sft", "dpo", "ppo", "grpo"]
    assert res["posts"]["n"] == 4 and res["judge_is_training_rm"]
    # the SFT policy's KL to itself: the same sampled tokens under the same weights -> exactly 0
    assert res["policies"]["sft"]["kl_to_sft"] == 0.0
    # base = the starting model = SFT's initial weights; after 2 SFT steps at lr 1e-3 they differ
    assert res["policies"]["base"]["kl_to_sft"] != 0.0
    for m in res["policies"].values():
        assert 0.0 <= m["eos_rate"] <= 1.0 and 0 <= m["mean_length"] <= 6
        assert m["judge"]["n"] == 4 and 0.0 <= m["judge"]["win_rate"] <= 1.0
        assert m["rm_win_rate"] == m["judge"]["win_rate"]  # judge = training RM here
    lines = [json.loads(l) for l in (run_dir / "evaluate" / "summaries.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and set(lines[0]["summaries"]) == set(res["policies"])
    # LLM judge: "B" always, so the policy wins exactly where its summary was shown second
    for name, m in res["policies"].items():
        second = sum(not rec["summaries"][name]["llm_policy_first"] for rec in lines)
        assert (m["llm_judge"]["n"], m["llm_judge"]["unparseable"], m["llm_judge"]["failed"]) == (4, 0, 0)
        assert m["llm_judge"]["win_rate"] == second / 4
        assert all(rec["summaries"][name]["llm_verdict"] == ("reference" if rec["summaries"][name]["llm_policy_first"] else "policy") for rec in lines)
    report = (run_dir / "report" / "report.md").read_text()
    for png in ("win_rate.png", "rouge.png", "lengths.png", "reward_vs_kl.png", *(f"curves_{s}.png" for s in TRAINING)):
        assert (run_dir / "report" / png).stat().st_size > 1000, png
        assert f"]({png})" in report, png
    assert "| sft | done |" in report and "| report |" not in report  # the report lists the stages before it
    assert "| sft |" in report and "Side by side" in report and lines[0]["summaries"]["ppo"]["text"][:20].replace("|", "\\|") in report
    assert (run_dir / "report" / "report.html").read_text().count("<img") == 4 + len(TRAINING)


def test_second_run_skips_every_finished_stage(pipeline_run):
    cfg, run_dir, first = pipeline_run
    finals = {s: os.stat(run_dir / s / "final" / "model.safetensors").st_mtime_ns for s in TRAINING}
    eval_mtime = os.stat(run_dir / "evaluate" / "eval.json").st_mtime_ns
    calls = []
    spies = {s: (lambda c, s=s: calls.append(s)) for s in ("sft", "rm", "evaluate-rm", "dpo", "ppo", "grpo", "evaluate", "report")}
    state = run_pipeline(cfg, stage_functions=spies)
    assert calls == ["report"]  # nothing but the report (always rebuilt) ran
    assert {k: v["status"] for k, v in state["stages"].items()} == {**{s: "skipped" for s in ("sft", "rm", "evaluate-rm", "dpo", "ppo", "grpo", "evaluate")}, "report": "done"}
    # a skipped stage keeps the time it took when it ran
    assert state["stages"]["sft"]["seconds"] == first["stages"]["sft"]["seconds"]
    assert finals == {s: os.stat(run_dir / s / "final" / "model.safetensors").st_mtime_ns for s in TRAINING}
    assert os.stat(run_dir / "evaluate" / "eval.json").st_mtime_ns == eval_mtime


def test_greedy_summaries_do_not_depend_on_the_seed_and_the_kl_uses_a_separate_sample(pipeline_run, tmp_path):
    from tldr_rlhf.evaluate import evaluate

    cfg, run_dir, _ = pipeline_run
    base = dict(
        policies=(f"sft={run_dir / 'sft' / 'final'}", f"ppo={run_dir / 'ppo' / 'final'}"), sft_path=str(run_dir / "sft" / "final"),
        data=cfg.sft.data, num_posts=2, response_length=6, batch_size=2, greedy=True,
    )
    a = evaluate(EvaluateConfig(**base, seed=1, output_dir=str(tmp_path / "a")))
    b = evaluate(EvaluateConfig(**base, seed=2, output_dir=str(tmp_path / "b")))
    texts = lambda d: [json.loads(l)["summaries"]["ppo"]["text"] for l in (d / "summaries.jsonl").read_text().splitlines()]
    assert texts(tmp_path / "a") == texts(tmp_path / "b")  # greedy
    assert a["policies"]["sft"]["kl_to_sft"] == b["policies"]["sft"]["kl_to_sft"] == 0.0
    assert a["policies"]["ppo"]["kl_to_sft"] != b["policies"]["ppo"]["kl_to_sft"]  # a fresh sample per seed
    assert "rm_score" not in a["policies"]["ppo"] and a["rm_path"] == ""


def test_a_crashed_stage_is_resumed_and_the_stages_before_it_are_not_redone(pipeline_run):
    cfg, run2, _ = pipeline_run
    # lose the GRPO and evaluation outputs of the finished run as if GRPO had crashed
    # (this test changes the shared run folder: it runs after the tests that read it)
    shutil.rmtree(run2 / "grpo")
    shutil.rmtree(run2 / "evaluate")
    cfg2 = cfg

    def crash(c):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(cfg2, stage_functions={"grpo": crash})
    state = json.loads((run2 / "pipeline.json").read_text())
    assert state["stages"]["grpo"]["status"] == "failed" and "killed" in state["stages"]["grpo"]["error"]
    calls = []

    def spy(name):
        def fn(c):
            calls.append((name, c.run.output_dir if hasattr(c, "run") else c.output_dir))
        return fn

    state = run_pipeline(cfg2, stage_functions={s: spy(s) for s in ("sft", "rm", "evaluate-rm", "dpo", "ppo", "grpo", "evaluate", "report")})
    assert calls == [("grpo", str(run2 / "grpo")), ("evaluate", str(run2 / "evaluate")), ("report", "")]
    assert state["stages"]["ppo"]["status"] == "skipped"
    # the spies return without writing grpo/final/ or evaluate's results: "incomplete", not "done" (a gold
    # --worker does its share only), so the next run does them again
    assert state["stages"]["grpo"]["status"] == state["stages"]["evaluate"]["status"] == "incomplete"


def test_stage_wiring_and_bad_stage_names(tmp_path):
    cfg = PIPELINE_PRESETS["cpu-smol"]
    cfg = PipelineConfig(**{**cfg.__dict__, "run_dir": str(tmp_path / "p"), "num_threads": 1, "rerun": ("dpo",)})
    w = stage_configs(cfg)
    assert w["sft"].run.output_dir == str(tmp_path / "p" / "sft") and w["sft"].run.num_threads == 1
    assert w["dpo"].run.overwrite and not w["ppo"].run.overwrite
    assert (w["grpo"].sft_path, w["grpo"].rm_path) == (str(tmp_path / "p" / "sft" / "final"), str(tmp_path / "p" / "rm" / "final"))
    assert w["evaluate"].policies[0].startswith("base=") and w["evaluate"].policies[0].endswith(".gguf")
    assert [p.split("=")[0] for p in w["evaluate"].policies] == ["base", "sft", "dpo", "ppo", "grpo"]
    assert w["evaluate"].data == cfg.sft.data  # held-out posts = the SFT stage's held-out split
    assert w["evaluate-rm"].model == str(tmp_path / "p" / "rm" / "final")
    with pytest.raises(DataError, match="unknown stage 'ppoo'"):
        check_stages(PipelineConfig(**{**cfg.__dict__, "stages": ("sft", "ppoo")}))
    with pytest.raises(DataError, match="stage 'ppo' needs the output of rm"):
        check_stages(PipelineConfig(**{**cfg.__dict__, "stages": ("sft", "ppo")}))


def test_cli_pipeline_preset_and_overrides():
    from tldr_rlhf.cli import parse

    fn, cfg = parse(["pipeline", "--preset", "cpu-smol", "--num-threads", "1", "--ppo.run.max-steps", "3", "--stages", "sft", "rm"])
    assert (cfg.num_threads, cfg.ppo.run.max_steps, cfg.stages) == (1, 3, ("sft", "rm"))
    assert cfg.sft.model.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and cfg.evaluate.num_posts == 16 and not cfg.evaluate.greedy


def test_ultrafeedback_pipeline_preset_trains_and_evaluates_every_stage_on_the_task(tmp_path):
    cfg = PIPELINE_PRESETS["uf-cpu-smol"]
    w = stage_configs(PipelineConfig(**{**cfg.__dict__, "run_dir": str(tmp_path / "uf")}))
    for stage in ("sft", "rm", "dpo", "ppo", "grpo", "rloo", "evaluate"):
        assert w[stage].data.task == "ultrafeedback", stage
    assert w["evaluate"].data == cfg.sft.data and w["evaluate"].data.valid.endswith("binarized_eval_200.jsonl")
    assert w["rm"].data.valid_comparisons == w["dpo"].data.valid_comparisons == w["evaluate"].data.valid  # one held-out set
    assert w["ppo"].sft_path == w["rm"].model.path == str(tmp_path / "uf" / "sft" / "final")  # the RM starts from the SFT model
