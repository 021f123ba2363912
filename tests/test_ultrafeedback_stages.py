"""Every stage on the UltraFeedback task (``data.task = ultrafeedback``) end to end on tiny models
built from a config and the real Argilla pairs: SFT, reward model (+ evaluate-rm), DPO, PPO, GRPO,
then ``evaluate`` with the reward model's held-out pair accuracy and win rates against the chosen
responses. Same run-folder conventions as TL;DR; no stage knows which task it trains on."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tldr_rlhf.config import (
    DPOConfig, PreferenceDataArgs as DPODataArgs, EvaluateConfig, EvaluateRMConfig, GRPOConfig, ModelArgs, OptimArgs, PPOConfig, RMConfig, PreferenceDataArgs as RMDataArgs, RunArgs, SFTConfig,
    TldrDataArgs,
)

from conftest import SHARED
from rl_fixtures import make_checkpoints, one_thread

ARGILLA = str(SHARED / "data" / "ultrafeedback" / "argilla_mean_rating_1k.jsonl")
UF = dict(task="ultrafeedback", max_query_length=128, max_response_length=96)
OPTIM = OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0)


def run_args(out, **kw):
    return RunArgs(**{"output_dir": str(out), "progress": False, "eval_every": 0, "save_every": 0, "num_threads": 1, **kw})


@pytest.fixture(scope="module")
def stages(qwen_tokenizer, tmp_path_factory):
    """Runs every stage once on the task; returns {stage: (run folder, final path)}."""
    from tldr_rlhf.train import dpo, grpo, ppo, rm, sft

    sft_in, rm_in = make_checkpoints(qwen_tokenizer)
    root = tmp_path_factory.mktemp("uf")
    out = {}
    with one_thread():
        out["sft"] = root / "sft", sft.train(SFTConfig(
            model=ModelArgs(path=sft_in, dtype="float32"), data=TldrDataArgs(train=ARGILLA, limit=8, valid_limit=4, **UF), optim=OPTIM,
            run=run_args(root / "sft", max_steps=2), micro_batch_size=2, gradient_accumulation_steps=2, num_sample_posts=1))
        out["rm"] = root / "rm", rm.train(RMConfig(
            model=ModelArgs(path=sft_in, dtype="float32"), data=RMDataArgs(comparisons=ARGILLA, limit=8, valid_limit=6, **UF), optim=OPTIM,
            run=run_args(root / "rm", max_steps=2), micro_batch_size=2, gradient_accumulation_steps=2, eval_batch_size=4))
        out["dpo"] = root / "dpo", dpo.train(DPOConfig(
            sft_path=out["sft"][1], dtype="float32", data=DPODataArgs(comparisons=ARGILLA, limit=8, valid_limit=4, **UF), optim=OPTIM,
            run=run_args(root / "dpo", max_steps=2), micro_batch_size=2, gradient_accumulation_steps=2, eval_batch_size=4, num_sample_posts=1,
            sample_max_new_tokens=3))
        rl = dict(sft_path=out["sft"][1], rm_path=rm_in, dtype="float32", data=TldrDataArgs(train=ARGILLA, limit=8, valid_fraction=0.1, **UF),
                  optim=OptimArgs(lr=1e-3, weight_decay=0.0, max_grad_norm=0.0), response_length=6, forward_batch_size=8, num_sample_posts=2)
        out["ppo"] = root / "ppo", ppo.train(PPOConfig(
            **rl, run=run_args(root / "ppo", eval_every=1), total_episodes=4, rollout_batch_size=4, num_mini_batches=1, micro_batch_size=4, ppo_epochs=1))
        out["grpo"] = root / "grpo", grpo.train(GRPOConfig(
            **rl, run=run_args(root / "grpo", eval_every=1), total_episodes=8, rollout_prompts=2, group_size=4, micro_batch_size=4, mini_batch_size=8))
    return out


def test_every_stage_trains_on_ultrafeedback_and_saves(stages):
    for name, (run, final) in stages.items():
        assert (run / "config.json").exists() and (run / "final" / "model.safetensors").exists(), name
        assert json.loads((run / "config.json").read_text())["data"]["task"] == "ultrafeedback", name
    report = json.loads((stages["rm"][0] / "data_report.json").read_text())
    assert report["train"]["n"] == 8 and report["valid"]["n"] == 6 and report["normalization"]["n"] > 0
    # PPO's sampled queries are the plain-template prompts (the Qwen2.5 base tokenizer has no chat template)
    samples = [json.loads(l) for l in (stages["ppo"][0] / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["query"].startswith("### Instruction:\n") and s["query"].endswith("### Response:\n") for s in samples)


def test_dpo_on_ultrafeedback_moves_the_policy(stages):
    before = load_file(f"{stages['sft'][1]}/model.safetensors")
    after = load_file(f"{stages['dpo'][1]}/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_evaluate_reports_rm_pair_accuracy_and_win_rate_against_chosen(stages, tmp_path):
    from tldr_rlhf.evaluate import evaluate
    from tldr_rlhf import evaluate_rm

    cfg = EvaluateConfig(
        policies=(f"sft={stages['sft'][1]}", f"dpo={stages['dpo'][1]}"), sft_path=stages["sft"][1], rm_path=stages["rm"][1],
        data=TldrDataArgs(train=ARGILLA, valid_limit=5, **UF), num_posts=3, response_length=4, batch_size=4, output_dir=str(tmp_path), num_threads=1,
    )
    with one_thread():
        res = evaluate(cfg)
        rm_res = evaluate_rm.evaluate(EvaluateRMConfig(model=stages["rm"][1], progress=False, batch_size=4, valid_limit=6))
    assert res["posts"]["task"] == "ultrafeedback" and res["posts"]["n"] == 3
    pairs = res["rm_heldout_pairs"]
    assert pairs["n"] == 5 and 0.0 <= pairs["accuracy"] <= 1.0
    for name in ("sft", "dpo"):
        m = res["policies"][name]
        assert 0.0 <= m["rm_win_rate"] <= 1.0 and "rm_score" in m and m["judge"]["n"] == 3
    assert res["policies"]["sft"]["kl_to_sft"] == 0.0
    record = json.loads((tmp_path / "summaries.jsonl").read_text().splitlines()[0])
    assert set(record) >= {"id", "prompt", "reference", "summaries"} and "post" not in record
    assert "held-out preference pairs" in (tmp_path / "eval_table.md").read_text()
    # evaluate-rm takes the run's own data settings: held-out UltraFeedback pairs, no TL;DR OOD sets
    assert rm_res["heldout"]["n"] == 6 and "cnndm" not in rm_res and "judge" not in rm_res
    assert rm_res["skipped"] == {"cnndm": "a TL;DR set; the task is ultrafeedback", "judge": "a TL;DR set; the task is ultrafeedback"}  # said, not silent
